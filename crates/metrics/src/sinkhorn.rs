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
    let (la, lb): (Vec<f64>, Vec<f64>) = (
        a.iter().map(|w| w.ln()).collect(),
        b.iter().map(|w| w.ln()).collect(),
    );
    // −M/ε, and its transpose for the column updates (contiguous rows for both).
    let mr: Vec<f64> = cost.iter().map(|c| -c / reg).collect();
    let mut mt = vec![0f64; n * m];
    mt.par_chunks_mut(n).enumerate().for_each(|(j, col)| {
        for (i, v) in col.iter_mut().enumerate() {
            *v = mr[i * m + j];
        }
    });
    // Potentials divided by ε: u = f/ε, v = g/ε.
    let (mut u, mut v) = (vec![0f64; n], vec![0f64; m]);
    let (mut iterations, mut err, mut converged) = (0, f64::INFINITY, false);
    while iterations < max_iter {
        v.par_iter_mut().enumerate().for_each(|(j, vj)| {
            let col = &mt[j * n..(j + 1) * n];
            *vj = lb[j] - log_sum_exp(col, &u);
        });
        u.par_iter_mut().enumerate().for_each(|(i, ui)| {
            let row = &mr[i * m..(i + 1) * m];
            *ui = la[i] - log_sum_exp(row, &v);
        });
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

/// `Σ_j |Σ_i P_ij − b_j|` for the potentials `u`, `v`.
fn column_error(mt: &[f64], u: &[f64], v: &[f64], b: &[f64]) -> f64 {
    let n = u.len();
    let per: Vec<f64> = (0..v.len())
        .into_par_iter()
        .map(|j| {
            let col = &mt[j * n..(j + 1) * n];
            (log_sum_exp(col, u).exp() * v[j].exp() - b[j]).abs()
        })
        .collect();
    per.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let have = std::process::Command::new("python3")
            .args(["-c", "import ot"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !have {
            eprintln!("test sinkhorn against POT ... skipped: python3 with POT (pip install pot) is not here");
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
            let ours = sinkhorn_log(&a, &b, &cost, reg, 1e-12, 100_000).unwrap();
            let script = format!(
                "import numpy as np, ot\n\
                 M = np.loadtxt('{}').reshape(256, 256)\n\
                 a = np.ones(256) / 256\n\
                 P = ot.sinkhorn(a, a, M, {reg:e}, method='sinkhorn_log', stopThr=1e-12, numItermax=100000)\n\
                 print(' '.join(repr(float(x)) for x in P.ravel()))",
                input.display()
            );
            let o = std::process::Command::new("python3")
                .args(["-c", &script])
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let theirs: Vec<f64> = String::from_utf8(o.stdout)
                .unwrap()
                .split_whitespace()
                .map(|v| v.parse().unwrap())
                .collect();
            let top = theirs.iter().cloned().fold(0.0, f64::max);
            let diff = ours
                .plan
                .iter()
                .zip(&theirs)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0, f64::max);
            eprintln!(
                "sinkhorn vs POT, ε = {rel} × mean cost: {:.2e} of the largest entry",
                diff / top
            );
            assert!(diff / top < 1e-5, "ε = {rel}: {diff} of {top}");
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
        let (a, b, cost) = problem(100, 90);
        let run = |t: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap()
                .install(|| sinkhorn_log(&a, &b, &cost, 0.05, 1e-9, 300).unwrap().plan)
        };
        assert_eq!(run(1), run(3));
    }
}
