//! Stride-1 convolutions on the padded sample, laid out with its padded row width `Wp`: tap
//! `(i, j)` of every output pixel is then one shifted slice of `H'·Wp` values (the `Wp − W'`
//! columns past each output row are scratch, dropped at the end).
//!
//! - Few output channels (a U-Net's last conv: 64 → 1), tap by tap: unfolding such a conv
//!   writes `C·k²` rows per pixel for a product with one row, so each tap is instead a single
//!   long `y += w·x`; the backward runs the same shifts (dx as the adjoint `axpy`s, dW as dot
//!   products against the gradient laid out the same way, its scratch columns zero).
//! - Otherwise, with AVX2, the direct kernels (`conv_direct`) read the shifted slices in
//!   place: the forward, the data gradient, which is itself a stride-1 conv (of `dy`, padded
//!   by `k − 1 − pad`, with the flipped kernel whose in and out channels are swapped:
//!   [`flip_transpose`]), and the weight gradient with the output channels in the lanes
//!   (`conv_wgrad`); Winograd (`conv_winograd`) for 3×3 pad 1 on even sides instead, straight
//!   into the output. Nothing is unfolded or folded back.
//! - Elsewhere, unfolding is one copy of `H'·Wp`
//!   values per row (no short runs, no padding tests) for a gemm `Wp / W'` wider; the data
//!   gradient's conv runs the same way, its gemm summing over `O·k²` rather than `O`.

use super::conv_direct::{self, SLACK};
use super::conv_pointwise;
use super::conv_subpixel::SubPixel;
use super::conv_wgrad;
use super::conv_winograd;
use super::cpu::{matmul, row_sums};
use super::geometry::Geometry;
use std::mem::MaybeUninit;

/// Output channels up to which a stride-1 conv runs tap by tap instead of im2col + gemm.
pub(crate) const MAX_DIRECT_OUT: usize = 4;

/// Whether a conv of geometry `g` with `o` output channels runs tap by tap.
pub(crate) fn direct_fits(g: &Geometry, o: usize) -> bool {
    g.stride == 1 && o <= MAX_DIRECT_OUT && !g.is_pointwise()
}

/// The padded layout of one sample: `C` planes of `Hp × Wp`, and `k` floats of slack at the
/// end that the last plane's shifted slices run into.
struct Padded {
    hp: usize,
    wp: usize,
    ho: usize,
    wo: usize,
}

impl Padded {
    fn of(g: &Geometry) -> Self {
        let (ho, wo) = g.out_hw();
        Self {
            hp: g.h + 2 * g.pad,
            wp: g.w + 2 * g.pad,
            ho,
            wo,
        }
    }

    fn plane(&self) -> usize {
        self.hp * self.wp
    }

    /// The span of one output channel in the `Wp`-wide layout.
    fn span(&self) -> usize {
        self.ho * self.wp
    }

    fn len(&self, c: usize, k: usize) -> usize {
        c * self.plane() + k + SLACK
    }

    /// The direct kernel's view of a sample in this layout.
    fn shape<'a>(&self, c: usize, offsets: &'a [usize]) -> conv_direct::Shape<'a> {
        conv_direct::Shape {
            c,
            plane: self.plane(),
            offsets,
            span: self.span(),
        }
    }

    /// The output pixels in this layout, for `conv_wgrad`.
    fn pixels(&self) -> conv_wgrad::Pixels {
        conv_wgrad::Pixels {
            ho: self.ho,
            wo: self.wo,
            wp: self.wp,
        }
    }

    /// The taps' offsets `i·Wp + j` of a `k×k` kernel.
    fn offsets(&self, k: usize) -> Vec<usize> {
        (0..k * k).map(|t| t / k * self.wp + t % k).collect()
    }
}

/// Reused buffers of one worker (resized on first use).
#[derive(Default)]
pub(crate) struct Scratch {
    x: Vec<f32>,
    y: Vec<f32>,
    dx: Vec<f32>,
    cols: Vec<f32>,
    /// The padded gradient of the data gradient's conv (a geometry of its own).
    dy: Vec<f32>,
    /// The Winograd kernel's transformed inputs.
    v: Vec<f32>,
    /// The Winograd weight gradient's buffers and a chunk's sums ([`finish_backward`]).
    sums: conv_winograd::GradSums,
    /// Zeros, the addend of a data gradient written by `conv_packed`.
    zeros: Vec<f32>,
    /// The channels-last weight gradient's sums (`conv_wgrad`), over a chunk.
    wsums: conv_wgrad::Sums,
}

/// Whether a conv of geometry `g` runs on the padded layout (stride 1, a kernel wider than 1).
pub(crate) fn fits(g: &Geometry) -> bool {
    g.stride == 1 && !g.is_pointwise()
}

/// Whether a conv runs on its input's 2×2 phases (`conv_direct::split_phases`): stride 2, a
/// kernel wider than 1, and the direct kernel (AVX2).
pub(crate) fn phases_fit(g: &Geometry) -> bool {
    g.stride == 2 && g.k >= 2 && conv_direct::available()
}

