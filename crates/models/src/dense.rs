//! `act(x Wᵀ + b)` in one pass, for sampling: an AVX2 + FMA register-tiled kernel whose
//! epilogue adds the bias and applies the activation while the outputs are still in cache.
//!
//! Sampling 10,000 points through the lesson's MLP is two 128 × 128 layers per evaluation:
//! through `gemm` and a separate activation pass, 15% of the time went to that pass and 10%
//! to packing and copies. Here the weight is packed once per call into panels of 16 output
//! columns, and each group of 6 rows goes through every panel and then the activation.
//!
//! The sums run over `k` in order with one fused multiply-add per term, from zero, and the
//! bias is added last: the same arithmetic as `gemm` onto the bias, so the outputs are
//! bit-identical to [`Linear`](crate::Linear) followed by [`Activation::apply`] (tested).
//! No gradient: this is for ODE solvers' evaluations (`velocity_at`); a backward through it
//! is an error.

use crate::activation::{forward, has_avx2, Activation, Kind};
use crate::cpu::f32_slices3;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Output columns per panel: two AVX2 vectors.
const COLS: usize = 16;
// Rows per AVX2 tile: 6 × 2 accumulators + 2 weight vectors + 1 broadcast = 15 of the 16
// registers (the `rows_fn!` lists).
/// Output columns per AVX-512 panel: two 16-lane vectors.
const WIDE_COLS: usize = 32;
/// Fewest rows for the fused path (bit-identical from here on).
pub(crate) const MIN_ROWS: usize = 3;
/// Most inputs per output for the fused path (bit-identical up to here).
pub(crate) const MAX_INNER: usize = 512;

/// `act(x Wᵀ + b)` without gradient, fused on x86-64 CPUs with AVX2 + FMA when the output width
/// is a multiple of 16; otherwise `None` (the caller uses the differentiable ops). Also `None`
/// outside the shapes where `gemm` sums the same way (at least [`MIN_ROWS`] rows, at most
/// [`MAX_INNER`] inputs: fewer rows take its matrix-vector path, more inputs its blocked sums).
pub(crate) fn linear_act(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    act: Activation,
) -> Result<Option<Tensor>> {
    let fits = matches!(x.device(), Device::Cpu)
        && x.dtype() == DType::F32
        && x.rank() == 2
        && x.dim(0)? >= MIN_ROWS
        && weight.dim(1)? <= MAX_INNER
        && weight.dim(0)? % COLS == 0
        && has_avx2();
    if !fits {
        return Ok(None);
    }
    x.contiguous()?
        .apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &LinearAct(act))
        .map(Some)
}

struct LinearAct(Activation);

impl CustomOp3 for LinearAct {
    fn name(&self) -> &'static str {
        "linear-act"
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
        let [x, w, b] = f32_slices3(self.name(), (s1, l1), (s2, l2), (s3, l3))?;
        let (o, i) = l2.shape().dims2()?;
        let n = l1.shape().dims2()?.0;
        if l1.shape().dims2()?.1 != i || b.len() != o || o % COLS != 0 || !has_avx2() {
            candle_core::bail!(
                "linear-act: input {:?} against weight ({o}, {i})",
                l1.shape()
            );
        }
        // AVX-512 (chosen at run time) where the width allows: 12 rows × 32 columns per tile.
        let wide = o % WIDE_COLS == 0 && has_avx512();
        let cols = if wide { WIDE_COLS } else { COLS };
        // Panels: panel p holds columns cols·p.. cols·(p+1) of Wᵀ, row k contiguous.
        let mut panels = vec![0f32; o * i];
        for (p, panel) in panels.chunks_exact_mut(cols * i).enumerate() {
            for (k, row) in panel.chunks_exact_mut(cols).enumerate() {
                for (c, v) in row.iter_mut().enumerate() {
                    *v = w[(p * cols + c) * i + k];
                }
            }
        }
        // Every output is written by a tile before the epilogue reads it, so `y` starts
        // uninitialised (no zero-fill pass).
        let mut y: Vec<f32> = Vec::with_capacity(n * o);
        // Row groups are independent: split them across rayon's threads when the layer is big.
        let chunk_rows = 12 * 32;
        let run = |(xs, ys): (&[f32], &mut [MaybeUninit<f32>])| {
            // SAFETY: `has_avx2` was checked above, `has_avx512` for the wide tiles.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                if wide {
                    rows_avx512(xs, ys, &panels, b, i, o, self.0)
                } else {
                    rows_avx2(xs, ys, &panels, b, i, o, self.0)
                }
            }
        };
        let spare = &mut y.spare_capacity_mut()[..n * o];
        if n * o * i >= 1 << 22 && rayon::current_num_threads() > 1 {
            x.par_chunks(chunk_rows * i)
                .zip(spare.par_chunks_mut(chunk_rows * o))
                .for_each(run);
        } else {
            x.chunks(chunk_rows * i)
                .zip(spare.chunks_mut(chunk_rows * o))
                .for_each(run);
        }
        // SAFETY: the row functions wrote all n·o outputs.
        unsafe { y.set_len(n * o) };
        Ok((CpuStorage::F32(y), Shape::from((n, o))))
    }
}

