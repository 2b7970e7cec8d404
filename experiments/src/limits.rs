//! What a run will ask of the machine, estimated from its config before anything is
//! allocated, so that an absurd size fails at once with the key to blame (`[limits]`).
//!
//! The estimate is deliberately rough (within a small factor) and errs high: it is a guard
//! against typos such as `train.batch_size = 1000000000`, not a planner.

use crate::check::Plan;
use flowmatch_models::ModelSpec;

/// Bytes of an f32.
const F32: f64 = 4.0;
/// Bytes of an f64.
const F64: f64 = 8.0;

/// The estimate and its largest term.
#[derive(Debug, Clone, PartialEq)]
pub struct Need {
    /// Peak bytes, estimated.
    pub bytes: f64,
    /// The config key that drives the largest term.
    pub key: &'static str,
    /// What the largest term is, in words.
    pub what: String,
}

/// A U-Net's `hidden`, scaled by how much wider its widest level is than the default
/// `[1, 2, 2]` (`model.mults`); the estimates below were sized on the default.
fn unet_width(model: &ModelSpec) -> f64 {
    match *model {
        ModelSpec::UNet { hidden, mults, .. } => {
            let widest = |m: [usize; 3]| m.into_iter().max().unwrap_or(1) as f64;
            hidden as f64 * widest(mults) / widest(flowmatch_models::UNET_MULTS)
        }
        ModelSpec::UNetLesson { hidden, .. } => hidden as f64,
        _ => 0.0,
    }
}

/// Scalar parameters of a model on `dim`-dimensional data, roughly.
fn parameters(model: &ModelSpec, dim: f64) -> f64 {
    match *model {
        ModelSpec::VelocityNet { hidden, .. } => {
            let h = hidden as f64;
            (dim + 1.0) * h + 2.0 * h * h + h * dim
        }
        ModelSpec::VelocityMlp { hidden, layers, .. } => {
            let h = hidden as f64;
            (dim + 1.0) * h + layers as f64 * h * h + h * dim
        }
        // Convolutions: a few hundred 3×3 kernels of width up to 4·hidden.
        ModelSpec::UNet { .. } | ModelSpec::UNetLesson { .. } => {
            let h = unet_width(model);
            200.0 * h * h + 1000.0
        }
    }
}

/// Floats kept per sample for one forward and backward pass, roughly.
pub(crate) fn activations_per_sample(model: &ModelSpec, dim: f64) -> f64 {
    match *model {
        ModelSpec::VelocityNet { hidden, .. } => 12.0 * (hidden as f64).max(dim),
        ModelSpec::VelocityMlp { hidden, layers, .. } => {
            4.0 * (layers as f64 + 2.0) * (hidden as f64).max(dim)
        }
        ModelSpec::UNet { .. } | ModelSpec::UNetLesson { .. } => 40.0 * dim * unet_width(model),
    }
}

/// Bytes of the time grid and per-step records of a solve of `steps` steps (times, step
/// sizes, the solver's bookkeeping).
pub fn grid_bytes(steps: usize) -> f64 {
    (steps as f64 + 1.0) * 4.0 * F64
}

