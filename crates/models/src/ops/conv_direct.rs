//! A direct kernel for stride-1 convs on the padded layout (`conv_padded`): no unfolding.
//!
//! On the `Wp`-wide padded sample, tap `(i, j)` of the output pixels `q..q + 16` is the 16
//! consecutive inputs from `c·Hp·Wp + i·Wp + j + q` on. So a register tile of 6 output
//! channels × 16 pixels (12 AVX2 accumulators) sums over every `(c, i, j)` with two unaligned
//! loads straight from the padded sample and six broadcast weights: the same 12 fused
//! multiply-adds per step as a gemm's 16 × 6 microkernel, without the `C·k²`-row unfolded copy
//! that the gemm needs and then packs again.
//!
//! With AVX-512 (`forward_wide`) a register tile covers up to 12 output channels × 32 pixels
//! (24 of the 32 vector registers), each value the same operations in the same order (the
//! same bits).
//!
//! The weights are packed once per op into panels of at most 6 output channels, the rows
//! spread evenly over them, so no tile sums rows of zeros (`pack`). Each sum runs
//! over `(c, i, j)` in order with one fused multiply-add per term, from zero, per sample, so
//! the bits do not depend on the thread count.
//!
//! The same kernel serves every conv whose taps are fixed offsets into a sample's planes: the
//! forward of convs with few outputs (the same sums as `conv_padded`'s tap-by-tap `axpy`s),
//! the data gradient of a stride-1 conv (a conv with the flipped kernel), the four sub-pixel phases
//! of a stride-2 transposed conv or of a stride-2 conv's data gradient (`conv_subpixel`), and
//! stride-2 convs on their input's 2×2 phases ([`split_phases`], [`phase_offsets`]).
//! `conv_wgrad` sums the weight gradient of such a conv in the same layout.

use super::pairs;

/// Output channels per register tile.
const ROWS: usize = 6;
/// Output pixels per register tile (two AVX2 vectors).
const LANES: usize = 16;
/// Floats past the padded planes and their `k` floats of slack that the last tile's loads may
/// reach (its lanes past the output are never stored).
pub(crate) const SLACK: usize = LANES;

/// Whether the direct kernel runs on this CPU (x86-64 with AVX2 and FMA).
pub(crate) fn available() -> bool {
    super::activation::has_avx2()
}

/// The panels of `o` output channels, as `(first row, rows)`: as few as tiles of [`ROWS`]
/// need, with the rows spread evenly (16 channels are 6 + 5 + 5, not 6 + 6 + 4 with two
/// rows of zeros), so no tile sums rows that are never stored.
pub(crate) fn panels(o: usize) -> impl Iterator<Item = (usize, usize)> {
    let n = o.div_ceil(ROWS);
    let (base, extra) = (o / n.max(1), o % n.max(1));
    (0..n).map(move |p| (p * base + p.min(extra), base + usize::from(p < extra)))
}

/// Calls `f::<NR>(args)` for a panel of `nr` rows (1 to 6): the kernels' register tiles are
/// sized at compile time.
macro_rules! by_rows {
    // A kernel with a second const parameter after the rows: `f[K](args)`.
    ($nr:expr, $f:ident[$k:expr]($($arg:expr),* $(,)?)) => {
        match $nr {
            1 => $f::<1, { $k }>($($arg),*),
            2 => $f::<2, { $k }>($($arg),*),
            3 => $f::<3, { $k }>($($arg),*),
            4 => $f::<4, { $k }>($($arg),*),
            5 => $f::<5, { $k }>($($arg),*),
            _ => $f::<6, { $k }>($($arg),*),
        }
    };
    ($nr:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $nr {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            4 => $f::<4>($($arg),*),
            5 => $f::<5>($($arg),*),
            _ => $f::<6>($($arg),*),
        }
    };
}
pub(crate) use by_rows;

/// The weights `(O, C, k, k)` in [`panels`]: the panel of rows `r0..r0 + nr` starts at
/// `r0·inner` and holds, for every `(c, i, j)` in order, the `nr` weights of its channels.
pub(crate) fn pack(o: usize, inner: usize, w: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; o * inner];
    for (r0, nr) in panels(o) {
        for r in 0..nr {
            for t in 0..inner {
                out[r0 * inner + t * nr + r] = w[(r0 + r) * inner + t];
            }
        }
    }
    out
}

