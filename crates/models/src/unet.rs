//! U-Net velocity fields for images. Both take `x` as `(B, C, H, W)` or flattened `(B, C·H·W)`
//! (what the samplers, couplings and solvers pass around) and answer in the same shape.

use crate::classes::{ClassTable, Conditional};
use crate::mlp::time_embedding;
use crate::ops::activation::Activation;
use crate::ops::conv::Conv;
use crate::ops::conv_transpose::ConvTranspose;
use crate::ops::norm::GroupNormSilu;
use crate::Linear;
use crate::{ModelError, Params, VelocityField};
use candle_core::{Module, Result, Tensor};

/// Image geometry `(channels, side)` for a flattened dimension: square images, 1 or 3 channels.
pub fn image_shape(dim: usize) -> std::result::Result<(usize, usize), ModelError> {
    for c in [1usize, 3] {
        let side = ((dim / c) as f64).sqrt().round() as usize;
        if dim.is_multiple_of(c) && side * side * c == dim && side.is_multiple_of(4) {
            return Ok((c, side));
        }
    }
    Err(ModelError::Invalid(format!(
        "a U-Net needs square images whose side is a multiple of 4 (dim = C·S·S, C = 1 or 3), got dim {dim}"
    )))
}

fn as_image(x: &Tensor, c: usize, side: usize) -> Result<Tensor> {
    if x.rank() == 2 {
        x.reshape((x.dim(0)?, c, side, side))
    } else {
        Ok(x.clone())
    }
}

fn like_input(out: Tensor, x: &Tensor) -> Result<Tensor> {
    if x.rank() == 2 {
        out.flatten_from(1)
    } else {
        Ok(out)
    }
}

/// The time embedding `(B,)` → `(B, hidden)`: 64-dim sinusoids, `Linear(64, hidden)`, SiLU;
/// with a span input, `[emb(t), emb(h)]` and `Linear(128, hidden)`.
fn time_features(
    t: &Tensor,
    h: Option<&Tensor>,
    span: bool,
    lin: &Linear,
    act: Activation,
    b: usize,
) -> Result<Tensor> {
    let batch = |t: &Tensor| -> Result<Tensor> {
        let t = t.flatten_all()?;
        if t.dim(0)? == 1 && b > 1 {
            t.broadcast_as(b)?.contiguous()
        } else {
            Ok(t)
        }
    };
    let h = h.map(batch).transpose()?;
    act.apply(&lin.forward(&time_embedding(&batch(t)?, h.as_ref(), span, 64)?)?)
}

/// The lesson's `VelocityUNet`: two stride-2 conv encoders, two transposed-conv decoders with
/// skips, the time embedding added once after the first conv.
pub struct VelocityUNetLesson {
    time_mlp: Linear,
    enc1: Conv,
    enc2: Conv,
    enc3: Conv,
    dec3: ConvTranspose,
    dec2: ConvTranspose,
    dec1: Conv,
    act: Activation,
    channels: usize,
    side: usize,
    span: bool,
    /// `(K + 1, hidden)`: each label's row, added to the time embedding.
    class_emb: ClassTable,
}

