//! Entropic minibatch OT (TorchCFM's `OTPlanSampler(method="sinkhorn")`): an independent batch
//! is re-paired by sampling from the Sinkhorn plan of its squared-Euclidean costs, in place of
//! the exact assignment. The Schrödinger-bridge coupling is the same plan at `ε = 2σ²`.
//!
//! The plan ([`flowmatch_metrics::sinkhorn_stabilized`]) is deterministic; the sampling from it takes one uniform per pair, drawn with the
//! batch ([`Coupling::draw`]), so the pairing stage stays free of randomness and can be
//! prefetched on a second thread with the same numbers.

use crate::coupling::{Draw, Independent, Pairing, Pairs};
use crate::{Coupling, LossError};
use candle_core::{Device, Tensor};
use flowmatch_data::Rng;
use flowmatch_metrics::ot::sq_cost_matrix;
use flowmatch_metrics::{rows, sinkhorn_stabilized, Sinkhorn};
use rand::Rng as _;
use std::sync::{Arc, Mutex};

/// How pairs are drawn from an entropic plan (`loss.ot_draw`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OtDraw {
    /// `batch` entries `(i, j)` drawn from the whole plan with replacement (TorchCFM's choice):
    /// both sides are resampled, so some points repeat and others drop out.
    #[default]
    WithReplacement,
    /// One target per source point, drawn from its row: every `x_0` is kept once.
    Rows,
}

/// The regularisation `ε` of an entropic plan.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Epsilon {
    /// `ε` times the batch's mean cost (`loss.ot_reg`, as POT and TorchCFM scale it).
    OfMeanCost(f64),
    /// `ε` in the cost's units (the Schrödinger bridge's `2σ²`).
    Absolute(f64),
}

impl Epsilon {
    /// The number, relative or absolute.
    pub fn value(self) -> f64 {
        let (Self::OfMeanCost(e) | Self::Absolute(e)) = self;
        e
    }
}

/// The settings of an entropic coupling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EntropicOt {
    pub eps: Epsilon,
    pub draw: OtDraw,
    /// Stop when the column marginals' L1 error is below this (`loss.ot_tol`).
    pub tol: f64,
    /// The iteration cap (`loss.ot_max_iter`).
    pub max_iter: usize,
}

impl EntropicOt {
    /// The label's tail after the name and `ε` or `σ`: `-rows`, `-tol…`, `-iter…` where they
    /// differ from the defaults.
    pub(crate) fn label_tail(&self) -> String {
        let d = crate::CouplingOptions::default();
        let mut t = String::new();
        if self.draw == OtDraw::Rows {
            t += "-rows";
        }
        if self.tol != d.ot_tol {
            t += &format!("-tol{:e}", self.tol);
        }
        if self.max_iter != d.ot_max_iter {
            t += &format!("-iter{}", self.max_iter);
        }
        t
    }

    /// Checks the settings; an error names the field of [`crate::CouplingOptions`].
    pub fn validate(&self) -> Result<(), LossError> {
        let (Epsilon::OfMeanCost(e) | Epsilon::Absolute(e)) = self.eps;
        if !(e.is_finite() && e > 0.0) {
            return Err(LossError::setting(
                "ot_reg",
                format!("the entropic regularisation must be a positive number, got {e}"),
            ));
        }
        if !(self.tol.is_finite() && self.tol > 0.0) {
            return Err(LossError::setting(
                "ot_tol",
                format!("must be a positive number, got {}", self.tol),
            ));
        }
        if self.max_iter == 0 {
            return Err(LossError::setting(
                "ot_max_iter",
                "Sinkhorn needs at least one iteration, got 0",
            ));
        }
        Ok(())
    }

    /// The coupling re-pairing draws of `inner` by this plan.
    pub fn coupling(self, inner: Independent) -> SinkhornCoupling {
        SinkhornCoupling {
            inner,
            pairing: Arc::new(SinkhornPairing {
                ot: self,
                capped: Mutex::new(Capped::default()),
            }),
        }
    }
}

/// Entropic OT re-pairing of independent draws ([`EntropicOt::coupling`]).
pub struct SinkhornCoupling {
    inner: Independent,
    pairing: Arc<SinkhornPairing>,
}

