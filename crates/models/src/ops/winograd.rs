//! Winograd F(2×2, 3×3) (Lavin & Gray 2016) for the 3×3 stride-1 convolutions, over the whole
//! batch: each 4×4 input tile and each 3×3 kernel is carried into a 16-point transform domain,
//! where the convolution is 16 matrix products (one per point, `O × C` by `C × tiles`, the
//! tiles of every sample side by side), and each product's 4×4 result tile is carried back to
//! a 2×2 output tile. That is 16 multiplies per 4 outputs instead of 36, in gemms as wide as
//! the batch's tiles (a per-sample gemm of a 7×7 map has 49 columns; here it has 49·B).
//!
//! The backward is the adjoint of the same linear map: the output gradient is carried into
//! the transform domain (`A·dY·Aᵀ`), the weight gradient is 16 products summed over the batch's
//! tiles and carried back with `Gᵀ·dU·G`, and the input gradient is 16 products carried back
//! with `B·dV·Bᵀ` and added onto the overlapping input tiles.
//!
//! Every product runs on one thread (the 16 of them in parallel), and every plane's overlapping
//! sums are made by one task in a fixed order, so the bits do not depend on the thread count.
//! The error is f32 round-off of the transforms: measured against the unfolded conv in the
//! tests (about 1e-6 of the output's scale).

use super::cpu::matmul;
use super::geometry::Geometry;
use rayon::prelude::*;

/// Whether a conv of geometry `g` can run here: 3×3 taps, stride 1, padding at most 2.
pub(crate) fn fits(g: &Geometry) -> bool {
    g.k == 3 && g.stride == 1 && g.pad <= 2 && g.h + 2 * g.pad >= 3 && g.w + 2 * g.pad >= 3
}

/// The output's 2×2 tiles of one sample.
#[derive(Clone, Copy)]
struct Tiles {
    ho: usize,
    wo: usize,
    /// Tile rows and columns.
    th: usize,
    tw: usize,
}

impl Tiles {
    fn of(g: &Geometry) -> Self {
        let (ho, wo) = g.out_hw();
        Self {
            ho,
            wo,
            th: ho.div_ceil(2),
            tw: wo.div_ceil(2),
        }
    }

    fn per_sample(&self) -> usize {
        self.th * self.tw
    }
}

/// `Bᵀ·d·B` of a 4×4 tile (row-major).
#[inline(always)]
fn input_transform(d: &[f32; 16]) -> [f32; 16] {
    let mut t = [0f32; 16];
    for j in 0..4 {
        let (d0, d1, d2, d3) = (d[j], d[4 + j], d[8 + j], d[12 + j]);
        t[j] = d0 - d2;
        t[4 + j] = d1 + d2;
        t[8 + j] = d2 - d1;
        t[12 + j] = d1 - d3;
    }
    let mut v = [0f32; 16];
    for i in 0..4 {
        let r = &t[4 * i..4 * i + 4];
        v[4 * i] = r[0] - r[2];
        v[4 * i + 1] = r[1] + r[2];
        v[4 * i + 2] = r[2] - r[1];
        v[4 * i + 3] = r[1] - r[3];
    }
    v
}

/// `B·v·Bᵀ`: the adjoint of [`input_transform`].
#[inline(always)]
fn input_adjoint(v: &[f32; 16]) -> [f32; 16] {
    let mut t = [0f32; 16];
    for j in 0..4 {
        let (v0, v1, v2, v3) = (v[j], v[4 + j], v[8 + j], v[12 + j]);
        t[j] = v0;
        t[4 + j] = v1 - v2 + v3;
        t[8 + j] = v1 + v2 - v0;
        t[12 + j] = -v3;
    }
    let mut d = [0f32; 16];
    for i in 0..4 {
        let r = &t[4 * i..4 * i + 4];
        d[4 * i] = r[0];
        d[4 * i + 1] = r[1] - r[2] + r[3];
        d[4 * i + 2] = r[1] + r[2] - r[0];
        d[4 * i + 3] = -r[3];
    }
    d
}

