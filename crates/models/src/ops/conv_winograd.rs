//! Winograd F(2×2, 3×3) (Lavin & Gray 2016) on the padded layout of `conv_padded`, fused per
//! block of tiles: 16 multiplies per 2×2 output tile and input channel instead of 36.
//!
//! The AVX2 lanes are 8 output tiles side by side in a row of tiles (16 output columns), as
//! the direct kernel's lanes are 16 pixels. For two such vectors (16 tiles) at a time:
//! - the input transform `Bᵀ·d·B` of every channel's 4×4 patches (loads of 16 consecutive
//!   padded inputs, split into even and odd columns) goes into a small buffer `V[ξ][c]`;
//! - for each panel of output channels and each of the 16 points `ξ`, a register tile of
//!   up to 6 channels × 16 tiles sums `U[ξ][o][c]·V[ξ][c]` over `c`, as the direct kernel's;
//! - the output transform `Aᵀ·M·A` gives each tile's 2×2 outputs, interleaved back into rows.
//!
//! `U = G·g·Gᵀ` is computed once per op ([`pack`]). Each output is the same fixed sequence of
//! operations whatever the thread count. The error is f32 round-off of the transforms, about
//! 1e-6 of the output's scale (tested against the direct sum).

use super::conv_direct::{available, panels};

/// The side of an input tile (4×4 inputs for 2×2 outputs).
const TILE_IN: usize = 4;
/// Output columns per vector of 8 tiles.
const COLS: usize = 16;

/// Whether the kernel serves a conv: 3×3 taps, stride 1, padding 1 (output sides = input
/// sides), and even output sides (whole 2×2 tiles).
pub(crate) fn fits(k: usize, stride: usize, pad: usize, (ho, wo): (usize, usize)) -> bool {
    available()
        && k == 3
        && stride == 1
        && pad == 1
        && ho.is_multiple_of(2)
        && wo.is_multiple_of(2)
        && ho > 0
}

/// `U[ξ] = G·g·Gᵀ` of every `(o, c)` kernel of `w` `(O, C, 3, 3)`, for each of the 16 points
/// `ξ`, in the direct kernel's panels: point `ξ`'s panel of rows `r0..r0 + nr` starts at
/// `ξ·O·C + r0·C` and holds, for every `c`, the `nr` values of its channels.
pub(crate) fn pack(o: usize, c: usize, w: &[f32]) -> Vec<f32> {
    const G: [[f64; 3]; 4] = [
        [1., 0., 0.],
        [0.5, 0.5, 0.5],
        [0.5, -0.5, 0.5],
        [0., 0., 1.],
    ];
    let mut out = vec![0f32; 16 * o * c];
    for (r0, nr) in panels(o) {
        for r in 0..nr {
            for ch in 0..c {
                let g = &w[((r0 + r) * c + ch) * 9..][..9];
                for xi in 0..16 {
                    let (a, b) = (xi / 4, xi % 4);
                    let mut u = 0f64;
                    for i in 0..3 {
                        for j in 0..3 {
                            u += G[a][i] * g[i * 3 + j] as f64 * G[b][j];
                        }
                    }
                    out[xi * o * c + r0 * c + ch * nr + r] = u as f32;
                }
            }
        }
    }
    out
}

/// One sample's layout: `c` padded planes of `hp × wp` floats (`plane`), output `ho × wo`.
pub(crate) struct Shape {
    pub(crate) c: usize,
    pub(crate) plane: usize,
    pub(crate) wp: usize,
    pub(crate) ho: usize,
    pub(crate) wo: usize,
}

impl Shape {
    /// The floats of the padded sample that the loads reach: the last vector's 4 rows from
    /// its tile row, 24 columns each (two loads of 8 at offsets 0, 2, 8 and 10).
    pub(crate) fn reach(&self) -> usize {
        let last_q = (self.wo.max(1) - 1) / COLS * COLS;
        (self.c.max(1) - 1) * self.plane + (self.ho + 1) * self.wp + last_q + 24
    }
}

