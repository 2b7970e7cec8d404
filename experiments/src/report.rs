//! The results that several modules share: evaluation tables, summaries, progress scores and
//! the reflow table's rows (what `summary.json`, `eval-*.json` and `reflow.json` hold).

use flowmatch_losses::CouplingSpec;
use flowmatch_solvers::{Method, NoiseSchedule, SolverSpec};
use serde::{Deserialize, Serialize};

/// The sampler behind a result: an ODE solver (its method, on the uniform or the warped
/// grid) or Euler–Maruyama with its noise schedule. Written as the labels the files have
/// always held (`euler`, `rk4-warp0.5`, `em-g0.1`, `em-decay-g0.1`), read back exactly.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Solver {
    Ode { method: Method, warp: Option<f64> },
    Sde(NoiseSchedule),
}

impl Solver {
    /// Plain Euler on the uniform grid (the reflow table's and the sweep's few-step W2).
    pub const EULER: Solver = Solver::Ode {
        method: Method::Euler,
        warp: None,
    };
}

impl From<&SolverSpec> for Solver {
    fn from(s: &SolverSpec) -> Self {
        Self::Ode {
            method: s.method,
            warp: s.warp_s,
        }
    }
}

impl std::fmt::Display for Solver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let label = match self {
            Self::Ode { method, warp: None } => method.name().to_string(),
            Self::Ode {
                method,
                warp: Some(s),
            } => format!("{}-warp{s}", method.name()),
            Self::Sde(g) => g.label(),
        };
        f.pad(&label)
    }
}

impl From<Solver> for String {
    fn from(s: Solver) -> String {
        s.to_string()
    }
}

impl TryFrom<String> for Solver {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bad = || format!("'{s}' is not a solver label");
        let gamma = |g: &str| g.parse::<f64>().map_err(|_| bad());
        if let Some(g) = s.strip_prefix("em-decay-g") {
            return Ok(Self::Sde(NoiseSchedule::Decaying { gamma: gamma(g)? }));
        }
        if let Some(g) = s.strip_prefix("em-g") {
            return Ok(Self::Sde(NoiseSchedule::Constant { gamma: gamma(g)? }));
        }
        let (name, warp) = match s.split_once("-warp") {
            Some((n, w)) => (n, Some(w.parse::<f64>().map_err(|_| bad())?)),
            None => (s.as_str(), None),
        };
        let method = Method::from_name(name).map_err(|_| bad())?;
        Ok(Self::Ode { method, warp })
    }
}

/// The coupling a run trained with: a batch coupling of `loss.coupling`, or a reflow
/// student's teacher (its pairs made once, offline, or every step, online). Written as the
/// labels the files have always held (`ot`, `reflow-offline(12800 pairs, euler 50 steps)`,
/// `reflow-online(rk4-warp0.5 20 steps)`), read back exactly.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum RunCoupling {
    Batch(CouplingSpec),
    ReflowOffline {
        pairs: usize,
        teacher: Solver,
        steps: usize,
    },
    ReflowOnline {
        teacher: Solver,
        steps: usize,
    },
}

impl std::fmt::Display for RunCoupling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let label = match self {
            Self::Batch(c) => c.label(),
            Self::ReflowOffline {
                pairs,
                teacher,
                steps,
            } => format!("reflow-offline({pairs} pairs, {teacher} {steps} steps)"),
            Self::ReflowOnline { teacher, steps } => {
                format!("reflow-online({teacher} {steps} steps)")
            }
        };
        f.pad(&label)
    }
}

impl From<RunCoupling> for String {
    fn from(c: RunCoupling) -> String {
        c.to_string()
    }
}

impl TryFrom<String> for RunCoupling {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bad = || format!("'{s}' is not a coupling label");
        // "SOLVER STEPS steps", the teacher of a reflow coupling.
        let teacher = |t: &str| -> Result<(Solver, usize), String> {
            let t = t.strip_suffix(" steps").ok_or_else(bad)?;
            let (solver, steps) = t.rsplit_once(' ').ok_or_else(bad)?;
            Ok((
                Solver::try_from(solver.to_string())?,
                steps.parse().map_err(|_| bad())?,
            ))
        };
        if let Some(rest) = s
            .strip_prefix("reflow-offline(")
            .and_then(|r| r.strip_suffix(')'))
        {
            let (pairs, t) = rest.split_once(" pairs, ").ok_or_else(bad)?;
            let (teacher, steps) = teacher(t)?;
            let pairs = pairs.parse().map_err(|_| bad())?;
            return Ok(Self::ReflowOffline {
                pairs,
                teacher,
                steps,
            });
        }
        if let Some(t) = s
            .strip_prefix("reflow-online(")
            .and_then(|r| r.strip_suffix(')'))
        {
            let (teacher, steps) = teacher(t)?;
            return Ok(Self::ReflowOnline { teacher, steps });
        }
        CouplingSpec::from_label(&s)
            .map(Self::Batch)
            .ok_or_else(bad)
    }
}

