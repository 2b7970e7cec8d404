//! Winograd F(2×2, 3×3) (Lavin & Gray 2016) on the padded layout of `conv_padded`, fused per
//! block of tiles: 16 multiplies per 2×2 output tile and input channel instead of 36.
//!
//! The AVX2 lanes are 8 output tiles side by side in a row of tiles (16 output columns), as
//! the direct kernel's lanes are 16 pixels. For two such vectors (16 tiles) at a time:
//! - the input transform `Bᵀ·d·B` of every channel's 4×4 patches (loads of 16 consecutive
//!   padded inputs, split into even and odd columns) goes into a small buffer `V[ξ][c]`;
//! - for each panel of output channels and each of the 16 points `ξ`, a register tile of
//!   up to 6 channels × 16 tiles sums `U[ξ][o][c]·V[ξ][c]` over `c`, as the direct kernel's;
//! - the output transform `Aᵀ·M·A` gives each tile's 2×2 outputs, interleaved back into rows
//!   and written once, with the bias, into the output (no `Wp`-wide copy to narrow).
//!
//! With AVX-512 the 16 tiles of a block are one vector (and the weight gradient's 16 output
//! channels), each lane running the AVX2 code's operations in the same order: the same bits.
//!
//! `U = G·g·Gᵀ` is computed once per op ([`pack`]). The weight gradient ([`weight_grad`]) is
//! the same algebra run backwards: `Gᵀ·(Σ_tiles (A·dy·Aᵀ) ⊙ (Bᵀ·d·B))·G`, 16 products per
//! tile and channel pair instead of 36. Each output is the same fixed sequence of operations
//! whatever the thread count. The error is f32 round-off of the transforms, about 1e-6 of the
//! output's scale (tested against the direct sum in f64, values and weight gradient).

use super::conv_direct::{available, by_rows, panels};
use super::cpu::add_row_sums_last;
use std::mem::MaybeUninit;

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

/// `y` (`O × ho × wo`, every value written once) `=` `add[o]` `+` the conv of the padded
/// sample `xp` (at least [`Shape::reach`] floats) with the [`pack`]ed `u`: the bias, or zero
/// for a data gradient (`0 + v`, the bits of an add onto zeros). `v` is a reused buffer.
pub(crate) fn forward(
    s: &Shape,
    o: usize,
    u: &[f32],
    xp: &[f32],
    (y, add): (&mut [MaybeUninit<f32>], &[f32]),
    v: &mut Vec<f32>,
) {
    assert!(available() && s.wp >= s.wo + 2 && s.ho.is_multiple_of(2) && s.wo.is_multiple_of(2));
    assert!(u.len() >= 16 * o * s.c && y.len() >= o * s.ho * s.wo && add.len() >= o);
    assert!(xp.len() >= s.reach());
    // The vectors of 8 tiles: (tile row, first output column), taken two at a time.
    let per_row = s.wo.div_ceil(COLS);
    let count = s.ho / 2 * per_row;
    let vector = |i: usize| (i / per_row, i % per_row * COLS);
    v.resize(16 * s.c * 16, 0.0);
    // AVX-512 where the CPU has it (the same bits).
    let wide = super::activation::wide_kernels();
    for first in (0..count).step_by(2) {
        // The last of an odd count is transformed twice and stored once.
        let both = [vector(first), vector((first + 1).min(count - 1))];
        let pair = &both[..(count - first).min(2)];
        // SAFETY: AVX2 and FMA are checked (`available`); the loads stay inside `xp` (the
        // assert above), and the stores write `min(16, wo − q)` columns of rows below `ho`.
        unsafe {
            if wide {
                input_transform512(s, xp, both, v);
            } else {
                input_transform(s, xp, both, v);
            }
            for (r0, nr) in panels(o) {
                let panel = (&u[r0 * s.c..], o * s.c);
                let rows = &mut y[r0 * s.ho * s.wo..];
                let out = (rows, &add[r0..], pair);
                if wide {
                    by_rows!(nr, products512(s, panel, v, out))
                } else {
                    by_rows!(nr, products(s, panel, v, out))
                }
            }
        }
    }
}

