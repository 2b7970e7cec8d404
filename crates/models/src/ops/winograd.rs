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

    /// Tile columns rounded up to whole sets of lanes.
    fn twp(&self) -> usize {
        self.tw.div_ceil(L) * L
    }

    /// The width of a padded plane that every set of lanes reads or writes without bounds:
    /// `2·twp + 2` (input tiles are 4 wide at a step of 2).
    fn wp(&self) -> usize {
        2 * self.twp() + 2
    }

    /// Its height, `2·th + 2`.
    fn hp(&self) -> usize {
        2 * self.th + 2
    }
}

/// Copies the `h × w` plane `src` into the padded plane `dst` (`wp` wide) at `(off, off)`;
/// the rest of `dst` is zero.
fn pad_plane(src: &[f32], (h, w): (usize, usize), off: usize, dst: &mut [f32], wp: usize) {
    dst.fill(0.0);
    for (r, row) in src.chunks_exact(w).take(h).enumerate() {
        dst[(r + off) * wp + off..][..w].copy_from_slice(row);
    }
}

/// The `L` 4×4 tiles at tile row `ty`, tile columns `tx..tx + L` of a padded plane.
#[inline(always)]
fn tiles_at(p: &[f32], wp: usize, ty: usize, tx: usize) -> [Lanes; 16] {
    let mut d = [[0f32; L]; 16];
    for i in 0..4 {
        let row = &p[(2 * ty + i) * wp + 2 * tx..][..2 * L + 2];
        for j in 0..4 {
            d[4 * i + j] = lanes(|l| row[2 * l + j]);
        }
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

/// Tiles transformed together: the same transform on `L` neighbouring tiles of a tile row at
/// once, one value per lane (the loops over lanes vectorize).
const L: usize = 8;
type Lanes = [f32; L];

#[inline(always)]
fn lanes(f: impl Fn(usize) -> f32) -> Lanes {
    std::array::from_fn(f)
}

/// `Bᵀ·d·B` of `L` 4×4 tiles (row-major).
#[inline(always)]
fn input_transform_l(d: &[Lanes; 16]) -> [Lanes; 16] {
    let mut t = [[0f32; L]; 16];
    for j in 0..4 {
        let (d0, d1, d2, d3) = (&d[j], &d[4 + j], &d[8 + j], &d[12 + j]);
        t[j] = lanes(|l| d0[l] - d2[l]);
        t[4 + j] = lanes(|l| d1[l] + d2[l]);
        t[8 + j] = lanes(|l| d2[l] - d1[l]);
        t[12 + j] = lanes(|l| d1[l] - d3[l]);
    }
    let mut v = [[0f32; L]; 16];
    for i in 0..4 {
        let (r0, r1, r2, r3) = (&t[4 * i], &t[4 * i + 1], &t[4 * i + 2], &t[4 * i + 3]);
        v[4 * i] = lanes(|l| r0[l] - r2[l]);
        v[4 * i + 1] = lanes(|l| r1[l] + r2[l]);
        v[4 * i + 2] = lanes(|l| r2[l] - r1[l]);
        v[4 * i + 3] = lanes(|l| r1[l] - r3[l]);
    }
    v
}

/// `B·v·Bᵀ`: the adjoint of [`input_transform_l`].
#[inline(always)]
fn input_adjoint_l(v: &[Lanes; 16]) -> [Lanes; 16] {
    let mut t = [[0f32; L]; 16];
    for j in 0..4 {
        let (v0, v1, v2, v3) = (&v[j], &v[4 + j], &v[8 + j], &v[12 + j]);
        t[j] = *v0;
        t[4 + j] = lanes(|l| v1[l] - v2[l] + v3[l]);
        t[8 + j] = lanes(|l| v1[l] + v2[l] - v0[l]);
        t[12 + j] = lanes(|l| -v3[l]);
    }
    let mut d = [[0f32; L]; 16];
    for i in 0..4 {
        let (r0, r1, r2, r3) = (&t[4 * i], &t[4 * i + 1], &t[4 * i + 2], &t[4 * i + 3]);
        d[4 * i] = *r0;
        d[4 * i + 1] = lanes(|l| r1[l] - r2[l] + r3[l]);
        d[4 * i + 2] = lanes(|l| r1[l] + r2[l] - r0[l]);
        d[4 * i + 3] = lanes(|l| -r3[l]);
    }
    d
}

/// `Aᵀ·m·A`: `L` transform-domain tiles back to their 2×2 outputs.
#[inline(always)]
fn output_transform_l(m: &[Lanes; 16]) -> [Lanes; 4] {
    let mut t = [[0f32; L]; 8];
    for j in 0..4 {
        let (m0, m1, m2, m3) = (&m[j], &m[4 + j], &m[8 + j], &m[12 + j]);
        t[j] = lanes(|l| m0[l] + m1[l] + m2[l]);
        t[4 + j] = lanes(|l| m1[l] - m2[l] - m3[l]);
    }
    let mut y = [[0f32; L]; 4];
    for i in 0..2 {
        let (r0, r1, r2, r3) = (&t[4 * i], &t[4 * i + 1], &t[4 * i + 2], &t[4 * i + 3]);
        y[2 * i] = lanes(|l| r0[l] + r1[l] + r2[l]);
        y[2 * i + 1] = lanes(|l| r1[l] - r2[l] - r3[l]);
    }
    y
}

/// `A·dy·Aᵀ`: the adjoint of [`output_transform_l`].
#[inline(always)]
fn output_adjoint_l(dy: &[Lanes; 4]) -> [Lanes; 16] {
    let mut t = [[0f32; L]; 8];
    for j in 0..2 {
        let (a, b) = (&dy[j], &dy[2 + j]);
        t[j] = *a;
        t[2 + j] = lanes(|l| a[l] + b[l]);
        t[4 + j] = lanes(|l| a[l] - b[l]);
        t[6 + j] = lanes(|l| -b[l]);
    }
    let mut m = [[0f32; L]; 16];
    for i in 0..4 {
        let (a, b) = (&t[2 * i], &t[2 * i + 1]);
        m[4 * i] = *a;
        m[4 * i + 1] = lanes(|l| a[l] + b[l]);
        m[4 * i + 2] = lanes(|l| a[l] - b[l]);
        m[4 * i + 3] = lanes(|l| -b[l]);
    }
    m
}

/// Copies `m` lanes to `dst` (a constant-size copy for a full set of lanes).
#[inline(always)]
fn store(dst: &mut [f32], val: &Lanes, m: usize) {
    if m == L {
        let d: &mut Lanes = (&mut dst[..L]).try_into().unwrap();
        *d = *val;
    } else {
        dst[..m].copy_from_slice(&val[..m]);
    }
}

/// Reads `m` lanes from `src` (zero past them).
#[inline(always)]
fn load(src: &[f32], m: usize) -> Lanes {
    if m == L {
        let s: &Lanes = src[..L].try_into().unwrap();
        *s
    } else {
        let mut v = [0f32; L];
        v[..m].copy_from_slice(&src[..m]);
        v
    }
}

/// The 16 transform-domain points of `m` tiles from columns `col..` of row `row` of each
/// point's `rows × nb` matrix in `mat` (`[16][rows][nb]`).
#[inline(always)]
fn points(
    mat: &[f32],
    (row, rows): (usize, usize),
    nb: usize,
    col: usize,
    m: usize,
) -> [Lanes; 16] {
    std::array::from_fn(|xi| load(&mat[(xi * rows + row) * nb + col..], m))
}

/// Runs `f` compiled for AVX2 where the CPU has it: the transforms are adds and copies only,
/// so the bits are the same either way.
#[inline(always)]
fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn run<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if super::activation::has_avx2() {
            // SAFETY: only where the CPU reports AVX2 and FMA.
            return unsafe { run(f) };
        }
    }
    f()
}