/// All rows of `x` (`rows × i`) into `y` (`rows × o`): groups of rows through every panel
/// (the last group smaller), then the epilogue on them while they are in L1.
macro_rules! rows_fn {
    ($name:ident, $tile:ident, $cols:expr, [$($r:literal),+], $feat:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feat)]
        unsafe fn $name(
            x: &[f32],
            y: &mut [MaybeUninit<f32>],
            panels: &[f32],
            b: &[f32],
            i: usize,
            o: usize,
            act: Activation,
        ) {
            let most = [$($r),+][0];
            let n = x.len() / i;
            let mut r = 0;
            while r < n {
                let rows = most.min(n - r);
                let xs = &x[r * i..(r + rows) * i];
                let ys = y[r * o..(r + rows) * o].as_mut_ptr() as *mut f32;
                for (p, panel) in panels.chunks_exact($cols * i).enumerate() {
                    match rows {
                        $($r => $tile::<$r>(xs, ys, panel, i, o, p * $cols),)+
                        _ => unreachable!(),
                    }
                }
                // SAFETY: the tiles above wrote these rows' every column.
                let ys = std::slice::from_raw_parts_mut(ys, rows * o);
                for row in ys.chunks_exact_mut(o) {
                    match act {
                        Activation::Gelu => epilogue(row, b, |v| forward::<true>(Kind::Gelu, v)),
                        Activation::Silu => epilogue(row, b, |v| forward::<true>(Kind::Silu, v)),
                        Activation::Relu => epilogue(row, b, |v| v.max(0.0)),
                    }
                }
                r += rows;
            }
        }
    };
}
rows_fn!(rows_avx2, tile, COLS, [6, 5, 4, 3, 2, 1], "avx2,fma");
rows_fn!(
    rows_avx512,
    tile512,
    WIDE_COLS,
    [12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1],
    "avx512f,avx2,fma"
);

#[inline(always)]
fn epilogue(row: &mut [f32], b: &[f32], f: impl Fn(f32) -> f32) {
    row.iter_mut().zip(b).for_each(|(v, &bb)| *v = f(*v + bb));
}

/// `R` rows × 16 columns: `y[r][c0..c0+16] = Σ_k x[r][k]·panel[k]`, in registers; `y` points
/// at `R` rows of `o` writable floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile<const R: usize>(
    x: &[f32],
    y: *mut f32,
    panel: &[f32],
    i: usize,
    o: usize,
    c0: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!(x.len() >= R * i && panel.len() >= COLS * i && c0 + COLS <= o);
    let mut lo = [_mm256_setzero_ps(); R];
    let mut hi = [_mm256_setzero_ps(); R];
    let (xp, pp) = (x.as_ptr(), panel.as_ptr());
    for k in 0..i {
        let w0 = _mm256_loadu_ps(pp.add(k * COLS));
        let w1 = _mm256_loadu_ps(pp.add(k * COLS + 8));
        for r in 0..R {
            let a = _mm256_broadcast_ss(&*xp.add(r * i + k));
            lo[r] = _mm256_fmadd_ps(a, w0, lo[r]);
            hi[r] = _mm256_fmadd_ps(a, w1, hi[r]);
        }
    }
    let yp = y;
    for r in 0..R {
        _mm256_storeu_ps(yp.add(r * o + c0), lo[r]);
        _mm256_storeu_ps(yp.add(r * o + c0 + 8), hi[r]);
    }
}