/// The phases of one sample into `s.x`: the layout of the output in rows `wq` wide, and the
/// direct kernel's view of the phases.
fn split(g: &Geometry, x: &[f32], s: &mut Scratch) -> (Padded, Vec<usize>) {
    let (hq, wq) = conv_direct::split_phases(x, (g.c, g.h, g.w), g.pad, &mut s.x);
    let (ho, wo) = g.out_hw();
    let p = Padded {
        hp: hq,
        wp: wq,
        ho,
        wo,
    };
    (p, conv_direct::phase_offsets(g.k, hq, wq))
}

/// The direct kernel's view of [`split`]'s phases: a channel's four phase planes are one
/// `plane` of the kernel.
fn phase_shape<'a>(g: &Geometry, p: &Padded, offsets: &'a [usize]) -> conv_direct::Shape<'a> {
    conv_direct::Shape {
        plane: 4 * p.plane(),
        ..p.shape(g.c, offsets)
    }
}

/// One sample's forward of a stride-2 conv on its input's phases: `y` (every value written)
/// `=` `bias` `+` the conv, by the direct kernel with the [`pack`]ed weights `wp`.
pub(crate) fn forward_phases(
    g: &Geometry,
    o: usize,
    (x, wp): (&[f32], &[f32]),
    bias: &[f32],
    y: &mut [MaybeUninit<f32>],
    s: &mut Scratch,
) {
    let (p, offsets) = split(g, x, s);
    s.y.resize(o * p.span(), 0.0);
    conv_direct::forward(&phase_shape(g, &p, &offsets), o, wp, &s.x, &mut s.y);
    narrow_bias(&p, &s.y, bias, y);
}

/// One sample's data gradient of a stride-2 conv by the [`SubPixel`] plan `sub`: `dx` (every
/// value written) from `dy`.
pub(crate) fn data_grad_sub_pixel(
    sub: &SubPixel,
    dy: &[f32],
    dx: &mut [MaybeUninit<f32>],
    s: &mut Scratch,
) {
    let c = sub.channels();
    if s.zeros.len() < c {
        s.zeros.resize(c, 0.0);
    }
    sub.apply(dy, (dx, &s.zeros[..c]), (&mut s.dy, &mut s.y, &mut s.v));
}

/// One sample's weight gradient of a stride-2 conv on its input's phases:
/// `dy ⋆ x` added to the chunk's sums ([`finish_backward`] hands them out), `db += Σ dy`.
pub(crate) fn weight_grad_phases(
    g: &Geometry,
    o: usize,
    (x, dy): (&[f32], &[f32]),
    db: &mut [f32],
    s: &mut Scratch,
) {
    let (p, offsets) = split(g, x, s);
    let shape = phase_shape(g, &p, &offsets);
    conv_wgrad::accumulate(&shape, p.pixels(), o, dy, &s.x, &mut s.wsums);
    s.wsums.add_row_sums(p.pixels(), db);
}

/// One sample's backward of a transposed conv that is the data gradient of the stride-2 conv
/// `g` (`dy` → `x`), on `dy`'s phases: `dx` (every value written) `=` that conv of `dy` with
/// the [`pack`]ed `wp` (`ci` outputs: a k-4 stride-2 transposed conv's data gradient is a k-4
/// stride-2 conv with the same weights), and its weight gradient with `x` as the output's
/// gradient added to the chunk's sums ([`finish_backward`] hands them out).
/// `dy` is split into phases once for both.
pub(crate) fn transposed_backward_phases(
    g: &Geometry,
    ci: usize,
    (dy, x, wp): (&[f32], &[f32], &Packed),
    dx: &mut [MaybeUninit<f32>],
    s: &mut Scratch,
) {
    let (p, offsets) = split(g, dy, s);
    let shape = phase_shape(g, &p, &offsets);
    match wp {
        Packed::Direct(wp) => {
            s.y.resize(ci * p.span(), 0.0);
            conv_direct::forward(&shape, ci, wp, &s.x, &mut s.y);
            narrow_write(&p, &s.y, dx);
        }
        Packed::Winograd2(u) => {
            // Each phase plane a channel of a 2×2 conv (its taps at shifts 0 and 1).
            let ws = conv_winograd::Shape {
                c: 4 * g.c,
                plane: p.plane(),
                wp: p.wp,
                ho: p.ho,
                wo: p.wo,
            };
            let need = ws.reach_side(2);
            if s.x.len() < need {
                s.x.resize(need, 0.0);
            }
            if s.zeros.len() < ci {
                s.zeros.resize(ci, 0.0);
            }
            conv_winograd::forward2(&ws, ci, u, &s.x, (dx, &s.zeros[..ci]), &mut s.v);
        }
    }
    conv_wgrad::accumulate(&shape, p.pixels(), ci, x, &s.x, &mut s.wsums);
}

/// The weights of a stride-2 transposed conv's data gradient (`ci` outputs), packed once per
/// op: for the direct kernel, or, for a k-4 kernel on whole 2×2 tiles, for Winograd
/// F(2×2, 2×2) on dy's phases (each phase plane a channel with a 2×2 window).
pub(crate) enum Packed {
    Direct(Vec<f32>),
    Winograd2(Vec<f32>),
}

