//! Transposed convolution (PyTorch's `ConvTranspose2d`) as a CPU custom op with its own
//! backward. It is the data gradient of a convolution (the "adjoint conv", output → input).
//! With stride 2 (the U-Nets' upsampling: k 4, padding 1) and the direct kernel, everything
//! runs on 2×2 phases with nothing unfolded or folded back: the forward as four sub-pixel
//! convolutions of x (`conv_subpixel`), the data gradient as the adjoint conv of dy on dy's
//! phases (direct kernel; for k 4 on even maps both by Winograd F(2×2, 2×2): each phase a
//! 2×2 window, 9 products per 2×2 tile instead of 16), and the weight gradient there with the output channels in the lanes
//! (`conv_wgrad`). Other geometries unfold: the forward is one gemm `Wᵀ · x` into patch
//! columns folded onto the output by col2im, the backward im2col of dy and two gemms. Samples
//! run in parallel with the weight gradient summed in fixed chunks (the same bits for any
//! thread count). Other devices run candle's `conv_transpose2d`.

use super::conv_padded::{self as padded, Scratch};
use super::conv_subpixel::SubPixel;
use super::cpu::{f32_slice, matmul, row_sums, unpack_grads, zeroed, CHUNK};
use super::geometry::Geometry;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// A `k×k` transposed convolution with stride and zero padding (no output padding, no
/// dilation); weights in PyTorch's `(in, out, k, k)` layout.
pub struct ConvTranspose {
    weight: Tensor,
    bias: Tensor,
    k: usize,
    stride: usize,
    pad: usize,
}

impl ConvTranspose {
    /// Wraps PyTorch-layout weights `(in, out, k, k)` and bias `(out,)`.
    pub fn new(weight: Tensor, bias: Tensor, stride: usize, pad: usize) -> Result<Self> {
        let k = weight.dim(2)?;
        if stride == 0 {
            candle_core::bail!("conv_transpose: stride must be at least 1");
        }
        Ok(Self {
            weight,
            bias,
            k,
            stride,
            pad,
        })
    }

    /// `(B, C_in, H, W)` → `(B, C_out, (H − 1)·s − 2p + k, (W − 1)·s − 2p + k)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 {
            self.forward_cpu(x)
        } else {
            self.forward_ops(x)
        }
    }

    /// The geometry of the convolution whose data gradient this is: it maps the output
    /// `(C_out, H', W')` back to the input `(C_in, H, W)`.
    fn geometry(&self, x: &Tensor) -> Result<(Geometry, usize)> {
        let (_, c, h, w) = x.dims4()?;
        if self.weight.dim(0)? != c {
            candle_core::bail!(
                "conv_transpose: {} input channels, the weight expects {}",
                c,
                self.weight.dim(0)?
            );
        }
        let (k, s, p) = (self.k, self.stride, self.pad);
        let (ho, wo) = ((h - 1) * s + k, (w - 1) * s + k);
        if h == 0 || w == 0 || ho <= 2 * p || wo <= 2 * p {
            candle_core::bail!("conv_transpose: a {h}×{w} input gives no output with padding {p}");
        }
        let g = Geometry {
            c: self.weight.dim(1)?,
            h: ho - 2 * p,
            w: wo - 2 * p,
            k,
            stride: s,
            pad: p,
        };
        debug_assert_eq!(g.out_hw(), (h, w));
        Ok((g, c))
    }

    fn forward_cpu(&self, x: &Tensor) -> Result<Tensor> {
        let (g, c_in) = self.geometry(x)?;
        x.contiguous()?.apply_op3(
            &self.weight.contiguous()?,
            &self.bias.contiguous()?,
            ConvTransposeOp { g, c_in },
        )
    }

    fn forward_ops(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.conv_transpose2d(&self.weight, self.pad, 0, self.stride, 1)?;
        let c_out = self.weight.dim(1)?;
        y.broadcast_add(&self.bias.reshape((1, c_out, 1, 1))?)
    }
}

/// `(x, W, b) → y`, per sample `y = col2im(Wᵀ · x) + b`.
struct ConvTransposeOp {
    /// The geometry of the adjoint convolution (output → input).
    g: Geometry,
    c_in: usize,
}

