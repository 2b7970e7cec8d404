//! Convolutions written as unfold (im2col) + matmul.
//!
//! candle's CPU `conv2d` backward goes through `conv_transpose2d` (a direct loop) and a conv
//! whose kernel is the whole feature map; both are far slower than the forward. Unfolding
//! keeps forward and backward as matmuls. On CPU the whole conv is one custom op: per sample,
//! unfold into a reused buffer and one gemm, samples in parallel, and a backward that
//! re-unfolds (dW) and folds back (col2im, dx). Other devices build the batch's patches from
//! `pad` / `narrow` / `stack` and one batched matmul.

use super::conv_padded::{self as padded, Scratch};
use super::conv_pointwise;
use super::conv_subpixel::SubPixel;
use super::cpu::{f32_slice, matmul, row_sums, unpack_grads, zeroed, CHUNK};
use super::geometry::Geometry;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// A `k×k` convolution with stride 1 or 2 and zero padding; weights in PyTorch's
/// `(out, in, k, k)` layout.
/// (`Conv::forward_upsampled` lives in `upconv.rs`.)
#[derive(Clone)]
pub struct Conv {
    pub(super) weight: Tensor,
    pub(super) bias: Tensor,
    pub(super) k: usize,
    pub(super) stride: usize,
    pub(super) pad: usize,
}

impl Conv {
    /// Wraps PyTorch-layout weights `(out, in, k, k)` and bias `(out,)`.
    pub fn new(weight: Tensor, bias: Tensor, stride: usize, pad: usize) -> Result<Self> {
        let k = weight.dim(2)?;
        Ok(Self {
            weight,
            bias,
            k,
            stride,
            pad,
        })
    }

    /// `(B, C, H, W)` → `(B, O, H', W')`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_shifted(x, None)
    }

    /// The conv plus a per-sample shift `(B, O)` of each output channel (a U-Net block's
    /// time embedding), in the same pass: on CPU the shift joins the bias inside the op, so
    /// neither the broadcast add nor its backward's reduction runs over the feature map.
    pub fn forward_shifted(&self, x: &Tensor, shift: Option<&Tensor>) -> Result<Tensor> {
        let bias = match shift {
            Some(s) => s.broadcast_add(&self.bias.unsqueeze(0)?)?,
            None => self.bias.clone(),
        };
        if matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 {
            self.forward_cpu(x, &bias)
        } else {
            self.forward_ops(x, &bias)
        }
    }

    /// `bias` is `(O,)` or per sample `(B, O)`.
    fn forward_cpu(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        if self.weight.dim(1)? != c {
            candle_core::bail!(
                "conv: {} input channels, the weight expects {}",
                c,
                self.weight.dim(1)?
            );
        }
        let geo = Geometry {
            c,
            h,
            w,
            k: self.k,
            stride: self.stride,
            pad: self.pad,
        };
        if h + 2 * self.pad < self.k || w + 2 * self.pad < self.k {
            candle_core::bail!(
                "conv: a {h}×{w} input is smaller than the {}×{} kernel",
                self.k,
                self.k
            );
        }
        x.contiguous()?
            .apply_op3(&self.weight.contiguous()?, &bias.contiguous()?, ConvOp(geo))
    }

    fn forward_ops(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let (o, k, s, p) = (self.weight.dim(0)?, self.k, self.stride, self.pad);
        let ho = (h + 2 * p - k) / s + 1;
        let wo = (w + 2 * p - k) / s + 1;
        let wm = self.weight.reshape((o, c * k * k))?;
        let cols = if k == 1 && s == 1 && p == 0 {
            x.reshape((b, c, h * w))?
        } else {
            let xp = if p > 0 {
                x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?
            } else {
                x.clone()
            };
            let (hp, wp) = (h + 2 * p, w + 2 * p);
            let mut patches = Vec::with_capacity(k * k);
            for di in 0..k {
                for dj in 0..k {
                    let patch = if s == 1 {
                        xp.narrow(2, di, ho)?.narrow(3, dj, wo)?
                    } else {
                        // Every s-th row and column: take s·ho rows (padding the end if the
                        // map is short) and keep index 0 of each group of s.
                        let mut q = xp.narrow(2, di, (s * ho).min(hp - di))?.narrow(
                            3,
                            dj,
                            (s * wo).min(wp - dj),
                        )?;
                        let (qh, qw) = (q.dim(2)?, q.dim(3)?);
                        if qh < s * ho {
                            q = q.pad_with_zeros(2, 0, s * ho - qh)?;
                        }
                        if qw < s * wo {
                            q = q.pad_with_zeros(3, 0, s * wo - qw)?;
                        }
                        q.reshape((b, c, ho, s, wo, s))?
                            .narrow(3, 0, 1)?
                            .narrow(5, 0, 1)?
                            .reshape((b, c, ho, wo))?
                    };
                    patches.push(patch);
                }
            }
            Tensor::stack(&patches, 2)?.reshape((b, c * k * k, ho * wo))?
        };
        let y = wm.broadcast_matmul(&cols)?;
        let bias = if bias.rank() == 2 {
            bias.unsqueeze(2)?
        } else {
            bias.reshape((1, o, 1))?
        };
        y.broadcast_add(&bias)?.reshape((b, o, ho, wo))
    }
}

