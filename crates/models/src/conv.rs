//! Convolutions written as unfold + matmul from differentiable candle ops.
//!
//! candle's CPU `conv2d` backward goes through `conv_transpose2d` (a direct loop) and a conv
//! whose kernel is the whole feature map; both are far slower than the forward. Building the
//! im2col patches from `pad` / `narrow` / `stack` keeps forward and backward as matmuls.

use candle_core::{Result, Tensor};

/// A `k×k` convolution with stride 1 or 2 and zero padding; weights in PyTorch's
/// `(out, in, k, k)` layout.
pub struct Conv {
    weight: Tensor,
    bias: Tensor,
    k: usize,
    stride: usize,
    pad: usize,
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
        y.broadcast_add(&self.bias.reshape((1, o, 1))?)?
            .reshape((b, o, ho, wo))
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
        for (k, s, p, hw) in [(3, 1, 1, 8), (3, 2, 1, 8), (3, 2, 1, 7), (1, 1, 0, 5)] {
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, hw, hw), &dev).unwrap()).unwrap();
            let w =
                Var::from_tensor(&Tensor::randn(0f32, 0.3, (4, 3, k, k), &dev).unwrap()).unwrap();
            let bias = Tensor::randn(0f32, 0.3, 4, &dev).unwrap();
            let ours = Conv::new(w.as_tensor().clone(), bias.clone(), s, p)
                .unwrap()
                .forward(x.as_tensor())
                .unwrap();
            let cfg = candle_nn::Conv2dConfig {
                padding: p,
                stride: s,
                ..Default::default()
            };
            let theirs = candle_nn::Conv2d::new(w.as_tensor().clone(), Some(bias), cfg)
                .forward(x.as_tensor())
                .unwrap();
            assert_eq!(ours.dims(), theirs.dims(), "k{k} s{s} p{p} hw{hw}");
            let d = crate::max_abs_diff(&ours, &theirs);
            assert!(d < 1e-4, "forward k{k} s{s}: {d}");
            let g1 = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = theirs.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &w] {
                let a = g1.get(v.as_tensor()).unwrap();
                let b = g2.get(v.as_tensor()).unwrap();
                let d = crate::max_abs_diff(&a, &b);
                assert!(d < 1e-3, "grad k{k} s{s} p{p} hw{hw}: {d}");
            }
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