impl Packed {
    /// `ws` `(ci, O, k, k)` for the conv `g` of [`transposed_backward_phases`].
    pub(crate) fn new(g: &Geometry, ci: usize, ws: &[f32]) -> Self {
        let (ho, wo) = g.out_hw();
        let even = |n: usize| n > 0 && n.is_multiple_of(2);
        if g.k != 4 || !even(ho) || !even(wo) {
            return Self::Direct(conv_direct::pack(ci, g.rows(), ws));
        }
        // Channel (oc, α, β) of the phases, window tap (a, b): kernel tap (2a + α, 2b + β).
        let mut kernel = Vec::with_capacity(ci * g.c * 16);
        for c in 0..ci {
            for oc in 0..g.c {
                let taps = &ws[(c * g.c + oc) * 16..][..16];
                for (alpha, beta) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                    for a in 0..2 {
                        for b in 0..2 {
                            kernel.push(taps[(2 * a + alpha) * 4 + 2 * b + beta]);
                        }
                    }
                }
            }
        }
        Self::Winograd2(conv_winograd::pack2(ci, 4 * g.c, &kernel))
    }
}

/// One sample of a 1×1 conv's forward on the direct kernel (`conv_pointwise`): `y` (every
/// value written) `= bias +` the conv of sample `i` of `xs` with the packed `wp`.
pub(crate) fn forward_pointwise(
    g: &Geometry,
    o: usize,
    ((xs, i), wp): ((&[f32], usize), &[f32]),
    bias: &[f32],
    y: &mut [MaybeUninit<f32>],
    s: &mut Scratch,
) {
    let bufs = (&mut s.y, &mut s.x);
    conv_pointwise::forward((g.c, g.h * g.w, o), wp, (xs, i), bias, y, bufs);
}

/// One sample of a 1×1 conv's backward on the direct kernels (`conv_pointwise`): the weight
/// gradient into the chunk's sums ([`finish_backward`] hands them out), `db`, and `dx` when
/// asked, from sample `i` of `xs` and `dys` and the packed `Wᵀ` `wtp`.
pub(crate) fn backward_pointwise(
    g: &Geometry,
    o: usize,
    (samples, wtp): (conv_pointwise::Samples, &[f32]),
    (dx, db): (Option<&mut [MaybeUninit<f32>]>, &mut [f32]),
    s: &mut Scratch,
) {
    if s.zeros.len() < g.c {
        s.zeros.resize(g.c, 0.0);
    }
    let dx = dx.map(|d| (d, &s.zeros[..g.c]));
    let bufs = (&mut s.dx, &mut s.dy);
    let (c, hw) = (g.c, (g.h, g.w));
    conv_pointwise::backward((c, hw, o), wtp, samples, (dx, db), &mut s.wsums, bufs);
}

/// Unfolds one sample into `s.cols` (`C·k² × H'·Wp`): row `(c, i, j)` is the padded plane `c`
/// from `i·Wp + j` on.
fn unfold(g: &Geometry, p: &Padded, x: &[f32], s: &mut Scratch) {
    pad_into(g, p, x, &mut s.x);
    unfold_padded(g, p, &s.x, &mut s.cols);
}

/// Unfolds a sample already in the padded layout (`src`) into `cols`.
fn unfold_padded(g: &Geometry, p: &Padded, src: &[f32], cols: &mut Vec<f32>) {
    let (k, span) = (g.k, p.span());
    cols.resize(g.rows() * span, 0.0);
    for (r, row) in cols.chunks_exact_mut(span).enumerate() {
        let (ch, i, j) = (r / (k * k), r / k % k, r % k);
        let at = ch * p.plane() + i * p.wp + j;
        row.copy_from_slice(&src[at..at + span]);
    }
}

/// The geometry of the data gradient's conv: `dy` (`O × H' × W'`) padded by `k − 1 − pad`,
/// which gives back `H × W`. None where the padding exceeds `k − 1`.
fn transposed(g: &Geometry, o: usize) -> Option<Geometry> {
    let (ho, wo) = g.out_hw();
    let pad = (g.k - 1).checked_sub(g.pad)?;
    Some(Geometry {
        c: o,
        h: ho,
        w: wo,
        k: g.k,
        stride: 1,
        pad,
    })
}

/// The data gradient's kernel `(C, O, k, k)` of a conv kernel `w` `(O, C, k, k)`: in and out
/// channels swapped and each `k×k` window flipped. Empty where the data gradient is not
/// computed as a conv (tap by tap, or a padding over `k − 1`).
pub(crate) fn flip_transpose(g: &Geometry, o: usize, taps: bool, w: &[f32]) -> Vec<f32> {
    if taps || transposed(g, o).is_none() {
        return vec![];
    }
    let kk = g.k * g.k;
    let mut wt = vec![0f32; w.len()];
    // Kernel `(oc, ch)` reversed (tap `t` to `k² − 1 − t`) into place `(ch, oc)`.
    for (oc, kernels) in w.chunks_exact(g.c * kk).enumerate() {
        for (ch, taps) in kernels.chunks_exact(kk).enumerate() {
            let dst = &mut wt[(ch * o + oc) * kk..][..kk];
            dst.iter_mut()
                .zip(taps.iter().rev())
                .for_each(|(d, v)| *d = *v);
        }
    }
    wt
}