/// The fewest input channels for which [`weight_grad`] runs: its transforms of the gradient
/// cost as much as the products of a few channels (the direct kernel's 9 taps serve a
/// one-channel input better).
pub(crate) const MIN_GRAD_CHANNELS: usize = 8;

/// The weight gradient's buffers of one worker: the transformed inputs `V` and gradients
/// `M` of one block of tiles, the sample's gradient with its channels last, and the sums
/// `U[ξ][c][o]` of a chunk of samples until [`finish_grad`].
#[derive(Default)]
pub(crate) struct GradSums {
    v: Vec<f32>,
    /// `ho·wo × O'` (`O'`: the channels rounded up to 16, the rest zero).
    dyt: Vec<f32>,
    /// `M[ξ][slot][O']` of the block's 16 tiles.
    m: Vec<f32>,
    u: Vec<f32>,
}

impl GradSums {
    /// Adds the row sums of the last sample's `dy` (`ho × wo` per channel: the bias gradient)
    /// to `db` (one value per channel), from its channels-last copy ([`add_row_sums_last`]).
    pub(crate) fn add_row_sums(&self, (ho, wo): (usize, usize), db: &mut [f32]) {
        let op = db.len().next_multiple_of(COLS);
        add_row_sums_last(&self.dyt, (ho, wo, op), db);
    }
}

/// The gradient of `U = G·g·Gᵀ` over one sample, added to `sums`:
/// `U[ξ][c][o] += Σ_tiles (A·dy·Aᵀ)[ξ][o] · (Bᵀ·d·B)[ξ][c]`, with `dy` `O × ho × wo`, and the
/// padded sample `xp` (at least [`Shape::reach`] floats). [`finish_grad`] turns the sums into
/// the weight gradient, `Gᵀ·U·G`, once per chunk of samples.
///
/// Per block of 16 tiles (the forward's two vectors): both transforms into small buffers,
/// then per point `ξ` register tiles of up to 6 input channels × 16 output channels summed
/// over the block's tiles in order and added to `U` (the gradient's transform has the output
/// channels in the lanes, so no lanes are folded). 16 products per tile and channel pair
/// instead of the direct sum's 36.
pub(crate) fn weight_grad(s: &Shape, o: usize, dy: &[f32], xp: &[f32], sums: &mut GradSums) {
    assert!(available() && s.ho.is_multiple_of(2) && s.wo.is_multiple_of(2));
    assert!(dy.len() >= o * s.ho * s.wo && xp.len() >= s.reach());
    let op = o.next_multiple_of(COLS);
    let per_row = s.wo.div_ceil(COLS);
    let count = s.ho / 2 * per_row;
    let vector = |i: usize| (i / per_row, i % per_row * COLS);
    // Channels last; the channels past `o` are never written (zero).
    let pixels = s.ho * s.wo;
    sums.dyt.resize(pixels * op, 0.0);
    // SAFETY: AVX2 is checked; `dy` holds `o` planes of `pixels`, `dyt` `pixels` rows of `op`.
    unsafe { channels_last(&dy[..o * pixels], (o, pixels, op), &mut sums.dyt) };
    sums.v.resize(16 * s.c * 16, 0.0);
    sums.m.resize(16 * 16 * op, 0.0);
    // AVX-512 where the CPU has it (the same bits).
    let wide = super::activation::wide_kernels();
    if sums.u.is_empty() {
        sums.u.resize(16 * s.c * op, 0.0);
    }
    for first in (0..count).step_by(2) {
        let both = [vector(first), vector((first + 1).min(count - 1))];
        // The tiles of each vector inside the output (the rest of its 8 slots unused).
        let valid = |i: usize| {
            if first + i < count {
                8.min((s.wo - both[i].1) / 2)
            } else {
                0
            }
        };
        let slots = [valid(0), valid(1)];
        // SAFETY: AVX2 and FMA are checked; the loads stay inside `xp` (the assert above),
        // `dyt` holds `ho·wo` rows of `op` and the slots written lie inside the output; the
        // stores stay in `v` (`16·c` rows of 16) and `m` (`16·16` rows of `op`).
        unsafe {
            if wide {
                input_transform512(s, xp, both, &mut sums.v);
            } else {
                input_transform(s, xp, both, &mut sums.v);
            }
            grad_transform(s, op, &sums.dyt, (both, slots), &mut sums.m);
        }
        for xi in 0..16 {
            let v = &sums.v[xi * s.c * 16..];
            let m = &sums.m[xi * 16 * op..];
            for ob in (0..op).step_by(COLS) {
                for (c0, nr) in panels(s.c) {
                    let panel = &v[c0 * 16..];
                    let grad = (&m[ob..], op, slots);
                    let u = &mut sums.u[(xi * s.c + c0) * op + ob..];
                    // SAFETY: AVX2 and FMA are checked; the panel's rows, the slots and the
                    // 16 channels from `ob` are inside `v`, `m` and `u` (their sizes above).
                    unsafe {
                        if wide {
                            by_rows!(nr, grad_products512(panel, grad, u))
                        } else {
                            by_rows!(nr, grad_products(panel, grad, u))
                        }
                    }
                }
            }
        }
    }
}

