//! Entropic optimal transport by Sinkhorn's iterations in the log domain (issue 31's solver;
//! POT's `ot.sinkhorn(a, b, M, reg, method="sinkhorn_log")`).
//!
//! With potentials `f`, `g` and `ε = reg`, each iteration sets
//! `g_j = ε·log b_j − ε·LSE_i((f_i − M_ij)/ε)`, then `f_i = ε·log a_i − ε·LSE_j((g_j − M_ij)/ε)`,
//! and the plan is `P_ij = exp((f_i + g_j − M_ij)/ε)`. Nothing is exponentiated outside a
//! log-sum-exp shifted by its largest term, so small `ε` neither overflows nor underflows.
//! Rows and columns run in parallel, each sum made by one task in a fixed order, so every thread
//! count gives the same bits.

use crate::MetricsError;
use rayon::prelude::*;

/// A Sinkhorn solution.
#[derive(Debug, Clone)]
pub struct Sinkhorn {
    /// The plan, `n × m` row-major; its row sums are `a` (exactly after the last `f` update)
    /// and its column sums are `b` to within `marginal_error`.
    pub plan: Vec<f64>,
    pub n: usize,
    pub m: usize,
    /// Iterations run.
    pub iterations: usize,
    /// `Σ_j |Σ_i P_ij − b_j|` when it stopped.
    pub marginal_error: f64,
    /// Whether the error fell below the tolerance before the iteration cap.
    pub converged: bool,
}

/// Lanes of the sums and maxima: eight partial results combined in a fixed order, so the
/// compiler can keep them in vector registers and every build gets the same bits.
const LANES: usize = 8;

/// `e^x` for `x ≤ 709` (below −708 it returns `e^−708`, as good as 0 here): `x = k·ln 2 + r`,
/// `|r| ≤ ln 2 / 2`, `e^r` by its Taylor series to degree 13 (relative error within a few units in the last place) and
/// `2^k` put into the exponent bits. Branch-free plain arithmetic (no fused multiply-add), so
/// a loop of it vectorises and gives the scalar loop's bits.
#[inline(always)]
fn exp(x: f64) -> f64 {
    const MAGIC: f64 = 6_755_399_441_055_744.0; // 1.5·2⁵²: adding it rounds to an integer.
    const LN2_HI: f64 = f64::from_bits(0x3FE6_2E42_FEE0_0000); // ln 2 with 32 low bits clear
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    let x = if x > -708.0 { x } else { -708.0 };
    let t = x * std::f64::consts::LOG2_E + MAGIC;
    let k = t - MAGIC;
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let p = 1.0 / 6_227_020_800.0;
    let p = p * r + 1.0 / 479_001_600.0;
    let p = p * r + 1.0 / 39_916_800.0;
    let p = p * r + 1.0 / 3_628_800.0;
    let p = p * r + 1.0 / 362_880.0;
    let p = p * r + 1.0 / 40_320.0;
    let p = p * r + 1.0 / 5_040.0;
    let p = p * r + 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // t's low mantissa bits hold k; (k + 1023) << 52 is 2^k.
    p * f64::from_bits(t.to_bits().wrapping_add(1023) << 52)
}