/// Adds the row sums of each channel of `dy` (`O × H' × W'`) to `db`, a row at a time.
fn add_row_sums(p: &Padded, dy: &[f32], db: &mut [f32]) {
    let mut sums = vec![0f32; p.ho];
    for (plane, d) in dy.chunks_exact(p.ho * p.wo).zip(db) {
        row_sums(plane, (p.ho, p.wo, p.wo), &mut sums);
        for v in &sums {
            *d += v;
        }
    }
}

/// Ends a chunk of samples' [`backward`]s: adds what the Winograd weight gradient summed over
/// them to `dw` (nothing for the other kernels, which add each sample's part as they go).
pub(crate) fn finish_backward(g: &Geometry, o: usize, dw: &mut [f32], s: &mut Scratch) {
    conv_winograd::finish_grad(&mut s.sums, o, g.c, dw);
    conv_wgrad::finish(&mut s.wsums, dw);
}

/// `dy` (`O × H' × W'`) into `dst` in the `Wp`-wide layout (`O × H'·Wp`), zero in the
/// scratch columns (never written, as the border in `pad_into`); adds its row sums to `db`.
fn widen(p: &Padded, o: usize, dy: &[f32], dst: &mut Vec<f32>, db: &mut [f32]) {
    dst.resize(o * p.span(), 0.0);
    let planes = dy
        .chunks_exact(p.ho * p.wo)
        .zip(dst.chunks_exact_mut(p.span()));
    for (plane, out) in planes {
        for (src, row) in plane.chunks_exact(p.wo).zip(out.chunks_exact_mut(p.wp)) {
            row[..p.wo].copy_from_slice(src);
        }
    }
    add_row_sums(p, dy, db);
}

/// The weights `w` of a conv of geometry `g` with `o` outputs on the padded layout as its
/// kernels read them: transformed for the Winograd kernel where it serves the conv, else
/// packed into the direct kernel's panels where that runs (empty otherwise).
pub(crate) fn pack(g: &Geometry, o: usize, w: &[f32]) -> Vec<f32> {
    if winograd_fits(g) && !w.is_empty() {
        conv_winograd::pack(o, g.c, w)
    } else if conv_direct::available() && !w.is_empty() {
        conv_direct::pack(o, g.rows(), w)
    } else {
        vec![]
    }
}

/// The weights of a conv with few outputs, run tap by tap ([`forward`] with `taps`), packed
/// for the direct kernel's forward where that runs (empty otherwise).
pub(crate) fn pack_direct(g: &Geometry, o: usize, w: &[f32]) -> Vec<f32> {
    if conv_direct::available() && !w.is_empty() {
        conv_direct::pack(o, g.rows(), w)
    } else {
        vec![]
    }
}

/// The data gradient's kernel of a conv run tap by tap, for the direct kernel (empty where
/// that does not run or the padding exceeds `k − 1`): `(C, O, k, k)`, channels swapped but
/// each window in the forward's order (not flipped), read at [`taps_offsets`]. So each value
/// of `dx` is the chain of multiply-adds over `(o, i, j)` in the order the tap-by-tap scatter
/// (`axpy` per tap) added them: the same bits, from registers.
pub(crate) fn pack_taps_transposed(g: &Geometry, o: usize, w: &[f32]) -> Vec<f32> {
    if !conv_direct::available() || transposed(g, o).is_none() || w.is_empty() {
        return vec![];
    }
    let kk = g.k * g.k;
    let mut wt = Vec::with_capacity(w.len());
    for ch in 0..g.c {
        for oc in 0..o {
            wt.extend_from_slice(&w[(oc * g.c + ch) * kk..][..kk]);
        }
    }
    conv_direct::pack(g.c, o * kk, &wt)
}

/// The offsets in the data gradient's padded `dy` (layout `pt`) of tap `(i, j)` of the
/// forward's kernel, in its order: `(k − 1 − i)·Wp + k − 1 − j`.
fn taps_offsets(k: usize, pt: &Padded) -> Vec<usize> {
    (0..k * k)
        .map(|t| (k - 1 - t / k) * pt.wp + (k - 1 - t % k))
        .collect()
}

/// [`pack`] for the data gradient's conv: its [`flip_transpose`]d kernel `wt` (empty where
/// the data gradient is not a conv).
pub(crate) fn pack_transposed(g: &Geometry, o: usize, wt: &[f32]) -> Vec<f32> {
    match transposed(g, o) {
        Some(gt) if !wt.is_empty() => pack(&gt, g.c, wt),
        _ => vec![],
    }
}

/// Whether the Winograd kernel serves a conv of geometry `g` (3×3, stride 1, padding 1, even
/// sides).
fn winograd_fits(g: &Geometry) -> bool {
    conv_winograd::fits(g.k, g.stride, g.pad, g.out_hw())
}

