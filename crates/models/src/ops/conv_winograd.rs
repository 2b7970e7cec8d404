//! Winograd F(2×2, 3×3) (Lavin & Gray 2016) on the padded layout of `conv_padded`, fused per
//! block of tiles: 16 multiplies per 2×2 output tile and input channel instead of 36. And
//! F(2×2, 2×2) ([`forward2`]: 9 instead of 16) for the 2×2 windows of a k-4 stride-2
//! (transposed) conv's sub-pixel phases.
//!
//! The AVX2 lanes are 8 output tiles side by side in a row of tiles (16 output columns), as
//! the direct kernel's lanes are 16 pixels. For a block of four such vectors (32 tiles; two
//! where fewer than three are left) at a time:
//! - the input transform `Bᵀ·d·B` of every channel's 4×4 patches (loads of 16 consecutive
//!   padded inputs, split into even and odd columns) goes into a small buffer `V[ξ][c]`;
//! - for each panel of output channels and each of the 16 points `ξ`, a register tile of
//!   up to 6 channels × 16 tiles sums `U[ξ][o][c]·V[ξ][c]` over `c`, as the direct kernel's
//!   (with AVX-512, 6 channels × 32 tiles: each weight broadcast feeds two vectors);
//! - the output transform `Aᵀ·M·A` gives each tile's 2×2 outputs, interleaved back into rows
//!   and written once, with the bias, into the output (no `Wp`-wide copy to narrow).
//!
//! With AVX-512 16 tiles are one vector (and the weight gradient's 16 output channels), each
//! lane running the AVX2 code's operations in the same order: the same bits.
//!
//! `U = G·g·Gᵀ` is computed once per op ([`pack`]). The weight gradient ([`weight_grad`]) is
//! the same algebra run backwards: `Gᵀ·(Σ_tiles (A·dy·Aᵀ) ⊙ (Bᵀ·d·B))·G`, 16 products per
//! tile and channel pair instead of 36. Each output is the same fixed sequence of operations
//! whatever the thread count. The error is f32 round-off of the transforms, about 1e-6 of the
//! output's scale (tested against the direct sum in f64, values and weight gradient); for
//! F(2×2, 2×2), whose transforms only add and subtract, about 2e-7 of the terms' sizes.

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
    pack_side::<3>(o, c, w)
}

/// [`pack`] for F(2×2, 2×2): `w` `(O, C, 2, 2)`, 9 points.
pub(crate) fn pack2(o: usize, c: usize, w: &[f32]) -> Vec<f32> {
    pack_side::<2>(o, c, w)
}

/// `G` of F(2×2, K×K) (its first `K + 1` rows and `K` columns).
const fn g_matrix(k: usize) -> [[f64; 3]; 4] {
    if k == 3 {
        [
            [1., 0., 0.],
            [0.5, 0.5, 0.5],
            [0.5, -0.5, 0.5],
            [0., 0., 1.],
        ]
    } else {
        // F(2, 2): m₀ = (d₀ − d₁)·g₀, m₁ = d₁·(g₀ + g₁), m₂ = (d₂ − d₁)·g₁.
        [[1., 0., 0.], [1., 1., 0.], [0., 1., 0.], [0., 0., 0.]]
    }
}