/// `G·g·Gᵀ` of a 3×3 kernel.
#[inline(always)]
fn kernel_transform(g: &[f32]) -> [f32; 16] {
    let mut t = [0f32; 12];
    for j in 0..3 {
        let (a, b, c) = (g[j], g[3 + j], g[6 + j]);
        t[j] = a;
        t[3 + j] = 0.5 * (a + b + c);
        t[6 + j] = 0.5 * (a - b + c);
        t[9 + j] = c;
    }
    let mut u = [0f32; 16];
    for i in 0..4 {
        let (a, b, c) = (t[3 * i], t[3 * i + 1], t[3 * i + 2]);
        u[4 * i] = a;
        u[4 * i + 1] = 0.5 * (a + b + c);
        u[4 * i + 2] = 0.5 * (a - b + c);
        u[4 * i + 3] = c;
    }
    u
}

/// `Gᵀ·u·G`: the adjoint of [`kernel_transform`], into a 3×3 kernel.
#[inline(always)]
fn kernel_adjoint(u: &[f32; 16]) -> [f32; 9] {
    let mut t = [0f32; 12];
    for j in 0..4 {
        let (a, b, c, d) = (u[j], u[4 + j], u[8 + j], u[12 + j]);
        t[j] = a + 0.5 * (b + c);
        t[4 + j] = 0.5 * (b - c);
        t[8 + j] = 0.5 * (b + c) + d;
    }
    let mut g = [0f32; 9];
    for i in 0..3 {
        let r = &t[4 * i..4 * i + 4];
        g[3 * i] = r[0] + 0.5 * (r[1] + r[2]);
        g[3 * i + 1] = 0.5 * (r[1] - r[2]);
        g[3 * i + 2] = 0.5 * (r[1] + r[2]) + r[3];
    }
    g
}

/// `Aᵀ·m·A`: a transform-domain tile back to its 2×2 outputs.
#[inline(always)]
fn output_transform(m: &[f32; 16]) -> [f32; 4] {
    let mut t = [0f32; 8];
    for j in 0..4 {
        let (m0, m1, m2, m3) = (m[j], m[4 + j], m[8 + j], m[12 + j]);
        t[j] = m0 + m1 + m2;
        t[4 + j] = m1 - m2 - m3;
    }
    let mut y = [0f32; 4];
    for i in 0..2 {
        let r = &t[4 * i..4 * i + 4];
        y[2 * i] = r[0] + r[1] + r[2];
        y[2 * i + 1] = r[1] - r[2] - r[3];
    }
    y
}

/// `A·dy·Aᵀ`: the adjoint of [`output_transform`].
#[inline(always)]
fn output_adjoint(dy: &[f32; 4]) -> [f32; 16] {
    let mut t = [0f32; 8];
    for j in 0..2 {
        let (a, b) = (dy[j], dy[2 + j]);
        t[j] = a;
        t[2 + j] = a + b;
        t[4 + j] = a - b;
        t[6 + j] = -b;
    }
    let mut m = [0f32; 16];
    for i in 0..4 {
        let (a, b) = (t[2 * i], t[2 * i + 1]);
        m[4 * i] = a;
        m[4 * i + 1] = a + b;
        m[4 * i + 2] = a - b;
        m[4 * i + 3] = -b;
    }
    m
}

/// The 4×4 input tile `(ty, tx)` of a plane `H × W` (zero outside it).
#[inline(always)]
fn gather(g: &Geometry, plane: &[f32], ty: usize, tx: usize) -> [f32; 16] {
    let mut d = [0f32; 16];
    let (r0, c0) = (
        (2 * ty) as isize - g.pad as isize,
        (2 * tx) as isize - g.pad as isize,
    );
    let interior = r0 >= 0 && c0 >= 0 && r0 as usize + 4 <= g.h && c0 as usize + 4 <= g.w;
    if interior {
        let (r0, c0) = (r0 as usize, c0 as usize);
        for i in 0..4 {
            d[4 * i..4 * i + 4].copy_from_slice(&plane[(r0 + i) * g.w + c0..][..4]);
        }
        return d;
    }
    for i in 0..4 {
        let r = r0 + i as isize;
        if r < 0 || r as usize >= g.h {
            continue;
        }
        for j in 0..4 {
            let c = c0 + j as isize;
            if c >= 0 && (c as usize) < g.w {
                d[4 * i + j] = plane[r as usize * g.w + c as usize];
            }
        }
    }
    d
}