/// The Winograd kernel's view of the padded sample `xp`, which grows to what the kernel reads
/// (zeros).
fn winograd_shape(g: &Geometry, p: &Padded, xp: &mut Vec<f32>) -> conv_winograd::Shape {
    let shape = conv_winograd::Shape {
        c: g.c,
        plane: p.plane(),
        wp: p.wp,
        ho: p.ho,
        wo: p.wo,
    };
    if xp.len() < shape.reach() {
        xp.resize(shape.reach(), 0.0);
    }
    shape
}

/// `y` (`O × H' × W'`, every value written once) `=` `add[o]` `+` the conv of the padded
/// sample `xp` with the [`pack`]ed `wp`: by the Winograd kernel, straight into `y`, or by the
/// direct one into `wide` (`O × H'·Wp`), then narrowed. `xp` grows to what the kernel reads
/// (zeros).
fn conv_packed(
    (g, p, o): (&Geometry, &Padded, usize),
    wp: &[f32],
    xp: &mut Vec<f32>,
    (y, add): (&mut [MaybeUninit<f32>], &[f32]),
    (wide, v): (&mut Vec<f32>, &mut Vec<f32>),
) {
    if winograd_fits(g) {
        let shape = winograd_shape(g, p, xp);
        conv_winograd::forward(&shape, o, wp, xp, (y, add), v);
    } else {
        wide.resize(o * p.span(), 0.0);
        let offsets = p.offsets(g.k);
        conv_direct::forward(&p.shape(g.c, &offsets), o, wp, xp, wide);
        narrow_bias(p, wide, add, y);
    }
}

/// One sample's forward on the padded layout: `y` (`O × H' × W'`, every value written) `=`
/// the `bias` `+` the conv, tap by tap (`taps`; by the direct kernel with [`pack_direct`]ed
/// weights `wp` where it runs), by the direct or Winograd kernel (with the [`pack`]ed weights
/// `wp`), or as one gemm on the unfolded sample.
pub(crate) fn forward(
    g: &Geometry,
    o: usize,
    taps: bool,
    (x, w, wp): (&[f32], &[f32], &[f32]),
    bias: &[f32],
    y: &mut [MaybeUninit<f32>],
    s: &mut Scratch,
) {
    let p = Padded::of(g);
    if taps && !wp.is_empty() {
        // A few outputs: the direct kernel's tile runs the taps' multiply-adds in their order
        // from zero (the same bits as `forward_taps`), from registers instead of `axpy`s that
        // load and store the outputs at every tap.
        pad_into(g, &p, x, &mut s.x);
        s.y.resize(o * p.span(), 0.0);
        let offsets = p.offsets(g.k);
        conv_direct::forward(&p.shape(g.c, &offsets), o, wp, &s.x, &mut s.y);
    } else if taps {
        pad_into(g, &p, x, &mut s.x);
        forward_taps(g, &p, o, w, s);
    } else if !wp.is_empty() {
        pad_into(g, &p, x, &mut s.x);
        conv_packed((g, &p, o), wp, &mut s.x, (y, bias), (&mut s.y, &mut s.v));
        return;
    } else {
        unfold(g, &p, x, s);
        gemm_into(g, &p, o, w, &s.cols, &mut s.y);
    }
    narrow_bias(&p, &s.y, bias, y);
}

/// `y` (`O × H' × W'`) `=` `bias` `+` the `Wp`-wide `yp` (`O × H'·Wp`) without its scratch
/// columns.
fn narrow_bias(p: &Padded, yp: &[f32], bias: &[f32], y: &mut [MaybeUninit<f32>]) {
    let planes = y
        .chunks_exact_mut(p.ho * p.wo)
        .zip(yp.chunks_exact(p.span()));
    for ((out, src), &b) in planes.zip(bias) {
        for (row, from) in out.chunks_exact_mut(p.wo).zip(src.chunks_exact(p.wp)) {
            for (d, v) in row.iter_mut().zip(from) {
                d.write(b + v);
            }
        }
    }
}

/// A conv's weights as its backward reads them: `w`; `wt`, [`flip_transpose`] of `w` (empty
/// where the data gradient is not a conv); `wtp`, [`pack`] of `wt` (empty where the direct
/// kernel does not run), or for a conv run tap by tap [`pack_taps_transposed`] of `w`.
#[derive(Clone, Copy)]
pub(crate) struct Weights<'a> {
    pub(crate) w: &'a [f32],
    pub(crate) wt: &'a [f32],
    pub(crate) wtp: &'a [f32],
}

/// One sample's gradients as the backward writes them: `dx` (each value once, when asked),
/// and `dw`, `db` added onto.
pub(crate) type Grads<'a> = (
    Option<&'a mut [MaybeUninit<f32>]>,
    &'a mut [f32],
    &'a mut [f32],
);

