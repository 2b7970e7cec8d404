//! GroupNorm followed by SiLU, the pre-activation of every residual block, as one candle custom
//! op on CPU (forward and backward each one pass over the data, two per group).
//!
//! candle's `GroupNorm` is built from about ten broadcast ops (mean, subtract, square, mean,
//! sqrt, divide, scale, shift), each allocating and each with its own backward: 26 ms for
//! 64 × 16 × 28 × 28 on one core, against ~2 ms here. Other devices use candle's ops.

use super::activation::{forward, has_avx2, silu_derivative, Kind};
use super::cpu::{f32_slices3, unpack_grads, CHUNK};
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Module, Result, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// `SiLU(GroupNorm(x))` for `(B, C, …)` tensors: per-channel affine `weight`, `bias` `(C,)`.
pub struct GroupNormSilu {
    weight: Tensor,
    bias: Tensor,
    op: Fused,
    fallback: candle_nn::GroupNorm,
}

impl GroupNormSilu {
    /// Wraps the affine parameters (PyTorch's `GroupNorm(groups, C)` then `SiLU`).
    pub fn new(weight: Tensor, bias: Tensor, groups: usize, eps: f64) -> Result<Self> {
        let c = weight.dim(0)?;
        let fallback = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), c, groups, eps)?;
        Ok(Self {
            weight,
            bias,
            op: Fused { groups, eps },
            fallback,
        })
    }

    /// `(B, C, …)` → same shape.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 {
            x.contiguous()?.apply_op3(&self.weight, &self.bias, self.op)
        } else {
            super::activation::Activation::Silu.apply(&self.fallback.forward(x)?)
        }
    }
}

#[derive(Clone, Copy)]
struct Fused {
    groups: usize,
    eps: f64,
}

/// Shapes of a `(B, C, rest)` tensor seen as `groups` groups of `C/groups` channels.
#[derive(Clone, Copy)]
struct Geometry {
    channels: usize,
    spatial: usize,
    groups: usize,
}

impl Geometry {
    fn of(shape: &Shape, groups: usize, op: &str) -> Result<Self> {
        let dims = shape.dims();
        if dims.len() < 2 {
            candle_core::bail!("{op}: expected (B, C, …), got {dims:?}");
        }
        let channels = dims[1];
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!("{op}: {channels} channels do not split into {groups} groups");
        }
        Ok(Self {
            channels,
            spatial: dims[2..].iter().product(),
            groups,
        })
    }

    /// Elements of one group in one sample.
    fn group_len(&self) -> usize {
        self.channels / self.groups * self.spatial
    }
}