/// The peak memory of a checked `plan` (model, data, coupling, reflow pairs,
/// the likelihood and stochastic rows of the evaluation) and the key behind its largest term.
pub fn estimate(plan: &Plan) -> Need {
    let (model, dim, images) = (&plan.model, plan.source.dim(), plan.images());
    let (ot, exact) = (plan.coupling.is_ot(), plan.coupling.is_exact_ot());
    let offline =
        plan.reflow.is_reflow() && plan.reflow.mode == flowmatch_reflow::ReflowMode::Offline;
    let d = dim as f64;
    let batch = plan.train.batch_size as f64;
    let samples = plan.eval.samples as f64;
    let p = parameters(model, d);
    let mut terms: Vec<(f64, &'static str, String)> = vec![
        // Weights, gradients, two moments, a weight average, a checkpoint copy.
        (6.0 * p * F32, "model.hidden", format!("{p:.3e} parameters")),
        (
            batch * (activations_per_sample(model, d) + 8.0 * d) * F32,
            "train.batch_size",
            format!("training batches of {batch} × {dim} values"),
        ),
        // Exact W2 and MMD hold an n × n matrix; the headline solve keeps its trajectory.
        (
            2.0 * samples * samples * F64 + 4.0 * samples * d * F32,
            "eval.samples",
            format!("{samples}² distances for the exact W2"),
        ),
        (
            (plan.solver.steps as f64 + 1.0) * samples * d * F32,
            "solver.steps",
            format!(
                "a trajectory of {} steps × {samples} samples",
                plan.solver.steps
            ),
        ),
    ];
    // Every solve of the evaluation holds its time grid: the table's longest, the
    // likelihood's and the stochastic rows'.
    if let Some(&longest) = plan.eval.steps.iter().max() {
        terms.push((
            grid_bytes(longest),
            "eval.steps",
            format!("the time grid of {longest} steps"),
        ));
    }
    if let Some(nll) = &plan.nll {
        terms.push((
            grid_bytes(nll.solver.steps) + 4.0 * nll.samples as f64 * d * F64,
            "eval.nll_steps",
            format!("the likelihood's time grid of {} steps", nll.solver.steps),
        ));
    }
    if !plan.sde.is_empty() {
        terms.push((
            grid_bytes(plan.sde_steps),
            "eval.sde_steps",
            format!("the stochastic sampler's grid of {} steps", plan.sde_steps),
        ));
    }
    if ot {
        // The exact assignment holds the costs and its copy; Sinkhorn the costs, −M/ε, its
        // transpose, the plan and the plan's running sum.
        let copies = if exact { 2.0 } else { 5.0 };
        terms.push((
            copies * batch * batch * F64,
            "train.batch_size",
            format!("{copies} × {batch}² values for the OT coupling"),
        ));
    }
    if offline {
        terms.push((
            2.0 * plan.reflow.pairs as f64 * d * F32,
            "reflow.pairs",
            format!("{} reflow pairs × {dim} values", plan.reflow.pairs),
        ));
    }
    if images {
        // The MNIST digits held in memory, as f32.
        terms.push((
            70_000.0 * d * F32,
            "data.dir",
            "the MNIST digits".to_string(),
        ));
    }
    let bytes = terms.iter().map(|t| t.0).sum::<f64>() + 64e6;
    let (_, key, what) =
        terms
            .into_iter()
            .fold((0.0, "train.batch_size", String::new()), |best, t| {
                if t.0 > best.0 {
                    t
                } else {
                    best
                }
            });
    // A huge `data.dim` inflates every term that holds points: blame the dimension.
    let grids = ["eval.steps", "eval.nll_steps", "eval.sde_steps"];
    let key = if d > 1e4 && !images && key != "model.hidden" && !grids.contains(&key) {
        "data.dim"
    } else {
        key
    };
    Need { bytes, key, what }
}

/// The longest a batch's exact assignment may take, estimated, before a run is refused.
pub const EXACT_OT_SECONDS: f64 = 10.0;

/// Seconds per `n³` of each exact solver, measured on one core of the 2-core AMD EPYC
/// (n = 1024: JV 20 ms, Kuhn–Munkres 68 ms), rounded up. JV often does better than `n³`.
fn seconds_per_cube(solver: flowmatch_losses::OtSolver) -> f64 {
    match solver {
        flowmatch_losses::OtSolver::Jv => 2e-11,
        flowmatch_losses::OtSolver::Pathfinding => 7e-11,
    }
}

/// The error for an exact OT coupling whose batch would take longer than
/// [`EXACT_OT_SECONDS`] per assignment by its `n³` estimate (`None` when it fits).
pub fn exact_ot_too_slow(plan: &Plan) -> Option<String> {
    let flowmatch_losses::CouplingSpec::Ot { solver, .. } = plan.coupling else {
        return None;
    };
    let n = plan.train.batch_size as f64;
    let secs = seconds_per_cube(solver) * n * n * n;
    (secs > EXACT_OT_SECONDS).then(|| {
        format!(
            "the exact OT assignment of {n} pairs would take about {secs:.0} s per batch (n³), over {EXACT_OT_SECONDS} s; use loss.coupling = \"sinkhorn\" for batches this large, or a smaller batch"
        )
    })
}