/// `y` (`O × ho·wp`, the `Wp`-wide layout; its scratch columns are left as they are) `=` the
/// conv of the padded sample `xp` (at least [`Shape::reach`] floats) with the [`pack`]ed `u`.
/// `v` is a reused buffer.
pub(crate) fn forward(s: &Shape, o: usize, u: &[f32], xp: &[f32], y: &mut [f32], v: &mut Vec<f32>) {
    assert!(available() && s.wp >= s.wo + 2 && s.ho.is_multiple_of(2) && s.wo.is_multiple_of(2));
    assert!(u.len() >= 16 * o * s.c && y.len() >= o * s.ho * s.wp);
    assert!(xp.len() >= s.reach());
    // The vectors of 8 tiles: (tile row, first output column), taken two at a time.
    let per_row = s.wo.div_ceil(COLS);
    let count = s.ho / 2 * per_row;
    let vector = |i: usize| (i / per_row, i % per_row * COLS);
    v.resize(16 * s.c * 16, 0.0);
    for first in (0..count).step_by(2) {
        // The last of an odd count is transformed twice and stored once.
        let both = [vector(first), vector((first + 1).min(count - 1))];
        let pair = &both[..(count - first).min(2)];
        // SAFETY: AVX2 and FMA are checked (`available`); the loads stay inside `xp` (the
        // assert above), and the stores write `min(16, wo − q)` columns of rows below `ho`.
        unsafe {
            input_transform(s, xp, both, v);
            for (r0, nr) in panels(o) {
                let panel = (&u[r0 * s.c..], o * s.c);
                let rows = &mut y[r0 * s.ho * s.wp..];
                let out = (rows, pair);
                match nr {
                    1 => products::<1>(s, panel, v, out),
                    2 => products::<2>(s, panel, v, out),
                    3 => products::<3>(s, panel, v, out),
                    4 => products::<4>(s, panel, v, out),
                    5 => products::<5>(s, panel, v, out),
                    _ => products::<6>(s, panel, v, out),
                }
            }
        }
    }
}

/// `V[ξ][c][16]` `=` `Bᵀ·d·B` of the 4×4 patches of the two vectors of tiles `both`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn input_transform(s: &Shape, xp: &[f32], both: [(usize, usize); 2], v: &mut [f32]) {
    use std::arch::x86_64::*;
    // Even and odd lanes of the 16 consecutive floats from `p` (a macro, not a function or a
    // closure: those would be compiled without AVX2 and not inlined).
    macro_rules! split {
        ($p:expr) => {{
            let (a, b) = (_mm256_loadu_ps($p), _mm256_loadu_ps($p.add(8)));
            let even = _mm256_castps_pd(_mm256_shuffle_ps::<0b10_00_10_00>(a, b));
            let odd = _mm256_castps_pd(_mm256_shuffle_ps::<0b11_01_11_01>(a, b));
            (
                _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(even)),
                _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(odd)),
            )
        }};
    }
    let vp = v.as_mut_ptr();
    for ch in 0..s.c {
        for (half, &(ty, q)) in both.iter().enumerate() {
            let base = xp.as_ptr().add(ch * s.plane + 2 * ty * s.wp + q);
            let mut d = [[_mm256_setzero_ps(); TILE_IN]; TILE_IN];
            for (i, row) in d.iter_mut().enumerate() {
                let p = base.add(i * s.wp);
                (row[0], row[1]) = split!(p);
                (row[2], row[3]) = split!(p.add(2));
            }
            // Rows: Bᵀ = [1 0 −1 0; 0 1 1 0; 0 −1 1 0; 0 1 0 −1].
            let mut t = [[_mm256_setzero_ps(); TILE_IN]; TILE_IN];
            for j in 0..TILE_IN {
                t[0][j] = _mm256_sub_ps(d[0][j], d[2][j]);
                t[1][j] = _mm256_add_ps(d[1][j], d[2][j]);
                t[2][j] = _mm256_sub_ps(d[2][j], d[1][j]);
                t[3][j] = _mm256_sub_ps(d[1][j], d[3][j]);
            }
            // Columns: the same, on the right.
            for (i, t) in t.iter().enumerate() {
                let w = [
                    _mm256_sub_ps(t[0], t[2]),
                    _mm256_add_ps(t[1], t[2]),
                    _mm256_sub_ps(t[2], t[1]),
                    _mm256_sub_ps(t[1], t[3]),
                ];
                for (j, w) in w.iter().enumerate() {
                    let xi = i * TILE_IN + j;
                    _mm256_storeu_ps(vp.add((xi * s.c + ch) * 16 + half * 8), *w);
                }
            }
        }
    }
}