fn pack_side<const K: usize>(o: usize, c: usize, w: &[f32]) -> Vec<f32> {
    let g_m = g_matrix(K);
    let (side, points) = (K + 1, (K + 1) * (K + 1));
    let mut out = vec![0f32; points * o * c];
    for (r0, nr) in panels(o) {
        for r in 0..nr {
            for ch in 0..c {
                let g = &w[((r0 + r) * c + ch) * K * K..][..K * K];
                for xi in 0..points {
                    let (a, b) = (xi / side, xi % side);
                    let mut u = 0f64;
                    for i in 0..K {
                        for j in 0..K {
                            u += g_m[a][i] * g[i * K + j] as f64 * g_m[b][j];
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
        self.reach_side(3)
    }

    /// [`Shape::reach`] of F(2×2, k×k): `k + 1` rows from each tile row.
    pub(crate) fn reach_side(&self, k: usize) -> usize {
        let last_q = (self.wo.max(1) - 1) / COLS * COLS;
        (self.c.max(1) - 1) * self.plane + (self.ho + k - 2) * self.wp + last_q + 24
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
    forward_side::<3>(s, o, u, xp, (y, add), v)
}

/// [`forward`] for F(2×2, 2×2) (a stride-1 2×2 conv without padding: output `(u, v)` reads
/// `xp` at rows `u, u + 1` and columns `v, v + 1`) with the [`pack2`]ed `u`: 9 products per
/// 2×2 output tile and input channel instead of 16. `xp` holds at least
/// [`Shape::reach_side`]`(2)` floats.
pub(crate) fn forward2(
    s: &Shape,
    o: usize,
    u: &[f32],
    xp: &[f32],
    (y, add): (&mut [MaybeUninit<f32>], &[f32]),
    v: &mut Vec<f32>,
) {
    forward_side::<2>(s, o, u, xp, (y, add), v)
}

fn forward_side<const K: usize>(
    s: &Shape,
    o: usize,
    u: &[f32],
    xp: &[f32],
    (y, add): (&mut [MaybeUninit<f32>], &[f32]),
    v: &mut Vec<f32>,
) {
    let points = (K + 1) * (K + 1);
    assert!(available() && s.wp >= s.wo + K - 1);
    assert!(s.ho.is_multiple_of(2) && s.wo.is_multiple_of(2));
    assert!(u.len() >= points * o * s.c && y.len() >= o * s.ho * s.wo && add.len() >= o);
    assert!(xp.len() >= s.reach_side(K));
    // The vectors of 8 tiles: (tile row, first output column), four at a time (32 tiles:
    // with AVX-512 two vectors of tiles per weight broadcast), the last two or one as a pair.
    let per_row = s.wo.div_ceil(COLS);
    let count = s.ho / 2 * per_row;
    let vector = |i: usize| (i / per_row, i % per_row * COLS);
    v.resize(points * s.c * 32, 0.0);
    // AVX-512 where the CPU has it (the same bits).
    let wide = super::activation::wide_kernels();
    let mut first = 0;
    while first < count {
        // A vector past the last repeats the last (transformed and summed, never stored).
        let n = if count - first >= 3 { 4 } else { 2 };
        let block: [(usize, usize); 4] =
            std::array::from_fn(|k| vector((first + k.min(n - 1)).min(count - 1)));
        let live = &block[..(count - first).min(n)];
        let lanes = 8 * n;
        // SAFETY: AVX2 and FMA are checked (`available`); the loads stay inside `xp` (the
        // assert above), and the stores write `min(16, wo − q)` columns of rows below `ho`.
        unsafe {
            for (h, both) in [[block[0], block[1]], [block[2], block[3]]][..n / 2]
                .iter()
                .enumerate()
            {
                let place = (&mut v[..], lanes, 16 * h);
                match (K, wide) {
                    (3, true) => input_transform512::<3>(s, xp, *both, place),
                    (3, false) => input_transform::<3>(s, xp, *both, place),
                    (_, true) => input_transform512::<2>(s, xp, *both, place),
                    _ => input_transform::<2>(s, xp, *both, place),
                }
            }
            for (r0, nr) in panels(o) {
                let panel = (&u[r0 * s.c..], o * s.c);
                let rows = &mut y[r0 * s.ho * s.wo..];
                let add = &add[r0..];
                match (wide, n) {
                    (true, 4) => by_rows!(nr, products512x2[K](s, panel, v, (rows, add, live))),
                    (true, _) => by_rows!(nr, products512[K](s, panel, v, (rows, add, live))),
                    _ => {
                        // AVX2: 16 lanes at a time.
                        for (h, pair) in live.chunks(2).enumerate() {
                            let rows = &mut *rows;
                            let vs = (&v[..], lanes, 16 * h);
                            by_rows!(nr, products[K](s, panel, vs, (rows, add, pair)))
                        }
                    }
                }
            }
        }
        first += n;
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
            let place = (&mut sums.v[..], 16, 0);
            if wide {
                input_transform512::<3>(s, xp, both, place);
            } else {
                input_transform::<3>(s, xp, both, place);
            }
            grad_transform(s, op, &sums.dyt, (both, slots), &mut sums.m);
        }
        for xi in 0..16 {
            let v = &sums.v[xi * s.c * 16..];
            let m = &sums.m[xi * 16 * op..];
            // With AVX-512, 32 output channels at a time where there are: each broadcast
            // of V feeds two multiply-adds (one left the kernel waiting on loads and on the
            // adds' latency).
            let mut ob = 0;
            while ob < op {
                let two = wide && ob + 2 * COLS <= op;
                for (c0, nr) in panels(s.c) {
                    let panel = &v[c0 * 16..];
                    let grad = (&m[ob..], op, slots);
                    let u = &mut sums.u[(xi * s.c + c0) * op + ob..];
                    // SAFETY: AVX2 and FMA are checked; the panel's rows, the slots and the
                    // 16 (32) channels from `ob` are inside `v`, `m` and `u` (their sizes
                    // above).
                    unsafe {
                        if two {
                            by_rows!(nr, grad_products512[2](panel, grad, u))
                        } else if wide {
                            by_rows!(nr, grad_products512[1](panel, grad, u))
                        } else {
                            by_rows!(nr, grad_products(panel, grad, u))
                        }
                    }
                }
                ob += if two { 2 * COLS } else { COLS };
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

/// [`grad_products`] with AVX-512 for `16·W` output channels (`W` vectors: 32 channels at a
/// time let each broadcast of V feed two multiply-adds); each lane runs the same operations
/// in the same order (the same bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn grad_products512<const NR: usize, const W: usize>(
    v: &[f32],
    (m, op, slots): (&[f32], usize, [usize; 2]),
    u: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); W]; NR];
    for (half, &n) in slots.iter().enumerate() {
        for slot in half * 8..half * 8 + n {
            let mq = m.as_ptr().add(slot * op);
            let mut a = [_mm512_setzero_ps(); W];
            for (k, a) in a.iter_mut().enumerate() {
                *a = _mm512_loadu_ps(mq.add(16 * k));
            }
            let vq = v.as_ptr().add(slot);
            for (r, acc) in acc.iter_mut().enumerate() {
                let w = _mm512_set1_ps(*vq.add(r * 16));
                for (acc, a) in acc.iter_mut().zip(&a) {
                    *acc = _mm512_fmadd_ps(w, *a, *acc);
                }
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (k, acc) in acc.iter().enumerate() {
            let dst = u.as_mut_ptr().add(r * op + 16 * k);
            _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), *acc));
        }
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

/// The even and odd lanes of the 16 consecutive floats from `p`, as two AVX2 vectors (a
/// macro, not a function or a closure: those would be compiled without AVX2 and not inlined).
#[cfg(target_arch = "x86_64")]
macro_rules! split16 {
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

/// `Bᵀ·d·B` of one tile `d` (`K + 1` rows of `K + 1` vectors), each of its `(K + 1)²` points
/// handed to the closure-like `|ξ, value| store`; `$add` and `$sub` are the vector width's
/// intrinsics, so AVX2 and AVX-512 run the same operations in the same order (a macro, so
/// that it compiles inside its caller's `target_feature`).
#[cfg(target_arch = "x86_64")]
macro_rules! input_tile {
    ($k:expr, $d:expr, $zero:expr, $add:ident, $sub:ident, |$xi:ident, $w:ident| $store:expr) => {{
        let d = &$d;
        if $k == 2 {
            // F(2×2, 2×2): Bᵀ = [1 −1 0; 0 1 0; 0 −1 1], rows then columns.
            let mut t = [[$zero; 3]; 3];
            for j in 0..3 {
                t[0][j] = $sub(d[0][j], d[1][j]);
                t[1][j] = d[1][j];
                t[2][j] = $sub(d[2][j], d[1][j]);
            }
            for (i, t) in t.iter().enumerate() {
                let w = [$sub(t[0], t[1]), t[1], $sub(t[2], t[1])];
                for (j, &$w) in w.iter().enumerate() {
                    let $xi = i * 3 + j;
                    $store;
                }
            }
        } else {
            // Rows: Bᵀ = [1 0 −1 0; 0 1 1 0; 0 −1 1 0; 0 1 0 −1].
            let mut t = [[$zero; 4]; 4];
            for j in 0..4 {
                t[0][j] = $sub(d[0][j], d[2][j]);
                t[1][j] = $add(d[1][j], d[2][j]);
                t[2][j] = $sub(d[2][j], d[1][j]);
                t[3][j] = $sub(d[1][j], d[3][j]);
            }
            // Columns: the same, on the right.
            for (i, t) in t.iter().enumerate() {
                let w = [
                    $sub(t[0], t[2]),
                    $add(t[1], t[2]),
                    $sub(t[2], t[1]),
                    $sub(t[1], t[3]),
                ];
                for (j, &$w) in w.iter().enumerate() {
                    let $xi = i * 4 + j;
                    $store;
                }
            }
        }
    }};
}

/// `V[ξ][c][16]` `=` `Bᵀ·d·B` of the 4×4 patches of the two vectors of tiles `both`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn input_transform<const K: usize>(
    s: &Shape,
    xp: &[f32],
    both: [(usize, usize); 2],
    (v, lanes, at): (&mut [f32], usize, usize),
) {
    use std::arch::x86_64::*;
    let vp = v.as_mut_ptr();
    for ch in 0..s.c {
        for (half, &(ty, q)) in both.iter().enumerate() {
            let base = xp.as_ptr().add(ch * s.plane + 2 * ty * s.wp + q);
            let mut d = [[_mm256_setzero_ps(); TILE_IN]; TILE_IN];
            for (i, row) in d.iter_mut().enumerate().take(K + 1) {
                let p = base.add(i * s.wp);
                (row[0], row[1]) = split16!(p);
                (row[2], row[3]) = split16!(p.add(2));
            }
            let store = |xi: usize| vp.add((xi * s.c + ch) * lanes + at + half * 8);
            input_tile!(
                K,
                d,
                _mm256_setzero_ps(),
                _mm256_add_ps,
                _mm256_sub_ps,
                |xi, w| { _mm256_storeu_ps(store(xi), w) }
            );
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
unsafe fn input_transform512<const K: usize>(
    s: &Shape,
    xp: &[f32],
    both: [(usize, usize); 2],
    (v, lanes, at): (&mut [f32], usize, usize),
) {
    use std::arch::x86_64::*;
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
        for (i, row) in d.iter_mut().enumerate().take(K + 1) {
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
                let ((e0, o0), (e1, o1)) = (split16!(p0), split16!(p1));
                let ((e2, o2), (e3, o3)) = (split16!(p0.add(2)), split16!(p1.add(2)));
                *row = [join!(e0, e1), join!(o0, o1), join!(e2, e3), join!(o2, o3)];
            }
        }
        let store = |xi: usize| vp.add((xi * s.c + ch) * lanes + at);
        input_tile!(
            K,
            d,
            _mm512_setzero_ps(),
            _mm512_add_ps,
            _mm512_sub_ps,
            |xi, w| { _mm512_storeu_ps(store(xi), w) }
        );
    }
}

/// A panel's outputs: its rows of `y`, their addends, and the vectors of tiles to store.
type Out<'a> = (&'a mut [MaybeUninit<f32>], &'a [f32], &'a [(usize, usize)]);

/// For the panel of `NR` output channels at `u` (point `ξ`'s values `ξ·stride` further on):
/// `M[ξ] = Σ_c U[ξ][·][c]·V[ξ][c]` in registers, then `add[r] + Aᵀ·M·A` into the rows of `y`
/// (`NR` planes of `ho × wo`); F(2×2, K×K), `(K + 1)²` points.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn products<const NR: usize, const K: usize>(
    s: &Shape,
    (u, stride): (&[f32], usize),
    (v, lanes, at): (&[f32], usize, usize),
    out: Out,
) {
    use std::arch::x86_64::*;
    // Every point's sums are written below: no zero fill first (it cost a memset of up to
    // 6 KiB per call).
    let mut m = MaybeUninit::<[[[__m256; 2]; NR]; 16]>::uninit();
    let points = m.as_mut_ptr().cast::<[[__m256; 2]; NR]>();
    for xi in 0..(K + 1) * (K + 1) {
        // In registers over the sum; stored once.
        let mut acc = [[_mm256_setzero_ps(); 2]; NR];
        let mut wq = u.as_ptr().add(xi * stride);
        let mut vq = v.as_ptr().add(xi * s.c * lanes + at);
        for _ in 0..s.c {
            let (a, b) = (_mm256_loadu_ps(vq), _mm256_loadu_ps(vq.add(8)));
            for (r, acc) in acc.iter_mut().enumerate() {
                let wv = _mm256_broadcast_ss(&*wq.add(r));
                acc[0] = _mm256_fmadd_ps(wv, a, acc[0]);
                acc[1] = _mm256_fmadd_ps(wv, b, acc[1]);
            }
            wq = wq.add(NR);
            vq = vq.add(lanes);
        }
        points.add(xi).write(acc);
    }
    store::<NR, K, 2>(s, &m, out);
}

/// The output transform of F(2×2, K×K) of the points' sums `m` (its first `(K + 1)²`
/// written).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn store<const NR: usize, const K: usize, const H: usize>(
    s: &Shape,
    m: &MaybeUninit<[[[std::arch::x86_64::__m256; H]; NR]; 16]>,
    out: Out,
) {
    // SAFETY: the first `(K + 1)²` points were written; the rest is never read.
    let points = std::slice::from_raw_parts(
        m.as_ptr().cast::<[[std::arch::x86_64::__m256; H]; NR]>(),
        (K + 1) * (K + 1),
    );
    store_tiles::<NR, H, K>(s, points, out);
}

/// [`products`] with AVX-512: the 16 tiles in one vector, so half the multiply-adds and loads
/// of the tiles; each lane runs the same operations in the same order (the same bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn products512<const NR: usize, const K: usize>(
    s: &Shape,
    (u, stride): (&[f32], usize),
    v: &[f32],
    out: Out,
) {
    // The pair's 16 lanes are the whole row of `v`.
    use std::arch::x86_64::*;
    let mut m = MaybeUninit::<[[[__m256; 2]; NR]; 16]>::uninit();
    let points = m.as_mut_ptr().cast::<[[__m256; 2]; NR]>();
    // Two points at a time: 2·NR independent sums (NR alone leave the FMA units waiting on
    // their latency), each the same chain over `c` as before. With 9 points the last is
    // summed twice (and written twice, the same values).
    let n = (K + 1) * (K + 1);
    for xi in (0..n).step_by(2) {
        let both = [xi, (xi + 1).min(n - 1)];
        let mut acc = [[_mm512_setzero_ps(); NR]; 2];
        let mut wq = both.map(|x| u.as_ptr().add(x * stride));
        let mut vq = both.map(|x| v.as_ptr().add(x * s.c * 16));
        for _ in 0..s.c {
            let a = [_mm512_loadu_ps(vq[0]), _mm512_loadu_ps(vq[1])];
            #[allow(clippy::needless_range_loop)] // `r` picks the row in both points' sums
            for r in 0..NR {
                for k in 0..2 {
                    acc[k][r] = _mm512_fmadd_ps(_mm512_set1_ps(*wq[k].add(r)), a[k], acc[k][r]);
                }
            }
            wq = wq.map(|p| p.add(NR));
            vq = vq.map(|p| p.add(16));
        }
        for (&x, acc) in both.iter().zip(&acc) {
            let rows = points.add(x).cast::<[__m256; 2]>();
            for (r, acc) in acc.iter().enumerate() {
                let high = _mm512_extractf64x4_pd::<1>(_mm512_castps_pd(*acc));
                rows.add(r)
                    .write([_mm512_castps512_ps256(*acc), _mm256_castpd_ps(high)]);
            }
        }
    }
    store::<NR, K, 2>(s, &m, out);
}

/// [`products512`] on a block of 32 tiles (four vectors of 8, two AVX-512 vectors): each
/// weight broadcast feeds two multiply-adds, so the loads no longer outnumber them (one
/// broadcast per multiply-add left the kernel waiting on loads). Each lane's sum is the same
/// chain as before: the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn products512x2<const NR: usize, const K: usize>(
    s: &Shape,
    (u, stride): (&[f32], usize),
    v: &[f32],
    out: Out,
) {
    use std::arch::x86_64::*;
    let mut m = MaybeUninit::<[[[__m256; 4]; NR]; 16]>::uninit();
    let points = m.as_mut_ptr().cast::<[[__m256; 4]; NR]>();
    for xi in 0..(K + 1) * (K + 1) {
        let mut acc = [[_mm512_setzero_ps(); 2]; NR];
        let mut wq = u.as_ptr().add(xi * stride);
        let mut vq = v.as_ptr().add(xi * s.c * 32);
        for _ in 0..s.c {
            let (a, b) = (_mm512_loadu_ps(vq), _mm512_loadu_ps(vq.add(16)));
            for (r, acc) in acc.iter_mut().enumerate() {
                let w = _mm512_set1_ps(*wq.add(r));
                acc[0] = _mm512_fmadd_ps(w, a, acc[0]);
                acc[1] = _mm512_fmadd_ps(w, b, acc[1]);
            }
            wq = wq.add(NR);
            vq = vq.add(32);
        }
        let rows = points.add(xi).cast::<[__m256; 4]>();
        for (r, acc) in acc.iter().enumerate() {
            macro_rules! high {
                ($z:expr) => {
                    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd($z)))
                };
            }
            rows.add(r).write([
                _mm512_castps512_ps256(acc[0]),
                high!(acc[0]),
                _mm512_castps512_ps256(acc[1]),
                high!(acc[1]),
            ]);
        }
    }
    store::<NR, K, 4>(s, &m, out);
}