/// `dw` (`O × C·9`) `+=` `Gᵀ·U·G` of the sums [`weight_grad`] added up, which start again
/// from zero. Nothing where no sample was added.
pub(crate) fn finish_grad(sums: &mut GradSums, o: usize, c: usize, dw: &mut [f32]) {
    if sums.u.is_empty() {
        return;
    }
    let op = o.next_multiple_of(COLS);
    // Per input channel, vectors over the output channels: `T = Gᵀ·U` (3 × 4 rows), then
    // `T·G` (3 × 3 taps). `G = [1 0 0; ½ ½ ½; ½ −½ ½; 0 0 1]`.
    let mut t = vec![0f32; 12 * o];
    let mut tap = vec![0f32; o];
    for ch in 0..c {
        let row = |xi: usize| &sums.u[(xi * c + ch) * op..][..o];
        for b in 0..4 {
            let (u0, u1, u2, u3) = (row(b), row(4 + b), row(8 + b), row(12 + b));
            let (t0, rest) = t[b * o..].split_at_mut(4 * o);
            let (t1, t2) = rest.split_at_mut(4 * o);
            for k in 0..o {
                let (s12, d12) = (u1[k] + u2[k], u1[k] - u2[k]);
                t0[k] = u0[k] + 0.5 * s12;
                t1[k] = 0.5 * d12;
                t2[k] = 0.5 * s12 + u3[k];
            }
        }
        for i in 0..3 {
            let tr = |b: usize| &t[(i * 4 + b) * o..][..o];
            let (t0, t1, t2, t3) = (tr(0), tr(1), tr(2), tr(3));
            for j in 0..3 {
                for k in 0..o {
                    let (s12, d12) = (t1[k] + t2[k], t1[k] - t2[k]);
                    tap[k] = match j {
                        0 => t0[k] + 0.5 * s12,
                        1 => 0.5 * d12,
                        _ => 0.5 * s12 + t3[k],
                    };
                }
                for (oc, v) in tap.iter().enumerate() {
                    dw[(oc * c + ch) * 9 + i * 3 + j] += v;
                }
            }
        }
    }
    sums.u.clear();
}

/// The 8 × 8 transpose of eight AVX2 rows (an expression of `[__m256; 8]`): pairs, quads,
/// then 128-bit halves. A macro, so that it compiles inside its caller's `target_feature`.
macro_rules! transpose8 {
    ($r:expr) => {{
        let r: [__m256; 8] = $r;
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let q0 = _mm256_shuffle_ps::<0b01_00_01_00>(t0, t2);
        let q1 = _mm256_shuffle_ps::<0b11_10_11_10>(t0, t2);
        let q2 = _mm256_shuffle_ps::<0b01_00_01_00>(t1, t3);
        let q3 = _mm256_shuffle_ps::<0b11_10_11_10>(t1, t3);
        let q4 = _mm256_shuffle_ps::<0b01_00_01_00>(t4, t6);
        let q5 = _mm256_shuffle_ps::<0b11_10_11_10>(t4, t6);
        let q6 = _mm256_shuffle_ps::<0b01_00_01_00>(t5, t7);
        let q7 = _mm256_shuffle_ps::<0b11_10_11_10>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(q0, q4),
            _mm256_permute2f128_ps::<0x20>(q1, q5),
            _mm256_permute2f128_ps::<0x20>(q2, q6),
            _mm256_permute2f128_ps::<0x20>(q3, q7),
            _mm256_permute2f128_ps::<0x31>(q0, q4),
            _mm256_permute2f128_ps::<0x31>(q1, q5),
            _mm256_permute2f128_ps::<0x31>(q2, q6),
            _mm256_permute2f128_ps::<0x31>(q3, q7),
        ]
    }};
}