/// One sample's backward on the padded layout: `dw += dy ⋆ x`, `db += Σ dy`, and, when asked,
/// `dx = 0 + Wᵀ ⋆ dy` (every value written once, the bits of an add onto zeros); tap by tap
/// (`taps`), by the direct kernels, or by gemms on the unfolded sample. Where `wt` is there,
/// `dx` is the conv of `dy` with it.
pub(crate) fn backward(
    g: &Geometry,
    o: usize,
    taps: bool,
    (x, ws, dy): (&[f32], &Weights, &[f32]),
    (dx, dw, db): Grads,
    s: &mut Scratch,
) {
    let Weights { w, wt, wtp } = *ws;
    let p = Padded::of(g);
    // The direct kernels where they serve the whole backward (dx, if asked, as a conv), with
    // the weight gradient by Winograd (reading dy as it is) where there are input channels
    // enough to spread its transforms of dy over, else with the output channels in the lanes
    // (`conv_wgrad`); otherwise unfold + gemm.
    let direct = !taps && conv_direct::available() && (dx.is_none() || !wtp.is_empty());
    let winograd = direct && winograd_fits(g) && g.c >= conv_winograd::MIN_GRAD_CHANNELS;
    // db from dy's channels-last copy where a weight gradient kernel makes one, else with
    // the widened copy.
    if !direct {
        widen(&p, o, dy, &mut s.y, db);
    }
    if taps {
        pad_into(g, &p, x, &mut s.x);
        weight_grad_taps(g, &p, dw, s);
        let Some(dx) = dx else { return };
        match transposed(g, o) {
            Some(gt) if !wtp.is_empty() => {
                // dx as the conv of dy (padded by k − 1 − pad) by the direct kernel.
                let pt = Padded::of(&gt);
                pad_into(&gt, &pt, dy, &mut s.dy);
                let offsets = taps_offsets(g.k, &pt);
                s.dx.resize(g.c * pt.span(), 0.0);
                conv_direct::forward(&pt.shape(o, &offsets), g.c, wtp, &s.dy, &mut s.dx);
                narrow_write(&pt, &s.dx, dx);
            }
            _ => scatter_taps(g, &p, w, dx, s),
        }
        return;
    }
    // dx is a conv of dy where `wt` is there (then `transposed` is too), else folded back
    // from the gemm's columns.
    let (dx_conv, dx_fold) = if wt.is_empty() {
        (None, dx)
    } else {
        (dx, None)
    };
    if winograd {
        pad_into(g, &p, x, &mut s.x);
        let shape = winograd_shape(g, &p, &mut s.x);
        conv_winograd::weight_grad(&shape, o, dy, &s.x, &mut s.sums);
        s.sums.add_row_sums((p.ho, p.wo), db);
    } else if direct {
        pad_into(g, &p, x, &mut s.x);
        let offsets = p.offsets(g.k);
        conv_wgrad::accumulate(
            &p.shape(g.c, &offsets),
            p.pixels(),
            o,
            dy,
            &s.x,
            &mut s.wsums,
        );
        s.wsums.add_row_sums(p.pixels(), db);
    } else {
        unfold(g, &p, x, s);
        backward_gemm(g, &p, o, w, dw, dx_fold, s);
    }
    let (Some(dx), Some(gt)) = (dx_conv, transposed(g, o)) else {
        return;
    };
    let pt = Padded::of(&gt);
    pad_into(&gt, &pt, dy, &mut s.dy);
    // Into `s.dx`: `s.y` keeps its zero scratch columns for the next sample's `widen`.
    if wtp.is_empty() {
        unfold_padded(&gt, &pt, &s.dy, &mut s.cols);
        gemm_into(&gt, &pt, g.c, wt, &s.cols, &mut s.dx);
        narrow_write(&pt, &s.dx, dx);
    } else {
        // `0 + v` (as `narrow_write`).
        s.zeros.resize(g.c, 0.0);
        let out = (dx, &s.zeros[..]);
        conv_packed((&gt, &pt, g.c), wtp, &mut s.dy, out, (&mut s.dx, &mut s.v));
    }
}

/// `y` (`O × H'·Wp`) = `w` (`O × C·k²`) · the unfolded sample `cols`.
fn gemm_into(g: &Geometry, p: &Padded, o: usize, w: &[f32], cols: &[f32], y: &mut Vec<f32>) {
    let (rows, span) = (g.rows(), p.span());
    y.resize(o * span, 0.0);
    matmul((o, span, rows), y, false, w, (rows, 1), cols, (span, 1), 1);
}

/// `y` (`O × H' × W'`) `= 0 +` the `Wp`-wide `yp` (`O × H'·Wp`) without its scratch columns.
/// (`0 + v` is `v` with −0 made +0: the bits of an add onto a zeroed output.)
fn narrow_write(p: &Padded, yp: &[f32], y: &mut [MaybeUninit<f32>]) {
    for (row, src) in y.chunks_exact_mut(p.wo).zip(yp.chunks_exact(p.wp)) {
        for (d, v) in row.iter_mut().zip(src) {
            d.write(0.0 + v);
        }
    }
}