/// The transformed input of the batch: `[C][16][N]` with `N = B·T` columns, sample `b`'s tiles
/// at `b·T..`; channel by channel in parallel.
fn transform_input(g: &Geometry, t: Tiles, b: usize, xs: &[f32]) -> Vec<f32> {
    let (nt, plane) = (t.per_sample(), g.h * g.w);
    let n = b * nt;
    let mut v = vec![0f32; g.c * 16 * n];
    v.par_chunks_mut(16 * n).enumerate().for_each(|(c, vc)| {
        for s in 0..b {
            let x = &xs[(s * g.c + c) * plane..][..plane];
            for ty in 0..t.th {
                for tx in 0..t.tw {
                    let col = s * nt + ty * t.tw + tx;
                    let e = input_transform(&gather(g, x, ty, tx));
                    for (xi, val) in e.into_iter().enumerate() {
                        vc[xi * n + col] = val;
                    }
                }
            }
        }
    });
    v
}

/// The transformed kernels `[16][O][C]`.
fn transform_kernels(o: usize, c: usize, ws: &[f32]) -> Vec<f32> {
    let mut u = vec![0f32; 16 * o * c];
    for (oc, g) in ws.chunks_exact(9).enumerate() {
        for (xi, val) in kernel_transform(g).into_iter().enumerate() {
            u[xi * o * c + oc] = val;
        }
    }
    u
}

/// `y += conv(x, W)` for the batch: `xs` is `(B, C, H, W)`, `ws` is `(O, C, 3, 3)`, `y` is
/// `(B, O, H', W')` (holding the bias).
pub(crate) fn forward(g: &Geometry, b: usize, o: usize, xs: &[f32], ws: &[f32], y: &mut [f32]) {
    let t = Tiles::of(g);
    let n = b * t.per_sample();
    let v = transform_input(g, t, b, xs);
    let u = transform_kernels(o, g.c, ws);
    // The 16 products M[ξ] (O × N) = U[ξ] (O × C) · V[ξ] (C × N).
    let mut m = vec![0f32; 16 * o * n];
    m.par_chunks_mut(o * n).enumerate().for_each(|(xi, mx)| {
        let (ux, vx) = (&u[xi * o * g.c..], &v[xi * n..]);
        matmul((o, n, g.c), mx, false, ux, (g.c, 1), vx, (16 * n, 1), 1);
    });
    let nt = t.per_sample();
    y.par_chunks_mut(t.ho * t.wo)
        .enumerate()
        .for_each(|(plane, yp)| {
            let (s, oc) = (plane / o, plane % o);
            for ty in 0..t.th {
                for tx in 0..t.tw {
                    let col = s * nt + ty * t.tw + tx;
                    let mut e = [0f32; 16];
                    for (xi, val) in e.iter_mut().enumerate() {
                        *val = m[(xi * o + oc) * n + col];
                    }
                    let out = output_transform(&e);
                    for i in 0..2 {
                        let r = 2 * ty + i;
                        if r >= t.ho {
                            break;
                        }
                        for j in 0..2 {
                            let c = 2 * tx + j;
                            if c < t.wo {
                                yp[r * t.wo + c] += out[2 * i + j];
                            }
                        }
                    }
                }
            }
        });
}