impl Coupling for SinkhornCoupling {
    fn draw(&mut self, batch: usize, rng: &mut Rng, device: &Device) -> Result<Draw, LossError> {
        let mut d = self.inner.draw(batch, rng, device)?;
        d.u = (0..batch).map(|_| rng.random::<f64>()).collect();
        Ok(d)
    }

    fn pairing(&self) -> Option<Arc<dyn Pairing>> {
        Some(self.pairing.clone())
    }

    fn report(&self) -> Option<String> {
        self.pairing.report()
    }
}

/// The batches whose Sinkhorn iterations hit the cap, and the worst error reached.
#[derive(Debug, Default)]
struct Capped {
    batches: usize,
    of: usize,
    worst: f64,
}

/// The deterministic stage of [`SinkhornCoupling`]: the plan, then the pairs the draw's
/// uniforms pick from it.
struct SinkhornPairing {
    ot: EntropicOt,
    capped: Mutex<Capped>,
}

impl SinkhornPairing {
    fn report(&self) -> Option<String> {
        let c = self.capped.lock().ok()?;
        (c.batches > 0).then(|| {
            format!(
                "Sinkhorn stopped at its cap of {} iterations (loss.ot_max_iter) in {} of {} batches, with a marginal error up to {:.3e} against loss.ot_tol = {:e}",
                self.ot.max_iter, c.batches, c.of, c.worst, self.ot.tol
            )
        })
    }
}

impl Pairing for SinkhornPairing {
    fn pair(&self, draw: Draw) -> Result<(Tensor, Tensor), LossError> {
        let (x0, x1, _) = self.pair_labeled(draw)?;
        Ok((x0, x1))
    }

    fn pair_labeled(&self, mut draw: Draw) -> Result<Pairs, LossError> {
        let u = std::mem::take(&mut draw.u);
        let (x0, x1, y) = draw.into_labeled_pairs()?;
        let n = x0.dim(0)?;
        if u.len() != n {
            return Err(LossError::Invalid(format!(
                "the Sinkhorn pairing needs one uniform per pair: {} for {n}",
                u.len()
            )));
        }
        let solved = if x0.device().is_cpu() {
            let (a, _, d) = rows(&x0)?;
            let (b, _, _) = rows(&x1)?;
            plan_on_host(&self.ot, &a, &b, d)?
        } else {
            plan_as_tensors(&self.ot, &x0, &x1)?
        };
        let (src, dst) = draw_pairs(&self.ot, solved, &u, &self.capped);
        let device = x0.device().clone();
        let index = |v: &[usize]| {
            Tensor::from_vec(
                v.iter().map(|&k| k as u32).collect::<Vec<_>>(),
                v.len(),
                &device,
            )
        };
        let x0 = match &src {
            Some(s) => x0.index_select(&index(s)?, 0)?,
            None => x0,
        };
        let x1 = x1.index_select(&index(&dst)?, 0)?;
        let y = y.map(|y| dst.iter().map(|&j| y[j]).collect());
        Ok((x0, x1, y))
    }
}

/// `ε` in the cost's units for a batch of mean cost `mean`.
fn absolute_eps(eps: Epsilon, mean: f64) -> f64 {
    match eps {
        Epsilon::Absolute(e) => e,
        // A batch of identical points costs nothing: any positive ε gives the same plan.
        Epsilon::OfMeanCost(r) => r * if mean > 0.0 { mean } else { 1.0 },
    }
}

/// The plan of `a` and `b` (`d`-dimensional rows, uniform weights) on the CPU, by
/// [`sinkhorn_stabilized`].
fn plan_on_host(ot: &EntropicOt, a: &[f64], b: &[f64], d: usize) -> Result<Sinkhorn, LossError> {
    let (n, m) = (a.len() / d, b.len() / d);
    let cost = sq_cost_matrix(a, b, d);
    let eps = absolute_eps(ot.eps, cost.iter().sum::<f64>() / cost.len() as f64);
    Ok(sinkhorn_stabilized(
        &vec![1.0 / n as f64; n],
        &vec![1.0 / m as f64; m],
        &cost,
        eps,
        ot.tol,
        ot.max_iter,
    )?)
}

