//! A 3×3 convolution (stride 1, padding 1) of a nearest-neighbour ×2 upsampled map, computed
//! at the low resolution (the "sub-pixel" form of a U-Net's up path).
//!
//! Upsampling repeats each pixel in a 2 × 2 block, so the output pixel `(2i + py, 2j + px)`
//! sees only a 2 × 2 window of the input, rows `i - 1 + py ..= i + py` and the same in
//! columns, with the 3×3 taps summed onto it: for `py = 0` the rows weigh `[w₀, w₁ + w₂]`,
//! for `py = 1` `[w₀ + w₁, w₂]`. The four parities are one 2×2 conv with `4·O` outputs on the
//! input padded by 1, and an interleave. Per output pixel that is 4·C products instead of
//! 9·C, and neither the upsampled map nor its gradient (a strided sum) is ever built.

use super::conv::{upsample2, Conv};
use super::cpu::f32_slice;
use super::pairs;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Tap sums of the two parities: row `(p, a)` gives the weight of low-resolution offset `a`
/// for output parity `p` as a sum of the 3 taps.
const TAPS: [f32; 12] = [1., 0., 0., 0., 1., 1., 1., 1., 0., 0., 0., 1.];

impl Conv {
    /// `self.forward(&upsample2(x))`, the same numbers up to rounding: a 3×3, stride 1,
    /// padding 1 conv runs at the low resolution on CPU (four 2×2 kernels, [`forward`]); any
    /// other conv, or device, upsamples first.
    pub fn forward_upsampled(&self, x: &Tensor) -> Result<Tensor> {
        let cpu = matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32;
        if cpu && self.k == 3 && self.stride == 1 && self.pad == 1 {
            forward(&self.weight, &self.bias, x)
        } else {
            self.forward(&upsample2(x)?)
        }
    }
}

/// `conv(upsample2(x))` for a 3×3, stride 1, padding 1 `weight (O, C, 3, 3)` and `bias (O,)`.
pub(crate) fn forward(weight: &Tensor, bias: &Tensor, x: &Tensor) -> Result<Tensor> {
    let (o, c, _, _) = weight.dims4()?;
    let a = Tensor::from_slice(&TAPS, (4, 3), weight.device())?.to_dtype(weight.dtype())?;
    // K[oc, (px, b), (py, a)] = Σ A[(py, a), r] · W[oc, r, s] · A[(px, b), s].
    let t = weight.reshape((o * c * 3, 3))?.matmul(&a.t()?)?; // (oc, r), (px, b)
    let t = t.reshape((o * c, 3, 4))?.transpose(1, 2)?.contiguous()?;
    let k = t.reshape((o * c * 4, 3))?.matmul(&a.t()?)?; // (oc, px, b), (py, a)
    let k = k
        .reshape((o, c, 2, 2, 2, 2))? // o, c, px, b, py, a
        .permute((4, 2, 0, 1, 5, 3))? // py, px, o, c, a, b
        .contiguous()?
        .reshape((4 * o, c, 2, 2))?;
    let bias4 = Tensor::cat(&[bias, bias, bias, bias], 0)?;
    let y = Conv::new(k, bias4, 1, 1)?.forward(x)?;
    y.apply_op1(Interleave { o })
}

/// `(B, 4·O, S + 1, S + 1)` → `(B, O, 2S, 2S)`: `out[b, o, 2i + py, 2j + px] =
/// y[b, (2py + px)·O + o, i + py, j + px]`; its backward scatters back (zeros elsewhere).
struct Interleave {
    o: usize,
}

/// The batch and the low-resolution side `S` of the 2×2 conv's output `(B, 4·O, S + 1, S + 1)`.
fn dims(l: &Layout, o: usize, name: &str) -> Result<(usize, usize)> {
    let (b, o4, h, w) = l.shape().dims4()?;
    if o4 != 4 * o || h != w || h < 2 {
        candle_core::bail!(
            "{name}: expected (B, {}, S+1, S+1), got {:?}",
            4 * o,
            l.dims()
        );
    }
    Ok((b, h - 1))
}

