//! The weight gradient of a conv on the direct kernel's layout (`conv_direct::Shape`) with the
//! output channels in the vector lanes: `dW[o, (c, t)] = Σ_q dy[o, q] · x[c·plane + t + q]`
//! over the output pixels `q`.
//!
//! `dy` is put channels-last once per sample (`pixel × O`, the channels padded to 16), so a
//! register tile of 32 output channels (two AVX-512 vectors; two AVX2 tiles of 16) × 12 taps
//! (6 with AVX2) sums over the pixels with one vector load of `dy` per 16 channels and one
//! broadcast input per tap: 24 independent sums (12 with AVX2), no lane folds. Where the
//! output channels are few (a 1-channel output would fill one lane in 16), `conv_direct`'s
//! kernel with the pixels in the lanes serves instead.
//!
//! Every value is one fused multiply-add chain over the pixels in order from zero per sample,
//! added onto the chunk's sums (`tap × O`, channels-last) sample by sample, and turned into
//! `O × taps` once per chunk ([`finish`]): the same bits for AVX2 and AVX-512 and any thread
//! count.

use super::conv_direct::{available, Shape};
use super::conv_winograd::{channels_last, transpose_into};
use super::cpu::add_row_sums_last;

/// Output channels are padded to a multiple of one AVX-512 vector.
const LANES: usize = 16;

/// A chunk's weight-gradient sums (`inner × opad`, channels-last) and one sample's `dy`
/// channels-last (`pixels × opad`; the padding channels stay zero).
#[derive(Default)]
pub(crate) struct Sums {
    dwt: Vec<f32>,
    dyt: Vec<f32>,
    o: usize,
    inner: usize,
}

impl Sums {
    fn opad(&self) -> usize {
        self.o.next_multiple_of(LANES)
    }

    /// Adds the row sums of the last sample's `dy` (the bias gradient) to `db` (`o` values),
    /// from its channels-last copy ([`add_row_sums_last`]).
    pub(crate) fn add_row_sums(&self, px: Pixels, db: &mut [f32]) {
        add_row_sums_last(&self.dyt, (px.ho, px.wo, self.opad()), &mut db[..self.o]);
    }
}

/// The output pixels of a sample on the direct layout: `ho` rows of `wo`, rows `wp` apart.
#[derive(Clone, Copy)]
pub(crate) struct Pixels {
    pub(crate) ho: usize,
    pub(crate) wo: usize,
    pub(crate) wp: usize,
}

/// Adds one sample's weight gradient to `sums`: `dy` (`o × ho·wo`) against the taps of `s` on
/// `xp` (what [`conv_direct::forward`](super::conv_direct::forward) reads for those pixels).
pub(crate) fn accumulate(s: &Shape, px: Pixels, o: usize, dy: &[f32], xp: &[f32], sums: &mut Sums) {
    let taps = s.offsets.len();
    let inner = s.c * taps;
    let n = px.ho * px.wo;
    assert!(available() && dy.len() >= o * n && px.wo <= px.wp);
    let last = s.offsets.iter().max().copied().unwrap_or(0);
    assert!(n == 0 || xp.len() >= (s.c.max(1) - 1) * s.plane + last + (px.ho - 1) * px.wp + px.wo);
    if sums.o != o || sums.inner != inner {
        *sums = Sums {
            o,
            inner,
            ..Sums::default()
        };
    }
    let opad = sums.opad();
    sums.dwt.resize(inner * opad, 0.0);
    sums.dyt.resize(n * opad, 0.0);
    // SAFETY: AVX2 is checked (`available`); `dy` holds `o` planes of `n` and `dyt` `n` rows
    // of `opad >= o`.
    unsafe { channels_last(&dy[..o * n], (o, n, opad), &mut sums.dyt) };
    let bases: Vec<usize> = (0..inner)
        .map(|i| i / taps * s.plane + s.offsets[i % taps])
        .collect();
    let wide = super::activation::wide_kernels();
    let nt = if wide { WIDE_TAPS } else { TAPS };
    for t0 in (0..inner).step_by(nt) {
        let valid = nt.min(inner - t0);
        // The last block repeats its last tap in the rows it does not store.
        let at = |j: usize| bases[t0 + j.min(valid - 1)];
        let mut o0 = 0;
        while o0 < opad {
            let tile = Tile {
                xp,
                dyt: &sums.dyt[o0..],
                opad,
                px,
                valid,
            };
            let dwt = &mut sums.dwt[t0 * opad + o0..];
            // SAFETY: AVX2 and FMA (and AVX-512F for the wide tiles) are checked; the loads
            // stay inside `xp` (asserted above) and `dyt`, the stores inside `dwt`.
            unsafe {
                if wide && opad - o0 >= 2 * LANES {
                    tile_avx512::<WIDE_TAPS, 2>(&tile, std::array::from_fn(at), dwt);
                    o0 += 2 * LANES;
                } else if wide {
                    tile_avx512::<WIDE_TAPS, 1>(&tile, std::array::from_fn(at), dwt);
                    o0 += LANES;
                } else {
                    tile_avx2(&tile, std::array::from_fn(at), dwt);
                    o0 += LANES;
                }
            }
        }
    }
}

