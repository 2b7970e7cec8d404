//! The data gradient of a stride-2 conv, which is also the forward of a stride-2 transposed
//! conv, as four sub-pixel convolutions on the low-resolution map: no unfolded columns, no
//! `col2im` scatter.
//!
//! Input row `y = 2u + α` of a stride-2 conv (padding `p`) is read by kernel row `i` of output
//! row `u + (α + p − i) / 2` for each `i ≡ α + p (mod 2)`: so the rows (and likewise the
//! columns) of each phase `(α, β)` of `dx` are a small stride-1 conv of `dy` (1 or 2 taps a
//! side for k 3, 2 for k 4) with its own slice of the kernel. Each phase runs on the direct
//! kernel (`conv_direct`) over `dy` zero-padded once per sample, and its values go to every
//! other pixel of `dx`, each written once. Where every phase is a 2×2 window (k 4) on whole
//! 2×2 tiles, the phases run on Winograd F(2×2, 2×2) instead (`conv_winograd::forward2`).

use super::conv_direct::{self, SLACK};
use super::conv_winograd;
use super::geometry::Geometry;
use super::pairs;
use std::mem::MaybeUninit;

/// One phase `(α, β)`: its rows and columns of `dx`, the taps' offsets in the padded `dy`
/// and its kernel packed for the direct kernel (`C` rows of `O·taps`).
struct Phase {
    alpha: usize,
    beta: usize,
    rows: usize,
    cols: usize,
    offsets: Vec<usize>,
    packed: Vec<f32>,
}

/// The four phases of a k-4 kernel as Winograd F(2×2, 2×2) convs (each phase's taps are a
/// 2×2 window of the padded `dy`): per phase, the window's first offset and its kernel
/// ([`conv_winograd::pack2`]); 9 products per 2×2 tile instead of 16.
struct Winograd {
    phases: Vec<(usize, Vec<f32>)>,
}

/// The four phases of the data gradient of a stride-2 conv of geometry `g` with `o` outputs,
/// planned once per op from its weights.
pub(crate) struct SubPixel {
    g: Geometry,
    o: usize,
    /// `dy`'s zero padding before its first row (column), and its padded height and width.
    lo: usize,
    hd: usize,
    wd: usize,
    phases: Vec<Phase>,
    winograd: Option<Winograd>,
}

/// The kernel taps of phase `a` along one side: `(i, shift)` with input `u` reading output
/// `u + shift` through tap `i`.
fn taps(a: usize, k: usize, pad: usize) -> Vec<(usize, isize)> {
    (0..k)
        .filter(|i| (a + pad + i).is_multiple_of(2))
        .map(|i| (i, (a as isize + pad as isize - i as isize) / 2))
        .collect()
}