/// `log Σ_i exp(c_i + w_i)`, shifted by the largest term (−∞ if every term is −∞).
#[inline(always)]
fn lse_body(c: &[f64], w: &[f64]) -> f64 {
    let n = c.len().min(w.len());
    let (c, w) = (&c[..n], &w[..n]);
    let split = n - n % LANES;
    let max = |a: f64, b: f64| if b > a { b } else { a };
    let mut top = [f64::NEG_INFINITY; LANES];
    for (cc, ww) in c[..split]
        .chunks_exact(LANES)
        .zip(w[..split].chunks_exact(LANES))
    {
        for k in 0..LANES {
            top[k] = max(top[k], cc[k] + ww[k]);
        }
    }
    let mut top = top.iter().fold(f64::NEG_INFINITY, |a, &b| max(a, b));
    for k in split..n {
        top = max(top, c[k] + w[k]);
    }
    if top == f64::NEG_INFINITY {
        return top;
    }
    let mut sum = [0f64; LANES];
    for (cc, ww) in c[..split]
        .chunks_exact(LANES)
        .zip(w[..split].chunks_exact(LANES))
    {
        for k in 0..LANES {
            sum[k] += exp(cc[k] + ww[k] - top);
        }
    }
    let mut total = sum.iter().sum::<f64>();
    for k in split..n {
        total += exp(c[k] + w[k] - top);
    }
    top + total.ln()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn lse_avx2(c: &[f64], w: &[f64]) -> f64 {
    lse_body(c, w)
}

/// `log Σ_i exp(c_i + w_i)`: with AVX2 where the CPU has it (the same bits either way).
fn log_sum_exp(c: &[f64], w: &[f64]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: called only where the CPU reports AVX2.
            return unsafe { lse_avx2(c, w) };
        }
    }
    lse_body(c, w)
}

/// Solves the entropic OT problem between weights `a` (`n`) and `b` (`m`) for the cost `cost`
/// (`n × m` row-major) at regularisation `reg` (absolute, in the cost's units), stopping when
/// the column marginal's L1 error is below `tol` (checked every 10 iterations, as POT does) or
/// after `max_iter` iterations.
pub fn sinkhorn_log(
    a: &[f64],
    b: &[f64],
    cost: &[f64],
    reg: f64,
    tol: f64,
    max_iter: usize,
) -> Result<Sinkhorn, MetricsError> {
    let (n, m) = check_inputs(a, b, cost, reg)?;
    let (la, lb): (Vec<f64>, Vec<f64>) = (
        a.iter().map(|w| w.ln()).collect(),
        b.iter().map(|w| w.ln()).collect(),
    );
    // −M/ε, and its transpose for the column updates (contiguous rows for both).
    let mr: Vec<f64> = cost.iter().map(|c| -c / reg).collect();
    let mt = transpose(&mr, n, m);
    // Potentials divided by ε: u = f/ε, v = g/ε.
    let (mut u, mut v) = (vec![0f64; n], vec![0f64; m]);
    let (mut iterations, mut err, mut converged) = (0, f64::INFINITY, false);
    while iterations < max_iter {
        log_iteration(&mr, &mt, &la, &lb, &mut u, &mut v);
        iterations += 1;
        if iterations % 10 == 0 || iterations == max_iter {
            err = column_error(&mt, &u, &v, b);
            if err < tol {
                converged = true;
                break;
            }
        }
    }
    let plan: Vec<f64> = (0..n * m)
        .into_par_iter()
        .map(|k| exp(mr[k] + u[k / m] + v[k % m]))
        .collect();
    Ok(Sinkhorn {
        plan,
        n,
        m,
        iterations,
        marginal_error: err,
        converged,
    })
}

/// The transpose of the `n × m` row-major `x`.
fn transpose(x: &[f64], n: usize, m: usize) -> Vec<f64> {
    let mut t = vec![0f64; n * m];
    t.par_chunks_mut(n).enumerate().for_each(|(j, col)| {
        for (i, v) in col.iter_mut().enumerate() {
            *v = x[i * m + j];
        }
    });
    t
}

/// One log-domain iteration: the column potentials `v`, then the row potentials `u` (both
/// divided by ε), for `−M/ε` as `mr` and its transpose `mt`.
fn log_iteration(mr: &[f64], mt: &[f64], la: &[f64], lb: &[f64], u: &mut [f64], v: &mut [f64]) {
    let (n, m) = (u.len(), v.len());
    v.par_iter_mut().enumerate().for_each(|(j, vj)| {
        *vj = lb[j] - log_sum_exp(&mt[j * n..(j + 1) * n], u);
    });
    let v: &[f64] = v;
    u.par_iter_mut().enumerate().for_each(|(i, ui)| {
        *ui = la[i] - log_sum_exp(&mr[i * m..(i + 1) * m], v);
    });
}