/// `dw` (`o × inner`) `+=` the chunk's sums, which start again from zero.
pub(crate) fn finish(sums: &mut Sums, dw: &mut [f32]) {
    let (o, inner, opad) = (sums.o, sums.inner, sums.opad());
    if sums.dwt.is_empty() {
        return;
    }
    if available() {
        // `dw[ch][t] += dwt[t][ch]`, by 8 × 8 register transposes (a value at a time, the
        // strided reads cost 9 % of the weight gradient's tiles); one add per value.
        assert!(sums.dwt.len() >= inner * opad && opad >= o && dw.len() >= o * inner);
        // SAFETY: AVX2 is checked; `dwt` holds `inner` rows of `opad >= o`, `dw` `o` of `inner`.
        unsafe { transpose_into::<true>(&sums.dwt, (inner, o, opad), dw, inner) };
        sums.dwt.fill(0.0);
        return;
    }
    // By blocks of 16 taps: each channel's 16 sums are one cache line of `dw` (a tap at a time,
    // rows `inner` floats apart, would walk one line per value).
    for t0 in (0..inner).step_by(LANES) {
        let t1 = inner.min(t0 + LANES);
        for ch in 0..o {
            let out = &mut dw[ch * inner + t0..ch * inner + t1];
            for (d, t) in out.iter_mut().zip(t0..t1) {
                *d += sums.dwt[t * opad + ch];
            }
        }
    }
    sums.dwt.fill(0.0);
}

/// Taps per AVX2 tile (2 × 6 sums of 8 channels).
const TAPS: usize = 6;
/// Taps per AVX-512 tile (2 × 12 sums of 16 channels).
const WIDE_TAPS: usize = 12;

/// What a tile reads: the input, `dy` channels-last from the tile's first channel, and the
/// number of taps it stores.
struct Tile<'a> {
    xp: &'a [f32],
    dyt: &'a [f32],
    opad: usize,
    px: Pixels,
    valid: usize,
}

/// `NT` taps (inputs from `bases`) × `NV` vectors of 16 channels, summed over the pixels and
/// added onto `dwt` (`tap × opad`, from the tile's first tap and channel).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn tile_avx512<const NT: usize, const NV: usize>(
    t: &Tile,
    bases: [usize; NT],
    dwt: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); NV]; NT];
    let (x, mut d) = (t.xp.as_ptr(), t.dyt.as_ptr());
    for r in 0..t.px.ho {
        let row = r * t.px.wp;
        for j in 0..t.px.wo {
            let dv: [__m512; NV] = std::array::from_fn(|v| _mm512_loadu_ps(d.add(v * LANES)));
            for (acc, &base) in acc.iter_mut().zip(&bases) {
                let xv = _mm512_set1_ps(*x.add(base + row + j));
                for (a, dv) in acc.iter_mut().zip(&dv) {
                    *a = _mm512_fmadd_ps(xv, *dv, *a);
                }
            }
            d = d.add(t.opad);
        }
    }
    for (k, acc) in acc.iter().enumerate().take(t.valid) {
        for (v, a) in acc.iter().enumerate() {
            let p = dwt.as_mut_ptr().add(k * t.opad + v * LANES);
            _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), *a));
        }
    }
}

/// [`tile_avx512`] with AVX2: 16 channels as two vectors of 8, [`TAPS`] taps; each value the
/// same operations in the same order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2(t: &Tile, bases: [usize; TAPS], dwt: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; TAPS];
    let (x, mut d) = (t.xp.as_ptr(), t.dyt.as_ptr());
    for r in 0..t.px.ho {
        let row = r * t.px.wp;
        for j in 0..t.px.wo {
            let dv = [_mm256_loadu_ps(d), _mm256_loadu_ps(d.add(8))];
            for (acc, &base) in acc.iter_mut().zip(&bases) {
                let xv = _mm256_broadcast_ss(&*x.add(base + row + j));
                for (a, dv) in acc.iter_mut().zip(&dv) {
                    *a = _mm256_fmadd_ps(xv, *dv, *a);
                }
            }
            d = d.add(t.opad);
        }
    }
    for (k, acc) in acc.iter().enumerate().take(t.valid) {
        for (v, a) in acc.iter().enumerate() {
            let p = dwt.as_mut_ptr().add(k * t.opad + v * 8);
            _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), *a));
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_avx512<const NT: usize, const NV: usize>(_: &Tile, _: [usize; NT], _: &mut [f32]) {
    unreachable!("the direct kernels run only where `available` holds")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_avx2(_: &Tile, _: [usize; TAPS], _: &mut [f32]) {
    unreachable!("the direct kernels run only where `available` holds")
}