/// One row of the evaluation table: a solver at a step count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableRow {
    pub solver: Solver,
    pub steps: usize,
    pub nfe: usize,
    pub w2: f64,
    pub mmd: f64,
    /// FID-like score (images with a classifier).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fid: Option<f64>,
}

/// Metrics of one solver against fresh target samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// The headline solver, e.g. `euler` at 100 steps.
    pub solver: Solver,
    pub solver_steps: usize,
    pub nfe: usize,
    /// Exact W2 between generated and real samples.
    pub w2: f64,
    /// RBF-MMD² (bandwidth: median distance of the real sample).
    pub mmd: f64,
    pub energy_distance: f64,
    /// Lesson's straightness |x1 - x0| / path length (1 = straight).
    pub straightness: f64,
    /// Liu et al.'s S (0 = straight).
    pub rf_straightness: f64,
    /// Tong et al.'s normalized path energy.
    pub normalized_path_energy: f64,
    /// W2 between the source and target samples (the cost of transport itself).
    pub w2_source_target: f64,
    /// Solver × steps.
    pub table: Vec<TableRow>,
    /// FID-like score and class spread of the headline samples (images with a classifier).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<crate::images::ImageScores>,
    /// Negative log-likelihood of real samples under the flow (Gaussian sources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nll: Option<Nll>,
    /// The opt-in metrics of the registry (`eval.metrics`), by name.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub extra: std::collections::BTreeMap<String, f64>,
}

impl Evaluation {
    /// The eval table's row of plain Euler at `steps` steps, when the table has one.
    pub fn euler(&self, steps: usize) -> Option<&TableRow> {
        self.table
            .iter()
            .find(|r| r.solver == Solver::EULER && r.steps == steps)
    }
}

/// The negative log-likelihood of real samples under the model's flow (its instantaneous
/// velocity), by the instantaneous change of variables.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Nll {
    /// Real samples scored.
    pub samples: usize,
    /// Mean `−log p₁(x)` in nats per sample.
    pub nats: f64,
    /// The same in bits per dimension, `nats / (D·ln 2)`.
    pub bits_per_dim: f64,
    /// `exact` (2-D) or `hutchinson-P` (P probes per point).
    pub divergence: String,
    /// The backward solver, e.g. `rk4` at 20 steps.
    pub solver: Solver,
    pub steps: usize,
}

/// The headline solver's scores at one point of training (`eval.every`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressRow {
    pub step: usize,
    pub w2: f64,
    pub mmd: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fid: Option<f64>,
}

/// `summary.json`: deterministic (no timings), one per finished run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub name: String,
    pub source: String,
    pub target: String,
    pub model: String,
    pub path: String,
    pub coupling: RunCoupling,
    /// The training objective, when not plain CFM (`meanflow`, `shortcut`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objective: Option<String>,
    /// Whether CUDA's matrix products ran in TF32 (`tf32`; only written when they did).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tf32: bool,
    pub train_steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub seed: u64,
    /// Mean training loss over the last 100 steps.
    pub final_loss: f64,
    pub w2: f64,
    pub mmd: f64,
    pub straightness: f64,
    pub rf_straightness: f64,
    pub normalized_path_energy: f64,
    pub nfe: usize,
    pub eval: Evaluation,
    /// For reflow experiments: one row per k-rectified flow (1-RF first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reflow: Option<Vec<IterationRow>>,
    /// The headline solver's scores during training (`eval.every`), the last at the end.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub progress: Vec<ProgressRow>,
}

/// W2 of one Euler step count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepW2 {
    pub steps: usize,
    pub w2: f64,
}

/// One k-rectified flow in the reflow table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IterationRow {
    /// `1-RF`, `2-RF`, … or `distill-k`.
    pub flow: flowmatch_reflow::Flow,
    /// Lesson's straightness (Euler, 100 steps).
    pub straightness: f64,
    /// Liu et al.'s S.
    pub rf_straightness: f64,
    pub normalized_path_energy: f64,
    /// W2 against fresh target samples at 1, 2, 5, 10, 100 Euler steps.
    pub w2_euler: Vec<StepW2>,
}

/// `  NLL 2.31 nats (1.67 bits/dim)` when the evaluation has one (the console's run line).
pub fn nll_text(ev: &Evaluation) -> String {
    match &ev.nll {
        Some(n) => format!("  NLL {:.4} nats ({:.4} bits/dim)", n.nats, n.bits_per_dim),
        None => String::new(),
    }
}