impl VelocityUNetLesson {
    /// Builds it for flattened images of `dim` pixels with `hidden` base channels (and a span
    /// input with `span`).
    pub fn new(
        p: &mut Params,
        dim: usize,
        hidden: usize,
        span: bool,
    ) -> std::result::Result<Self, ModelError> {
        let (c, side) = image_shape(dim)?;
        let h = hidden;
        Ok(Self {
            time_mlp: p.linear("time_mlp.0", 64 * (1 + span as usize), h)?,
            enc1: p.conv("enc1", c, h, 3, 1, 1)?,
            enc2: p.conv("enc2", h, 2 * h, 3, 2, 1)?,
            enc3: p.conv("enc3", 2 * h, 2 * h, 3, 2, 1)?,
            dec3: p.conv_transpose("dec3", 2 * h, 2 * h, 4, 2, 1)?,
            dec2: p.conv_transpose("dec2", 4 * h, h, 4, 2, 1)?,
            dec1: p.conv("dec1", 2 * h, c, 3, 1, 1)?,
            act: Activation::Silu,
            channels: c,
            side,
            span,
            class_emb: ClassTable::default(),
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        t: &Tensor,
        h: Option<&Tensor>,
        y: Option<&Tensor>,
    ) -> Result<Tensor> {
        let xi = as_image(x, self.channels, self.side)?;
        let b = xi.dim(0)?;
        let mut temb = time_features(t, h, self.span, &self.time_mlp, self.act, b)?;
        if let Some(y) = y {
            temb = self.class_emb.join(&temb, y)?;
        }
        let temb = temb.unsqueeze(2)?.unsqueeze(3)?;
        let a = |t: Tensor| self.act.apply(&t);
        let h1 = a(self.enc1.forward(&xi)?)?.broadcast_add(&temb)?;
        let h2 = a(self.enc2.forward(&h1)?)?;
        let h3 = a(self.enc3.forward(&h2)?)?;
        let d3 = a(self.dec3.forward(&h3)?)?;
        let d2 = a(self.dec2.forward(&Tensor::cat(&[&d3, &h2], 1)?)?)?;
        let d1 = self.dec1.forward(&Tensor::cat(&[&d2, &h1], 1)?)?;
        like_input(d1, x)
    }
}

/// Both U-Nets are fields through their `forward(x, t, h)`; their JVP is the trait's
/// central differences.
macro_rules! unet_field {
    ($($ty:ty),*) => {$(
        impl VelocityField for $ty {
            fn velocity(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
                self.forward(x, t, None, None)
            }
            fn mean_velocity(&self, x: &Tensor, t: &Tensor, h: &Tensor) -> Result<Tensor> {
                self.forward(x, t, Some(h), None)
            }
            fn mean_velocity_at(&self, x: &Tensor, t: f64, h: f64) -> Result<Tensor> {
                let full =
                    |v: f64| Tensor::full(v as f32, x.dim(0)?, x.device())?.to_dtype(x.dtype());
                self.forward(x, &full(t)?, Some(&full(h)?), None)
            }
            fn classes(&self) -> usize {
                self.class_emb.classes()
            }
            fn labeled_velocity(
                &self,
                x: &Tensor,
                t: &Tensor,
                h: Option<&Tensor>,
                y: &Tensor,
            ) -> Result<Tensor> {
                self.forward(x, t, h, Some(y))
            }
        }
    )*};
}
unet_field!(VelocityUNetLesson, VelocityUNet);

/// A residual block: GroupNorm → SiLU → conv, plus the time embedding projected to the
/// block's channels, GroupNorm → SiLU → conv, and a 1×1 skip when channels change.
struct ResBlock {
    norm1: GroupNormSilu,
    conv1: Conv,
    time: Linear,
    norm2: GroupNormSilu,
    conv2: Conv,
    skip: Option<Conv>,
}

impl ResBlock {
    fn new(
        p: &mut Params,
        name: &str,
        c_in: usize,
        c_out: usize,
        t_dim: usize,
        groups: usize,
    ) -> std::result::Result<Self, ModelError> {
        Ok(Self {
            norm1: p.group_norm_silu(&format!("{name}.norm1"), groups, c_in)?,
            conv1: p.conv(&format!("{name}.conv1"), c_in, c_out, 3, 1, 1)?,
            time: p.linear(&format!("{name}.time"), t_dim, c_out)?,
            norm2: p.group_norm_silu(&format!("{name}.norm2"), groups, c_out)?,
            conv2: p.conv(&format!("{name}.conv2"), c_out, c_out, 3, 1, 1)?,
            skip: if c_in != c_out {
                Some(p.conv(&format!("{name}.skip"), c_in, c_out, 1, 1, 0)?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let shift = self.time.forward(temb)?;
        let h = self
            .conv1
            .forward_shifted(&self.norm1.forward(x)?, Some(&shift))?;
        let h = self.conv2.forward(&self.norm2.forward(&h)?)?;
        match &self.skip {
            Some(s) => s.forward(x)? + h,
            None => x + h,
        }
    }
}

/// Self-attention over the pixels of a feature map `(B, C, S, S)`: `x + proj(attn)`, the
/// tokens layer-normalised (no affine: the projections absorb it) before one `qkv` layer,
/// `C / 32` heads (at least one), softmax(q·kᵀ/√d)·v. At the U-Net's lowest resolution
/// (7 × 7 on MNIST) it joins every pixel to every other for little compute.
struct Attention {
    qkv: Linear,
    proj: Linear,
    heads: usize,
}

impl Attention {
    fn new(p: &mut Params, name: &str, c: usize) -> std::result::Result<Self, ModelError> {
        Ok(Self {
            qkv: p.linear(&format!("{name}.qkv"), c, 3 * c)?,
            proj: p.linear(&format!("{name}.proj"), c, c)?,
            heads: (c / 32).max(1),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, s1, s2) = x.dims4()?;
        let (n, heads) = (s1 * s2, self.heads);
        let d = c / heads;
        let tokens = x.flatten_from(2)?.transpose(1, 2)?.reshape((b * n, c))?;
        let centred = tokens.broadcast_sub(&tokens.mean_keepdim(1)?)?;
        let spread = (centred.sqr()?.mean_keepdim(1)? + 1e-5)?.sqrt()?;
        let qkv = self
            .qkv
            .forward(&centred.broadcast_div(&spread)?)?
            .reshape((b, n, 3, heads, d))?
            .permute((2, 0, 3, 1, 4))?;
        let part = |i: usize| qkv.get(i)?.contiguous();
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let att = (q.matmul(&k.t()?.contiguous()?)? * (1.0 / (d as f64).sqrt()))?;
        let att = candle_nn::ops::softmax(&att, candle_core::D::Minus1)?;
        let out = att.matmul(&v)?.permute((0, 2, 1, 3))?.reshape((b * n, c))?;
        let out = self
            .proj
            .forward(&out)?
            .reshape((b, n, c))?
            .transpose(1, 2)?
            .reshape((b, c, s1, s2))?;
        x + out
    }
}

/// flowmatch's default image field: residual blocks with GroupNorm at three resolutions
/// (S, S/2, S/4), the time embedding injected into every block, skips across the U;
/// stride-2 convs down, nearest ×2 + conv up (computed at the low resolution,
/// [`Conv::forward_upsampled`]); every conv is unfold + matmul ([`Conv`]).
pub struct VelocityUNet {
    time1: Linear,
    time2: Linear,
    conv_in: Conv,
    enc1: ResBlock,
    down1: Conv,
    enc2: ResBlock,
    down2: Conv,
    mid: ResBlock,
    mid_attn: Option<Attention>,
    up2: Conv,
    dec2: ResBlock,
    up1: Conv,
    dec1: ResBlock,
    norm_out: GroupNormSilu,
    conv_out: Conv,
    act: Activation,
    channels: usize,
    side: usize,
    span: bool,
    /// `(K + 1, 4·hidden)`: each label's row, added to the time embedding.
    class_emb: ClassTable,
}

impl VelocityUNet {
    /// Builds it with `hidden` base channels (a multiple of 8: GroupNorm uses 8 groups) times
    /// `mults` at the three resolutions (`[1, 2, 2]`: hidden, 2·hidden, 2·hidden), and a span
    /// input with `span`; with `attention`, self-attention after the lowest block.
    pub fn new(
        p: &mut Params,
        dim: usize,
        hidden: usize,
        mults: [usize; 3],
        attention: bool,
        span: bool,
    ) -> std::result::Result<Self, ModelError> {
        let (c, side) = image_shape(dim)?;
        if !hidden.is_multiple_of(8) {
            return Err(ModelError::Invalid(format!(
                "unet hidden channels must be a multiple of 8 (GroupNorm groups), got {hidden}"
            )));
        }
        let (g, td) = (8, 4 * hidden);
        let [c1, c2, c3] = mults.map(|m| m * hidden);
        Ok(Self {
            time1: p.linear("time.0", 64 * (1 + span as usize), td)?,
            time2: p.linear("time.2", td, td)?,
            conv_in: p.conv("conv_in", c, c1, 3, 1, 1)?,
            enc1: ResBlock::new(p, "enc1", c1, c1, td, g)?,
            down1: p.conv("down1", c1, c2, 3, 2, 1)?,
            enc2: ResBlock::new(p, "enc2", c2, c2, td, g)?,
            down2: p.conv("down2", c2, c3, 3, 2, 1)?,
            mid: ResBlock::new(p, "mid", c3, c3, td, g)?,
            mid_attn: if attention {
                Some(Attention::new(p, "mid.attn", c3)?)
            } else {
                None
            },
            up2: p.conv("up2", c3, c2, 3, 1, 1)?,
            dec2: ResBlock::new(p, "dec2", 2 * c2, c2, td, g)?,
            up1: p.conv("up1", c2, c1, 3, 1, 1)?,
            dec1: ResBlock::new(p, "dec1", 2 * c1, c1, td, g)?,
            norm_out: p.group_norm_silu("norm_out", g, c1)?,
            conv_out: p.conv("conv_out", c1, c, 3, 1, 1)?,
            act: Activation::Silu,
            channels: c,
            side,
            span,
            class_emb: ClassTable::default(),
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        t: &Tensor,
        h: Option<&Tensor>,
        y: Option<&Tensor>,
    ) -> Result<Tensor> {
        let xi = as_image(x, self.channels, self.side)?;
        let b = xi.dim(0)?;
        let temb = time_features(t, h, self.span, &self.time1, self.act, b)?;
        let mut temb = self.time2.forward(&temb)?;
        if let Some(y) = y {
            temb = self.class_emb.join(&temb, y)?;
        }
        let h0 = self.conv_in.forward(&xi)?;
        let h1 = self.enc1.forward(&h0, &temb)?;
        let h2 = self.enc2.forward(&self.down1.forward(&h1)?, &temb)?;
        let mut m = self.mid.forward(&self.down2.forward(&h2)?, &temb)?;
        if let Some(attn) = &self.mid_attn {
            m = attn.forward(&m)?;
        }
        let d2 = self.dec2.forward(
            &Tensor::cat(&[&self.up2.forward_upsampled(&m)?, &h2], 1)?,
            &temb,
        )?;
        let d1 = self.dec1.forward(
            &Tensor::cat(&[&self.up1.forward_upsampled(&d2)?, &h1], 1)?,
            &temb,
        )?;
        let out = self.conv_out.forward(&self.norm_out.forward(&d1)?)?;
        like_input(out, x)
    }
}

impl Conditional for VelocityUNetLesson {
    fn class_width(&self) -> usize {
        self.time_mlp.weight().dims()[0]
    }
    fn class_table(&mut self) -> &mut ClassTable {
        &mut self.class_emb
    }
}

impl Conditional for VelocityUNet {
    fn class_width(&self) -> usize {
        self.time2.weight().dims()[0]
    }
    fn class_table(&mut self) -> &mut ClassTable {
        &mut self.class_emb
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn image_shapes_are_recognised_or_refused() {
        assert_eq!(image_shape(784).unwrap(), (1, 28));
        assert_eq!(image_shape(3 * 32 * 32).unwrap(), (3, 32));
        assert!(image_shape(2).is_err());
        assert!(image_shape(100)
            .unwrap_err()
            .to_string()
            .contains("multiple of 4"));
    }

    /// A U-Net for 8×8 images with 8 base channels.
    fn tiny_unet(p: &mut Params, lesson: bool, span: bool) -> Box<dyn VelocityField> {
        if lesson {
            Box::new(VelocityUNetLesson::new(p, 64, 8, span).unwrap())
        } else {
            Box::new(VelocityUNet::new(p, 64, 8, [1, 2, 2], true, span).unwrap())
        }
    }

    #[test]
    fn both_unets_keep_the_input_shape_and_learn_a_constant_field() {
        for lesson in [true, false] {
            let mut p = Params::new(1, &Device::Cpu);
            let net = tiny_unet(&mut p, lesson, false);
            let x = Tensor::randn(0f32, 1.0, (4, 64), &Device::Cpu).unwrap();
            let t = Tensor::new(&[0.0f32, 0.3, 0.6, 1.0], &Device::Cpu).unwrap();
            assert_eq!(net.velocity(&x, &t).unwrap().dims(), &[4, 64]);
            let xi = x.reshape((4, 1, 8, 8)).unwrap();
            assert_eq!(net.velocity(&xi, &t).unwrap().dims(), &[4, 1, 8, 8]);
            // A few AdamW steps towards v = 0.5 everywhere must lower the loss: gradients flow
            // through every conv, transposed conv and GroupNorm.
            let vars: Vec<Var> = p.vars();
            let mut opt = candle_nn::AdamW::new(
                vars,
                candle_nn::ParamsAdamW {
                    lr: 1e-2,
                    ..Default::default()
                },
            )
            .unwrap();
            use candle_nn::Optimizer;
            let loss = |n: &dyn VelocityField| {
                (n.velocity(&x, &t).unwrap() - 0.5)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .mean_all()
                    .unwrap()
            };
            let first = loss(net.as_ref()).to_scalar::<f32>().unwrap();
            for _ in 0..30 {
                opt.backward_step(&loss(net.as_ref())).unwrap();
            }
            let last = loss(net.as_ref()).to_scalar::<f32>().unwrap();
            assert!(last < 0.2 * first, "lesson={lesson}: {first} -> {last}");
        }
    }

    #[test]
    fn channel_multipliers_and_attention_add_the_expected_parameters() {
        let count = |mults: [usize; 3], attention: bool| {
            let mut p = Params::new(0, &Device::Cpu);
            VelocityUNet::new(&mut p, 64, 8, mults, attention, false).unwrap();
            p.count()
        };
        // Self-attention on c channels: qkv c·3c + 3c, proj c·c + c.
        let attn = |c: usize| 3 * c * c + 3 * c + c * c + c;
        assert_eq!(count([1, 2, 2], true) - count([1, 2, 2], false), attn(16));
        assert_eq!(count([1, 2, 4], true) - count([1, 2, 4], false), attn(32));
        // The lowest level widens from 16 to 32 channels: every weight there grows.
        assert!(count([1, 2, 4], false) > count([1, 2, 2], false) + 2 * 9 * 16 * 16);
        let mut p = Params::new(0, &Device::Cpu);
        let net = VelocityUNet::new(&mut p, 64, 8, [2, 2, 4], true, false).unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, 64), &Device::Cpu).unwrap();
        let t = Tensor::new(&[0.1f32, 0.5, 0.9], &Device::Cpu).unwrap();
        assert_eq!(net.velocity(&x, &t).unwrap().dims(), &[3, 64]);
    }

    #[test]
    fn span_unets_read_the_span_and_their_jvp_matches_a_finer_difference() {
        for lesson in [true, false] {
            let mut p = Params::new(2, &Device::Cpu);
            let net = tiny_unet(&mut p, lesson, true);
            let x = Tensor::randn(0f32, 1.0, (3, 64), &Device::Cpu).unwrap();
            let dx = Tensor::randn(0f32, 1.0, (3, 64), &Device::Cpu).unwrap();
            let t = Tensor::new(&[0.1f32, 0.5, 0.7], &Device::Cpu).unwrap();
            let h = Tensor::new(&[0.5f32, 0.25, 0.0], &Device::Cpu).unwrap();
            let zero = t.zeros_like().unwrap();
            let v = net.velocity(&x, &t).unwrap();
            let u0 = net.mean_velocity(&x, &t, &zero).unwrap();
            assert!(crate::max_abs_diff(&u0, &v) < 1e-6, "lesson={lesson}");
            let u = net.mean_velocity(&x, &t, &h).unwrap();
            assert!(
                crate::max_abs_diff(&u, &v) > 1e-4,
                "lesson={lesson}: span ignored"
            );
            // The trait's central differences (ε = 4e-3) against a difference with a step 4×
            // smaller: both carry f32 rounding of order 2⁻²³·|u|/ε, hence a loose bound.
            let (_, jvp) = net.mean_velocity_jvp(&x, &t, &h, (&dx, 1.0, -1.0)).unwrap();
            let eps = 1e-3;
            let at = |s: f64| {
                net.mean_velocity(
                    &(&x + dx.affine(s * eps, 0.0).unwrap()).unwrap(),
                    &t.affine(1.0, s * eps).unwrap(),
                    &h.affine(1.0, -s * eps).unwrap(),
                )
                .unwrap()
            };
            let fine = ((at(1.0) - at(-1.0)).unwrap() / (2.0 * eps)).unwrap();
            let scale = crate::max_abs(&jvp).max(1e-3);
            let err = crate::max_abs_diff(&jvp, &fine) / scale;
            assert!(
                err < 2e-2,
                "lesson={lesson}: JVP {err} off a finer difference"
            );
        }
    }
}