/// The gradients of [`forward`] from `dy` `(B, O, H', W')`: `dW` `(O, C, 3, 3)` (summed over the
/// batch), and `dx` `(B, C, H, W)` when `dx` is given. The bias gradient is not made here.
pub(crate) fn backward(
    g: &Geometry,
    b: usize,
    o: usize,
    (xs, ws, dy): (&[f32], &[f32], &[f32]),
    dw: &mut [f32],
    dx: Option<&mut [f32]>,
) {
    let t = Tiles::of(g);
    let (nt, c) = (t.per_sample(), g.c);
    let n = b * nt;
    // dM: [O][16][N], output channel by output channel.
    let mut dm = vec![0f32; o * 16 * n];
    let plane_out = t.ho * t.wo;
    dm.par_chunks_mut(16 * n).enumerate().for_each(|(oc, dmo)| {
        for s in 0..b {
            let d = &dy[(s * o + oc) * plane_out..][..plane_out];
            for ty in 0..t.th {
                for tx in 0..t.tw {
                    let mut e = [0f32; 4];
                    for i in 0..2 {
                        let r = 2 * ty + i;
                        for j in 0..2 {
                            let cc = 2 * tx + j;
                            if r < t.ho && cc < t.wo {
                                e[2 * i + j] = d[r * t.wo + cc];
                            }
                        }
                    }
                    let col = s * nt + ty * t.tw + tx;
                    for (xi, val) in output_adjoint(&e).into_iter().enumerate() {
                        dmo[xi * n + col] = val;
                    }
                }
            }
        }
    });
    let v = transform_input(g, t, b, xs);
    // dU[ξ] (O × C) = dM[ξ] (O × N) · V[ξ]ᵀ (N × C): each a sum over the batch's tiles.
    let mut du = vec![0f32; 16 * o * c];
    du.par_chunks_mut(o * c).enumerate().for_each(|(xi, dux)| {
        let (dmx, vx) = (&dm[xi * n..], &v[xi * n..]);
        matmul((o, c, n), dux, false, dmx, (16 * n, 1), vx, (1, 16 * n), 1);
    });
    for (oc, dwk) in dw.chunks_exact_mut(9).enumerate() {
        let mut e = [0f32; 16];
        for (xi, val) in e.iter_mut().enumerate() {
            *val = du[xi * o * c + oc];
        }
        dwk.copy_from_slice(&kernel_adjoint(&e));
    }
    let Some(dx) = dx else { return };
    drop(v);
    let u = transform_kernels(o, c, ws);
    // dV[ξ] (C × N) = U[ξ]ᵀ (C × O) · dM[ξ] (O × N).
    let mut dv = vec![0f32; 16 * c * n];
    dv.par_chunks_mut(c * n).enumerate().for_each(|(xi, dvx)| {
        let (ux, dmx) = (&u[xi * o * c..], &dm[xi * n..]);
        matmul((c, n, o), dvx, false, ux, (1, c), dmx, (16 * n, 1), 1);
    });
    let plane_in = g.h * g.w;
    dx.par_chunks_mut(plane_in)
        .enumerate()
        .for_each(|(plane, dxp)| {
            let (s, ch) = (plane / c, plane % c);
            dxp.fill(0.0);
            for ty in 0..t.th {
                for tx in 0..t.tw {
                    let col = s * nt + ty * t.tw + tx;
                    let mut e = [0f32; 16];
                    for (xi, val) in e.iter_mut().enumerate() {
                        *val = dv[(xi * c + ch) * n + col];
                    }
                    let d = input_adjoint(&e);
                    let (r0, c0) = (
                        2 * ty as isize - g.pad as isize,
                        2 * tx as isize - g.pad as isize,
                    );
                    for i in 0..4 {
                        let r = r0 + i as isize;
                        if r < 0 || r as usize >= g.h {
                            continue;
                        }
                        for j in 0..4 {
                            let cc = c0 + j as isize;
                            if cc >= 0 && (cc as usize) < g.w {
                                dxp[r as usize * g.w + cc as usize] += d[4 * i + j];
                            }
                        }
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each adjoint is the transpose of its transform: <T a, b> = <a, Tᵀ b>.
    #[test]
    fn adjoints_are_transposes() {
        let a: Vec<f32> = (0..16).map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0).collect();
        let b: Vec<f32> = (0..16).map(|i| ((i * 5 % 13) as f32 - 6.0) / 4.0).collect();
        let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>();
        let a16: [f32; 16] = a.clone().try_into().unwrap();
        let b16: [f32; 16] = b.clone().try_into().unwrap();
        let close = |p: f32, q: f32| assert!((p - q).abs() < 1e-4, "{p} vs {q}");
        close(
            dot(&input_transform(&a16), &b),
            dot(&a, &input_adjoint(&b16)),
        );
        close(
            dot(&kernel_transform(&a[..9]), &b),
            dot(&a[..9], &kernel_adjoint(&b16)),
        );
        let b4: [f32; 4] = b[..4].try_into().unwrap();
        close(
            dot(&output_transform(&a16), &b[..4]),
            dot(&a, &output_adjoint(&b4)),
        );
    }
}