/// The same plan by log-domain iterations as tensor ops on the batch's device (a GPU): the
/// costs, potentials and log-sum-exps stay there, the marginal error is read every 10
/// iterations, and only the finished plan comes back to the host for the draw.
fn plan_as_tensors(ot: &EntropicOt, x0: &Tensor, x1: &Tensor) -> Result<Sinkhorn, LossError> {
    let (a, b) = (x0.flatten_from(1)?, x1.flatten_from(1)?);
    let (n, m) = (a.dim(0)?, b.dim(0)?);
    let sq = |x: &Tensor| x.sqr()?.sum_keepdim(1);
    let cost = (sq(&a)?.broadcast_add(&sq(&b)?.t()?)? - (a.matmul(&b.t()?)? * 2.0)?)?.relu()?;
    let mean = cost
        .mean_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()?;
    let eps = absolute_eps(ot.eps, mean);
    let neg = (cost / -eps)?;
    let (la, lb) = (-(n as f64).ln(), -(m as f64).ln());
    let mut f = Tensor::zeros((n, 1), neg.dtype(), neg.device())?;
    let mut g = Tensor::zeros((1, m), neg.dtype(), neg.device())?;
    let (mut iterations, mut err, mut converged) = (0, f64::INFINITY, false);
    while iterations < ot.max_iter {
        g = (neg.broadcast_add(&f)?.log_sum_exp(0)?.unsqueeze(0)? * -1.0)?.affine(1.0, lb)?;
        f = (neg.broadcast_add(&g)?.log_sum_exp(1)?.unsqueeze(1)? * -1.0)?.affine(1.0, la)?;
        iterations += 1;
        if iterations % 10 == 0 || iterations == ot.max_iter {
            let cols = neg.broadcast_add(&f)?.broadcast_add(&g)?.exp()?.sum(0)?;
            err = (cols.affine(1.0, -1.0 / m as f64)?.abs()?.sum_all()?)
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
            if err < ot.tol {
                converged = true;
                break;
            }
        }
    }
    let plan = neg.broadcast_add(&f)?.broadcast_add(&g)?.exp()?;
    let plan: Vec<f64> = plan
        .to_dtype(candle_core::DType::F64)?
        .flatten_all()?
        .to_vec1()?;
    Ok(Sinkhorn {
        plan,
        n,
        m,
        iterations,
        marginal_error: err,
        converged,
    })
}

/// Counts a batch that stopped at the cap, and the pairs the uniforms `u` pick from the plan
/// `s`: the source rows (`None`: each kept in place) and the target rows.
fn draw_pairs(
    ot: &EntropicOt,
    s: Sinkhorn,
    u: &[f64],
    capped: &Mutex<Capped>,
) -> (Option<Vec<usize>>, Vec<usize>) {
    let m = s.m;
    if let Ok(mut c) = capped.lock() {
        c.of += 1;
        if !s.converged {
            c.batches += 1;
            c.worst = c.worst.max(s.marginal_error);
        }
    }
    match ot.draw {
        OtDraw::WithReplacement => {
            let picks = pick(&s.plan, u);
            let src = picks.iter().map(|k| k / m).collect();
            (Some(src), picks.iter().map(|k| k % m).collect())
        }
        OtDraw::Rows => {
            let dst = u
                .iter()
                .enumerate()
                .map(|(i, &ui)| pick(&s.plan[i * m..(i + 1) * m], &[ui])[0])
                .collect();
            (None, dst)
        }
    }
}

