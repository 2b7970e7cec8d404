//! A convolution's geometry for one sample, and the unfold (im2col) / fold (col2im) it
//! defines: shared by the convolutions (`conv`, `conv_padded`) and the transposed ones.

/// A convolution's geometry for one sample: `(C, H, W)` in, `k×k` taps, stride, zero padding.
#[derive(Clone, Copy)]
pub(crate) struct Geometry {
    pub(crate) c: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) k: usize,
    pub(crate) stride: usize,
    pub(crate) pad: usize,
}

impl Geometry {
    pub(crate) fn out_hw(&self) -> (usize, usize) {
        (
            (self.h + 2 * self.pad - self.k) / self.stride + 1,
            (self.w + 2 * self.pad - self.k) / self.stride + 1,
        )
    }

    /// Rows of the unfolded matrix, `C·k·k`.
    pub(crate) fn rows(&self) -> usize {
        self.c * self.k * self.k
    }

    /// Output pixels per channel.
    pub(crate) fn cols(&self) -> usize {
        let (ho, wo) = self.out_hw();
        ho * wo
    }

    /// A 1×1, stride-1, unpadded conv: the input already is its own unfolding.
    pub(crate) fn is_pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.pad == 0
    }

    /// The output columns `x0..x1` whose tap `j` reads inside the row: `0 ≤ s·x + j − p < W`.
    #[inline(always)]
    fn columns_in_range(&self, j: usize) -> (usize, usize) {
        let (_, wo) = self.out_hw();
        let (s, p) = (self.stride, self.pad);
        let x0 = p.saturating_sub(j).div_ceil(s).min(wo);
        let x1 = ((self.w + p).saturating_sub(j).div_ceil(s)).clamp(x0, wo);
        (x0, x1)
    }

    /// Calls `f(column_index, input_index, len)` for every run of in-range taps of one sample:
    /// row `c·k² + i·k + j`, column `y·W' + x` reads pixel `(s·y + i − p, s·x + j − p)` of
    /// channel `c`; a run is the `len` columns from `x0` on one output row (input step `s`).
    #[inline(always)]
    fn for_each_run(&self, mut f: impl FnMut(usize, usize, usize)) {
        let (ho, wo) = self.out_hw();
        let (k, s, p) = (self.k, self.stride, self.pad);
        for ch in 0..self.c {
            for i in 0..k {
                for j in 0..k {
                    let row = (ch * k + i) * k + j;
                    let (x0, x1) = self.columns_in_range(j);
                    if x1 == x0 {
                        continue;
                    }
                    for y in 0..ho {
                        let iy = (y * s + i) as isize - p as isize;
                        if iy < 0 || iy >= self.h as isize {
                            continue;
                        }
                        let in_row = (ch * self.h + iy as usize) * self.w;
                        f((row * ho + y) * wo + x0, in_row + x0 * s + j - p, x1 - x0);
                    }
                }
            }
        }
    }

    /// Unfolds one sample into `cols` (`rows() × cols()`, zero where a tap is padding):
    /// every entry is written once, stride 2 as a gather of every other pixel.
    pub(crate) fn im2col(&self, x: &[f32], cols: &mut [f32]) {
        let (ho, wo) = self.out_hw();
        let (k, s, p) = (self.k, self.stride, self.pad);
        for ch in 0..self.c {
            for i in 0..k {
                for j in 0..k {
                    let row = (ch * k + i) * k + j;
                    let (x0, x1) = self.columns_in_range(j);
                    for y in 0..ho {
                        let dst = &mut cols[(row * ho + y) * wo..][..wo];
                        let iy = (y * s + i) as isize - p as isize;
                        if iy < 0 || iy >= self.h as isize || x1 == x0 {
                            dst.fill(0.0);
                            continue;
                        }
                        dst[..x0].fill(0.0);
                        dst[x1..].fill(0.0);
                        let at = (ch * self.h + iy as usize) * self.w + x0 * s + j - p;
                        gather(&x[at..], &mut dst[x0..x1], s);
                    }
                }
            }
        }
    }

    /// The adjoint of [`Self::im2col`]: adds every column entry onto its pixel in `dx`.
    pub(crate) fn col2im(&self, cols: &[f32], dx: &mut [f32]) {
        let s = self.stride;
        self.for_each_run(|o, i, n| scatter_add(&cols[o..o + n], &mut dx[i..], s));
    }
}

/// `dst[t] = src[s·t]`.
#[inline(always)]
fn gather(src: &[f32], dst: &mut [f32], s: usize) {
    let n = dst.len();
    match s {
        1 => dst.copy_from_slice(&src[..n]),
        // Pairs when the last one is whole (vectorizes as a shuffle).
        2 if src.len() >= 2 * n => {
            for (d, pair) in dst.iter_mut().zip(src[..2 * n].chunks_exact(2)) {
                *d = pair[0];
            }
        }
        _ => {
            for (d, v) in dst.iter_mut().zip(src.iter().step_by(s)) {
                *d = *v;
            }
        }
    }
}

/// `dst[s·t] += src[t]`.
#[inline(always)]
fn scatter_add(src: &[f32], dst: &mut [f32], s: usize) {
    let n = src.len();
    match s {
        1 => {
            for (d, c) in dst[..n].iter_mut().zip(src) {
                *d += c;
            }
        }
        2 if dst.len() >= 2 * n => {
            for (pair, c) in dst[..2 * n].chunks_exact_mut(2).zip(src) {
                pair[0] += c;
            }
        }
        _ => {
            for (d, c) in dst.iter_mut().step_by(s).zip(src) {
                *d += c;
            }
        }
    }
}