/// Tiles per block: the batch runs in groups of whole samples of about this many tiles, each
/// group's transform-domain matrices small enough to stay in cache between the transforms and
/// the products (the whole batch at once makes the layer memory-bound).
const BLOCK_TILES: usize = 256;

/// One worker's reused buffers.
#[derive(Default)]
struct Scratch {
    v: Vec<f32>,
    m: Vec<f32>,
    dv: Vec<f32>,
    plane: Vec<f32>,
}

/// `buf` as `len` floats (grown once; every value is written before it is read).
fn sized(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

/// The layout of one group: `ns` samples of `nt` tiles, `nb = ns·nt` columns.
#[derive(Clone, Copy)]
struct Group {
    ns: usize,
    nb: usize,
}

/// Samples per group for `t`.
fn group_samples(t: &Tiles) -> usize {
    BLOCK_TILES.div_ceil(t.per_sample()).max(1)
}

/// The transformed input of a group's samples `xg` (`ns` samples of `(C, H, W)`) into `v`:
/// `[C][16][nb]`.
#[inline(always)]
fn transform_input(
    g: &Geometry,
    t: &Tiles,
    gr: Group,
    xg: &[f32],
    v: &mut [f32],
    xp: &mut Vec<f32>,
) {
    let (nt, plane, wp) = (t.per_sample(), g.h * g.w, t.wp());
    let xp = sized(xp, t.hp() * wp);
    for c in 0..g.c {
        let vc = &mut v[c * 16 * gr.nb..][..16 * gr.nb];
        for s in 0..gr.ns {
            pad_plane(
                &xg[(s * g.c + c) * plane..][..plane],
                (g.h, g.w),
                g.pad,
                xp,
                wp,
            );
            for ty in 0..t.th {
                for tx in (0..t.tw).step_by(L) {
                    let m = L.min(t.tw - tx);
                    let col = s * nt + ty * t.tw + tx;
                    let e = input_transform_l(&tiles_at(xp, wp, ty, tx));
                    for (xi, val) in e.iter().enumerate() {
                        store(&mut vc[xi * gr.nb + col..], val, m);
                    }
                }
            }
        }
    }
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
/// `(B, O, H', W')` (holding the bias). Groups of samples in parallel.
pub(crate) fn forward(g: &Geometry, _b: usize, o: usize, xs: &[f32], ws: &[f32], y: &mut [f32]) {
    let t = Tiles::of(g);
    let (nt, k) = (t.per_sample(), group_samples(&t));
    let (n_in, n_out) = (g.c * g.h * g.w, o * t.ho * t.wo);
    let u = transform_kernels(o, g.c, ws);
    y.par_chunks_mut(k * n_out)
        .zip(xs.par_chunks(k * n_in))
        .for_each_init(Scratch::default, |sc, (yg, xg)| {
            with_avx2(|| {
                let ns = yg.len() / n_out;
                let gr = Group { ns, nb: ns * nt };
                let Scratch { v, m, plane, .. } = sc;
                let v = sized(v, g.c * 16 * gr.nb);
                transform_input(g, &t, gr, xg, v, plane);
                // The 16 products M[ξ] (O × nb) = U[ξ] (O × C) · V[ξ] (C × nb).
                let mm = sized(m, 16 * o * gr.nb);
                for (xi, mx) in mm.chunks_exact_mut(o * gr.nb).enumerate() {
                    let (ux, vx) = (&u[xi * o * g.c..], &v[xi * gr.nb..]);
                    matmul(
                        (o, gr.nb, g.c),
                        mx,
                        false,
                        ux,
                        (g.c, 1),
                        vx,
                        (16 * gr.nb, 1),
                        1,
                    );
                }
                output_planes(&t, gr, o, mm, yg, plane);
            })
        });
}

/// Adds the output tiles of `mm` (`[16][O][nb]`) onto the group's output planes `yg`.
#[inline(always)]
fn output_planes(t: &Tiles, gr: Group, o: usize, mm: &[f32], yg: &mut [f32], yq: &mut Vec<f32>) {
    let (nt, wq) = (t.per_sample(), 2 * t.twp());
    let yq = sized(yq, 2 * t.th * wq);
    for (plane, yp) in yg.chunks_exact_mut(t.ho * t.wo).enumerate() {
        let (s, oc) = (plane / o, plane % o);
        // Every tile's outputs into a plane of whole tiles, then its valid part onto y.
        for ty in 0..t.th {
            for tx in (0..t.tw).step_by(L) {
                let m = L.min(t.tw - tx);
                let col = s * nt + ty * t.tw + tx;
                let out = output_transform_l(&points(mm, (oc, o), gr.nb, col, m));
                for i in 0..2 {
                    let row = &mut yq[(2 * ty + i) * wq + 2 * tx..][..2 * L];
                    for l in 0..L {
                        row[2 * l] = out[2 * i][l];
                        row[2 * l + 1] = out[2 * i + 1][l];
                    }
                }
            }
        }
        for (r, row) in yp.chunks_exact_mut(t.wo).enumerate() {
            for (v, q) in row.iter_mut().zip(&yq[r * wq..]) {
                *v += q;
            }
        }
    }
}

/// The gradients of [`forward`] from `dy` `(B, O, H', W')`: `dW` `(O, C, 3, 3)` (summed over the
/// batch: each group's part, then the groups in order), and `dx` `(B, C, H, W)` when `dx` is
/// given. The bias gradient is not made here.
pub(crate) fn backward(
    g: &Geometry,
    b: usize,
    o: usize,
    (xs, ws, dy): (&[f32], &[f32], &[f32]),
    dw: &mut [f32],
    dx: Option<&mut [f32]>,
) {
    let t = Tiles::of(g);
    let (nt, c, k) = (t.per_sample(), g.c, group_samples(&t));
    let (n_in, n_out) = (c * g.h * g.w, o * t.ho * t.wo);
    let groups = b.div_ceil(k);
    let u = transform_kernels(o, c, ws);
    let dx: Vec<Option<&mut [f32]>> = match dx {
        Some(d) => d.chunks_mut(k * n_in).map(Some).collect(),
        None => (0..groups).map(|_| None).collect(),
    };
    let partials: Vec<Vec<f32>> = dx
        .into_par_iter()
        .zip(xs.par_chunks(k * n_in))
        .zip(dy.par_chunks(k * n_out))
        .map_init(Scratch::default, |sc, ((dxg, xg), dyg)| {
            with_avx2(|| {
                let ns = xg.len() / n_in;
                let gr = Group { ns, nb: ns * nt };
                let Scratch { v, m, dv, plane } = sc;
                let dm = sized(m, o * 16 * gr.nb);
                output_adjoints(&t, gr, o, dyg, dm, plane);
                let v = sized(v, c * 16 * gr.nb);
                transform_input(g, &t, gr, xg, v, plane);
                // dU[ξ] (O × C) = dM[ξ] (O × nb) · V[ξ]ᵀ (nb × C).
                let mut du = vec![0f32; 16 * o * c];
                for (xi, dux) in du.chunks_exact_mut(o * c).enumerate() {
                    let (dmx, vx) = (&dm[xi * gr.nb..], &v[xi * gr.nb..]);
                    matmul(
                        (o, c, gr.nb),
                        dux,
                        false,
                        dmx,
                        (16 * gr.nb, 1),
                        vx,
                        (1, 16 * gr.nb),
                        1,
                    );
                }
                if let Some(dxg) = dxg {
                    // dV[ξ] (C × nb) = U[ξ]ᵀ (C × O) · dM[ξ] (O × nb).
                    let dvv = sized(dv, 16 * c * gr.nb);
                    for (xi, dvx) in dvv.chunks_exact_mut(c * gr.nb).enumerate() {
                        let (ux, dmx) = (&u[xi * o * c..], &dm[xi * gr.nb..]);
                        matmul(
                            (c, gr.nb, o),
                            dvx,
                            false,
                            ux,
                            (1, c),
                            dmx,
                            (16 * gr.nb, 1),
                            1,
                        );
                    }
                    input_adjoints(g, &t, gr, dvv, dxg, plane);
                }
                du
            })
        })
        .collect();
    let mut du = vec![0f32; 16 * o * c];
    for p in &partials {
        du.iter_mut().zip(p).for_each(|(a, v)| *a += v);
    }
    for (oc, dwk) in dw.chunks_exact_mut(9).enumerate() {
        let mut e = [0f32; 16];
        for (xi, val) in e.iter_mut().enumerate() {
            *val = du[xi * o * c + oc];
        }
        dwk.copy_from_slice(&kernel_adjoint(&e));
    }
}

/// The transform-domain output gradient of a group, `[O][16][nb]`, from its `dy` planes.
#[inline(always)]
fn output_adjoints(t: &Tiles, gr: Group, o: usize, dyg: &[f32], dm: &mut [f32], dq: &mut Vec<f32>) {
    let (nt, wq, plane_out) = (t.per_sample(), 2 * t.twp(), t.ho * t.wo);
    let dq = sized(dq, 2 * t.th * wq);
    for oc in 0..o {
        let dmo = &mut dm[oc * 16 * gr.nb..][..16 * gr.nb];
        for s in 0..gr.ns {
            let d = &dyg[(s * o + oc) * plane_out..][..plane_out];
            pad_plane(d, (t.ho, t.wo), 0, dq, wq);
            for ty in 0..t.th {
                for tx in (0..t.tw).step_by(L) {
                    let m = L.min(t.tw - tx);
                    let mut e = [[0f32; L]; 4];
                    for i in 0..2 {
                        let row = &dq[(2 * ty + i) * wq + 2 * tx..][..2 * L];
                        e[2 * i] = lanes(|l| row[2 * l]);
                        e[2 * i + 1] = lanes(|l| row[2 * l + 1]);
                    }
                    let col = s * nt + ty * t.tw + tx;
                    for (xi, val) in output_adjoint_l(&e).iter().enumerate() {
                        store(&mut dmo[xi * gr.nb + col..], val, m);
                    }
                }
            }
        }
    }
}

/// The input gradient of a group's planes `dxg` from `dv` (`[16][C][nb]`): every tile's
/// gradient added onto a padded plane, tile by tile in order, then its part inside the input.
#[inline(always)]
fn input_adjoints(
    g: &Geometry,
    t: &Tiles,
    gr: Group,
    dv: &[f32],
    dxg: &mut [f32],
    dq: &mut Vec<f32>,
) {
    let (nt, wp, c) = (t.per_sample(), t.wp(), g.c);
    let dq = sized(dq, t.hp() * wp);
    for (plane, dxp) in dxg.chunks_exact_mut(g.h * g.w).enumerate() {
        let (s, ch) = (plane / c, plane % c);
        dq.fill(0.0);
        for ty in 0..t.th {
            for tx in (0..t.tw).step_by(L) {
                let m = L.min(t.tw - tx);
                let col = s * nt + ty * t.tw + tx;
                let d = input_adjoint_l(&points(dv, (ch, c), gr.nb, col, m));
                for i in 0..4 {
                    let row = &mut dq[(2 * ty + i) * wp + 2 * tx..][..2 * L + 2];
                    for l in 0..L {
                        for j in 0..4 {
                            row[2 * l + j] += d[4 * i + j][l];
                        }
                    }
                }
            }
        }
        for (r, row) in dxp.chunks_exact_mut(g.w).enumerate() {
            row.copy_from_slice(&dq[(r + g.pad) * wp + g.pad..][..g.w]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each adjoint is the transpose of its transform, `<T a, b> = <a, Tᵀ b>`, in every lane.
    #[test]
    fn adjoints_are_transposes() {
        let val = |i: usize, l: usize, m: usize| ((i * 7 + l * 3) % m) as f32 / 3.0 - 1.5;
        let a: [Lanes; 16] = std::array::from_fn(|i| lanes(|l| val(i, l, 11)));
        let b: [Lanes; 16] = std::array::from_fn(|i| lanes(|l| val(i, l, 13)));
        let b4: [Lanes; 4] = std::array::from_fn(|i| b[i]);
        let dot = |x: &[Lanes], y: &[Lanes], l: usize| {
            x.iter().zip(y).map(|(p, q)| p[l] * q[l]).sum::<f32>()
        };
        let close = |p: f32, q: f32| assert!((p - q).abs() < 1e-4, "{p} vs {q}");
        for l in 0..L {
            close(
                dot(&input_transform_l(&a), &b, l),
                dot(&a, &input_adjoint_l(&b), l),
            );
            close(
                dot(&output_transform_l(&a), &b4, l),
                dot(&a, &output_adjoint_l(&b4), l),
            );
        }
        let a16: [f32; 16] = std::array::from_fn(|i| a[i][0]);
        let b16: [f32; 16] = std::array::from_fn(|i| b[i][0]);
        let dot1 = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>();
        close(
            dot1(&kernel_transform(&a16[..9]), &b16),
            dot1(&a16[..9], &kernel_adjoint(&b16)),
        );
    }
}