/// For sizes that no config bounds (`bench`, `plot SWEEP --what samples:K`): when the sum of
/// `terms` (bytes, and the flag behind them) is over a run's default `limits.memory_gb`,
/// the flag of the largest term, the sum and the limit, in bytes.
pub fn over_default_limit(terms: &[(f64, &'static str)]) -> Option<(&'static str, f64, f64)> {
    let limit = crate::config::DEFAULT_MEMORY_GB * 1e9;
    let need: f64 = terms.iter().map(|t| t.0).sum();
    let largest = terms
        .iter()
        .fold((0.0, ""), |b, t| if t.0 > b.0 { *t } else { b });
    (need > limit).then_some((largest.1, need, limit))
}

/// Bytes as `12.3 GB`.
pub fn human(bytes: f64) -> String {
    if bytes >= 1e12 {
        format!("{:.1} TB", bytes / 1e12)
    } else if bytes >= 1e9 {
        format!("{:.1} GB", bytes / 1e9)
    } else {
        format!("{:.0} MB", bytes / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use flowmatch_models::ModelKind;

    fn need(cfg: &Config) -> Need {
        // The estimate of a config whose checks pass except, perhaps, the memory limit.
        let mut unlimited = cfg.clone();
        unlimited.limits.memory_gb = 1e30;
        estimate(&unlimited.check().unwrap())
    }

    #[test]
    fn shipped_sizes_fit_and_absurd_ones_name_their_key() {
        let cfg = Config {
            name: "t".into(),
            ..Config::default()
        };
        let n = need(&cfg);
        assert!(n.bytes < 1e9, "{n:?}");
        let mut big = cfg.clone();
        big.train.batch_size = 1_000_000_000;
        let n = need(&big);
        assert!(n.bytes > 1e12 && n.key == "train.batch_size", "{n:?}");
        let mut wide = cfg.clone();
        wide.data.source = "gaussian-nd".into();
        wide.data.target = "gaussian-nd".into();
        wide.data.dim = 100_000_000;
        let n = need(&wide);
        assert!(n.bytes > 1e11 && n.key == "data.dim", "{n:?}");
        let mut many = cfg.clone();
        many.eval.samples = 1_000_000;
        let n = need(&many);
        assert!(n.bytes > 1e13 && n.key == "eval.samples", "{n:?}");
        // MNIST with the U-Net at a usual batch stays well under the default 16 GB.
        let mut img = cfg.clone();
        img.data.target = "mnist".into();
        img.model.kind = ModelKind::UNet;
        img.model.hidden = 32;
        img.train.batch_size = 128;
        let n = need(&img);
        assert!(n.bytes < 8e9, "{n:?}");
        // The evaluation's long solves: the likelihood, the stochastic rows, the table.
        let mut nll = cfg.clone();
        nll.eval.nll_steps = 100_000_000_000;
        let n = need(&nll);
        assert!(n.bytes > 1e12 && n.key == "eval.nll_steps", "{n:?}");
        let mut sde = cfg.clone();
        sde.eval.sde_gammas = vec![0.5];
        sde.eval.sde_steps = 100_000_000_000;
        let n = need(&sde);
        assert!(n.bytes > 1e12 && n.key == "eval.sde_steps", "{n:?}");
        let mut table = cfg.clone();
        table.eval.steps = vec![1, 100_000_000_000];
        let n = need(&table);
        assert!(n.bytes > 1e12 && n.key == "eval.steps", "{n:?}");
        assert_eq!(human(2.5e12), "2.5 TB");
        assert_eq!(human(3.21e9), "3.2 GB");
    }

    /// Sinkhorn at batch 4096 fits the default 16 GB and counts its five n² arrays; the exact
    /// assignment at 16384 is refused for its n³ time with a hint at Sinkhorn, and the slower
    /// Kuhn–Munkres sooner than JV.
    #[test]
    fn large_ot_batches_take_sinkhorn_and_refuse_the_exact_assignment() {
        let mut cfg = Config {
            name: "t".into(),
            ..Config::default()
        };
        cfg.loss.coupling = flowmatch_losses::CouplingKind::Sinkhorn;
        cfg.train.batch_size = 4096;
        let plan = cfg.check().unwrap();
        let n = estimate(&plan);
        assert!(
            n.bytes > 5.0 * 4096.0 * 4096.0 * 8.0 && n.bytes < 2e9,
            "{n:?}"
        );
        assert!(exact_ot_too_slow(&plan).is_none());
        cfg.loss.coupling = flowmatch_losses::CouplingKind::Ot;
        assert!(cfg.check().is_ok(), "exact OT at 4096 is allowed");
        cfg.train.batch_size = 16384;
        let (key, msg) = cfg.check().unwrap_err();
        assert_eq!(key, "train.batch_size");
        assert!(msg.contains("sinkhorn") && msg.contains("n³"), "{msg}");
        cfg.train.batch_size = 6000;
        assert!(cfg.check().is_ok(), "JV at 6000");
        cfg.loss.ot_solver = flowmatch_losses::OtSolver::Pathfinding;
        assert_eq!(cfg.check().unwrap_err().0, "train.batch_size");
    }
}