/// The layout the kernel reads and writes: `c` input planes of `plane` floats, taps at
/// `offsets` (`i·Wp + j`), `span` output pixels per channel (`H'·Wp`).
pub(crate) struct Shape<'a> {
    pub(crate) c: usize,
    pub(crate) plane: usize,
    pub(crate) offsets: &'a [usize],
    pub(crate) span: usize,
}

/// `y` (`O × span`) `=` the conv of the padded sample `xp` (its planes, `k` floats of slack
/// and [`SLACK`] more) with the packed weights `wp` of `o` output channels.
pub(crate) fn forward(s: &Shape, o: usize, wp: &[f32], xp: &[f32], y: &mut [f32]) {
    let inner = s.c * s.offsets.len();
    let last = s.offsets.iter().max().copied().unwrap_or(0);
    let reach = (s.c.max(1) - 1) * s.plane + last + s.span.div_ceil(LANES) * LANES;
    assert!(available() && wp.len() >= o * inner);
    assert!(xp.len() >= reach && y.len() >= o * s.span);
    // Pixel tiles outside, panels inside: a tile's inputs stay in L1 across the panels.
    // AVX-512 where the CPU has it (the same bits).
    if super::activation::wide_kernels() {
        // SAFETY: as below; `forward_wide` reads what the tiles here read.
        unsafe { forward_wide(s, o, wp, xp, y) };
        return;
    }
    let mut q = 0;
    while q < s.span {
        let n = LANES.min(s.span - q);
        for (r0, nr) in panels(o) {
            let panel = &wp[r0 * inner..(r0 + nr) * inner];
            let rows = &mut y[r0 * s.span..(r0 + nr) * s.span];
            // SAFETY: AVX2 and FMA are checked (`available`). The loads reach below
            // `(C − 1)·plane + max offset + q + 16 ≤ reach`; the stores cover `nr` rows of
            // `n` pixels from `q`.
            unsafe { by_rows!(nr, tile_avx2(s, panel, xp, q, rows, n)) }
        }
        q += LANES;
    }
}