impl SubPixel {
    /// Plans `g` with `o` outputs and weights `w` (`O × C × k × k`).
    pub(crate) fn new(g: &Geometry, o: usize, w: &[f32]) -> Self {
        let (k, pad) = (g.k, g.pad);
        let (ho, wo) = g.out_hw();
        let side = |n: usize, a: usize| (n + 1).saturating_sub(a) / 2;
        // The padding that keeps every read inside: before the first row, the largest
        // backward shift; after the last, what the last phase row reads past `ho`.
        let lo = (0..2)
            .flat_map(|a| taps(a, k, pad))
            .map(|(_, s)| (-s).max(0) as usize)
            .max()
            .unwrap_or(0);
        let past = |n: usize, out: usize| {
            (0..2)
                .flat_map(|a| {
                    let m = side(n, a);
                    taps(a, k, pad)
                        .into_iter()
                        .map(move |(_, s)| m as isize - 1 + s + 1 - out as isize)
                })
                .max()
                .unwrap_or(0)
                .max(0) as usize
        };
        let (hd, wd) = (ho + lo + past(g.h, ho), wo + lo + past(g.w, wo));
        let mut phases = Vec::with_capacity(4);
        for (alpha, beta) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            let (rows, cols) = (side(g.h, alpha), side(g.w, beta));
            if rows == 0 || cols == 0 {
                continue;
            }
            let (ti, tj) = (taps(alpha, k, pad), taps(beta, k, pad));
            let pairs: Vec<_> = ti
                .iter()
                .flat_map(|&a| tj.iter().map(move |&b| (a, b)))
                .collect();
            let at = |s: isize| (s + lo as isize) as usize;
            let offsets = pairs
                .iter()
                .map(|&((_, si), (_, sj))| at(si) * wd + at(sj))
                .collect();
            // Row c of the phase's kernel: for each output channel, its taps in order.
            let n = pairs.len();
            // (Nested loops: three integer divisions per value cost 1 % of the lesson's step.)
            let mut kernel = Vec::with_capacity(g.c * o * n);
            for c in 0..g.c {
                for oc in 0..o {
                    let taps = &w[(oc * g.c + c) * k * k..][..k * k];
                    kernel.extend(pairs.iter().map(|&((i, _), (j, _))| taps[i * k + j]));
                }
            }
            phases.push(Phase {
                alpha,
                beta,
                rows,
                cols,
                offsets,
                packed: conv_direct::pack(g.c, o * n, &kernel),
            });
        }
        let winograd = Self::winograd_plan(g, o, w, lo, wd, &phases);
        Self {
            g: *g,
            o,
            lo,
            hd,
            wd,
            phases,
            winograd,
        }
    }

    /// The Winograd plan where every phase is a 2×2 window on whole 2×2 tiles: all four
    /// phases present with 2 taps a side at consecutive shifts (k 4) and even sides.
    fn winograd_plan(
        g: &Geometry,
        o: usize,
        w: &[f32],
        lo: usize,
        wd: usize,
        phases: &[Phase],
    ) -> Option<Winograd> {
        let (k, pad) = (g.k, g.pad);
        let even = |n: usize| n > 0 && n.is_multiple_of(2);
        if phases.len() != 4 || !phases.iter().all(|ph| even(ph.rows) && even(ph.cols)) {
            return None;
        }
        if !conv_direct::available() {
            return None;
        }
        // A side's two taps by shift, the window's first shift.
        let window = |a: usize| -> Option<([usize; 2], isize)> {
            let mut t = taps(a, k, pad);
            t.sort_by_key(|&(_, shift)| shift);
            match t[..] {
                [(i0, s0), (i1, s1)] if s1 == s0 + 1 => Some(([i0, i1], s0)),
                _ => None,
            }
        };
        let mut plan = Vec::with_capacity(4);
        for ph in phases {
            let ((ti, si), (tj, sj)) = (window(ph.alpha)?, window(ph.beta)?);
            let at = |s: isize| (s + lo as isize) as usize;
            // Output channel c (of dx), input channel oc (of dy), window tap (a, b).
            let mut kernel = Vec::with_capacity(g.c * o * 4);
            for c in 0..g.c {
                for oc in 0..o {
                    let taps = &w[(oc * g.c + c) * k * k..][..k * k];
                    for i in ti {
                        kernel.extend(tj.iter().map(|&j| taps[i * k + j]));
                    }
                }
            }
            plan.push((at(si) * wd + at(sj), conv_winograd::pack2(g.c, o, &kernel)));
        }
        Some(Winograd { phases: plan })
    }

    /// Channels of `dx`.
    pub(crate) fn channels(&self) -> usize {
        self.g.c
    }

    /// One sample: `dx` (`C × H × W`, every value written) `=` `add[c]` `+` the conv's data
    /// gradient of `dy` (`O × H' × W'`). `dyp` and `y` are a worker's buffers (`dyp` serves
    /// this plan only: its padding is never written).
    pub(crate) fn apply(
        &self,
        dy: &[f32],
        (dx, add): (&mut [MaybeUninit<f32>], &[f32]),
        (dyp, y, v): (&mut Vec<f32>, &mut Vec<f32>, &mut Vec<f32>),
    ) {
        let g = &self.g;
        let (ho, wo) = g.out_hw();
        let plane = self.hd * self.wd;
        let most = self.hd.max(1) * self.wd;
        dyp.resize(self.o * plane + most + SLACK, 0.0);
        for (c, src) in dy.chunks_exact(ho * wo).take(self.o).enumerate() {
            for (r, row) in src.chunks_exact(wo).enumerate() {
                let at = c * plane + (r + self.lo) * self.wd + self.lo;
                dyp[at..at + wo].copy_from_slice(row);
            }
        }
        if let Some(wino) = &self.winograd {
            return self.apply_winograd(wino, dyp, (dx, add), (y, v));
        }
        // The phases of a row parity α side by side: their rows woven into every row
        // `2u + α` of dx at once (`pairs::interleave`), each value `add + v` as before.
        for alpha in 0..2 {
            let mut pair = [None, None];
            for ph in self.phases.iter().filter(|ph| ph.alpha == alpha) {
                pair[ph.beta] = Some(ph);
            }
            let Some(rows) = pair.iter().flatten().map(|ph| ph.rows).next() else {
                continue;
            };
            let span = rows * self.wd;
            y.resize(2 * g.c * span, 0.0);
            let (y0, y1) = y.split_at_mut(g.c * span);
            for (ph, res) in pair.iter().zip([&mut *y0, &mut y1[..g.c * span]]) {
                if let Some(ph) = ph {
                    let shape = conv_direct::Shape {
                        c: self.o,
                        plane,
                        offsets: &ph.offsets,
                        span,
                    };
                    conv_direct::forward(&shape, g.c, &ph.packed, dyp, res);
                }
            }
            let (y0, y1) = (&*y0, &y1[..g.c * span]);
            for (c, (out, &b)) in dx.chunks_exact_mut(g.h * g.w).zip(add).enumerate() {
                for u in 0..rows {
                    let row = &mut out[(2 * u + alpha) * g.w..][..g.w];
                    let at = c * span + u * self.wd;
                    match pair {
                        [Some(p0), Some(p1)] => pairs::interleave::<true>(
                            &y0[at..][..p0.cols],
                            &y1[at..][..p1.cols],
                            b,
                            row,
                        ),
                        _ => {
                            for (ph, res) in pair.iter().zip([y0, y1]) {
                                let Some(ph) = ph else { continue };
                                let dst = row[ph.beta..].iter_mut().step_by(2);
                                for (d, v) in dst.zip(&res[at..at + ph.cols]) {
                                    d.write(b + v);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// [`SubPixel::apply`] by Winograd, `dyp` already padded: each phase `add[c] +` its conv
    /// into a compact `C × rows × cols` buffer, then a row parity's two phases woven into dx.
    fn apply_winograd(
        &self,
        wino: &Winograd,
        dyp: &mut Vec<f32>,
        (dx, add): (&mut [MaybeUninit<f32>], &[f32]),
        (y, v): (&mut Vec<f32>, &mut Vec<f32>),
    ) {
        let g = &self.g;
        let (rows, cols) = (self.phases[0].rows, self.phases[0].cols);
        let shape = conv_winograd::Shape {
            c: self.o,
            plane: self.hd * self.wd,
            wp: self.wd,
            ho: rows,
            wo: cols,
        };
        let need =
            wino.phases.iter().map(|(base, _)| base).max().unwrap_or(&0) + shape.reach_side(2);
        if dyp.len() < need {
            dyp.resize(need, 0.0);
        }
        let n = g.c * rows * cols;
        y.resize(4 * n, 0.0);
        {
            // SAFETY: the kernel writes only initialised values (f32s over f32s).
            let out = unsafe {
                std::slice::from_raw_parts_mut(y.as_mut_ptr().cast::<MaybeUninit<f32>>(), 4 * n)
            };
            for ((base, u), res) in wino.phases.iter().zip(out.chunks_exact_mut(n)) {
                conv_winograd::forward2(&shape, g.c, u, &dyp[*base..], (res, add), v);
            }
        }
        // The phases in the order (0, 0), (0, 1), (1, 0), (1, 1).
        let phase = |i: usize| &y[i * n..(i + 1) * n];
        for (c, out) in dx.chunks_exact_mut(g.h * g.w).enumerate().take(g.c) {
            for (r, row) in out.chunks_exact_mut(g.w).enumerate() {
                let (alpha, u) = (r % 2, r / 2);
                let at = (c * rows + u) * cols;
                let (a, b) = (phase(2 * alpha), phase(2 * alpha + 1));
                pairs::interleave::<false>(&a[at..at + cols], &b[at..at + cols], 0.0, row);
            }
        }
    }
}