/// `dst[p·op + k] = src[k·pixels + p]` for the `o` planes of `src` (the rest of `dst` as it
/// is): [`transpose_into`]. Also `conv_wgrad`'s.
///
/// # Safety
/// AVX2; `src` holds `o·pixels` floats and `dst` `pixels` rows of `op >= o`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn channels_last(
    src: &[f32],
    (o, pixels, op): (usize, usize, usize),
    dst: &mut [f32],
) {
    transpose_into::<false>(src, (o, pixels, pixels), dst, op);
}

/// `dst[j·dst_stride + i]` `=` `src[i·src_stride + j]` (`+=` with `ADD`) for `i < rows`,
/// `j < cols`: 8 × 8 blocks transposed in registers, the edges one by one. Each value is
/// written (or added) once.
///
/// # Safety
/// AVX2; `src` holds `rows` rows of `src_stride >= cols` floats, `dst` `cols` rows of
/// `dst_stride >= rows`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn transpose_into<const ADD: bool>(
    src: &[f32],
    (rows, cols, src_stride): (usize, usize, usize),
    dst: &mut [f32],
    dst_stride: usize,
) {
    use std::arch::x86_64::*;
    let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
    let put = |d: *mut f32, v: f32| if ADD { *d += v } else { *d = v };
    let (rb, cb) = (rows / 8 * 8, cols / 8 * 8);
    for i0 in (0..rb).step_by(8) {
        for j0 in (0..cb).step_by(8) {
            let r: [__m256; 8] =
                std::array::from_fn(|i| _mm256_loadu_ps(sp.add((i0 + i) * src_stride + j0)));
            for (j, v) in transpose8!(r).iter().enumerate() {
                let d = dp.add((j0 + j) * dst_stride + i0);
                let v = if ADD {
                    _mm256_add_ps(_mm256_loadu_ps(d), *v)
                } else {
                    *v
                };
                _mm256_storeu_ps(d, v);
            }
        }
        for j in cb..cols {
            for i in i0..i0 + 8 {
                put(dp.add(j * dst_stride + i), *sp.add(i * src_stride + j));
            }
        }
    }
    for i in rb..rows {
        for j in 0..cols {
            put(dp.add(j * dst_stride + i), *sp.add(i * src_stride + j));
        }
    }
}

/// `M[ξ][slot][·] = A·dy·Aᵀ` of the tiles of the two vectors `both` (slot `8·half + l`, the
/// first `slots[half]` of each) from the channels-last gradient `dyt`, eight channels at a
/// time: `A = [1 0; 1 1; 1 −1; 0 −1]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn grad_transform(
    s: &Shape,
    op: usize,
    dyt: &[f32],
    (both, slots): ([(usize, usize); 2], [usize; 2]),
    m: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (d, mp) = (dyt.as_ptr(), m.as_mut_ptr());
    let zero = _mm256_setzero_ps();
    for (half, &(ty, q)) in both.iter().enumerate() {
        for l in 0..slots[half] {
            let slot = half * 8 + l;
            let p00 = (2 * ty * s.wo + q + 2 * l) * op;
            let (p01, p10) = (p00 + op, p00 + s.wo * op);
            let p11 = p10 + op;
            for ob in (0..op).step_by(8) {
                let g = [
                    [
                        _mm256_loadu_ps(d.add(p00 + ob)),
                        _mm256_loadu_ps(d.add(p01 + ob)),
                    ],
                    [
                        _mm256_loadu_ps(d.add(p10 + ob)),
                        _mm256_loadu_ps(d.add(p11 + ob)),
                    ],
                ];
                // Rows: A·dy.
                let mut t = [[zero; 2]; 4];
                for j in 0..2 {
                    t[0][j] = g[0][j];
                    t[1][j] = _mm256_add_ps(g[0][j], g[1][j]);
                    t[2][j] = _mm256_sub_ps(g[0][j], g[1][j]);
                    t[3][j] = _mm256_sub_ps(zero, g[1][j]);
                }
                // Columns: ·Aᵀ.
                for (a, t) in t.iter().enumerate() {
                    let row = [
                        t[0],
                        _mm256_add_ps(t[0], t[1]),
                        _mm256_sub_ps(t[0], t[1]),
                        _mm256_sub_ps(zero, t[1]),
                    ];
                    for (b, v) in row.iter().enumerate() {
                        let xi = a * TILE_IN + b;
                        _mm256_storeu_ps(mp.add((xi * 16 + slot) * op + ob), *v);
                    }
                }
            }
        }
    }
}