/// [`forward`] with AVX-512 and its 32 vector registers: a register tile covers two adjacent
/// panels (up to 12 output channels) and 32 to 128 pixels (`NV` vectors: 2 for 7 rows and
/// more, 4 for 4 to 6, 8 for 1 to 3), so 8 to 24 independent sums hide the multiply-add's
/// latency and each loaded input vector serves up to 12 of them (the 16-pixel tile had 6 sums
/// per load). Every output value is still one fused multiply-add chain over `(c, i, j)` in
/// order from zero: the same bits. The last tile of a span loads and stores under a mask.
///
/// # Safety
/// AVX-512F, AVX2 and FMA; the bounds [`forward`] asserts.
#[cfg(target_arch = "x86_64")]
unsafe fn forward_wide(s: &Shape, o: usize, wp: &[f32], xp: &[f32], y: &mut [f32]) {
    let inner = s.c * s.offsets.len();
    let list: Vec<(usize, usize)> = panels(o).collect();
    for pair in list.chunks(2) {
        let (ra, na) = pair[0];
        let nb = pair.get(1).map_or(0, |p| p.1);
        let a = Panel {
            w: &wp[ra * inner..(ra + na) * inner],
            y: y.as_mut_ptr().add(ra * s.span),
        };
        let b = Panel {
            w: &wp[(ra + na) * inner..(ra + na + nb) * inner],
            y: y.as_mut_ptr().add((ra + na) * s.span),
        };
        by_pair!(na, nb, tiles_avx512(s, &a, &b, xp));
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn forward_wide(_: &Shape, _: usize, _: &[f32], _: &[f32], _: &mut [f32]) {
    unreachable!("the direct kernel runs only where `available` holds")
}

/// One panel of a [`forward_wide`] tile: its packed weights and its first output row (`span`
/// floats per row).
struct Panel<'a> {
    w: &'a [f32],
    y: *mut f32,
}

/// Calls `f::<NA, NB, NV>(args)` for a pair of panels of `na` and `nb` rows (`nb` is `na`,
/// `na − 1` or 0, as [`panels`] spreads them), with `NV` vectors of pixels per tile.
macro_rules! by_pair {
    ($na:expr, $nb:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match ($na, $nb) {
            (6, 6) => $f::<6, 6, 2>($($arg),*),
            (6, 5) => $f::<6, 5, 2>($($arg),*),
            (5, 5) => $f::<5, 5, 2>($($arg),*),
            (5, 4) => $f::<5, 4, 2>($($arg),*),
            (4, 4) => $f::<4, 4, 2>($($arg),*),
            (4, 3) => $f::<4, 3, 2>($($arg),*),
            (3, 3) => $f::<3, 3, 4>($($arg),*),
            (3, 2) => $f::<3, 2, 4>($($arg),*),
            (2, 2) => $f::<2, 2, 4>($($arg),*),
            (2, 1) => $f::<2, 1, 8>($($arg),*),
            (1, 1) => $f::<1, 1, 8>($($arg),*),
            (6, _) => $f::<6, 0, 4>($($arg),*),
            (5, _) => $f::<5, 0, 4>($($arg),*),
            (4, _) => $f::<4, 0, 4>($($arg),*),
            (3, _) => $f::<3, 0, 8>($($arg),*),
            (2, _) => $f::<2, 0, 8>($($arg),*),
            _ => $f::<1, 0, 8>($($arg),*),
        }
    };
}
use by_pair;

/// The tiles of [`forward_wide`] for one pair of panels, over the whole span.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn tiles_avx512<const NA: usize, const NB: usize, const NV: usize>(
    s: &Shape,
    a: &Panel,
    b: &Panel,
    xp: &[f32],
) {
    use std::arch::x86_64::*;
    let x0 = xp.as_ptr();
    let mut q = 0;
    while q < s.span {
        // Lanes of each vector inside the span; a vector wholly past it loads nothing.
        let mask: [__mmask16; NV] = std::array::from_fn(|v| {
            let left = s.span.saturating_sub(q + v * LANES);
            if left >= LANES {
                !0
            } else {
                ((1u32 << left) - 1) as __mmask16
            }
        });
        let mut acc_a = [[_mm512_setzero_ps(); NV]; NA];
        let mut acc_b = [[_mm512_setzero_ps(); NV]; NB];
        let (mut wa, mut wb) = (a.w.as_ptr(), b.w.as_ptr());
        for ch in 0..s.c {
            let xc = x0.add(ch * s.plane + q);
            for &t in s.offsets {
                let xv: [__m512; NV] =
                    std::array::from_fn(|v| _mm512_maskz_loadu_ps(mask[v], xc.add(t + v * LANES)));
                for (r, acc) in acc_a.iter_mut().enumerate() {
                    let w = _mm512_set1_ps(*wa.add(r));
                    for (a, x) in acc.iter_mut().zip(&xv) {
                        *a = _mm512_fmadd_ps(w, *x, *a);
                    }
                }
                for (r, acc) in acc_b.iter_mut().enumerate() {
                    let w = _mm512_set1_ps(*wb.add(r));
                    for (a, x) in acc.iter_mut().zip(&xv) {
                        *a = _mm512_fmadd_ps(w, *x, *a);
                    }
                }
                wa = wa.add(NA);
                wb = wb.add(NB);
            }
        }
        for (panel, acc) in [(a, &acc_a[..]), (b, &acc_b[..])] {
            for (r, acc) in acc.iter().enumerate() {
                for (v, (a, m)) in acc.iter().zip(mask).enumerate() {
                    let dst = panel.y.add(r * s.span + q + v * LANES);
                    _mm512_mask_storeu_ps(dst, m, *a);
                }
            }
        }
        q += NV * LANES;
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tiles_avx512<const NA: usize, const NB: usize, const NV: usize>(
    _: &Shape,
    _: &Panel,
    _: &Panel,
    _: &[f32],
) {
    unreachable!("the direct kernel runs only where `available` holds")
}

/// One tile: `NR` output channels (the panel's rows) × 16 pixels from `q`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const NR: usize>(
    s: &Shape,
    panel: &[f32],
    xp: &[f32],
    q: usize,
    y: &mut [f32],
    n: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; NR];
    let mut wq = panel.as_ptr();
    let x0 = xp.as_ptr().add(q);
    for ch in 0..s.c {
        let xc = x0.add(ch * s.plane);
        for &t in s.offsets {
            let a = _mm256_loadu_ps(xc.add(t));
            let b = _mm256_loadu_ps(xc.add(t + 8));
            for (r, acc) in acc.iter_mut().enumerate() {
                let wv = _mm256_broadcast_ss(&*wq.add(r));
                acc[0] = _mm256_fmadd_ps(wv, a, acc[0]);
                acc[1] = _mm256_fmadd_ps(wv, b, acc[1]);
            }
            wq = wq.add(NR);
        }
    }
    let span = y.len() / NR;
    for (r, acc) in acc.iter().enumerate() {
        let dst = y.as_mut_ptr().add(r * span + q);
        if n == LANES {
            _mm256_storeu_ps(dst, acc[0]);
            _mm256_storeu_ps(dst.add(8), acc[1]);
        } else {
            let mut tmp = [0f32; LANES];
            _mm256_storeu_ps(tmp.as_mut_ptr(), acc[0]);
            _mm256_storeu_ps(tmp.as_mut_ptr().add(8), acc[1]);
            std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, n);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_avx2<const NR: usize>(
    _: &Shape,
    _: &[f32],
    _: &[f32],
    _: usize,
    _: &mut [f32],
    _: usize,
) {
    unreachable!("the direct kernel runs only where `available` holds")
}

/// The space-to-depth layout of a stride-2 conv's input: each channel of `x` (`C × H × W`),
/// zero-padded by `pad`, as its four 2×2 phases `(α, β)`, each a plane of `hq × wq` (pixel
/// `(2u + α, 2v + β)` of the padded map at `(u, v)`), and [`SLACK`] floats after the last.
/// A stride-2 conv is then a stride-1 one over these planes (taps by [`phase_offsets`]).
/// `dst` serves one geometry: what is never written (the padding) stays zero.
pub(crate) fn split_phases(
    x: &[f32],
    (c, h, w): (usize, usize, usize),
    pad: usize,
    dst: &mut Vec<f32>,
) -> (usize, usize) {
    let (hq, wq) = ((h + 2 * pad).div_ceil(2), (w + 2 * pad).div_ceil(2));
    dst.resize(c * 4 * hq * wq + SLACK, 0.0);
    // Padded column m lands in phase m % 2 at m / 2: the even columns 2j of a row in phase
    // `pad % 2` from `pad / 2` on, the odd ones in the other phase from `⌈pad / 2⌉` on.
    let (ne, no) = (w.div_ceil(2), w / 2);
    for (ch, plane) in x.chunks_exact(h * w).enumerate() {
        for (r, row) in plane.chunks_exact(w).enumerate() {
            let (alpha, u) = ((r + pad) % 2, (r + pad) / 2);
            let at = |beta: usize| ((ch * 4 + alpha * 2 + beta) * hq + u) * wq;
            let even = at(pad % 2) + pad / 2;
            let odd = at((pad + 1) % 2) + pad.div_ceil(2);
            // Two phases' planes: disjoint.
            let (ev, od) = if even < odd {
                let (a, b) = dst.split_at_mut(odd);
                (&mut a[even..even + ne], &mut b[..no])
            } else {
                let (a, b) = dst.split_at_mut(even);
                (&mut b[..ne], &mut a[odd..odd + no])
            };
            pairs::deinterleave(row, ev, od);
        }
    }
    (hq, wq)
}

/// The taps `(i, j)` of a `k×k` stride-2 kernel on [`split_phases`] planes of `hq × wq`:
/// phase `(i mod 2, j mod 2)`, shifted by `(i / 2, j / 2)`.
pub(crate) fn phase_offsets(k: usize, hq: usize, wq: usize) -> Vec<usize> {
    (0..k * k)
        .map(|t| {
            let (i, j) = (t / k, t % k);
            ((i % 2) * 2 + j % 2) * hq * wq + (i / 2) * wq + j / 2
        })
        .collect()
}
