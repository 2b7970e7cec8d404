//! An MLP's layers with their activation, `act(x Wᵀ + b)` each, for sampling: register-tiled
//! kernels (AVX-512 where the CPU has it, else AVX2 + FMA) whose epilogue adds the bias and
//! applies the activation while the outputs are still in cache.
//!
//! Sampling 10,000 points through the lesson's MLP is two 128 × 128 layers per evaluation:
//! through `gemm` and a separate activation pass, 15% of the time went to that pass and 10%
//! to packing and copies. Here each weight is packed once per evaluation into panels of 16
//! (AVX2) or 32 (AVX-512) output columns; tiles of 240 rows go through all the layers in turn
//! (their activations stay in L2), each group of 6 or 12 rows through every panel and then
//! the epilogue.
//!
//! The sums run over `k` in order with one fused multiply-add per term, from zero, and the
//! bias is added last: the same arithmetic as `gemm` onto the bias, so the outputs are
//! bit-identical to [`Linear`](crate::Linear) followed by [`Activation::apply`] (tested).
//! No gradient: this is for ODE solvers' evaluations (`velocity_at`); the result is a fresh
//! tensor outside the autograd graph.

use super::activation::{forward, has_avx2, has_avx512, Activation, Kind};
use super::cpu::f32_slice;
use candle_core::{DType, Device, Result, Storage, Tensor, D};
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

/// Rows per tile of [`chain`]: a multiple of both register tiles (6 and 12 rows), small
/// enough that a tile's activations (240 × 128 floats, 120 KiB) stay in L2 across layers.
const TILE_ROWS: usize = 240;

/// `act(… act(act(x W₁ᵀ + b₁) W₂ᵀ + b₂) …)`: the layers of an MLP, each followed by `act`,
/// without gradient. Rows go through all the layers a tile at a time, so the activations stay
/// in cache; each layer's weight is packed once. `None` where the fused kernels do not apply
/// (the caller then runs the differentiable ops): off x86-64 CPUs with AVX2 + FMA, widths
/// not a multiple of 16, and shapes where `gemm` sums differently (fewer than [`MIN_ROWS`]
/// rows: its matrix-vector path; more than [`MAX_INNER`] inputs: its blocked sums).
pub(crate) fn chain(
    x: &Tensor,
    layers: &[(&Tensor, &Tensor)],
    act: Activation,
) -> Result<Option<Tensor>> {
    let mut width = x.dim(D::Minus1)?;
    let mut fits = matches!(x.device(), Device::Cpu)
        && x.dtype() == DType::F32
        && x.rank() == 2
        && x.dim(0)? >= MIN_ROWS
        && !layers.is_empty()
        && has_avx2();
    for (w, b) in layers {
        let (o, i) = w.dims2()?;
        fits &= w.dtype() == DType::F32
            && b.dtype() == DType::F32
            && i == width
            && i <= MAX_INNER
            && o % COLS == 0
            && b.elem_count() == o;
        width = o;
    }
    if !fits {
        return Ok(None);
    }
    let packed = layers
        .iter()
        .map(|(w, b)| {
            let (o, i) = w.dims2()?;
            with_f32(w, |w| with_f32(b, |b| Packed::new(w, b, o, i, act)))?
        })
        .collect::<Result<Vec<_>>>()?;
    let n = x.dim(0)?;
    let y = with_f32(x, |x| run_chain(x, n, &packed))?;
    Ok(Some(Tensor::from_vec(y, (n, width), x.device())?))
}

/// Calls `f` on a CPU f32 tensor's data, contiguous (copied if not).
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => Ok(f(f32_slice(cpu, layout, "dense")?)),
        _ => candle_core::bail!("dense: expected a CPU tensor"),
    }
}

/// One layer packed for the tiles: panel p holds output columns `cols·p..cols·(p+1)` of Wᵀ,
/// row k contiguous.
struct Packed {
    panels: Vec<f32>,
    bias: Vec<f32>,
    i: usize,
    o: usize,
    /// AVX-512 tiles (12 rows × 32 columns), chosen at run time where the width allows.
    wide: bool,
    act: Activation,
}