/// `Σ f(x)` over a slice in 8 independent lanes, so the loop vectorises (a single running sum
/// is a serial chain: float addition does not reassociate).
#[inline(always)]
fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for c in chunks {
        let c: &[f32; 8] = c.try_into().expect("8 lanes");
        for l in 0..8 {
            acc[l] += f(c[l]);
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// Mean and 1/σ of one group (two passes: the variance of the centred values).
#[inline(always)]
fn stats(xs: &[f32], eps: f64) -> (f32, f32) {
    let n = xs.len() as f32;
    let mean = lane_sum(xs, |v| v) / n;
    let var = lane_sum(xs, |v| (v - mean) * (v - mean)) / n;
    (mean, (1.0 / (var as f64 + eps).sqrt()) as f32)
}

macro_rules! kernels {
    ($fwd:ident, $bwd:ident, $fma:literal $(, #[$attr:meta])?) => {
        $(#[$attr])?
        unsafe fn $fwd(
            g: Geometry,
            eps: f64,
            x: &[f32],
            w: &[f32],
            b: &[f32],
            out: &mut [MaybeUninit<f32>],
        ) {
            let (cg, hw, n) = (g.channels / g.groups, g.spatial, g.group_len());
            for (gi, (xs, os)) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)).enumerate() {
                let c0 = (gi % g.groups) * cg;
                let (mean, rstd) = stats(xs, eps);
                for (j, (xc, oc)) in xs.chunks_exact(hw).zip(os.chunks_exact_mut(hw)).enumerate() {
                    // z = x̂·γ + β = x·a + c with a = γ/σ, c = β − μ·γ/σ.
                    let a = w[c0 + j] * rstd;
                    let c = b[c0 + j] - mean * a;
                    for (o, &v) in oc.iter_mut().zip(xc) {
                        o.write(forward::<$fma>(Kind::Silu, v * a + c));
                    }
                }
            }
        }

        /// Writes every value of `dx` and accumulates dγ, dβ into `dw`, `db`.
        $(#[$attr])?
        #[allow(clippy::too_many_arguments)]
        unsafe fn $bwd(
            g: Geometry,
            eps: f64,
            x: &[f32],
            w: &[f32],
            b: &[f32],
            dy: &[f32],
            dx: &mut [MaybeUninit<f32>],
            dw: &mut [f64],
            db: &mut [f64],
        ) {
            let (cg, hw, n) = (g.channels / g.groups, g.spatial, g.group_len());
            for (gi, ((xs, gs), ds)) in x
                .chunks_exact(n)
                .zip(dy.chunks_exact(n))
                .zip(dx.chunks_exact_mut(n))
                .enumerate()
            {
                let c0 = (gi % g.groups) * cg;
                let (mean, rstd) = stats(xs, eps);
                // Pass 1, per channel: dz = dy·SiLU'(z) into dx; Σdz → dβ, Σdz·x̂ → dγ.
                // With g = dz·γ, the group sums Σg and Σg·x̂ are γ-weighted sums of those.
                let (mut sum_g, mut sum_gx) = (0f32, 0f32);
                for j in 0..cg {
                    let (wc, bc) = (w[c0 + j], b[c0 + j]);
                    let a = wc * rstd;
                    let c = bc - mean * a;
                    let r = j * hw..(j + 1) * hw;
                    let (xc, gc, dc) = (&xs[r.clone()], &gs[r.clone()], &mut ds[r]);
                    let (mut sdz, mut sdzx) = ([0f32; 8], [0f32; 8]);
                    let m = hw / 8 * 8;
                    for ((xv, gv), dv) in xc[..m]
                        .chunks_exact(8)
                        .zip(gc[..m].chunks_exact(8))
                        .zip(dc[..m].chunks_exact_mut(8))
                    {
                        // Fixed-size arrays: no bounds checks, so the 8 lanes become one vector.
                        let xv: &[f32; 8] = xv.try_into().expect("8 lanes");
                        let gv: &[f32; 8] = gv.try_into().expect("8 lanes");
                        let dv: &mut [MaybeUninit<f32>; 8] = dv.try_into().expect("8 lanes");
                        for l in 0..8 {
                            let dz = gv[l] * silu_derivative::<$fma>(xv[l] * a + c);
                            dv[l].write(dz);
                            sdz[l] += dz;
                            sdzx[l] += dz * xv[l];
                        }
                    }
                    let (mut tdz, mut tdzx) = (sdz.iter().sum::<f32>(), sdzx.iter().sum::<f32>());
                    for q in m..hw {
                        let v = xc[q];
                        let dz = gc[q] * silu_derivative::<$fma>(v * a + c);
                        dc[q].write(dz);
                        tdz += dz;
                        tdzx += dz * v;
                    }
                    // Σdz·x̂ = (Σdz·x − μ·Σdz)/σ.
                    let tdzxh = (tdzx - mean * tdz) * rstd;
                    db[c0 + j] += tdz as f64;
                    dw[c0 + j] += tdzxh as f64;
                    sum_g += wc * tdz;
                    sum_gx += wc * tdzxh;
                }
                // Pass 2: dx = (dz·γ − mean(g) − x̂·mean(g·x̂)) / σ.
                let (mg, mgx) = (sum_g / n as f32, sum_gx / n as f32);
                // SAFETY: pass 1 wrote every value of the group.
                let ds = std::slice::from_raw_parts_mut(ds.as_mut_ptr().cast::<f32>(), n);
                for j in 0..cg {
                    let wc = w[c0 + j];
                    let r = j * hw..(j + 1) * hw;
                    for (d, &v) in ds[r.clone()].iter_mut().zip(&xs[r]) {
                        let xh = (v - mean) * rstd;
                        *d = (*d * wc - mg - xh * mgx) * rstd;
                    }
                }
            }
        }
    };
}
kernels!(fwd_base, bwd_base, false);
#[cfg(target_arch = "x86_64")]
kernels!(fwd_avx2, bwd_avx2, true, #[target_feature(enable = "avx2,fma")]);

impl CustomOp3 for Fused {
    fn name(&self) -> &'static str {
        "groupnorm-silu"
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
        let op = self.name();
        let g = Geometry::of(l1.shape(), self.groups, op)?;
        let [x, w, b] = f32_slices3(op, (s1, l1), (s2, l2), (s3, l3))?;
        if w.len() != g.channels || b.len() != g.channels {
            candle_core::bail!("{op}: affine parameters must have {} values", g.channels);
        }
        let mut out = Vec::with_capacity(x.len());
        // Samples in parallel: each is whole groups.
        let per = g.channels * g.spatial;
        out.spare_capacity_mut()[..x.len()]
            .par_chunks_mut(per.max(1))
            .zip(x.par_chunks(per.max(1)))
            .for_each(|(os, xs)| {
                // SAFETY: the AVX2 path runs only where the CPU reports AVX2 and FMA.
                unsafe {
                    #[cfg(target_arch = "x86_64")]
                    if has_avx2() {
                        return fwd_avx2(g, self.eps, xs, w, b, os);
                    }
                    fwd_base(g, self.eps, xs, w, b, os);
                }
            });
        // SAFETY: the kernels write every value of every sample.
        unsafe { out.set_len(x.len()) };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // One op computes dx, dγ and dβ, packed end to end in a flat tensor.
        let packed = x.apply_op3_no_bwd(
            &Tensor::cat(&[w, b], 0)?,
            &grad.contiguous()?,
            &FusedGrad(*self),
        )?;
        unpack_grads(&packed, [x, w, b])
    }
}

/// Backward of [`Fused`] (same settings): inputs x, [γ; β], dy; output [dx; dγ; dβ] flattened.
struct FusedGrad(Fused);

impl CustomOp3 for FusedGrad {
    fn name(&self) -> &'static str {
        "groupnorm-silu-grad"
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
        let op = self.name();
        let g = Geometry::of(l1.shape(), self.0.groups, op)?;
        let [x, wb, dy] = f32_slices3(op, (s1, l1), (s2, l2), (s3, l3))?;
        if wb.len() != 2 * g.channels || dy.len() != x.len() {
            candle_core::bail!("{op}: shape mismatch");
        }
        let (w, b) = wb.split_at(g.channels);
        let mut dx = Vec::with_capacity(x.len() + 2 * g.channels);
        // Chunks of samples in parallel, each with its own dγ, dβ partial sums, added in
        // chunk order: the same bits for any thread count.
        let span = (CHUNK * g.channels * g.spatial).max(1);
        let partials: Vec<(Vec<f64>, Vec<f64>)> = dx.spare_capacity_mut()[..x.len()]
            .par_chunks_mut(span)
            .zip(x.par_chunks(span))
            .zip(dy.par_chunks(span))
            .map(|((dxs, xs), gs)| {
                let (mut dw, mut db) = (vec![0f64; g.channels], vec![0f64; g.channels]);
                // SAFETY: as in the forward.
                unsafe {
                    #[cfg(target_arch = "x86_64")]
                    if has_avx2() {
                        bwd_avx2(g, self.0.eps, xs, w, b, gs, dxs, &mut dw, &mut db);
                        return (dw, db);
                    }
                    bwd_base(g, self.0.eps, xs, w, b, gs, dxs, &mut dw, &mut db);
                }
                (dw, db)
            })
            .collect();
        let (mut dw, mut db) = (vec![0f64; g.channels], vec![0f64; g.channels]);
        for (pw, pb) in &partials {
            dw.iter_mut().zip(pw).for_each(|(t, v)| *t += v);
            db.iter_mut().zip(pb).for_each(|(t, v)| *t += v);
        }
        // SAFETY: the kernels wrote every value of dx.
        unsafe { dx.set_len(x.len()) };
        dx.extend(dw.iter().chain(&db).map(|&v| v as f32));
        Ok((CpuStorage::F32(dx), Shape::from(x.len() + 2 * g.channels)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn gradients_do_not_depend_on_the_thread_count() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (9, 8, 5, 5), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.5, 8, &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.5, 8, &dev).unwrap()).unwrap();
        let op = GroupNormSilu::new(w.as_tensor().clone(), b.as_tensor().clone(), 4, 1e-5).unwrap();
        let grads = |threads: usize| {
            crate::grads_on_threads(threads, &[&x, &w, &b], || {
                let y = op.forward(x.as_tensor()).unwrap();
                y.sqr().unwrap().sum_all().unwrap()
            })
        };
        assert_eq!(grads(1), grads(3));
    }

    #[test]
    fn matches_candle_groupnorm_then_silu_values_and_gradients() {
        let dev = Device::Cpu;
        for (shape, groups) in [((3, 8, 5, 4), 4), ((2, 6, 3, 3), 2), ((2, 4, 1, 7), 4)] {
            let c = shape.1;
            let x =
                Var::from_tensor(&(Tensor::randn(0f32, 2.0, shape, &dev).unwrap() + 0.7).unwrap())
                    .unwrap();
            let w = Var::from_tensor(&Tensor::randn(1f32, 0.5, c, &dev).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::randn(0f32, 0.5, c, &dev).unwrap()).unwrap();
            let ours =
                GroupNormSilu::new(w.as_tensor().clone(), b.as_tensor().clone(), groups, 1e-5)
                    .unwrap();
            let theirs = candle_nn::GroupNorm::new(
                w.as_tensor().clone(),
                b.as_tensor().clone(),
                c,
                groups,
                1e-5,
            )
            .unwrap();
            let y1 = ours.forward(x.as_tensor()).unwrap();
            let y2 = theirs.forward(x.as_tensor()).unwrap().silu().unwrap();
            let d = crate::max_abs_diff(&y1, &y2);
            assert!(d < 1e-5, "{shape:?} forward: {d}");
            // A loss that weights every element differently, so no gradient term cancels.
            let r = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
            let g1 = (y1 * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (y2 * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("x", &x), ("weight", &w), ("bias", &b)] {
                let d = crate::grad_diff(&g1, &g2, v);
                assert!(d < 1e-4, "{shape:?} d{name}: {d}");
            }
        }
    }

    #[test]
    fn refuses_channels_that_do_not_split_into_groups() {
        let dev = Device::Cpu;
        let gn = GroupNormSilu::new(
            Tensor::ones(6, DType::F32, &dev).unwrap(),
            Tensor::zeros(6, DType::F32, &dev).unwrap(),
            4,
            1e-5,
        );
        // candle's own GroupNorm refuses 6 channels in 4 groups at construction.
        assert!(gn.is_err());
    }
}