/// For each uniform `u_k`, the index its share `u_k·Σw` of the cumulative weights `w` falls in
/// (inverse-CDF sampling; zero-weight entries are never picked).
fn pick(w: &[f64], u: &[f64]) -> Vec<usize> {
    let mut cdf = Vec::with_capacity(w.len());
    let mut total = 0.0;
    for &x in w {
        total += x;
        cdf.push(total);
    }
    u.iter()
        .map(|&ui| {
            let target = ui * total;
            cdf.partition_point(|&c| c <= target).min(w.len() - 1)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CouplingSpec;
    use flowmatch_data::{rng_from_seed, Distribution, Sampler};

    fn spec(eps: f64, draw: OtDraw) -> CouplingSpec {
        CouplingSpec::Sinkhorn(EntropicOt {
            eps: Epsilon::OfMeanCost(eps),
            draw,
            tol: 1e-9,
            max_iter: 100_000,
        })
    }

    fn samplers() -> (Arc<dyn Sampler>, Arc<dyn Sampler>) {
        (
            Arc::new(Distribution::from_name("gaussian").unwrap()),
            Arc::new(Distribution::from_name("moons").unwrap()),
        )
    }

    fn pairs(c: CouplingSpec, n: usize, seed: u64) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let (g, m) = samplers();
        let (x0, x1) = c
            .build(g, m, None)
            .sample(n, &mut rng_from_seed(seed), &Device::Cpu)
            .unwrap();
        (x0.to_vec2().unwrap(), x1.to_vec2().unwrap())
    }

    fn mean_sq(x0: &[Vec<f32>], x1: &[Vec<f32>]) -> f64 {
        x0.iter()
            .zip(x1)
            .map(|(a, b)| {
                a.iter()
                    .zip(b)
                    .map(|(p, q)| (p - q).powi(2) as f64)
                    .sum::<f64>()
            })
            .sum::<f64>()
            / x0.len() as f64
    }

    /// As ε → 0 the pairs approach the exact assignment's (row draws keep every source in
    /// place, and at ε = 0.0001 × the mean cost nine in ten or more pick their assigned target); as ε grows the cost of the pairs rises to the
    /// independent coupling's.
    #[test]
    fn small_eps_gives_the_assignment_and_large_eps_the_independent_coupling() {
        let n = 64;
        let (e0, e1) = pairs(
            CouplingSpec::of(crate::CouplingKind::Ot, Default::default()),
            n,
            5,
        );
        let (s0, s1) = pairs(spec(1e-4, OtDraw::Rows), n, 5);
        assert_eq!(e0, s0, "row draws keep the sources");
        let same = e1.iter().zip(&s1).filter(|(a, b)| a == b).count();
        assert!(
            same * 10 >= n * 9,
            "ε = 0.0001 × mean cost: {same} of {n} exact partners"
        );
        let exact = mean_sq(&e0, &e1);
        assert!(mean_sq(&s0, &s1) < 1.05 * exact);
        let (i0, i1) = pairs(CouplingSpec::Independent, n, 5);
        let independent = mean_sq(&i0, &i1);
        let mut last = exact;
        for eps in [0.1, 1.0, 100.0] {
            // Average the draw over seeds: the plan is smooth, the pick is random.
            let cost: f64 = (0..8)
                .map(|s| {
                    let (a, b) = pairs(spec(eps, OtDraw::WithReplacement), n, 40 + s);
                    mean_sq(&a, &b)
                })
                .sum::<f64>()
                / 8.0;
            assert!(cost > last * 0.95, "eps {eps}: {cost} after {last}");
            last = cost;
        }
        assert!(
            (last - independent).abs() < 0.25 * independent,
            "ε = 100 × mean: {last}, independent {independent}"
        );
        assert!(exact < 0.5 * independent, "{exact} vs {independent}");
    }

    /// With an infinite-like ε the plan is uniform: each row's picks are spread over all targets.
    #[test]
    fn a_huge_eps_plan_is_the_product_of_the_marginals() {
        let a: Vec<f64> = (0..16).map(|k| (k as f64 * 0.3).sin()).collect();
        let b: Vec<f64> = (0..16).map(|k| (k as f64 * 0.7).cos() * 3.0).collect();
        let s = flowmatch_metrics::sinkhorn_log(
            &[1.0 / 8.0; 8],
            &[1.0 / 8.0; 8],
            &sq_cost_matrix(&a, &b, 2),
            1e6,
            1e-12,
            1000,
        )
        .unwrap();
        for p in &s.plan {
            assert!((p - 1.0 / 64.0).abs() < 1e-6, "{p}");
        }
    }

    /// The picks follow the weights: inverse-CDF on exact shares, and never a zero entry.
    #[test]
    fn picks_follow_the_cumulative_weights() {
        let w = [0.0, 0.25, 0.0, 0.75];
        assert_eq!(
            pick(&w, &[0.0, 0.1, 0.2499, 0.25, 0.9, 0.999_999]),
            [1, 1, 1, 3, 3, 3]
        );
    }

    /// The same seed gives the same pairs with or without prefetch, and a batch that hits the
    /// iteration cap is reported with its error.
    #[test]
    fn hitting_the_cap_is_reported() {
        let (g, m) = samplers();
        let mut c = CouplingSpec::Sinkhorn(EntropicOt {
            eps: Epsilon::OfMeanCost(0.01),
            draw: OtDraw::WithReplacement,
            tol: 1e-12,
            max_iter: 3,
        })
        .build(g, m, None);
        assert!(c.report().is_none());
        c.sample(32, &mut rng_from_seed(1), &Device::Cpu).unwrap();
        let r = c.report().unwrap();
        assert!(
            r.contains("1 of 1 batches") && r.contains("loss.ot_max_iter"),
            "{r}"
        );
    }

    /// Labels follow their targets through the pairing: each paired target is one of the
    /// independent draw's (same seed), with that draw's label.
    #[test]
    fn labels_follow_the_targets() {
        let (g, m) = samplers();
        let labels = Some(crate::LabelDraw {
            classes: 2,
            drop: 0.3,
        });
        let draw = |c: CouplingSpec| {
            let (_, x1, y) = c
                .build(g.clone(), m.clone(), labels)
                .sample_labeled(128, &mut rng_from_seed(2), &Device::Cpu)
                .unwrap();
            (x1.to_vec2::<f32>().unwrap(), y.unwrap())
        };
        let (ix1, iy) = draw(CouplingSpec::Independent);
        for d in [OtDraw::WithReplacement, OtDraw::Rows] {
            let (x1, y) = draw(spec(0.05, d));
            for (p, l) in x1.iter().zip(&y) {
                let k = ix1.iter().position(|q| q == p).expect("a drawn target");
                assert_eq!(iy[k], *l);
            }
        }
    }

    /// Bad settings name their field.
    #[test]
    fn bad_settings_name_the_field() {
        let field = |o: EntropicOt| match o.validate() {
            Err(LossError::Setting { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let ok = EntropicOt {
            eps: Epsilon::OfMeanCost(0.1),
            draw: OtDraw::Rows,
            tol: 1e-6,
            max_iter: 10,
        };
        assert!(ok.validate().is_ok());
        for e in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let o = EntropicOt {
                eps: Epsilon::OfMeanCost(e),
                ..ok
            };
            assert_eq!(field(o), "ot_reg");
        }
        assert_eq!(field(EntropicOt { max_iter: 0, ..ok }), "ot_max_iter");
        assert_eq!(field(EntropicOt { tol: 0.0, ..ok }), "ot_tol");
    }

    /// The tensor-op iterations (the path a GPU batch takes), run here on CPU tensors, give the
    /// host solver's plan to f32 precision (6e-6 of the largest entry at ε = 0.01 × the mean cost,
    /// 1e-6 at 0.5).
    #[test]
    fn the_tensor_iterations_give_the_host_plan() {
        let (g, m) = samplers();
        let mut rng = rng_from_seed(7);
        let x0 = g.sample(96, &mut rng, &Device::Cpu).unwrap();
        let x1 = m.sample(80, &mut rng, &Device::Cpu).unwrap();
        let (a, _, d) = rows(&x0).unwrap();
        let (b, _, _) = rows(&x1).unwrap();
        for r in [0.01, 0.5] {
            let ot = EntropicOt {
                eps: Epsilon::OfMeanCost(r),
                draw: OtDraw::Rows,
                tol: 1e-5,
                max_iter: 20_000,
            };
            let host = plan_on_host(&ot, &a, &b, d).unwrap();
            let dev = plan_as_tensors(&ot, &x0, &x1).unwrap();
            assert!(host.converged && dev.converged, "ε = {r}");
            let top = host.plan.iter().cloned().fold(0.0, f64::max);
            let diff = host
                .plan
                .iter()
                .zip(&dev.plan)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0, f64::max);
            eprintln!(
                "tensor iterations against the host plan, ε = {r}: {:.1e} of the largest entry",
                diff / top
            );
            assert!(diff < 1e-4 * top, "ε = {r}: {diff} of {top}");
        }
    }
}