/// Checks the shapes, the regularisation and the weights; returns `(n, m)`.
fn check_inputs(
    a: &[f64],
    b: &[f64],
    cost: &[f64],
    reg: f64,
) -> Result<(usize, usize), MetricsError> {
    let (n, m) = (a.len(), b.len());
    if n == 0 || m == 0 || cost.len() != n * m {
        return Err(MetricsError::Shape(format!(
            "sinkhorn: a cost of {} values for {n} × {m} weights",
            cost.len()
        )));
    }
    if !(reg.is_finite() && reg > 0.0) {
        return Err(MetricsError::Shape(format!(
            "sinkhorn: the regularisation must be positive, got {reg}"
        )));
    }
    if cost.iter().chain(a).chain(b).any(|v| !v.is_finite()) {
        return Err(MetricsError::NonFinite("sinkhorn inputs"));
    }
    if a.iter().chain(b).any(|&w| w <= 0.0) {
        return Err(MetricsError::Shape(
            "sinkhorn: weights must be positive".into(),
        ));
    }
    Ok((n, m))
}

/// Scalings outside `[1/BOUND, BOUND]` are absorbed into the potentials.
const BOUND: f64 = 1e50;

/// The same problem as [`sinkhorn_log`], solved by the log-stabilised scaling iterations
/// (Schmitzer 2019; POT's `sinkhorn_stabilized`): the potentials `f`, `g` (divided by ε) stay
/// in the log domain, absorbed into a kernel `K_ij = exp(f_i + g_j − M_ij/ε)`, and between
/// absorptions an iteration is one pass over the kernel with the scalings `u = a/(Kv)` and
/// `v = b/(Kᵀu)`, with no exponential. The first kernel is each row's softmax at its own
/// potential, so every row already holds its mass; a scaling that leaves `[10⁻⁵⁰, 10⁵⁰]` is
/// absorbed and the kernel rebuilt, and one that broke (a product that underflowed) is redone
/// by a log-domain iteration. It converges to the same plan as [`sinkhorn_log`] at any ε,
/// several times faster; every thread count gives the same bits.
pub fn sinkhorn_stabilized(
    a: &[f64],
    b: &[f64],
    cost: &[f64],
    reg: f64,
    tol: f64,
    max_iter: usize,
) -> Result<Sinkhorn, MetricsError> {
    let (n, m) = check_inputs(a, b, cost, reg)?;
    let inv = 1.0 / reg;
    let (mut f, mut g) = (vec![0f64; n], vec![0f64; m]);
    let mut kernel = vec![0f64; n * m];
    kernel
        .par_chunks_mut(m)
        .zip(f.par_iter_mut())
        .enumerate()
        .for_each(|(i, (row, fi))| {
            *fi = kernel_row(&cost[i * m..(i + 1) * m], inv, 0.0, &g, Some(a[i]), row);
        });
    let (mut u, mut v) = (vec![1f64; n], vec![1f64; m]);
    let (mut iterations, mut err, mut converged) = (1, f64::INFINITY, false);
    while iterations < max_iter {
        // One pass over the kernel: the row scalings, and the column products of the new ones.
        let ktu = row_pass(&kernel, a, &v, &mut u);
        iterations += 1;
        if iterations % 10 == 0 || iterations == max_iter {
            // The column marginals of the plan as it stands (its rows hold `a` exactly).
            err = ktu
                .iter()
                .zip(&v)
                .zip(b)
                .map(|((k, vj), bj)| (k * vj - bj).abs())
                .sum();
            if err < tol {
                converged = true;
                break;
            }
        }
        v.iter_mut()
            .zip(&ktu)
            .zip(b)
            .for_each(|((vj, k), bj)| *vj = bj / k);
        let out = |x: &f64| !(x.is_finite() && *x > 1.0 / BOUND && *x < BOUND);
        if u.iter().chain(&v).any(out) {
            let broke = |x: &f64| !(x.is_finite() && *x > 0.0);
            let redo = u.iter().chain(&v).any(broke);
            for (fi, ui) in f.iter_mut().zip(&u) {
                if !broke(ui) {
                    *fi += ui.ln();
                }
            }
            for (gj, vj) in g.iter_mut().zip(&v) {
                if !broke(vj) {
                    *gj += vj.ln();
                }
            }
            if redo {
                let mr: Vec<f64> = cost.iter().map(|c| -c / reg).collect();
                let mt = transpose(&mr, n, m);
                let ln = |w: &[f64]| -> Vec<f64> { w.iter().map(|x| x.ln()).collect() };
                log_iteration(&mr, &mt, &ln(a), &ln(b), &mut f, &mut g);
            }
            kernel
                .par_chunks_mut(m)
                .zip(&f)
                .enumerate()
                .for_each(|(i, (row, fi))| {
                    kernel_row(&cost[i * m..(i + 1) * m], inv, *fi, &g, None, row);
                });
            u.fill(1.0);
            v.fill(1.0);
        }
    }
    // The plan in place of the kernel.
    kernel.par_chunks_mut(m).zip(&u).for_each(|(row, ui)| {
        for (p, vj) in row.iter_mut().zip(&v) {
            *p *= ui * vj;
        }
    });
    Ok(Sinkhorn {
        plan: kernel,
        n,
        m,
        iterations,
        marginal_error: err,
        converged,
    })
}