impl Packed {
    fn new(w: &[f32], b: &[f32], o: usize, i: usize, act: Activation) -> Self {
        let wide = o.is_multiple_of(WIDE_COLS) && has_avx512();
        let cols = if wide { WIDE_COLS } else { COLS };
        let mut panels = vec![0f32; o * i];
        for (p, panel) in panels.chunks_exact_mut(cols * i).enumerate() {
            for (k, row) in panel.chunks_exact_mut(cols).enumerate() {
                for (c, v) in row.iter_mut().enumerate() {
                    *v = w[(p * cols + c) * i + k];
                }
            }
        }
        Self {
            panels,
            bias: b.to_vec(),
            i,
            o,
            wide,
            act,
        }
    }

    /// `x` (rows × i) through this layer into `y` (rows × o, written, not read).
    ///
    /// # Safety
    /// `y` must be valid for `rows·o` writes, and the CPU must have AVX2 + FMA (and AVX-512F
    /// for a wide layer): `chain` checked both.
    #[cfg(target_arch = "x86_64")]
    unsafe fn run(&self, x: &[f32], y: *mut f32) {
        if self.wide {
            rows_avx512(x, y, self)
        } else {
            rows_avx2(x, y, self)
        }
    }
}

/// All `n` rows of `x` through the layers, a tile at a time (tiles in parallel under rayon
/// when the work is big; each row's result is the same either way).
fn run_chain(x: &[f32], n: usize, layers: &[Packed]) -> Vec<f32> {
    let i0 = layers[0].i;
    let out = layers[layers.len() - 1].o;
    let widest = layers.iter().map(|l| l.o).max().unwrap_or(0);
    // Every output is written before it is read: `y` starts uninitialised (no zero-fill).
    let mut y: Vec<f32> = Vec::with_capacity(n * out);
    let spare = &mut y.spare_capacity_mut()[..n * out];
    let scratch = || {
        [
            vec![0f32; TILE_ROWS * widest],
            vec![0f32; TILE_ROWS * widest],
        ]
    };
    let one_tile = |bufs: &mut [Vec<f32>; 2], (xs, ys): (&[f32], &mut [MaybeUninit<f32>])| {
        let rows = xs.len() / i0;
        // Layer l reads the previous output and writes scratch l % 2 (or the output tile).
        let scratch = [bufs[0].as_mut_ptr(), bufs[1].as_mut_ptr()];
        let mut input: &[f32] = xs;
        for (l, layer) in layers.iter().enumerate() {
            let last = l + 1 == layers.len();
            let dst = if last {
                ys.as_mut_ptr() as *mut f32
            } else {
                scratch[l % 2]
            };
            // SAFETY: `chain` checked AVX2 (and AVX-512F for wide layers); `dst` holds
            // `rows·o` floats (the output tile, or a scratch buffer as wide as the widest
            // layer) and is not `input` (the other buffer, or `xs`); once written, it is read
            // as the next input.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                layer.run(input, dst);
                if !last {
                    input = std::slice::from_raw_parts(dst, rows * layer.o);
                }
            }
        }
    };
    let flops: usize = layers.iter().map(|l| n * l.i * l.o).sum();
    if flops >= 1 << 22 && rayon::current_num_threads() > 1 {
        x.par_chunks(TILE_ROWS * i0)
            .zip(spare.par_chunks_mut(TILE_ROWS * out))
            .for_each_init(scratch, one_tile);
    } else {
        let mut bufs = scratch();
        x.chunks(TILE_ROWS * i0)
            .zip(spare.chunks_mut(TILE_ROWS * out))
            .for_each(|c| one_tile(&mut bufs, c));
    }
    // SAFETY: the last layer wrote all n·out outputs.
    unsafe { y.set_len(n * out) };
    y
}