/// Whether a conv op's bias of `n` values is per sample (`B·O`) rather than shared (`O`).
fn bias_per_sample(n: usize, b: usize, o: usize, op: &str) -> Result<bool> {
    if n == o {
        Ok(false)
    } else if n == b * o {
        Ok(true)
    } else {
        candle_core::bail!("{op}: a bias of {n} values for {b} samples of {o} channels")
    }
}

/// How a conv runs on the CPU, per sample.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    /// 1×1, stride 1, unpadded: with AVX2 the direct kernels on the input as it is
    /// (`conv_pointwise`), else one gemm (the input is its own unfolding).
    Pointwise,
    /// Stride 1, at most [`padded::MAX_DIRECT_OUT`] output channels: tap by tap.
    Direct,
    /// Stride 1, on the padded layout (`conv_padded`): with AVX2, Winograd F(2×2, 3×3) for
    /// 3×3 pad 1 on even sides (`conv_winograd`: forward, data gradient, and the weight
    /// gradient from 8 input channels) and the direct
    /// kernels (`conv_direct`) for the rest; else unfolded (long copies) and one gemm.
    Padded,
    /// Stride 2 with AVX2: the direct kernel on the input's 2×2 phases (forward), the weight
    /// gradient there with the output channels in the lanes (`conv_wgrad`), and the data
    /// gradient as four sub-pixel convs of dy (`conv_subpixel`).
    Phases,
    /// Stride 2 and more: unfolded by runs of taps, one gemm, folded back by col2im.
    Strided,
}

impl Path {
    /// Whether the conv runs on the direct kernels (the padded layout, the phases, or a 1×1
    /// conv's input as it is), else by gemm.
    fn direct(self) -> bool {
        match self {
            Self::Direct | Self::Padded | Self::Phases => true,
            Self::Pointwise => conv_pointwise::available(),
            Self::Strided => false,
        }
    }

    fn of(g: &Geometry, o: usize) -> Self {
        if g.is_pointwise() {
            Self::Pointwise
        } else if padded::direct_fits(g, o) {
            Self::Direct
        } else if padded::fits(g) {
            Self::Padded
        } else if padded::phases_fit(g) {
            Self::Phases
        } else {
            Self::Strided
        }
    }
}

/// The forward on the padded layout (`Direct`, `Padded`) or the input's phases (`Phases`):
/// each output value is written once, as the bias plus the conv, with no zero fill and no
/// bias pass before it.
fn padded_forward(
    g: &Geometry,
    (b, o): (usize, usize),
    path: Path,
    (xs, ws): (&[f32], &[f32]),
    (bias, per_sample): (&[f32], bool),
) -> Vec<f32> {
    let (n_in, n_out) = (g.c * g.h * g.w, o * g.cols());
    let taps = path == Path::Direct;
    let wp = match path {
        Path::Direct | Path::Pointwise => padded::pack_direct(g, o, ws),
        _ => padded::pack(g, o, ws),
    };
    let mut out = Vec::with_capacity(b * n_out);
    out.spare_capacity_mut()[..b * n_out]
        .par_chunks_mut(n_out)
        .zip(xs.par_chunks(n_in))
        .enumerate()
        .for_each_init(Scratch::default, |scratch, (i, (yb, xb))| {
            let bias = if per_sample {
                &bias[i * o..(i + 1) * o]
            } else {
                &bias[..o]
            };
            if path == Path::Phases {
                padded::forward_phases(g, o, (xb, &wp), bias, yb, scratch);
            } else if path == Path::Pointwise {
                padded::forward_pointwise(g, o, ((xs, i), &wp), bias, yb, scratch);
            } else {
                padded::forward(g, o, taps, (xb, ws, &wp), bias, yb, scratch);
            }
        });
    // SAFETY: `padded::forward` writes every value of its sample's `O × H' × W'` chunk, and
    // the chunks cover the `b · n_out` values.
    unsafe { out.set_len(b * n_out) };
    out
}

/// The whole CPU convolution `(x, W, b) → y` as one custom op: per sample, unfold into a
/// reused buffer and one gemm; samples in parallel (rayon). Memory: one unfolded sample per
/// thread, instead of the batch's (58 MB for 64 × 32 × 28 × 28).
struct ConvOp(Geometry);