/// Writes `K_ij = exp(f + g_j − c_j/ε)` into `row`. With `mass = Some(a_i)` it first sets `f`
/// so that the row sums to `a_i` (the row's log-domain update) and returns that `f`;
/// otherwise it returns `f` as given.
fn kernel_row(c: &[f64], inv: f64, f: f64, g: &[f64], mass: Option<f64>, row: &mut [f64]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: called only where the CPU reports AVX2.
            return unsafe { kernel_row_avx2(c, inv, f, g, mass, row) };
        }
    }
    kernel_row_body(c, inv, f, g, mass, row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn kernel_row_avx2(
    c: &[f64],
    inv: f64,
    f: f64,
    g: &[f64],
    mass: Option<f64>,
    row: &mut [f64],
) -> f64 {
    kernel_row_body(c, inv, f, g, mass, row)
}

#[inline(always)]
fn kernel_row_body(
    c: &[f64],
    inv: f64,
    f: f64,
    g: &[f64],
    mass: Option<f64>,
    row: &mut [f64],
) -> f64 {
    for ((r, cj), gj) in row.iter_mut().zip(c).zip(g) {
        *r = gj - cj * inv;
    }
    let Some(a) = mass else {
        for r in row.iter_mut() {
            *r = exp(*r + f);
        }
        return f;
    };
    let top = row
        .iter()
        .fold(f64::NEG_INFINITY, |t, &x| if x > t { x } else { t });
    let mut sum = [0f64; LANES];
    let split = row.len() - row.len() % LANES;
    for chunk in row[..split].chunks_exact_mut(LANES) {
        for k in 0..LANES {
            chunk[k] = exp(chunk[k] - top);
            sum[k] += chunk[k];
        }
    }
    let mut total = sum.iter().sum::<f64>();
    for r in row[split..].iter_mut() {
        *r = exp(*r - top);
        total += *r;
    }
    let scale = a / total;
    for r in row.iter_mut() {
        *r *= scale;
    }
    a.ln() - top - total.ln()
}

/// `Σ_j x_j y_j` in [`LANES`] partial sums (a fixed order; vectorised with AVX2).
fn dot(x: &[f64], y: &[f64]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: called only where the CPU reports AVX2.
            return unsafe { dot_avx2(x, y) };
        }
    }
    dot_body(x, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(x: &[f64], y: &[f64]) -> f64 {
    dot_body(x, y)
}

#[inline(always)]
fn dot_body(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len().min(y.len());
    let split = n - n % LANES;
    let mut acc = [0f64; LANES];
    for (xx, yy) in x[..split]
        .chunks_exact(LANES)
        .zip(y[..split].chunks_exact(LANES))
    {
        for k in 0..LANES {
            acc[k] += xx[k] * yy[k];
        }
    }
    let mut total = acc.iter().sum::<f64>();
    for k in split..n {
        total += x[k] * y[k];
    }
    total
}

/// Rows per block of [`row_pass`]: each block's column sums are one partial, and the
/// partials are added in block order, so the thread count does not change the bits.
const ROWS: usize = 32;

/// For each row `u_i = a_i / (K_i·v)`, and the column products `Σ_i K_ij u_i` of the new
/// scalings, in one pass over the kernel (each row is read once, the second time from cache).
fn row_pass(kernel: &[f64], a: &[f64], v: &[f64], u: &mut [f64]) -> Vec<f64> {
    let m = v.len();
    let partials: Vec<Vec<f64>> = u
        .par_chunks_mut(ROWS)
        .enumerate()
        .map(|(c, block)| {
            let mut acc = vec![0f64; m];
            for (k, ui) in block.iter_mut().enumerate() {
                let i = c * ROWS + k;
                let row = &kernel[i * m..(i + 1) * m];
                *ui = a[i] / dot(row, v);
                axpy(&mut acc, row, *ui);
            }
            acc
        })
        .collect();
    let mut out = vec![0f64; m];
    for p in &partials {
        for (o, x) in out.iter_mut().zip(p) {
            *o += x;
        }
    }
    out
}

/// `y += a·x`.
fn axpy(y: &mut [f64], x: &[f64], a: f64) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: called only where the CPU reports AVX2.
            return unsafe { axpy_avx2(y, x, a) };
        }
    }
    axpy_body(y, x, a)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn axpy_avx2(y: &mut [f64], x: &[f64], a: f64) {
    axpy_body(y, x, a)
}