/// For the panel of `NR` output channels at `u` (point `ξ`'s values `ξ·stride` further on):
/// `M[ξ] = Σ_c U[ξ][·][c]·V[ξ][c]` in registers, then `Aᵀ·M·A` into the rows of `y`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn products<const NR: usize>(
    s: &Shape,
    (u, stride): (&[f32], usize),
    v: &[f32],
    (y, pair): (&mut [f32], &[(usize, usize)]),
) {
    use std::arch::x86_64::*;
    let mut m = [[[_mm256_setzero_ps(); 2]; NR]; 16];
    for (xi, m) in m.iter_mut().enumerate() {
        // In registers over the sum; stored once.
        let mut acc = [[_mm256_setzero_ps(); 2]; NR];
        let mut wq = u.as_ptr().add(xi * stride);
        let mut vq = v.as_ptr().add(xi * s.c * 16);
        for _ in 0..s.c {
            let (a, b) = (_mm256_loadu_ps(vq), _mm256_loadu_ps(vq.add(8)));
            for (r, acc) in acc.iter_mut().enumerate() {
                let wv = _mm256_broadcast_ss(&*wq.add(r));
                acc[0] = _mm256_fmadd_ps(wv, a, acc[0]);
                acc[1] = _mm256_fmadd_ps(wv, b, acc[1]);
            }
            wq = wq.add(NR);
            vq = vq.add(16);
        }
        *m = acc;
    }
    let span = s.ho * s.wp;
    #[allow(clippy::needless_range_loop)] // `r` picks the row in all 16 points' sums
    for r in 0..NR {
        for (half, &(ty, q)) in pair.iter().enumerate() {
            macro_rules! mm {
                ($i:expr, $j:expr) => {
                    m[$i * TILE_IN + $j][r][half]
                };
            }
            // Aᵀ = [1 1 1 0; 0 1 −1 −1], on the left, then on the right.
            let mut sr = [[_mm256_setzero_ps(); TILE_IN]; 2];
            for j in 0..TILE_IN {
                sr[0][j] = _mm256_add_ps(_mm256_add_ps(mm!(0, j), mm!(1, j)), mm!(2, j));
                sr[1][j] = _mm256_sub_ps(_mm256_sub_ps(mm!(1, j), mm!(2, j)), mm!(3, j));
            }
            for (a, sr) in sr.iter().enumerate() {
                let y0 = _mm256_add_ps(_mm256_add_ps(sr[0], sr[1]), sr[2]);
                let y1 = _mm256_sub_ps(_mm256_sub_ps(sr[1], sr[2]), sr[3]);
                // Tile t's two columns side by side: 16 consecutive outputs.
                let (lo, hi) = (_mm256_unpacklo_ps(y0, y1), _mm256_unpackhi_ps(y0, y1));
                let first = _mm256_permute2f128_ps::<0x20>(lo, hi);
                let second = _mm256_permute2f128_ps::<0x31>(lo, hi);
                let dst = y.as_mut_ptr().add(r * span + (2 * ty + a) * s.wp + q);
                let n = COLS.min(s.wo - q);
                if q + COLS <= s.wp {
                    _mm256_storeu_ps(dst, first);
                    _mm256_storeu_ps(dst.add(8), second);
                } else {
                    let mut tmp = [0f32; COLS];
                    _mm256_storeu_ps(tmp.as_mut_ptr(), first);
                    _mm256_storeu_ps(tmp.as_mut_ptr().add(8), second);
                    std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, n);
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn input_transform(_: &Shape, _: &[f32], _: [(usize, usize); 2], _: &mut [f32]) {
    unreachable!("the Winograd kernel runs only where `available` holds")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn products<const NR: usize>(
    _: &Shape,
    _: (&[f32], usize),
    _: &[f32],
    _: (&mut [f32], &[(usize, usize)]),
) {
    unreachable!("the Winograd kernel runs only where `available` holds")
}