impl ConvOp {
    fn shapes<'a>(
        &self,
        x: (&'a CpuStorage, &Layout),
        w: (&'a CpuStorage, &Layout),
        op: &str,
    ) -> Result<(usize, usize, &'a [f32], &'a [f32])> {
        let g = self.0;
        let xs = f32_slice(x.0, x.1, op)?;
        let ws = f32_slice(w.0, w.1, op)?;
        let n_in = g.c * g.h * g.w;
        if n_in == 0 || xs.len() % n_in != 0 || ws.len() % g.rows() != 0 {
            candle_core::bail!("{op}: input or weight does not fit the conv geometry");
        }
        Ok((xs.len() / n_in, ws.len() / g.rows(), xs, ws))
    }
}

impl CustomOp3 for ConvOp {
    fn name(&self) -> &'static str {
        "conv2d-im2col"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let (b, o, xs, ws) = self.shapes((s1, l1), (s2, l2), self.name())?;
        let bias = f32_slice(s3, l3, self.name())?;
        let per_sample = bias_per_sample(bias.len(), b, o, self.name())?;
        let (n_in, l, (ho, wo)) = (g.c * g.h * g.w, g.cols(), g.out_hw());
        let path = Path::of(&g, o);
        if path.direct() {
            let out = padded_forward(&g, (b, o), path, (xs, ws), (bias, per_sample));
            return Ok((CpuStorage::F32(out), Shape::from((b, o, ho, wo))));
        }
        // Each sample's rows are filled with the bias, then the product is added: no zero
        // fill before.
        let mut out = Vec::with_capacity(b * o * l);
        out.spare_capacity_mut()[..b * o * l]
            .par_chunks_mut(o * l)
            .zip(xs.par_chunks(n_in))
            .enumerate()
            .for_each_init(
                || {
                    vec![
                        0f32;
                        if path == Path::Strided {
                            g.rows() * l
                        } else {
                            0
                        }
                    ]
                },
                |cols, (i, (yb, xb))| {
                    let bias = if per_sample {
                        &bias[i * o..(i + 1) * o]
                    } else {
                        bias
                    };
                    for (row, &bv) in yb.chunks_exact_mut(l).zip(bias) {
                        row.fill(MaybeUninit::new(bv));
                    }
                    // SAFETY: every value was just written.
                    let yb = unsafe { &mut *(yb as *mut [MaybeUninit<f32>] as *mut [f32]) };
                    let cols: &[f32] = if path == Path::Pointwise {
                        xb
                    } else {
                        g.im2col(xb, cols);
                        cols
                    };
                    matmul(
                        (o, l, g.rows()),
                        yb,
                        true,
                        ws,
                        (g.rows(), 1),
                        cols,
                        (l, 1),
                        1,
                    );
                },
            );
        // SAFETY: the chunks cover the `b · o · l` values, each filled with its bias above.
        unsafe { out.set_len(b * o * l) };
        Ok((CpuStorage::F32(out), Shape::from((b, o, ho, wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // One op computes dx, dW and db, packed end to end in a flat tensor; dx only when
        // the input needs it (not for a network's input).
        let want_dx = x.track_op();
        let op = ConvGrad {
            geo: self.0,
            want_dx,
            per_sample_bias: bias.rank() == 2,
        };
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &op)?;
        if want_dx {
            return unpack_grads(&packed, [x, w, bias]);
        }
        let nw = w.elem_count();
        let dw = packed.narrow(0, 0, nw)?.reshape(w.shape())?;
        let db = packed
            .narrow(0, nw, bias.elem_count())?
            .reshape(bias.shape())?;
        Ok((None, Some(dw), Some(db)))
    }
}

/// Backward of [`ConvOp`]: inputs x, W, dy; output `[dx; dW; db]` flattened (`[dW; db]`
/// without dx; db per sample with a per-sample bias).
struct ConvGrad {
    geo: Geometry,
    want_dx: bool,
    per_sample_bias: bool,
}

impl CustomOp3 for ConvGrad {
    fn name(&self) -> &'static str {
        "conv2d-im2col-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geo;
        let (b, o, xs, ws) = ConvOp(g).shapes((s1, l1), (s2, l2), self.name())?;
        let dy = f32_slice(s3, l3, self.name())?;
        let (n_in, l, k) = (g.c * g.h * g.w, g.cols(), g.rows());
        if dy.len() != b * o * l {
            candle_core::bail!("{}: gradient shape mismatch", self.name());
        }
        let want_dx = self.want_dx;
        let n_dx = if want_dx { b * n_in } else { 0 };
        // The bias gradient: one row of o, or one per sample (written by its chunk).
        let n_db = if self.per_sample_bias { b * o } else { o };
        let path = Path::of(&g, o);
        // dx starts uninitialised: the padded backward writes each value once, and the other
        // paths, which add onto it, zero each sample's part first.
        let mut out = Vec::with_capacity(n_dx + o * k + n_db);
        // Each chunk of samples writes its own slice of dx, when there is one.
        let dx: Vec<Option<&mut [MaybeUninit<f32>]>> = if want_dx {
            out.spare_capacity_mut()[..n_dx]
                .chunks_mut(CHUNK * n_in)
                .map(Some)
                .collect()
        } else {
            (0..b.div_ceil(CHUNK)).map(|_| None).collect()
        };
        // Stride 2 on the phases: dx as four sub-pixel convs of dy (planned once here), dW on
        // the input's phases. The rest by gemm on the unfolded sample, dx folded back by col2im.
        let sub = (path == Path::Phases && want_dx).then(|| SubPixel::new(&g, o, ws));
        let unfolded = path == Path::Strided;
        let folded = unfolded && want_dx;
        let wt = match path {
            Path::Padded if want_dx => padded::flip_transpose(&g, o, false, ws),
            _ => vec![],
        };
        let pointwise = path == Path::Pointwise && path.direct();
        let wtp = match path {
            // A 1×1 conv's `Wᵀ` is the taps' unflipped transpose of one tap.
            Path::Direct | Path::Pointwise if want_dx => padded::pack_taps_transposed(&g, o, ws),
            _ => padded::pack_transposed(&g, o, &wt),
        };
        let weights = padded::Weights {
            w: ws,
            wt: &wt,
            wtp: &wtp,
        };
        // Per chunk of samples: dx (its own slice), and partial dW and db (db per sample with a
        // per-sample bias).
        let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
            .into_par_iter()
            .zip(xs.par_chunks(CHUNK * n_in))
            .zip(dy.par_chunks(CHUNK * o * l))
            .enumerate()
            // A worker's buffers serve each chunk it takes (one geometry: the padding never
            // written stays zero).
            .map_init(
                Scratch::default,
                |scratch, (chunk, ((mut dxc, xc), dyc))| {
                    let mut dw = vec![0f32; o * k];
                    let n = xc.len() / n_in;
                    let mut dbc = vec![0f32; if self.per_sample_bias { n * o } else { o }];
                    let mut cols = vec![0f32; if unfolded { k * l } else { 0 }];
                    let mut dcols = vec![0f32; if folded { k * l } else { 0 }];
                    let mut sums = vec![0f32; o];
                    for (i, (xb, dyb)) in xc
                        .chunks_exact(n_in)
                        .zip(dyc.chunks_exact(o * l))
                        .enumerate()
                    {
                        let dxb = dxc.as_deref_mut().map(|d| &mut d[i * n_in..(i + 1) * n_in]);
                        let (dw, db) = if self.per_sample_bias {
                            (&mut dw[..], &mut dbc[i * o..(i + 1) * o])
                        } else {
                            (&mut dw[..], &mut dbc[..])
                        };
                        if matches!(path, Path::Direct | Path::Padded) {
                            let (taps, s) = (path == Path::Direct, &mut *scratch);
                            padded::backward(&g, o, taps, (xb, &weights, dyb), (dxb, dw, db), s);
                            continue;
                        }
                        if pointwise {
                            let at = ((xs, dy, chunk * CHUNK + i), &wtp[..]);
                            padded::backward_pointwise(&g, o, at, (dxb, db), scratch);
                            continue;
                        }
                        if path == Path::Phases {
                            if let (Some(sub), Some(dxb)) = (&sub, dxb) {
                                padded::data_grad_sub_pixel(sub, dyb, dxb, scratch);
                            }
                            padded::weight_grad_phases(&g, o, (xb, dyb), db, scratch);
                            continue;
                        }
                        let dxb = dxb.map(zeroed);
                        let colsb: &[f32] = if path == Path::Pointwise {
                            xb
                        } else {
                            g.im2col(xb, &mut cols);
                            &cols
                        };
                        // dW += dY (o×l) · colsᵀ (l×k); db += row sums of dY.
                        matmul((o, k, l), dw, true, dyb, (l, 1), colsb, (1, l), 1);
                        row_sums(dyb, (o, l, l), &mut sums);
                        db.iter_mut().zip(&sums).for_each(|(d, v)| *d += v);
                        // dcols = Wᵀ (k×o) · dY (o×l), folded back onto the pixels.
                        let Some(dxb) = dxb else { continue };
                        if path == Path::Pointwise {
                            matmul((k, l, o), dxb, false, ws, (1, k), dyb, (l, 1), 1);
                        } else {
                            matmul((k, l, o), &mut dcols, false, ws, (1, k), dyb, (l, 1), 1);
                            g.col2im(&dcols, dxb);
                        }
                    }
                    padded::finish_backward(&g, o, &mut dw, scratch);
                    (dw, dbc)
                },
            )
            .collect();
        // SAFETY: every chunk of dx is written (above); dW and db follow as zeros.
        unsafe { out.set_len(n_dx) };
        out.resize(n_dx + o * k + n_db, 0.0);
        let (dw_out, db_out) = out[n_dx..].split_at_mut(o * k);
        let mut at = 0;
        for (pw, pb) in &partials {
            dw_out.iter_mut().zip(pw).for_each(|(t, v)| *t += v);
            if self.per_sample_bias {
                db_out[at..at + pb.len()].copy_from_slice(pb);
                at += pb.len();
            } else {
                db_out.iter_mut().zip(pb).for_each(|(t, v)| *t += v);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(n_dx + o * k + n_db)))
    }
}

/// Nearest-neighbour ×2 upsampling `(B, C, H, W)` → `(B, C, 2H, 2W)` (backward: a sum).
pub fn upsample2(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .contiguous()?
        .reshape((b, c, 2 * h, 2 * w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module, Var};

    #[test]
    fn matches_candle_conv2d_forward_and_gradients() {
        let dev = Device::Cpu;
        // At stride 1, output channels 1 and 4 run tap by tap and 6 by a gemm on the padded layout
        // (conv_padded), whose data gradient is a conv of dy padded by k − 1 − pad (2 when
        // unpadded; a padding over k − 1 falls back to folding); at stride 2, on the input's
        // phases (the weight gradient too from 28×28, odd sizes, k 4 and no padding included)
        // or by runs of taps without AVX2.
        let cases = [
            (3, 1, 1, 8),
            (3, 1, 0, 8),
            (3, 1, 3, 3),
            (3, 2, 1, 8),
            (3, 2, 1, 7),
            (3, 2, 1, 28),
            (4, 2, 1, 27),
            (3, 2, 0, 25),
            (2, 2, 0, 6),
            (1, 1, 0, 5),
            (5, 1, 2, 9),
        ];
        // 20 outputs: the stride-2 weight gradient with the channels in the lanes. Then the
        // U-Nets' own stride-2 convs: the lesson's 32 → 64 on 28×28 and 64 → 64 on 14×14, the
        // unet's 16 → 16 and 32 → 32, some at batch 1.
        let mut all: Vec<_> = cases
            .into_iter()
            .flat_map(|c| [1, 4, 6, 20].map(|o| (6, c, 3, o)))
            .collect();
        all.extend(
            [
                (6, 28, 32, 64),
                (1, 28, 32, 64),
                (6, 14, 64, 64),
                (6, 28, 16, 16),
                (1, 14, 32, 32),
            ]
            .map(|(b, hw, c, o)| (b, (3, 2, 1, hw), c, o)),
        );
        // The unet's 1×1 skips (64 → 32 on 14×14, 32 → 16 on 28×28, on the direct kernels),
        // at batch 6 and 1 (the last sample read from a buffer with room after it).
        all.extend(
            [
                (6, 14, 64, 32),
                (1, 14, 64, 32),
                (5, 28, 32, 16),
                (1, 28, 32, 16),
            ]
            .map(|(b, hw, c, o)| (b, (1, 1, 0, hw), c, o)),
        );
        for (b, (k, s, p, hw), c, o) in all {
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, hw, hw), &dev).unwrap()).unwrap();
            let w =
                Var::from_tensor(&Tensor::randn(0f32, 0.3, (o, c, k, k), &dev).unwrap()).unwrap();
            let bias = Var::from_tensor(&Tensor::randn(0f32, 0.3, o, &dev).unwrap()).unwrap();
            let conv = Conv::new(w.as_tensor().clone(), bias.as_tensor().clone(), s, p).unwrap();
            let cfg = candle_nn::Conv2dConfig {
                padding: p,
                stride: s,
                ..Default::default()
            };
            let theirs =
                candle_nn::Conv2d::new(w.as_tensor().clone(), Some(bias.as_tensor().clone()), cfg)
                    .forward(x.as_tensor())
                    .unwrap();
            let g2 = theirs.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            // Both paths: the CPU custom op and the op-built one other devices use.
            for (path, ours) in [
                (
                    "im2col",
                    conv.forward_cpu(x.as_tensor(), &conv.bias).unwrap(),
                ),
                ("ops", conv.forward_ops(x.as_tensor(), &conv.bias).unwrap()),
            ] {
                assert_eq!(
                    ours.dims(),
                    theirs.dims(),
                    "{path} c{c} k{k} s{s} p{p} hw{hw}"
                );
                let d = crate::max_abs_diff(&ours, &theirs);
                assert!(d < 1e-4, "{path} forward k{k} s{s}: {d}");
                let g1 = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                // Relative to the gradient's scale: dW sums up to 6 · 14² products per entry.
                // The bias gradient Σ 2y over a channel can cancel to near zero while its
                // terms do not: its scale is the largest channel's Σ |2y| (the f32 round-off
                // of a sum in another order is relative to that).
                let terms = (theirs.abs().unwrap().sum((0, 2, 3)).unwrap() * 2.0).unwrap();
                for (i, v) in [&x, &w, &bias].iter().enumerate() {
                    let scale = match i {
                        2 => crate::max_abs(&terms),
                        _ => crate::max_abs(g2.get(v.as_tensor()).unwrap()),
                    }
                    .max(1.0);
                    let d = crate::grad_diff(&g1, &g2, v) / scale;
                    assert!(
                        d < 2e-5,
                        "{path} b{b} c{c} o{o} k{k} s{s} p{p} hw{hw}, variable {i}: {d}"
                    );
                }
            }
        }
    }

