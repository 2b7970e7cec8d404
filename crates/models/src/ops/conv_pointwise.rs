//! A 1×1 conv (stride 1, unpadded: the U-Nets' channel-changing skips) on the direct kernel:
//! a sample's `C × L` input is its own layout, one tap at offset 0. The forward and the data
//! gradient (`Wᵀ · dy`, the same kernel with the channels swapped; the weights packed by
//! `conv_padded::pack_direct` and `pack_taps_transposed`) are register tiles of up to
//! 12 output channels × 32-128 pixels summing over the input channels in order; the weight
//! gradient runs with the output channels in the lanes (`conv_wgrad`), the bias gradient from
//! its channels-last `dy`. Without AVX2 the conv is one gemm per sample (`conv.rs`).
//!
//! The kernel's last vector reads past a sample's `L` pixels (the lanes it does not store):
//! inside the batch that is the next sample, and the last sample is copied into a buffer with
//! room after it.

use super::conv_direct::{self, Shape, SLACK};
use super::conv_wgrad::{self, Pixels};
use std::mem::MaybeUninit;

/// Whether the direct kernels serve a 1×1 conv here (AVX2 and FMA).
pub(crate) fn available() -> bool {
    conv_direct::available()
}

/// A sample's `x`, `dy` and its index in the batch: sample `i` of `xs` and of `dys`.
pub(crate) type Samples<'a> = (&'a [f32], &'a [f32], usize);

/// Where the data gradient goes, when asked, and the zeros it is added onto.
type DataGrad<'a> = Option<(&'a mut [MaybeUninit<f32>], &'a [f32])>;

/// Sample `i` of the samples of `per` floats in `all`, with at least [`SLACK`] readable floats
/// after its end: in place, or the last copied into `buf`.
fn padded_sample<'a>(all: &'a [f32], i: usize, per: usize, buf: &'a mut Vec<f32>) -> &'a [f32] {
    let end = (i + 1) * per;
    if end + SLACK <= all.len() {
        return &all[i * per..];
    }
    buf.clear();
    buf.extend_from_slice(&all[i * per..end]);
    buf.resize(per + SLACK, 0.0);
    buf
}

/// One sample's forward: `y` (`O × L`, every value written) `=` `add[o]` `+` `Σ_c W[o][c]·x[c]`
/// by the direct kernel, `x` being sample `i` of the batch `xs` (`C × L` each). `wide` and
/// `buf` are a worker's buffers.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    (c, l, o): (usize, usize, usize),
    wp: &[f32],
    (xs, i): (&[f32], usize),
    add: &[f32],
    y: &mut [MaybeUninit<f32>],
    (wide, buf): (&mut Vec<f32>, &mut Vec<f32>),
) {
    let x = padded_sample(xs, i, c * l, buf);
    let offsets = [0usize];
    let shape = Shape {
        c,
        plane: l,
        offsets: &offsets,
        span: l,
    };
    wide.resize(o * l, 0.0);
    conv_direct::forward(&shape, o, wp, x, wide);
    for ((out, src), &b) in y.chunks_exact_mut(l).zip(wide.chunks_exact(l)).zip(add) {
        for (d, v) in out.iter_mut().zip(src) {
            d.write(b + v);
        }
    }
}

/// One sample's backward: the weight gradient added to `sums` (handed out by
/// `conv_wgrad::finish`), `db +=` the row sums of `dy`, and, when asked, `dx` (every value
/// written) `= 0 + Wᵀ·dy` (with `C` zeros to add onto); `x` is sample `i` of `xs`, `dy` sample `i` of `dys`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    (c, (h, w), o): (usize, (usize, usize), usize),
    wtp: &[f32],
    (xs, dys, i): Samples,
    (dx, db): (DataGrad, &mut [f32]),
    sums: &mut conv_wgrad::Sums,
    (wide, buf): (&mut Vec<f32>, &mut Vec<f32>),
) {
    let l = h * w;
    let offsets = [0usize];
    let px = Pixels {
        ho: h,
        wo: w,
        wp: w,
    };
    let (x, dy) = (&xs[i * c * l..][..c * l], &dys[i * o * l..][..o * l]);
    let shape = Shape {
        c,
        plane: l,
        offsets: &offsets,
        span: l,
    };
    conv_wgrad::accumulate(&shape, px, o, dy, x, sums);
    sums.add_row_sums(px, db);
    let Some((dx, zeros)) = dx else { return };
    // `0 + v`: the bits of an add onto a zeroed dx.
    forward((o, l, c), wtp, (dys, i), zeros, dx, (wide, buf));
}