impl CustomOp1 for Interleave {
    fn name(&self) -> &'static str {
        "upconv-interleave"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, side) = dims(l, self.o, self.name())?;
        let (o, n) = (self.o, side + 1);
        let y = f32_slice(s, l, self.name())?;
        let len = b * o * 4 * side * side;
        let mut out = Vec::with_capacity(len);
        out.spare_capacity_mut()[..len]
            .par_chunks_mut(4 * side * side)
            .enumerate()
            .for_each(|(plane, dst)| {
                let (bi, oi) = (plane / o, plane % o);
                for (r, row) in dst.chunks_exact_mut(2 * side).enumerate() {
                    let (i, py) = (r / 2, r % 2);
                    let src = |px: usize| {
                        let at = ((bi * 4 + 2 * py + px) * o + oi) * n * n + (i + py) * n + px;
                        &y[at..at + side]
                    };
                    pairs::interleave::<false>(src(0), src(1), 0.0, row);
                }
            });
        // SAFETY: every row of every plane was written above.
        unsafe { out.set_len(len) };
        Ok((
            CpuStorage::F32(out),
            Shape::from((b, o, 2 * side, 2 * side)),
        ))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad
            .contiguous()?
            .apply_op1_no_bwd(&Scatter { o: self.o })?;
        Ok(Some(g))
    }
}

/// The backward of [`Interleave`]: `(B, O, 2S, 2S)` → `(B, 4·O, S + 1, S + 1)`.
struct Scatter {
    o: usize,
}

impl CustomOp1 for Scatter {
    fn name(&self) -> &'static str {
        "upconv-scatter"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, o, h, w) = l.shape().dims4()?;
        if o != self.o || h != w || h % 2 != 0 {
            candle_core::bail!("{}: unexpected gradient shape {:?}", self.name(), l.dims());
        }
        let (side, n) = (h / 2, h / 2 + 1);
        let g = f32_slice(s, l, self.name())?;
        let mut out = vec![0f32; b * 4 * o * n * n];
        // The two column parities of a row parity `py` of a sample: 2·O planes in a row,
        // filled from each gradient row at once (`pairs::deinterleave`); the rest stays zero.
        out.par_chunks_mut(2 * o * n * n)
            .enumerate()
            .for_each(|(k, dst)| {
                let (bi, py) = (k / 2, k % 2);
                let (px0, px1) = dst.split_at_mut(o * n * n);
                for oi in 0..o {
                    let src = &g[(bi * o + oi) * 4 * side * side..][..4 * side * side];
                    let (d0, d1) = (&mut px0[oi * n * n..], &mut px1[oi * n * n..]);
                    for i in 0..side {
                        let row = &src[(2 * i + py) * 2 * side..][..2 * side];
                        let at = (i + py) * n;
                        pairs::deinterleave(
                            row,
                            &mut d0[at..at + side],
                            &mut d1[at + 1..at + 1 + side],
                        );
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((b, 4 * o, n, n))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn equals_the_conv_of_the_upsampled_map_with_its_gradients() {
        let dev = Device::Cpu;
        // Output channels 1 (4 after the ×4: tap by tap), 3 and 6 (a gemm); odd and even sides.
        for (o, side) in [(1, 4), (3, 5), (6, 7)] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 4, side, side), &dev).unwrap())
                .unwrap();
            let w =
                Var::from_tensor(&Tensor::randn(0f32, 0.3, (o, 4, 3, 3), &dev).unwrap()).unwrap();
            let bias = Var::from_tensor(&Tensor::randn(0f32, 0.3, o, &dev).unwrap()).unwrap();
            let conv = Conv::new(w.as_tensor().clone(), bias.as_tensor().clone(), 1, 1).unwrap();
            let probe = Tensor::randn(0f32, 1.0, (3, o, 2 * side, 2 * side), &dev).unwrap();
            let run = |fast: bool| {
                let y = if fast {
                    conv.forward_upsampled(x.as_tensor()).unwrap()
                } else {
                    conv.forward(&upsample2(x.as_tensor()).unwrap()).unwrap()
                };
                let g = (&y * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let grads = [x.as_tensor(), w.as_tensor(), bias.as_tensor()]
                    .map(|v| g.get(v).unwrap().clone());
                (y, grads)
            };
            let (y, g) = run(true);
            let (y_ref, g_ref) = run(false);
            assert_eq!(y.dims(), y_ref.dims());
            let close = |a: &Tensor, b: &Tensor, what: &str| {
                let scale = crate::max_abs(b).max(1.0);
                let d = crate::max_abs_diff(a, b) / scale;
                assert!(d < 1e-5, "o={o} side={side} {what}: {d}");
            };
            close(&y, &y_ref, "y");
            for (what, (a, b)) in ["dx", "dW", "db"].iter().zip(g.iter().zip(&g_ref)) {
                close(a, b, what);
            }
        }
    }
}