#[inline(always)]
fn axpy_body(y: &mut [f64], x: &[f64], a: f64) {
    for (yj, xj) in y.iter_mut().zip(x) {
        *yj += a * xj;
    }
}

/// `Σ_j |Σ_i P_ij − b_j|` for the potentials `u`, `v`.
fn column_error(mt: &[f64], u: &[f64], v: &[f64], b: &[f64]) -> f64 {
    let n = u.len();
    let per: Vec<f64> = (0..v.len())
        .into_par_iter()
        .map(|j| {
            let col = &mt[j * n..(j + 1) * n];
            ((log_sum_exp(col, u) + v[j]).exp() - b[j]).abs()
        })
        .collect();
    per.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    type Solve = fn(&[f64], &[f64], &[f64], f64, f64, usize) -> Result<Sinkhorn, MetricsError>;
    const SOLVERS: [(&str, Solve); 2] = [
        ("sinkhorn_log", sinkhorn_log),
        ("sinkhorn_stabilized", sinkhorn_stabilized),
    ];

    fn problem(n: usize, m: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let pt = |k: usize, s: f64| {
            (
                (k as f64 * 0.37 + s).sin() * 2.0,
                (k as f64 * 0.71 + s).cos(),
            )
        };
        let cost: Vec<f64> = (0..n * m)
            .map(|k| {
                let (p, q) = (pt(k / m, 0.0), pt(k % m, 1.3));
                (p.0 - q.0).powi(2) + (p.1 - q.1).powi(2)
            })
            .collect();
        (vec![1.0 / n as f64; n], vec![1.0 / m as f64; m], cost)
    }

    /// Both marginals hold at convergence, at ε of 1 and 0.01 times the mean cost (the log domain keeps the
    /// small one finite), for a square and an oblong problem.
    #[test]
    fn marginals_hold_at_large_and_small_regularisation() {
        for (n, m) in [(64, 64), (40, 70)] {
            let (a, b, cost) = problem(n, m);
            let mean = cost.iter().sum::<f64>() / cost.len() as f64;
            for reg in [1.0 * mean, 0.01 * mean] {
                let s = sinkhorn_log(&a, &b, &cost, reg, 1e-9, 200_000).unwrap();
                assert!(
                    s.converged,
                    "reg {reg}: error {} after {}",
                    s.marginal_error, s.iterations
                );
                assert!(s.plan.iter().all(|p| p.is_finite() && *p >= 0.0));
                for (i, ai) in a.iter().enumerate() {
                    let r: f64 = s.plan[i * m..(i + 1) * m].iter().sum();
                    assert!((r - ai).abs() < 1e-9, "row {i}: {r} vs {ai}");
                }
                for (j, bj) in b.iter().enumerate() {
                    let c: f64 = (0..n).map(|i| s.plan[i * m + j]).sum();
                    assert!((c - bj).abs() < 1e-9, "column {j}: {c} vs {bj}");
                }
            }
        }
    }

    /// The branch-free `exp` is within 2e-15 (relative) of the library's over the range the
    /// iterations use, and the AVX2 and scalar sums give the same bits.
    #[test]
    fn exp_matches_the_library() {
        let mut worst = 0f64;
        for k in 0..200_000 {
            let x = -708.0 + 717.0 * k as f64 / 200_000.0;
            let rel = (exp(x) - x.exp()).abs() / x.exp();
            worst = worst.max(rel);
        }
        assert!(worst < 2e-15, "{worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f64::NEG_INFINITY), (-708f64).exp().max(exp(-708.0)));
        let c: Vec<f64> = (0..1037)
            .map(|k| -((k as f64) * 0.37).sin().abs() * 30.0)
            .collect();
        let w: Vec<f64> = (0..1037).map(|k| ((k as f64) * 0.11).cos()).collect();
        let a = log_sum_exp(&c, &w);
        assert_eq!(a.to_bits(), lse_body(&c, &w).to_bits());
        let direct = c
            .iter()
            .zip(&w)
            .map(|(c, w)| (c + w).exp())
            .sum::<f64>()
            .ln();
        assert!((a - direct).abs() < 1e-13, "{a} vs {direct}");
    }

    /// At a tiny ε the plan is the exact assignment's: each row's mass on the column the
    /// Hungarian solver gives it.
    #[test]
    fn a_tiny_regularisation_approaches_the_assignment() {
        let (a, b, cost) = problem(12, 12);
        let s = sinkhorn_log(&a, &b, &cost, 1e-3, 1e-10, 500_000).unwrap();
        let exact = crate::ot::assignment(&cost, 12).unwrap();
        for (i, &j) in exact.iter().enumerate() {
            let p = s.plan[i * 12 + j];
            assert!(p > 0.99 / 12.0, "row {i}: {p} on the assigned column {j}");
        }
    }

    /// The plan agrees with POT's `ot.sinkhorn(…, method="sinkhorn_log")` to 1e-5 of its largest
    /// entry at n = 256, for ε of 0.01, 0.1 and 1 times the mean cost (POT from PyPI, which
    /// `.ci/run` installs; "skipped" without it).
    #[test]
    fn agrees_with_pot() {
        if !crate::pot_here("sinkhorn against POT") {
            return;
        }
        let (a, b, cost) = problem(256, 256);
        let mean = cost.iter().sum::<f64>() / cost.len() as f64;
        let dir = std::env::temp_dir().join(format!("fm-sinkhorn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let input = dir.join("cost.txt");
        let text: Vec<String> = cost.iter().map(|c| format!("{c:e}")).collect();
        std::fs::write(&input, text.join(" ")).unwrap();
        for rel in [0.01, 0.1, 1.0] {
            let reg = rel * mean;
            let script = format!(
                "import numpy as np, ot\n\
                 M = np.loadtxt('{}').reshape(256, 256)\n\
                 a = np.ones(256) / 256\n\
                 P = ot.sinkhorn(a, a, M, {reg:e}, method='sinkhorn_log', stopThr=1e-12, numItermax=100000)\n\
                 print(' '.join(repr(float(x)) for x in P.ravel()))",
                input.display()
            );
            let stdout = crate::python(&script);
            let theirs: Vec<f64> = stdout
                .split_whitespace()
                .map(|v| v.parse().unwrap())
                .collect();
            for (name, solve) in SOLVERS {
                let ours = solve(&a, &b, &cost, reg, 1e-12, 100_000).unwrap();
                let (diff, top) = gap(&theirs, &ours.plan);
                eprintln!(
                    "{name} vs POT's sinkhorn_log, ε = {rel} × mean cost: {:.2e} of the largest entry",
                    diff / top
                );
                assert!(diff / top < 1e-5, "{name}, ε = {rel}: {diff} of {top}");
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn bad_inputs_are_errors_and_threads_do_not_change_bits() {
        let (a, b, cost) = problem(8, 8);
        assert!(sinkhorn_log(&a, &b, &cost[..10], 1.0, 1e-9, 10).is_err());
        assert!(sinkhorn_log(&a, &b, &cost, 0.0, 1e-9, 10).is_err());
        let mut nan = cost.clone();
        nan[3] = f64::NAN;
        assert!(sinkhorn_log(&a, &b, &nan, 1.0, 1e-9, 10).is_err());
        assert!(sinkhorn_stabilized(&a, &b, &nan, 1.0, 1e-9, 10).is_err());
        let (a, b, cost) = problem(300, 290);
        for (name, solve) in SOLVERS {
            let run = |t: usize| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(t)
                    .build()
                    .unwrap()
                    .install(|| solve(&a, &b, &cost, 0.05, 1e-9, 300).unwrap().plan)
            };
            assert_eq!(run(1), run(3), "{name}");
        }
    }

    /// The largest entry-wise difference of two plans, and the largest entry of the first.
    fn gap(p: &[f64], q: &[f64]) -> (f64, f64) {
        let top = p.iter().cloned().fold(0.0, f64::max);
        let diff = p
            .iter()
            .zip(q)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        (diff, top)
    }

    /// The stabilised iterations reach the log-domain plan, down to ε = 0.003 × the mean cost
    /// (where the kernel of the raw costs underflows), absorbing as they go.
    #[test]
    fn the_stabilised_iterations_reach_the_log_domain_plan() {
        for (n, m) in [(64, 64), (50, 70)] {
            let (a, b, cost) = problem(n, m);
            let mean = cost.iter().sum::<f64>() / cost.len() as f64;
            for rel in [1.0, 0.05, 0.003] {
                let reg = rel * mean;
                let p = sinkhorn_log(&a, &b, &cost, reg, 1e-10, 300_000).unwrap();
                let q = sinkhorn_stabilized(&a, &b, &cost, reg, 1e-10, 300_000).unwrap();
                assert!(p.converged && q.converged, "ε = {rel}");
                let (diff, top) = gap(&p.plan, &q.plan);
                assert!(diff < 1e-6 * top, "{n}×{m}, ε = {rel}: {diff} of {top}");
            }
        }
    }

    /// A target far from every source: its column's log-sum-exp is about −800 and its potential
    /// about +800, so the error check must add them before exponentiating (not multiply 0 by
    /// ∞); both solvers reach the same plan.
    #[test]
    fn a_far_target_keeps_the_marginal_error_finite() {
        let (n, m) = (12, 12);
        let (a, b, mut cost) = problem(n, m);
        for i in 0..n {
            cost[i * m + m - 1] += 400.0;
        }
        let p = sinkhorn_log(&a, &b, &cost, 0.5, 1e-10, 200_000).unwrap();
        let q = sinkhorn_stabilized(&a, &b, &cost, 0.5, 1e-10, 200_000).unwrap();
        assert!(p.converged && q.converged);
        let (diff, top) = gap(&p.plan, &q.plan);
        assert!(diff < 1e-6 * top, "{diff} of {top}");
    }
}