/// [`grad_products`] with AVX-512: the 16 output channels in one vector; each lane runs the
/// same operations in the same order (the same bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn grad_products512<const NR: usize>(
    v: &[f32],
    (m, op, slots): (&[f32], usize, [usize; 2]),
    u: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); NR];
    for (half, &n) in slots.iter().enumerate() {
        for slot in half * 8..half * 8 + n {
            let a = _mm512_loadu_ps(m.as_ptr().add(slot * op));
            let vq = v.as_ptr().add(slot);
            for (r, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(_mm512_set1_ps(*vq.add(r * 16)), a, *acc);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let dst = u.as_mut_ptr().add(r * op);
        _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), *acc));
    }
}

/// `U[c0 + r][ob..ob + 16] += Σ_slots V[c0 + r][slot] · M[slot][ob..ob + 16]` for the panel of
/// `NR` input channels at `v` (rows of 16 slots) and the 16 channels at `m` (slots `op`
/// apart; the first `slots[half]` of each half); `u`'s rows are `op` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn grad_products<const NR: usize>(
    v: &[f32],
    (m, op, slots): (&[f32], usize, [usize; 2]),
    u: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; NR];
    for (half, &n) in slots.iter().enumerate() {
        for slot in half * 8..half * 8 + n {
            let mq = m.as_ptr().add(slot * op);
            let (a, b) = (_mm256_loadu_ps(mq), _mm256_loadu_ps(mq.add(8)));
            let vq = v.as_ptr().add(slot);
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(&*vq.add(r * 16));
                acc[0] = _mm256_fmadd_ps(x, a, acc[0]);
                acc[1] = _mm256_fmadd_ps(x, b, acc[1]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let dst = u.as_mut_ptr().add(r * op);
        _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), acc[0]));
        _mm256_storeu_ps(
            dst.add(8),
            _mm256_add_ps(_mm256_loadu_ps(dst.add(8)), acc[1]),
        );
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