    /// The direct sum in f64: the reference that Winograd's f32 error is measured against.
    fn conv_f64(x: &Tensor, w: &Tensor, p: usize) -> Vec<f64> {
        let (b, c, h, wd) = x.dims4().unwrap();
        let o = w.dim(0).unwrap();
        let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let ws: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        let (ho, wo) = (h + 2 * p - 2, wd + 2 * p - 2);
        let mut y = vec![0f64; b * o * ho * wo];
        for (i, yv) in y.iter_mut().enumerate() {
            let (s, oc, r, q) = (i / (o * ho * wo), i / (ho * wo) % o, i / wo % ho, i % wo);
            for ch in 0..c {
                for u in 0..3 {
                    for v in 0..3 {
                        let (rr, qq) =
                            ((r + u) as isize - p as isize, (q + v) as isize - p as isize);
                        if rr < 0 || qq < 0 || rr as usize >= h || qq as usize >= wd {
                            continue;
                        }
                        let xv = xs[((s * c + ch) * h + rr as usize) * wd + qq as usize] as f64;
                        *yv += xv * ws[((oc * c + ch) * 3 + u) * 3 + v] as f64;
                    }
                }
            }
        }
        y
    }

    /// The largest absolute error of `got` against `exact`, and the largest `|exact|` (at least
    /// 1e-30), the scale it is read against.
    fn error_of(got: &[f32], exact: &[f64]) -> (f64, f64) {
        let scale = exact.iter().map(|v| v.abs()).fold(1e-30, f64::max);
        let err = got
            .iter()
            .zip(exact)
            .map(|(g, e)| (*g as f64 - e).abs())
            .fold(0f64, f64::max);
        (err, scale)
    }