impl ConvTransposeOp {
    /// Batch size and the slices of x and W, checked against the geometry.
    fn slices<'a>(
        &self,
        x: (&'a CpuStorage, &Layout),
        w: (&'a CpuStorage, &Layout),
        op: &str,
    ) -> Result<(usize, &'a [f32], &'a [f32])> {
        let xs = f32_slice(x.0, x.1, op)?;
        let ws = f32_slice(w.0, w.1, op)?;
        let n_in = self.c_in * self.g.cols();
        if n_in == 0 || xs.len() % n_in != 0 || ws.len() != self.c_in * self.g.rows() {
            candle_core::bail!("{op}: input or weight does not fit the geometry");
        }
        Ok((xs.len() / n_in, xs, ws))
    }
}

impl CustomOp3 for ConvTransposeOp {
    fn name(&self) -> &'static str {
        "conv-transpose2d-col2im"
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
        let g = self.g;
        let (b, xs, ws) = self.slices((s1, l1), (s2, l2), self.name())?;
        let bias = f32_slice(s3, l3, self.name())?;
        let (ci, k, l) = (self.c_in, g.rows(), g.cols());
        let n_out = g.c * g.h * g.w;
        if padded::phases_fit(&g) {
            // The data gradient of the stride-2 conv `g` with these weights, as four sub-pixel
            // convs of x, the bias written with each value.
            let sub = SubPixel::new(&g, ci, ws);
            let mut out = Vec::with_capacity(b * n_out);
            out.spare_capacity_mut()[..b * n_out]
                .par_chunks_mut(n_out)
                .zip(xs.par_chunks(ci * l))
                .for_each_init(
                    || (vec![], vec![], vec![]),
                    |bufs, (yb, xb)| {
                        sub.apply(xb, (yb, bias), (&mut bufs.0, &mut bufs.1, &mut bufs.2))
                    },
                );
            // SAFETY: every value of every sample was written (`SubPixel::apply`).
            unsafe { out.set_len(b * n_out) };
            return Ok((CpuStorage::F32(out), Shape::from((b, g.c, g.h, g.w))));
        }
        let mut out = vec![0f32; b * n_out];
        out.par_chunks_mut(n_out)
            .zip(xs.par_chunks(ci * l))
            .for_each_init(
                || vec![0f32; k * l],
                |cols, (yb, xb)| {
                    for (plane, &bv) in yb.chunks_exact_mut(g.h * g.w).zip(bias) {
                        plane.fill(bv);
                    }
                    // cols (k×l) = Wᵀ (k×ci) · x (ci×l), folded onto the output.
                    matmul((k, l, ci), cols, false, ws, (1, k), xb, (l, 1), 1);
                    g.col2im(cols, yb);
                },
            );
        Ok((CpuStorage::F32(out), Shape::from((b, g.c, g.h, g.w))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let packed = x.apply_op3_no_bwd(
            w,
            &grad.contiguous()?,
            &ConvTransposeGrad {
                g: self.g,
                c_in: self.c_in,
            },
        )?;
        unpack_grads(&packed, [x, w, bias])
    }
}

/// Backward of [`ConvTransposeOp`]: inputs x, W, dy; output `[dx; dW; db]` flattened.
struct ConvTransposeGrad {
    g: Geometry,
    c_in: usize,
}

impl CustomOp3 for ConvTransposeGrad {
    fn name(&self) -> &'static str {
        "conv-transpose2d-col2im-grad"
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
        let g = self.g;
        let op = ConvTransposeOp { g, c_in: self.c_in };
        let (b, xs, ws) = op.slices((s1, l1), (s2, l2), self.name())?;
        let dy = f32_slice(s3, l3, self.name())?;
        let (ci, k, l) = (self.c_in, g.rows(), g.cols());
        let (n_in, n_out, hw) = (ci * l, g.c * g.h * g.w, g.h * g.w);
        if dy.len() != b * n_out {
            candle_core::bail!("{}: gradient shape mismatch", self.name());
        }
        // dx starts uninitialised: each sample's part is written once (the gemm path zeroes
        // its own first).
        let n_all = b * n_in + ci * k + g.c;
        let mut out = Vec::with_capacity(n_all);
        let dx = &mut out.spare_capacity_mut()[..b * n_in];
        // A stride-2 transposed conv's data gradient is a stride-2 conv of dy with the same
        // weights: on dy's phases by the direct kernel (no unfolding), and its weight gradient
        // there too; else unfolded dy and gemms.
        let phases = padded::phases_fit(&g);
        let wp = if phases {
            padded::Packed::new(&g, ci, ws)
        } else {
            padded::Packed::Direct(vec![])
        };
        let partials: Vec<Vec<f32>> = dx
            .par_chunks_mut(CHUNK * n_in)
            .zip(xs.par_chunks(CHUNK * n_in))
            .zip(dy.par_chunks(CHUNK * n_out))
            .map_init(Scratch::default, |scratch, ((dxc, xc), dyc)| {
                let mut acc = vec![0f32; ci * k + g.c];
                let mut cols = vec![0f32; if phases { 0 } else { k * l }];
                let mut sums = vec![0f32; g.c];
                for ((dxb, xb), dyb) in dxc
                    .chunks_exact_mut(n_in)
                    .zip(xc.chunks_exact(n_in))
                    .zip(dyc.chunks_exact(n_out))
                {
                    let (dw, db) = acc.split_at_mut(ci * k);
                    if phases {
                        let (dyxw, s) = ((dyb, xb, &wp), &mut *scratch);
                        padded::transposed_backward_phases(&g, ci, dyxw, dxb, s);
                    } else {
                        let dxb = zeroed(dxb);
                        g.im2col(dyb, &mut cols);
                        // dx (ci×l) = W (ci×k) · cols (k×l): the adjoint conv's forward.
                        matmul((ci, l, k), dxb, false, ws, (k, 1), &cols, (l, 1), 1);
                        // dW (ci×k) += x (ci×l) · colsᵀ (l×k).
                        matmul((ci, k, l), dw, true, xb, (l, 1), &cols, (1, l), 1);
                    }
                    row_sums(dyb, (g.c, hw, hw), &mut sums);
                    db.iter_mut().zip(&sums).for_each(|(d, v)| *d += v);
                }
                padded::finish_backward(&g, ci, &mut acc[..ci * k], scratch);
                acc
            })
            .collect();
        // SAFETY: every sample's dx was written (above); dW and db follow as zeros.
        unsafe { out.set_len(b * n_in) };
        out.resize(n_all, 0.0);
        let tail = &mut out[b * n_in..];
        for p in &partials {
            tail.iter_mut().zip(p).for_each(|(t, v)| *t += v);
        }
        Ok((CpuStorage::F32(out), Shape::from(n_all)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Module, Var};

    #[test]
    fn matches_candle_conv_transpose2d_forward_and_gradients() {
        let dev = Device::Cpu;
        // The lesson's up-convolutions (k 4, s 2, p 1: sub-pixel forward, backward on dy's
        // phases) at their own sizes (and batch 1), odd and even maps, one channel, k 3 and k 2
        // at stride 2 (the same phases), and stride 1 (col2im).
        for (b, (k, s, p, hw, ci, co)) in [
            (5, (4, 2, 1, 7, 64, 64)),
            (5, (4, 2, 1, 14, 128, 32)),
            (1, (4, 2, 1, 14, 128, 32)),
            (5, (4, 2, 1, 7, 6, 4)),
            (5, (4, 2, 1, 14, 8, 3)),
            (1, (4, 2, 1, 1, 1, 1)),
            (5, (4, 2, 1, 3, 1, 5)),
            (5, (3, 2, 1, 5, 3, 5)),
            (5, (3, 1, 1, 6, 4, 4)),
            (5, (2, 2, 0, 4, 2, 3)),
        ] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, ci, hw, hw), &dev).unwrap())
                .unwrap();
            let w =
                Var::from_tensor(&Tensor::randn(0f32, 0.3, (ci, co, k, k), &dev).unwrap()).unwrap();
            let bias = Var::from_tensor(&Tensor::randn(0f32, 0.3, co, &dev).unwrap()).unwrap();
            let cfg = candle_nn::ConvTranspose2dConfig {
                padding: p,
                stride: s,
                ..Default::default()
            };
            let theirs = candle_nn::ConvTranspose2d::new(
                w.as_tensor().clone(),
                Some(bias.as_tensor().clone()),
                cfg,
            )
            .forward(x.as_tensor())
            .unwrap();
            let g2 = theirs.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let op =
                ConvTranspose::new(w.as_tensor().clone(), bias.as_tensor().clone(), s, p).unwrap();
            for (path, ours) in [
                ("col2im", op.forward_cpu(x.as_tensor()).unwrap()),
                ("ops", op.forward_ops(x.as_tensor()).unwrap()),
            ] {
                let what = format!("{path} b{b} k{k} s{s} p{p} hw{hw} {ci}->{co}");
                assert_eq!(ours.dims(), theirs.dims(), "{what}");
                let d = crate::max_abs_diff(&ours, &theirs);
                assert!(d < 1e-4, "{what} forward: {d}");
                let g1 = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                // Relative to the gradient's scale: dW sums hundreds of products per entry.
                for v in [&x, &w, &bias] {
                    let scale = crate::max_abs(g2.get(v.as_tensor()).unwrap()).max(1.0);
                    let d = crate::grad_diff(&g1, &g2, v) / scale;
                    assert!(d < 1e-5, "{what} grad: {d} of {scale}");
                }
            }
        }
    }

    #[test]
    fn gradients_do_not_depend_on_the_thread_count() {
        let dev = Device::Cpu;
        for hw in [7, 14] {
            let x = Tensor::randn(0f32, 1.0, (9, 4, hw, hw), &dev).unwrap();
            let x = Var::from_tensor(&x).unwrap();
            let w = Tensor::randn(0f32, 0.3, (4, 3, 4, 4), &dev).unwrap();
            let w = Var::from_tensor(&w).unwrap();
            let bias = Var::from_tensor(&Tensor::zeros(3, DType::F32, &dev).unwrap()).unwrap();
            let op =
                ConvTranspose::new(w.as_tensor().clone(), bias.as_tensor().clone(), 2, 1).unwrap();
            let grads = |threads: usize| {
                crate::grads_on_threads(threads, &[&x, &w, &bias], || {
                    let y = op.forward(x.as_tensor()).unwrap();
                    y.sqr().unwrap().sum_all().unwrap()
                })
            };
            assert_eq!(grads(1), grads(3), "{hw}×{hw}");
        }
    }
}