/// The gemm backward of an unfolded sample (`s.cols`) and a widened gradient (`s.y`).
fn backward_gemm(
    g: &Geometry,
    p: &Padded,
    o: usize,
    w: &[f32],
    dw: &mut [f32],
    dx: Option<&mut [MaybeUninit<f32>]>,
    s: &mut Scratch,
) {
    let (k, rows, span) = (g.k, g.rows(), p.span());
    matmul(
        (o, rows, span),
        dw,
        true,
        &s.y,
        (span, 1),
        &s.cols,
        (1, span),
        1,
    );
    let Some(dx) = dx else { return };
    // dcols = Wᵀ · dy (into the cols buffer, whose unfolding is spent), folded back.
    matmul(
        (rows, span, o),
        &mut s.cols,
        false,
        w,
        (1, rows),
        &s.y,
        (span, 1),
        1,
    );
    s.dx.clear();
    s.dx.resize(p.len(g.c, k), 0.0);
    for (r, row) in s.cols.chunks_exact(span).enumerate() {
        let (ch, i, j) = (r / (k * k), r / k % k, r % k);
        let at = ch * p.plane() + i * p.wp + j;
        for (d, v) in s.dx[at..at + span].iter_mut().zip(row) {
            *d += v;
        }
    }
    crop_interior(g, p, &s.dx, dx);
}

/// `dx = 0 +` the interior of the padded planes `dxp` (as [`narrow_write`]).
fn crop_interior(g: &Geometry, p: &Padded, dxp: &[f32], dx: &mut [MaybeUninit<f32>]) {
    for ch in 0..g.c {
        for r in 0..g.h {
            let from = ch * p.plane() + (r + g.pad) * p.wp + g.pad;
            let to = (ch * g.h + r) * g.w;
            for (d, v) in dx[to..to + g.w].iter_mut().zip(&dxp[from..from + g.w]) {
                d.write(0.0 + v);
            }
        }
    }
}

/// Copies `x` (`C × H × W`) into the zero-padded `Wp`-wide layout. A worker's buffer serves
/// one geometry: the border, zeroed when the buffer is made, is never written.
fn pad_into(g: &Geometry, p: &Padded, x: &[f32], dst: &mut Vec<f32>) {
    dst.resize(p.len(g.c, g.k), 0.0);
    for ch in 0..g.c {
        for r in 0..g.h {
            let at = ch * p.plane() + (r + g.pad) * p.wp + g.pad;
            let from = (ch * g.h + r) * g.w;
            dst[at..at + g.w].copy_from_slice(&x[from..from + g.w]);
        }
    }
}

/// `y += a·x` (portable).
fn axpy_base(a: f32, x: &[f32], y: &mut [f32]) {
    for (d, &s) in y.iter_mut().zip(x) {
        *d += a * s;
    }
}

/// `Σ x·y` in eight interleaved partial sums (portable).
fn dot_base(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (l, (a, b)) in x.iter().zip(y).enumerate() {
        acc[l % 8] += a * b;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// `y += a·x`, eight lanes at a time with fused multiply-adds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_avx2(a: f32, x: &[f32], y: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = x.len().min(y.len());
    let av = _mm256_set1_ps(a);
    let mut i = 0;
    while i + 8 <= n {
        let yp = y.as_mut_ptr().add(i);
        let v = _mm256_fmadd_ps(av, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(yp));
        _mm256_storeu_ps(yp, v);
        i += 8;
    }
    for t in i..n {
        y[t] = a.mul_add(x[t], y[t]);
    }
}

/// `Σ x·y` in four vector chains of eight lanes (fused multiply-adds), then the tail.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(x: &[f32], y: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = x.len().min(y.len());
    let (xp, yp) = (x.as_ptr(), y.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (c, a) in acc.iter_mut().enumerate() {
            let at = i + 8 * c;
            *a = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(at)), _mm256_loadu_ps(yp.add(at)), *a);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(
            _mm256_loadu_ps(xp.add(i)),
            _mm256_loadu_ps(yp.add(i)),
            acc[0],
        );
        i += 8;
    }
    let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), v);
    let mut sum = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
    for t in i..n {
        sum = x[t].mul_add(y[t], sum);
    }
    sum
}

fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::activation::has_avx2() {
        // SAFETY: the CPU reports AVX2 and FMA; every load and store is below `min(len)`.
        return unsafe { axpy_avx2(a, x, y) };
    }
    axpy_base(a, x, y)
}

fn dot(x: &[f32], y: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::activation::has_avx2() {
        // SAFETY: as in `axpy`.
        return unsafe { dot_avx2(x, y) };
    }
    dot_base(x, y)
}

/// The forward tap by tap, from the padded sample (`s.x`) into `s.y` (`O × H'·Wp`).
fn forward_taps(g: &Geometry, p: &Padded, o: usize, w: &[f32], s: &mut Scratch) {
    let k = g.k;
    s.y.clear();
    s.y.resize(o * p.span(), 0.0);
    for (oc, acc) in s.y.chunks_exact_mut(p.span()).enumerate() {
        for ch in 0..g.c {
            for i in 0..k {
                for j in 0..k {
                    let wv = w[((oc * g.c + ch) * k + i) * k + j];
                    let at = ch * p.plane() + i * p.wp + j;
                    axpy(wv, &s.x[at..at + p.span()], acc);
                }
            }
        }
    }
}