    /// The weight gradient `Σ dy ⋆ x` of a 3×3 conv with padding `p`, in f64: the reference for
    /// Winograd's weight gradient.
    fn weight_grad_f64(x: &Tensor, dy: &[f32], o: usize, p: usize) -> Vec<f64> {
        let (b, c, h, wd) = x.dims4().unwrap();
        let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let (ho, wo) = (h + 2 * p - 2, wd + 2 * p - 2);
        let mut dw = vec![0f64; o * c * 9];
        for (at, d) in dw.iter_mut().enumerate() {
            let (oc, ch, u, v) = (at / (c * 9), at / 9 % c, at / 3 % 3, at % 3);
            for s in 0..b {
                for r in 0..ho {
                    for q in 0..wo {
                        let (rr, qq) =
                            ((r + u) as isize - p as isize, (q + v) as isize - p as isize);
                        if rr < 0 || qq < 0 || rr as usize >= h || qq as usize >= wd {
                            continue;
                        }
                        let xv = xs[((s * c + ch) * h + rr as usize) * wd + qq as usize] as f64;
                        *d += dy[((s * o + oc) * ho + r) * wo + q] as f64 * xv;
                    }
                }
            }
        }
        dw
    }

    /// Every 3×3 stride-1 shape the two U-Nets use, plus odd sizes, 1 and 3 channels and
    /// batch 1, by both kernels: values against an f64 direct sum, gradients against candle's.
    #[test]
    fn stride1_kernels_match_the_direct_sum_and_candles_gradients() {
        let dev = Device::Cpu;
        // The largest relative error of each kernel: values, gradients, the weight gradient
        // against f64.
        let mut worst = [[0f64; 3]; 2];
        let cases = [
            (2, 1, 16, 28),
            (2, 16, 16, 28),
            (2, 32, 32, 14),
            (2, 32, 64, 7),
            (1, 64, 64, 7),
            (2, 64, 128, 7),
            (3, 3, 8, 5),
            (1, 3, 5, 12),
            (1, 1, 5, 9),
            (2, 4, 6, 1),
        ];
        // Both kernels of a 3×3 stride-1 conv on the padded layout (the data gradient a conv
        // too): Winograd on even sides, direct on odd ones (more than 4 outputs; 4 and fewer
        // run tap by tap).
        for (b, c, o, hw) in cases {
            let wino = hw % 2 == 0 && o > padded::MAX_DIRECT_OUT;
            let kernel = if wino { "winograd" } else { "padded direct" };
            let x = Tensor::randn(0f32, 1.0, (b, c, hw, hw), &dev).unwrap();
            let x = Var::from_tensor(&x).unwrap();
            let w = Tensor::randn(0f32, 0.3, (o, c, 3, 3), &dev).unwrap();
            let w = Var::from_tensor(&w).unwrap();
            let bias = Var::from_tensor(&Tensor::zeros(o, DType::F32, &dev).unwrap()).unwrap();
            let conv = Conv::new(w.as_tensor().clone(), bias.as_tensor().clone(), 1, 1).unwrap();
            let ours = conv.forward(x.as_tensor()).unwrap();
            let exact = conv_f64(x.as_tensor(), w.as_tensor(), 1);
            let got: Vec<f32> = ours.flatten_all().unwrap().to_vec1().unwrap();
            let (err, scale) = error_of(&got, &exact);
            worst[wino as usize][0] = worst[wino as usize][0].max(err / scale);
            assert!(
                err / scale < 1e-5,
                "{kernel} b{b} c{c} o{o} hw{hw}: {err} of {scale}"
            );
            let cfg = candle_nn::Conv2dConfig {
                padding: 1,
                ..Default::default()
            };
            let theirs =
                candle_nn::Conv2d::new(w.as_tensor().clone(), Some(bias.as_tensor().clone()), cfg)
                    .forward(x.as_tensor())
                    .unwrap();
            let g1 = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = theirs.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            // dW against the f64 sum for the same dy (2y): the kernel's own error.
            let dy: Vec<f32> = got.iter().map(|v| 2.0 * v).collect();
            let exact = weight_grad_f64(x.as_tensor(), &dy, o, 1);
            let dw: Vec<f32> = g1
                .get(w.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let (err, scale) = error_of(&dw, &exact);
            worst[wino as usize][2] = worst[wino as usize][2].max(err / scale);
            assert!(
                err / scale < 1e-5,
                "{kernel} b{b} c{c} o{o} hw{hw}, dW against f64: {err} of {scale}"
            );
            // The weight gradient sums b·H·W products: compared relative to its scale.
            for (i, v) in [&x, &w, &bias].iter().enumerate() {
                let (a, e) = (
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap(),
                );
                let scale = e.abs().unwrap().max_keepdim(0).unwrap().max_all().unwrap();
                let scale = scale.to_scalar::<f32>().unwrap().max(1e-30) as f64;
                let rel = crate::max_abs_diff(a, e) as f64 / scale;
                worst[wino as usize][1] = worst[wino as usize][1].max(rel);
                assert!(
                    rel < 2e-5,
                    "{kernel} b{b} c{c} o{o} hw{hw}, variable {i}: {rel:.2e}"
                );
            }
        }
        for (kernel, [v, g, dw]) in ["padded direct", "winograd"].iter().zip(worst) {
            eprintln!(
                "{kernel}: largest error {v:.2e} (values against f64), {g:.2e} (gradients \
                 against candle), {dw:.2e} (weight gradient against f64), of the largest value"
            );
        }
    }

    #[test]
    fn a_per_sample_shift_equals_the_broadcast_add() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (9, 3, 6, 6), &dev).unwrap()).unwrap();
        // Each path: tap by tap (2 outputs), padded (5 outputs, Winograd on the 6×6 map),
        // stride 2 (on the input's phases), pointwise.
        for (o, k, s, p) in [(2, 3, 1, 1), (5, 3, 1, 1), (5, 3, 2, 1), (5, 1, 1, 0)] {
            let w = Tensor::randn(0f32, 0.3, (o, 3, k, k), &dev).unwrap();
            let w = Var::from_tensor(&w).unwrap();
            let bias = Var::from_tensor(&Tensor::randn(0f32, 0.3, o, &dev).unwrap()).unwrap();
            let shift = Var::from_tensor(&Tensor::randn(0f32, 1.0, (9, o), &dev).unwrap()).unwrap();
            let conv = Conv::new(w.as_tensor().clone(), bias.as_tensor().clone(), s, p).unwrap();
            let fused = conv
                .forward_shifted(x.as_tensor(), Some(shift.as_tensor()))
                .unwrap();
            let plain = conv
                .forward(x.as_tensor())
                .unwrap()
                .broadcast_add(
                    &shift
                        .as_tensor()
                        .unsqueeze(2)
                        .unwrap()
                        .unsqueeze(3)
                        .unwrap(),
                )
                .unwrap();
            assert!(crate::max_abs_diff(&fused, &plain) < 1e-5, "o{o} k{k} s{s}");
            // The op-built path other devices run takes the per-sample bias too.
            let both = shift
                .as_tensor()
                .broadcast_add(&bias.as_tensor().unsqueeze(0).unwrap());
            let ops = conv.forward_ops(x.as_tensor(), &both.unwrap()).unwrap();
            assert!(
                crate::max_abs_diff(&ops, &plain) < 1e-4,
                "ops o{o} k{k} s{s}"
            );
            let loss = |y: &Tensor| y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let (g1, g2) = (loss(&fused), loss(&plain));
            let what = format!("o{o} k{k} s{s}");
            crate::assert_grads_close(&g1, &g2, &[&x, &w, &bias, &shift], 1e-3, &what);
        }
    }

    #[test]
    fn gradients_do_not_depend_on_the_thread_count() {
        let dev = Device::Cpu;
        // 5 output channels on the padded layout (Winograd on even sides, direct on odd), 2 tap
        // by tap, and stride 2; 8×8 and 9×9 with the weight gradients by gemm, 28×28 by the
        // direct kernels.
        let cases = [(5, 1), (2, 1), (5, 2)];
        for (hw, (o, stride)) in [8, 9, 28].into_iter().flat_map(|h| cases.map(|c| (h, c))) {
            let x = Tensor::randn(0f32, 1.0, (9, 3, hw, hw), &dev).unwrap();
            let x = Var::from_tensor(&x).unwrap();
            let w = Tensor::randn(0f32, 0.3, (o, 3, 3, 3), &dev).unwrap();
            let w = Var::from_tensor(&w).unwrap();
            let bias = Var::from_tensor(&Tensor::zeros(o, DType::F32, &dev).unwrap()).unwrap();
            let conv =
                Conv::new(w.as_tensor().clone(), bias.as_tensor().clone(), stride, 1).unwrap();
            let grads = |threads: usize| {
                crate::grads_on_threads(threads, &[&x, &w, &bias], || {
                    let y = conv.forward(x.as_tensor()).unwrap();
                    y.sqr().unwrap().sum_all().unwrap()
                })
            };
            assert_eq!(grads(1), grads(3), "{hw}×{hw} o{o} s{stride}");
        }
    }

    #[test]
    fn maps_that_are_not_square_match_candle() {
        // Rows and columns are planned apart (phases, padding, pixels): a stride-2 conv and a
        // transposed conv on maps of odd and even sides that differ. The stride-2 conv's
        // reference is the op-built path (candle's own conv2d backward gives a gradient one
        // column short when only one side is even).
        let dev = Device::Cpu;
        for (h, w) in [(9, 6), (6, 11), (1, 4)] {
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 5, h, w), &dev).unwrap()).unwrap();
            let wd =
                Var::from_tensor(&Tensor::randn(0f32, 0.3, (9, 5, 3, 3), &dev).unwrap()).unwrap();
            let wu =
                Var::from_tensor(&Tensor::randn(0f32, 0.3, (5, 9, 4, 4), &dev).unwrap()).unwrap();
            let bd = Var::from_tensor(&Tensor::randn(0f32, 0.3, 9, &dev).unwrap()).unwrap();
            let bu = Var::from_tensor(&Tensor::randn(0f32, 0.3, 9, &dev).unwrap()).unwrap();
            let down = Conv::new(wd.as_tensor().clone(), bd.as_tensor().clone(), 2, 1).unwrap();
            let (wt, bt) = (wu.as_tensor().clone(), bu.as_tensor().clone());
            let up = super::super::conv_transpose::ConvTranspose::new(wt, bt, 2, 1).unwrap();
            let up_ref = candle_nn::ConvTranspose2d::new(
                wu.as_tensor().clone(),
                Some(bu.as_tensor().clone()),
                candle_nn::ConvTranspose2dConfig {
                    padding: 1,
                    stride: 2,
                    ..Default::default()
                },
            );
            let ours = [
                down.forward(x.as_tensor()).unwrap(),
                up.forward(x.as_tensor()).unwrap(),
            ];
            let theirs = [
                down.forward_ops(x.as_tensor(), &down.bias).unwrap(),
                up_ref.forward(x.as_tensor()).unwrap(),
            ];
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                let what = format!("{h}×{w}, {}", ["stride-2 conv", "transposed conv"][i]);
                assert_eq!(a.dims(), b.dims(), "{what}");
                assert!(crate::max_abs_diff(a, b) < 1e-4, "{what} forward");
                let g1 = a.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                let g2 = b.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                let vars = if i == 0 {
                    [&x, &wd, &bd]
                } else {
                    [&x, &wu, &bu]
                };
                for v in vars {
                    let scale = crate::max_abs(g2.get(v.as_tensor()).unwrap()).max(1.0);
                    let d = crate::grad_diff(&g1, &g2, v) / scale;
                    assert!(d < 1e-5, "{what} grad: {d} of {scale}");
                }
            }
        }
    }

    #[test]
    fn the_avx512_kernels_give_the_avx2_kernels_bits() {
        use crate::ops::activation::{has_avx512, AVX2_ONLY};
        use std::sync::atomic::Ordering;
        if !has_avx512() {
            eprintln!("skipped: this CPU has no AVX-512, so only the AVX2 kernels run here");
            return;
        }
        let dev = Device::Cpu;
        // Winograd (forward, data and weight gradients) on 28×28, 14×14 and 6×6; the direct
        // kernel on 7×7, 9×9 and 11×11 with every kind of register tile (1 to 32 output
        // channels), on a stride-2 conv's phases and in a transposed conv's sub-pixel phases
        // (k 4: transposed), and 1×1 convs (k 1).
        for (c, o, hw, stride, k) in [
            (16, 16, 28, 1, 3),
            (32, 24, 14, 1, 3),
            (8, 5, 6, 1, 3),
            (16, 32, 7, 1, 3),
            (3, 7, 9, 1, 3),
            (16, 32, 28, 2, 3),
            (4, 1, 7, 1, 3),
            (4, 2, 9, 1, 3),
            (5, 3, 7, 1, 3),
            (6, 8, 7, 1, 3),
            (6, 13, 11, 1, 3),
            (3, 1, 28, 2, 3),
            (8, 12, 7, 2, 4),
            (6, 3, 14, 2, 4),
            (64, 32, 14, 1, 1),
            (32, 16, 28, 1, 1),
            (5, 13, 9, 1, 1),
        ] {
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, c, hw, hw), &dev).unwrap()).unwrap();
            let (up, shape) = (k == 4, if k == 4 { (c, o, 4, 4) } else { (o, c, k, k) });
            let w = Var::from_tensor(&Tensor::randn(0f32, 0.3, shape, &dev).unwrap()).unwrap();
            let bias = Var::from_tensor(&Tensor::randn(0f32, 0.3, o, &dev).unwrap()).unwrap();
            let (wt, bt) = (w.as_tensor().clone(), bias.as_tensor().clone());
            let op: Box<dyn Fn(&Tensor) -> Tensor> = if up {
                let up = super::super::conv_transpose::ConvTranspose::new(wt, bt, 2, 1).unwrap();
                Box::new(move |x| up.forward(x).unwrap())
            } else {
                let conv = Conv::new(wt, bt, stride, k / 2).unwrap();
                Box::new(move |x| conv.forward(x).unwrap())
            };
            let run = |avx2: bool| {
                AVX2_ONLY.store(avx2, Ordering::Relaxed);
                let y = op(x.as_tensor());
                let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                AVX2_ONLY.store(false, Ordering::Relaxed);
                let bits = |t: &Tensor| -> Vec<u32> {
                    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                    v.iter().map(|f| f.to_bits()).collect()
                };
                let mut all = bits(&y);
                for v in [&x, &w, &bias] {
                    all.extend(bits(g.get(v.as_tensor()).unwrap()));
                }
                all
            };
            assert!(
                run(true) == run(false),
                "c{c} o{o} k{k} {hw}×{hw} s{stride}"
            );
        }
    }

    #[test]
    fn an_input_without_gradient_skips_dx_and_keeps_dw() {
        let dev = Device::Cpu;
        for o in [1, 6] {
            let x = Tensor::randn(0f32, 1.0, (5, 2, 6, 6), &dev).unwrap();
            let w =
                Var::from_tensor(&Tensor::randn(0f32, 0.3, (o, 2, 3, 3), &dev).unwrap()).unwrap();
            let bias = Var::from_tensor(&Tensor::randn(0f32, 0.3, o, &dev).unwrap()).unwrap();
            let conv = Conv::new(w.as_tensor().clone(), bias.as_tensor().clone(), 1, 1).unwrap();
            let loss = |y: Tensor| y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let ours = loss(conv.forward_cpu(&x, &conv.bias).unwrap());
            let theirs = loss(conv.forward_ops(&x, &conv.bias).unwrap());
            assert!(ours.get(&x).is_none(), "o{o}: no dx for a plain input");
            crate::assert_grads_close(&ours, &theirs, &[&w, &bias], 1e-3, &format!("o{o}"));
        }
    }

    #[test]
    fn upsample_repeats_each_pixel_twice_each_way() {
        let x = Tensor::new(&[[[[1f32, 2.], [3., 4.]]]], &Device::Cpu).unwrap();
        let y = upsample2(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(
            y,
            [1., 1., 2., 2., 1., 1., 2., 2., 3., 3., 4., 4., 3., 3., 4., 4.]
        );
    }
}