/// A conditional model's class scores as the console prints them: the headline solver's line,
/// then one line per guidance scale of `scales` (nothing for an unconditional model).
pub fn class_lines(ev: &Evaluation, scales: &[f64]) -> Vec<String> {
    let x = |k: &str| ev.extra.get(k).copied();
    let Some(acc) = x("class_accuracy") else {
        return vec![];
    };
    let mut head = format!("class accuracy {acc:.4}");
    if let Some(a) = x("class_accuracy_euler_1") {
        head += &format!(" (1 Euler step: {a:.4})");
    }
    if let Some(w) = x("class_w2") {
        head += &format!("  per-class W2 {w:.4}");
        if let Some(w1) = x("class_w2_euler_1") {
            head += &format!(" (1 Euler step: {w1:.4})");
        }
    }
    if let Some(f) = x("class_fid") {
        head += &format!("  per-class FID-like {f:.2}");
        if let Some(r) = x("class_fid_real") {
            head += &format!(" (real digits: {r:.2})");
        }
    }
    let mut lines = vec![head];
    for w in scales {
        let at = |k: &str| x(&format!("{k}_guidance_{w}"));
        let mut l = format!(
            "guidance {w}: class accuracy {:.4}  W2 {:.4}",
            at("class_accuracy").unwrap_or(f64::NAN),
            at("w2").unwrap_or(f64::NAN)
        );
        if let Some(f) = at("fid") {
            l += &format!("  FID-like {f:.2}");
        }
        lines.push(l);
    }
    lines
}

/// The eval table as the console prints it: a header and one line per row (none when empty).
pub fn table_lines(rows: &[TableRow]) -> Vec<String> {
    if rows.is_empty() {
        return vec![];
    }
    let fid = rows.iter().any(|r| r.fid.is_some());
    let mut out = vec![format!(
        "{:<14} {:>6} {:>6} {:>9} {:>10}{}",
        "solver",
        "steps",
        "nfe",
        "W2",
        "MMD",
        if fid {
            format!(" {:>9}", "FID-like")
        } else {
            String::new()
        }
    )];
    for r in rows {
        out.push(format!(
            "{:<14} {:>6} {:>6} {:>9.4} {:>10.3e}{}",
            r.solver,
            r.steps,
            r.nfe,
            r.w2,
            r.mmd,
            match r.fid {
                Some(f) => format!(" {f:>9.2}"),
                None => String::new(),
            }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowmatch_losses::OtSolver;

    #[test]
    fn coupling_labels_are_todays_strings_and_read_back_exactly() {
        let teacher = Solver::Ode {
            method: Method::Rk4,
            warp: Some(0.5),
        };
        for (c, label) in [
            (RunCoupling::Batch(CouplingSpec::Independent), "independent"),
            (
                RunCoupling::Batch(CouplingSpec::Ot {
                    solver: OtSolver::Pathfinding,
                    within_class: false,
                }),
                "ot-pathfinding",
            ),
            (
                RunCoupling::ReflowOffline {
                    pairs: 12800,
                    teacher: Solver::EULER,
                    steps: 50,
                },
                "reflow-offline(12800 pairs, euler 50 steps)",
            ),
            (
                RunCoupling::ReflowOnline { teacher, steps: 20 },
                "reflow-online(rk4-warp0.5 20 steps)",
            ),
        ] {
            assert_eq!(c.to_string(), label);
            assert_eq!(RunCoupling::try_from(label.to_string()), Ok(c));
        }
        assert!(RunCoupling::try_from("sinkhorn".to_string()).is_err());
    }

    #[test]
    fn solver_labels_are_todays_strings_and_read_back_exactly() {
        let cases = [
            (Solver::EULER, "euler"),
            (
                Solver::Ode {
                    method: Method::Rk4,
                    warp: Some(0.5),
                },
                "rk4-warp0.5",
            ),
            (
                Solver::Sde(NoiseSchedule::Constant { gamma: 0.1 }),
                "em-g0.1",
            ),
            (
                Solver::Sde(NoiseSchedule::Decaying { gamma: 1.0 }),
                "em-decay-g1",
            ),
        ];
        for (solver, label) in cases {
            assert_eq!(solver.to_string(), label);
            assert_eq!(
                serde_json::to_string(&solver).unwrap(),
                format!("\"{label}\"")
            );
            assert_eq!(Solver::try_from(label.to_string()), Ok(solver));
        }
        assert_eq!(format!("{:<7}|", Solver::EULER), "euler  |");
        assert!(Solver::try_from("leapfrog".to_string()).is_err());
    }

    /// Summaries are read back (sweep tables, reused trainings, resumed reflow chains) and
    /// written again: every float must survive the round trip bit for bit.
    #[test]
    fn floats_read_back_exactly() {
        for x in [
            1.033_673_328_757_286_1_f64,
            0.142_406_970_262_527_47,
            1.0 / 3.0,
            2.225_073_858_507_201_4e-308,
            6.02e23,
        ] {
            let back: f64 = serde_json::from_str(&serde_json::to_string(&x).unwrap()).unwrap();
            assert_eq!(back.to_bits(), x.to_bits(), "{x}");
        }
    }
}