/// `add[r] + Aᵀ·M·A` of the sums `m` (per point, row and vector of 8 tiles) into the rows of
/// `y` (`NR` planes of `ho × wo`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn store_tiles<const NR: usize, const H: usize, const K: usize>(
    s: &Shape,
    m: &[[[std::arch::x86_64::__m256; H]; NR]],
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
                    m[$i * (K + 1) + $j][r][half]
                };
            }
            let mut sr = [[_mm256_setzero_ps(); TILE_IN]; 2];
            for j in 0..K + 1 {
                if K == 2 {
                    // F(2×2, 2×2): Aᵀ = [1 1 0; 0 1 1].
                    sr[0][j] = _mm256_add_ps(mm!(0, j), mm!(1, j));
                    sr[1][j] = _mm256_add_ps(mm!(1, j), mm!(2, j));
                } else {
                    // Aᵀ = [1 1 1 0; 0 1 −1 −1], on the left, then on the right.
                    sr[0][j] = _mm256_add_ps(_mm256_add_ps(mm!(0, j), mm!(1, j)), mm!(2, j));
                    sr[1][j] = _mm256_sub_ps(_mm256_sub_ps(mm!(1, j), mm!(2, j)), mm!(3, j));
                }
            }
            // The columns from `q` inside the row: all 16, or the first `n` (masked).
            let n = COLS.min(s.wo - q);
            let masks = [
                _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lane),
                _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32 - 8), lane),
            ];
            for (a, sr) in sr.iter().enumerate() {
                let (y0, y1) = if K == 2 {
                    (_mm256_add_ps(sr[0], sr[1]), _mm256_add_ps(sr[1], sr[2]))
                } else {
                    (
                        _mm256_add_ps(_mm256_add_ps(sr[0], sr[1]), sr[2]),
                        _mm256_sub_ps(_mm256_sub_ps(sr[1], sr[2]), sr[3]),
                    )
                };
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
unsafe fn input_transform512<const K: usize>(
    _: &Shape,
    _: &[f32],
    _: [(usize, usize); 2],
    _: (&mut [f32], usize, usize),
) {
    unreachable!("the Winograd kernel runs only where `available` holds")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn input_transform<const K: usize>(
    _: &Shape,
    _: &[f32],
    _: [(usize, usize); 2],
    _: (&mut [f32], usize, usize),
) {
    unreachable!("the Winograd kernel runs only where `available` holds")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn products<const NR: usize, const K: usize>(
    _: &Shape,
    _: (&[f32], usize),
    _: (&[f32], usize, usize),
    _: Out,
) {
    unreachable!("the Winograd kernel runs only where `available` holds")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn grad_products512<const NR: usize, const W: usize>(
    _: &[f32],
    _: (&[f32], usize, [usize; 2]),
    _: &mut [f32],
) {
    unreachable!("the Winograd kernel runs only where `available` holds")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn products512x2<const NR: usize, const K: usize>(
    _: &Shape,
    _: (&[f32], usize),
    _: &[f32],
    _: Out,
) {
    unreachable!("the Winograd kernel runs only where `available` holds")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn products512<const NR: usize, const K: usize>(
    _: &Shape,
    _: (&[f32], usize),
    _: &[f32],
    _: Out,
) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::activation::{has_avx512, AVX2_ONLY};
    use std::sync::atomic::Ordering;

    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// F(2×2, 2×2) against the direct 2×2 sum in f64 (the error relative to the sum of the
    /// terms' sizes), and AVX-512 against AVX2 bit for bit: the sub-pixel phases' shapes
    /// (14×14 from 128 and from 32 channels), a row of tiles 32 wide, odd output counts,
    /// one output channel and sides that leave part of a vector.
    #[test]
    fn winograd_2x2_matches_the_direct_sum() {
        if !available() {
            eprintln!("skipped: no AVX2 and FMA here, so the Winograd kernels do not run");
            return;
        }
        for (c, o, ho, wo, wp) in [
            (128, 32, 14, 14, 16),
            (32, 128, 14, 14, 15),
            (3, 5, 14, 14, 16),
            (2, 7, 28, 28, 30),
            (4, 1, 2, 6, 8),
            (5, 12, 6, 36, 38),
        ] {
            let plane = (ho + 1) * wp;
            let shape = Shape {
                c,
                plane,
                wp,
                ho,
                wo,
            };
            let xp = noise(shape.reach_side(2).max(c * plane), c as u64);
            let (w, bias) = (noise(o * c * 4, 7), noise(o, 9));
            let u = pack2(o, c, &w);
            let run = |avx2: bool| {
                AVX2_ONLY.store(avx2, Ordering::Relaxed);
                let mut y = vec![MaybeUninit::new(f32::NAN); o * ho * wo];
                forward2(&shape, o, &u, &xp, (&mut y, &bias), &mut Vec::new());
                AVX2_ONLY.store(false, Ordering::Relaxed);
                // SAFETY: initialised above (and every value written: no NaN is left).
                y.iter()
                    .map(|v| unsafe { v.assume_init() })
                    .collect::<Vec<f32>>()
            };
            let y = run(false);
            let mut worst = 0f64;
            for oc in 0..o {
                for i in 0..ho {
                    for j in 0..wo {
                        let (mut sum, mut size) = (bias[oc] as f64, bias[oc].abs() as f64);
                        for ch in 0..c {
                            for (a, b) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                                let term = w[((oc * c + ch) * 2 + a) * 2 + b] as f64
                                    * xp[ch * plane + (i + a) * wp + j + b] as f64;
                                sum += term;
                                size += term.abs();
                            }
                        }
                        let got = y[(oc * ho + i) * wo + j] as f64;
                        worst = worst.max((got - sum).abs() / size);
                    }
                }
            }
            eprintln!("c{c} o{o} {ho}×{wo}: error {worst:e} of the terms");
            assert!(
                worst < 1e-6,
                "c{c} o{o} {ho}×{wo}: error {worst:e} of the terms"
            );
            if has_avx512() {
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&run(true)), bits(&y), "c{c} o{o} {ho}×{wo}");
            }
        }
    }
}