/// All rows of `x` (`rows × i`) into `y` (`rows × o`) through one packed layer: groups of rows
/// through every panel (the last group smaller), then the epilogue (bias, activation) on them
/// while they are in L1.
macro_rules! rows_fn {
    ($name:ident, $tile:ident, $cols:expr, [$($r:literal),+], $feat:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feat)]
        unsafe fn $name(x: &[f32], y: *mut f32, layer: &Packed) {
            let Packed { panels, bias: b, i, o, act, .. } = layer;
            let (i, o) = (*i, *o);
            let most = [$($r),+][0];
            let n = x.len() / i;
            let mut r = 0;
            while r < n {
                let rows = most.min(n - r);
                let xs = &x[r * i..(r + rows) * i];
                let ys = y.add(r * o);
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

/// A register tile: `R` rows × `cols` columns, `y[r][c0..c0+cols] = Σ_k x[r][k]·panel[k]`, two
/// accumulators per row, written to `y` (`R` rows of `o` writable floats).
macro_rules! tile_fn {
    ($name:ident, $feat:literal, $cols:expr, $half:expr,
     $zero:ident, $load:ident, $set1:ident, $fmadd:ident, $store:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feat)]
        #[inline]
        unsafe fn $name<const R: usize>(
            x: &[f32],
            y: *mut f32,
            panel: &[f32],
            i: usize,
            o: usize,
            c0: usize,
        ) {
            use std::arch::x86_64::*;
            debug_assert!(x.len() >= R * i && panel.len() >= $cols * i && c0 + $cols <= o);
            let mut lo = [$zero(); R];
            let mut hi = [$zero(); R];
            let (xp, pp) = (x.as_ptr(), panel.as_ptr());
            for k in 0..i {
                let w0 = $load(pp.add(k * $cols));
                let w1 = $load(pp.add(k * $cols + $half));
                for r in 0..R {
                    let a = $set1(*xp.add(r * i + k));
                    lo[r] = $fmadd(a, w0, lo[r]);
                    hi[r] = $fmadd(a, w1, hi[r]);
                }
            }
            for r in 0..R {
                $store(y.add(r * o + c0), lo[r]);
                $store(y.add(r * o + c0 + $half), hi[r]);
            }
        }
    };
}
// AVX2: 6 rows × 16 columns, 12 accumulators + 2 weight vectors + 1 broadcast of 16 registers.
tile_fn!(
    tile,
    "avx2,fma",
    COLS,
    8,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_set1_ps,
    _mm256_fmadd_ps,
    _mm256_storeu_ps
);
// AVX-512: 12 rows × 32 columns, 24 accumulators of 32 registers.
tile_fn!(
    tile512,
    "avx512f,avx2,fma",
    WIDE_COLS,
    16,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_set1_ps,
    _mm512_fmadd_ps,
    _mm512_storeu_ps
);

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Module;

    fn bits(t: &Tensor) -> Vec<u32> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn matches_linear_then_activation_bit_for_bit() {
        if !has_avx2() {
            crate::skipped(
                "dense::matches_linear_then_activation_bit_for_bit",
                "this CPU has no AVX2/FMA, so the fused kernel is never used on it",
            );
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
                let got = chain(&x, &[(&w, &b)], act).unwrap().unwrap();
                assert_eq!(bits(&want), bits(&got), "{n}x{i}x{o} {act:?}");
            }
        }
        // Several layers, more rows than a tile: the same as layer after layer.
        let x = Tensor::randn(0f32, 1.0, (1000, 3), &dev).unwrap();
        let shapes = [(64, 3), (128, 64), (32, 128)];
        let ws: Vec<(Tensor, Tensor)> = shapes
            .iter()
            .map(|&(o, i)| {
                (
                    (Tensor::randn(0f32, 1.0, (o, i), &dev).unwrap() / (i as f64).sqrt()).unwrap(),
                    Tensor::randn(0f32, 1.0, o, &dev).unwrap(),
                )
            })
            .collect();
        let mut want = x.clone();
        for (w, b) in &ws {
            let lin = crate::Linear::new(w.clone(), b.clone());
            want = Activation::Gelu
                .apply(&lin.forward(&want).unwrap())
                .unwrap();
        }
        let layers: Vec<(&Tensor, &Tensor)> = ws.iter().map(|(w, b)| (w, b)).collect();
        let got = chain(&x, &layers, Activation::Gelu).unwrap().unwrap();
        assert_eq!(bits(&want), bits(&got));
        // Outside those shapes the caller keeps the differentiable ops.
        let none = |n: usize, i: usize, o: usize| {
            let x = Tensor::zeros((n, i), DType::F32, &dev).unwrap();
            let w = Tensor::zeros((o, i), DType::F32, &dev).unwrap();
            let b = Tensor::zeros(o, DType::F32, &dev).unwrap();
            chain(&x, &[(&w, &b)], Activation::Silu).unwrap().is_none()
        };
        assert!(none(2, 128, 128) && none(8, 1024, 64) && none(8, 8, 10));
    }
}