/// `R` rows × 32 columns with AVX-512: two 16-lane accumulators per row, up to 24 of the 32
/// registers; same sums as [`tile`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
unsafe fn tile512<const R: usize>(
    x: &[f32],
    y: *mut f32,
    panel: &[f32],
    i: usize,
    o: usize,
    c0: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!(x.len() >= R * i && panel.len() >= WIDE_COLS * i && c0 + WIDE_COLS <= o);
    let mut lo = [_mm512_setzero_ps(); R];
    let mut hi = [_mm512_setzero_ps(); R];
    let (xp, pp) = (x.as_ptr(), panel.as_ptr());
    for k in 0..i {
        let w0 = _mm512_loadu_ps(pp.add(k * WIDE_COLS));
        let w1 = _mm512_loadu_ps(pp.add(k * WIDE_COLS + 16));
        for r in 0..R {
            let a = _mm512_set1_ps(*xp.add(r * i + k));
            lo[r] = _mm512_fmadd_ps(a, w0, lo[r]);
            hi[r] = _mm512_fmadd_ps(a, w1, hi[r]);
        }
    }
    for r in 0..R {
        _mm512_storeu_ps(y.add(r * o + c0), lo[r]);
        _mm512_storeu_ps(y.add(r * o + c0 + 16), hi[r]);
    }
}

/// Whether the CPU has AVX-512F (checked once).
fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX512: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX512.get_or_init(|| is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Module;

    #[test]
    fn matches_linear_then_activation_bit_for_bit() {
        if !has_avx2() {
            return;
        }
        let dev = Device::Cpu;
        for (n, i, o) in [
            (3, 128, 128),
            (7, 128, 128),
            (8, 64, 64),
            (13, 128, 128),
            (1000, 128, 128),
            (37, 5, 32),
            (300, 200, 48),
            (50, 512, 64),
        ] {
            let x = Tensor::randn(0f32, 1.0, (n, i), &dev).unwrap();
            let w = (Tensor::randn(0f32, 1.0, (o, i), &dev).unwrap() / (i as f64).sqrt()).unwrap();
            let b = Tensor::randn(0f32, 1.0, o, &dev).unwrap();
            let lin = crate::Linear::new(w.clone(), b.clone());
            for act in [Activation::Silu, Activation::Gelu, Activation::Relu] {
                let want = act.apply(&lin.forward(&x).unwrap()).unwrap();
                let got = linear_act(&x, &w, &b, act).unwrap().unwrap();
                let (a, c): (Vec<f32>, Vec<f32>) = (
                    want.flatten_all().unwrap().to_vec1().unwrap(),
                    got.flatten_all().unwrap().to_vec1().unwrap(),
                );
                let differ = a.iter().zip(&c).filter(|(p, q)| p.to_bits() != q.to_bits());
                assert_eq!(differ.count(), 0, "{n}x{i}x{o} {act:?}");
            }
        }
        // Outside those shapes the caller keeps the differentiable ops.
        let none = |n: usize, i: usize, o: usize| {
            let x = Tensor::zeros((n, i), DType::F32, &dev).unwrap();
            let w = Tensor::zeros((o, i), DType::F32, &dev).unwrap();
            let b = Tensor::zeros(o, DType::F32, &dev).unwrap();
            linear_act(&x, &w, &b, Activation::Silu).unwrap().is_none()
        };
        assert!(none(2, 128, 128) && none(8, 1024, 64) && none(8, 8, 10));
    }
}