/// [`input_transform`] with AVX-512: the 16 tiles of the two vectors in one vector, each
/// lane running the AVX2 code's subtractions and additions in the same order (the same bits),
/// so half the transform's arithmetic and stores. Two vectors in one row of tiles (16 tiles
/// of a row 32 columns wide or more) are four loads of 16 and four two-source permutes per
/// input row; two in different rows are split as in [`input_transform`] and joined.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn input_transform512(s: &Shape, xp: &[f32], both: [(usize, usize); 2], v: &mut [f32]) {
    use std::arch::x86_64::*;
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
    // Two AVX2 vectors as the low and high halves of one.
    macro_rules! join {
        ($lo:expr, $hi:expr) => {
            _mm512_castpd_ps(_mm512_insertf64x4::<1>(
                _mm512_castpd256_pd512(_mm256_castps_pd($lo)),
                _mm256_castps_pd($hi),
            ))
        };
    }
    let even_idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd_idx = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    let [(ty0, q0), (ty1, q1)] = both;
    let one_row = ty0 == ty1 && q1 == q0 + COLS;
    let vp = v.as_mut_ptr();
    for ch in 0..s.c {
        let plane = xp.as_ptr().add(ch * s.plane);
        let mut d = [[_mm512_setzero_ps(); TILE_IN]; TILE_IN];
        for (i, row) in d.iter_mut().enumerate() {
            let p0 = plane.add((2 * ty0 + i) * s.wp + q0);
            if one_row {
                for (half, at) in [(0, 0), (2, 2)] {
                    let (a, b) = (
                        _mm512_loadu_ps(p0.add(at)),
                        _mm512_loadu_ps(p0.add(at + 16)),
                    );
                    row[half] = _mm512_permutex2var_ps(a, even_idx, b);
                    row[half + 1] = _mm512_permutex2var_ps(a, odd_idx, b);
                }
            } else {
                let p1 = plane.add((2 * ty1 + i) * s.wp + q1);
                let ((e0, o0), (e1, o1)) = (split!(p0), split!(p1));
                let ((e2, o2), (e3, o3)) = (split!(p0.add(2)), split!(p1.add(2)));
                *row = [join!(e0, e1), join!(o0, o1), join!(e2, e3), join!(o2, o3)];
            }
        }
        // Rows: Bᵀ = [1 0 −1 0; 0 1 1 0; 0 −1 1 0; 0 1 0 −1].
        let mut t = [[_mm512_setzero_ps(); TILE_IN]; TILE_IN];
        for j in 0..TILE_IN {
            t[0][j] = _mm512_sub_ps(d[0][j], d[2][j]);
            t[1][j] = _mm512_add_ps(d[1][j], d[2][j]);
            t[2][j] = _mm512_sub_ps(d[2][j], d[1][j]);
            t[3][j] = _mm512_sub_ps(d[1][j], d[3][j]);
        }
        // Columns: the same, on the right.
        for (i, t) in t.iter().enumerate() {
            let w = [
                _mm512_sub_ps(t[0], t[2]),
                _mm512_add_ps(t[1], t[2]),
                _mm512_sub_ps(t[2], t[1]),
                _mm512_sub_ps(t[1], t[3]),
            ];
            for (j, w) in w.iter().enumerate() {
                let xi = i * TILE_IN + j;
                _mm512_storeu_ps(vp.add((xi * s.c + ch) * 16), *w);
            }
        }
    }
}

/// A panel's outputs: its rows of `y`, their addends, and the vectors of tiles to store.
type Out<'a> = (&'a mut [MaybeUninit<f32>], &'a [f32], &'a [(usize, usize)]);

/// For the panel of `NR` output channels at `u` (point `ξ`'s values `ξ·stride` further on):
/// `M[ξ] = Σ_c U[ξ][·][c]·V[ξ][c]` in registers, then `add[r] + Aᵀ·M·A` into the rows of `y`
/// (`NR` planes of `ho × wo`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn products<const NR: usize>(s: &Shape, (u, stride): (&[f32], usize), v: &[f32], out: Out) {
    use std::arch::x86_64::*;
    // Every point's sums are written below: no zero fill first (it cost a memset of up to
    // 6 KiB per call).
    let mut m = MaybeUninit::<[[[__m256; 2]; NR]; 16]>::uninit();
    let points = m.as_mut_ptr().cast::<[[__m256; 2]; NR]>();
    for xi in 0..16 {
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
        points.add(xi).write(acc);
    }
    store_tiles(s, m.assume_init_ref(), out);
}

/// [`products`] with AVX-512: the 16 tiles in one vector, so half the multiply-adds and loads
/// of the tiles; each lane runs the same operations in the same order (the same bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn products512<const NR: usize>(
    s: &Shape,
    (u, stride): (&[f32], usize),
    v: &[f32],
    out: Out,
) {
    use std::arch::x86_64::*;
    let mut m = MaybeUninit::<[[[__m256; 2]; NR]; 16]>::uninit();
    let points = m.as_mut_ptr().cast::<[[__m256; 2]; NR]>();
    for xi in 0..16 {
        let mut acc = [_mm512_setzero_ps(); NR];
        let mut wq = u.as_ptr().add(xi * stride);
        let mut vq = v.as_ptr().add(xi * s.c * 16);
        for _ in 0..s.c {
            let a = _mm512_loadu_ps(vq);
            for (r, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(_mm512_set1_ps(*wq.add(r)), a, *acc);
            }
            wq = wq.add(NR);
            vq = vq.add(16);
        }
        let rows = points.add(xi).cast::<[__m256; 2]>();
        for (r, acc) in acc.iter().enumerate() {
            let high = _mm512_extractf64x4_pd::<1>(_mm512_castps_pd(*acc));
            rows.add(r)
                .write([_mm512_castps512_ps256(*acc), _mm256_castpd_ps(high)]);
        }
    }
    store_tiles(s, m.assume_init_ref(), out);
}