/// The weight gradient tap by tap, from the padded sample (`s.x`) and the widened gradient
/// (`s.y`).
fn weight_grad_taps(g: &Geometry, p: &Padded, dw: &mut [f32], s: &mut Scratch) {
    let k = g.k;
    for (oc, gy) in s.y.chunks_exact(p.span()).enumerate() {
        for ch in 0..g.c {
            for i in 0..k {
                for j in 0..k {
                    let at = ch * p.plane() + i * p.wp + j;
                    dw[((oc * g.c + ch) * k + i) * k + j] += dot(gy, &s.x[at..at + p.span()]);
                }
            }
        }
    }
}

/// The data gradient tap by tap (where the direct kernel does not run): each tap's `axpy` of
/// the widened gradient (`s.y`) onto the padded planes, cropped into `dx`.
fn scatter_taps(g: &Geometry, p: &Padded, w: &[f32], dx: &mut [MaybeUninit<f32>], s: &mut Scratch) {
    let k = g.k;
    s.dx.clear();
    s.dx.resize(p.len(g.c, k), 0.0);
    for (oc, gy) in s.y.chunks_exact(p.span()).enumerate() {
        for ch in 0..g.c {
            for i in 0..k {
                for j in 0..k {
                    let wv = w[((oc * g.c + ch) * k + i) * k + j];
                    let at = ch * p.plane() + i * p.wp + j;
                    axpy(wv, gy, &mut s.dx[at..at + p.span()]);
                }
            }
        }
    }
    crop_interior(g, p, &s.dx, dx);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_taps_data_gradient_by_the_direct_kernel_has_the_scatters_bits() {
        if !conv_direct::available() {
            crate::skipped(
                "conv_padded::the_taps_data_gradient_by_the_direct_kernel_has_the_scatters_bits",
                "this CPU has no AVX2 + FMA, so only the scatter runs",
            );
            return;
        }
        let value = |i: usize, m: usize| ((i * 37 + m) % 29) as f32 / 7.0 - 2.0;
        // (c, h, w, k, pad, o): the U-Nets' last convs (64 -> 1 and 16 -> 1 on 28 x 28), odd
        // sides, a 2 x 2 kernel, no padding, and 4 outputs.
        for (c, h, w, k, pad, o) in [
            (64, 28, 28, 3, 1, 1),
            (16, 28, 28, 3, 1, 1),
            (5, 9, 7, 3, 1, 3),
            (3, 6, 5, 2, 0, 2),
            (2, 7, 8, 3, 0, 4),
            (1, 5, 5, 3, 2, 1),
        ] {
            let g = Geometry {
                c,
                h,
                w,
                k,
                stride: 1,
                pad,
            };
            let (ho, wo) = g.out_hw();
            let x: Vec<f32> = (0..c * h * w).map(|i| value(i, 3)).collect();
            let dy: Vec<f32> = (0..o * ho * wo).map(|i| value(i, 11)).collect();
            let wv: Vec<f32> = (0..o * g.rows()).map(|i| value(i, 5) / 3.0).collect();
            let run = |wtp: &[f32]| {
                let ws = Weights {
                    w: &wv,
                    wt: &[],
                    wtp,
                };
                let mut dx = vec![MaybeUninit::new(f32::NAN); c * h * w];
                let (mut dw, mut db) = (vec![0f32; o * g.rows()], vec![0f32; o]);
                let mut s = Scratch::default();
                backward(
                    &g,
                    o,
                    true,
                    (&x, &ws, &dy),
                    (Some(&mut dx), &mut dw, &mut db),
                    &mut s,
                );
                // SAFETY: initialised above (and written by `backward`).
                let dx: Vec<u32> = dx
                    .iter()
                    .map(|v| unsafe { v.assume_init() }.to_bits())
                    .collect();
                (dx, dw, db)
            };
            let packed = pack_taps_transposed(&g, o, &wv);
            assert!(!packed.is_empty());
            let (gather, scatter) = (run(&packed), run(&[]));
            assert!(
                gather.0 == scatter.0,
                "{c}x{h}x{w} k{k} p{pad} o{o}: dx bits differ"
            );
            assert_eq!(gather.1, scatter.1);
            assert_eq!(gather.2, scatter.2);
        }
    }

    #[test]
    fn the_vector_kernels_match_the_portable_ones() {
        // Lengths around the 8- and 32-lane blocks, on values of both signs.
        for n in [0, 1, 7, 8, 9, 31, 32, 33, 70, 840] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
                .collect();
            let y0: Vec<f32> = (0..n).map(|i| ((i * 13 % 17) as f32 - 8.0) / 5.0).collect();
            let (mut ya, mut yb) = (y0.clone(), y0.clone());
            axpy(0.75, &x, &mut ya);
            axpy_base(0.75, &x, &mut yb);
            for (a, b) in ya.iter().zip(&yb) {
                assert!(
                    (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                    "axpy n{n}: {a} vs {b}"
                );
            }
            let exact: f64 = x.iter().zip(&y0).map(|(a, b)| *a as f64 * *b as f64).sum();
            for (what, d) in [("dot", dot(&x, &y0)), ("dot_base", dot_base(&x, &y0))] {
                assert!(
                    (d as f64 - exact).abs() < 1e-4 * (1.0 + exact.abs()),
                    "{what} n{n}: {d} vs {exact}"
                );
            }
        }
    }
}