/// `add[r] + Aᵀ·M·A` of the sums `m` (per point, row and vector of 8 tiles) into the rows of
/// `y` (`NR` planes of `ho × wo`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn store_tiles<const NR: usize>(
    s: &Shape,
    m: &[[[std::arch::x86_64::__m256; 2]; NR]; 16],
    (y, add, pair): Out,
) {
    use std::arch::x86_64::*;
    let plane = s.ho * s.wo;
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    #[allow(clippy::needless_range_loop)] // `r` picks the row in all 16 points' sums
    for r in 0..NR {
        let bias = _mm256_set1_ps(add[r]);
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
            // The columns from `q` inside the row: all 16, or the first `n` (masked).
            let n = COLS.min(s.wo - q);
            let masks = [
                _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lane),
                _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32 - 8), lane),
            ];
            for (a, sr) in sr.iter().enumerate() {
                let y0 = _mm256_add_ps(_mm256_add_ps(sr[0], sr[1]), sr[2]);
                let y1 = _mm256_sub_ps(_mm256_sub_ps(sr[1], sr[2]), sr[3]);
                // Tile t's two columns side by side: 16 consecutive outputs.
                let (lo, hi) = (_mm256_unpacklo_ps(y0, y1), _mm256_unpackhi_ps(y0, y1));
                let first = _mm256_add_ps(bias, _mm256_permute2f128_ps::<0x20>(lo, hi));
                let second = _mm256_add_ps(bias, _mm256_permute2f128_ps::<0x31>(lo, hi));
                let dst = y
                    .as_mut_ptr()
                    .cast::<f32>()
                    .add(r * plane + (2 * ty + a) * s.wo + q);
                if n == COLS {
                    _mm256_storeu_ps(dst, first);
                    _mm256_storeu_ps(dst.add(8), second);
                } else {
                    _mm256_maskstore_ps(dst, masks[0], first);
                    _mm256_maskstore_ps(dst.add(8), masks[1], second);
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn input_transform512(_: &Shape, _: &[f32], _: [(usize, usize); 2], _: &mut [f32]) {
    unreachable!("the Winograd kernel runs only where `available` holds")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn input_transform(_: &Shape, _: &[f32], _: [(usize, usize); 2], _: &mut [f32]) {
    unreachable!("the Winograd kernel runs only where `available` holds")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn products<const NR: usize>(_: &Shape, _: (&[f32], usize), _: &[f32], _: Out) {
    unreachable!("the Winograd kernel runs only where `available` holds")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn grad_products512<const NR: usize>(
    _: &[f32],
    _: (&[f32], usize, [usize; 2]),
    _: &mut [f32],
) {
    unreachable!("the Winograd kernel runs only where `available` holds")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn products512<const NR: usize>(_: &Shape, _: (&[f32], usize), _: &[f32], _: Out) {
    unreachable!("the Winograd kernel runs only where `available` holds")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn grad_transform(
    _: &Shape,
    _: usize,
    _: &[f32],
    _: ([(usize, usize); 2], [usize; 2]),
    _: &mut [f32],
) {
    unreachable!("the Winograd kernel runs only where `available` holds")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn grad_products<const NR: usize>(_: &[f32], _: (&[f32], usize, [usize; 2]), _: &mut [f32]) {
    unreachable!("the Winograd kernel runs only where `available` holds")
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn channels_last(_: &[f32], _: (usize, usize, usize), _: &mut [f32]) {
    unreachable!("the Winograd kernel runs only where `available` holds")
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn transpose_into<const ADD: bool>(
    _: &[f32],
    _: (usize, usize, usize),
    _: &mut [f32],
    _: usize,
) {
    unreachable!("the kernels run only where AVX2 is available")
}
