//! How source and target samples are paired for one training batch.

use crate::entropic::{EntropicOt, Epsilon, OtDraw};
use crate::path::{AffinePath, BrownianBridge, ProbabilityPath};
use crate::LossError;
use candle_core::{Device, Tensor};
use flowmatch_data::{Rng, Sampler};
use flowmatch_metrics::ot::{ot_pairing_with, OtSolver};
use flowmatch_metrics::rows;
use std::sync::Arc;

/// Draws a training batch of pairs `(x_0, x_1)`, in two stages: [`draw`](Self::draw) takes all
/// the randomness, and the coupling's [`Pairing`], if it has one, does the deterministic work
/// (the OT assignment, the reflow teacher's integration). The trainer can run that stage on a
/// second thread for the next batch while the current one trains, with the same numbers.
pub trait Coupling: Send {
    /// Draws the random part of `batch` pairs on `device`.
    fn draw(&mut self, batch: usize, rng: &mut Rng, device: &Device) -> Result<Draw, LossError>;

    /// The deterministic stage that turns a draw into pairs; `None` when the draw is the pairs.
    /// It is the same stage on every call (the trainer's prefetch worker asks once).
    fn pairing(&self) -> Option<Arc<dyn Pairing>> {
        None
    }

    /// A warning about the batches paired so far (an entropic plan that hit its iteration
    /// cap), for the run's log; `None` when there is nothing to say.
    fn report(&self) -> Option<String> {
        None
    }

    /// [`sample`](Self::sample) with the targets' class labels when the coupling draws them
    /// (in `0..=classes`, `classes` where the label was dropped), following the pairing.
    fn sample_labeled(
        &mut self,
        batch: usize,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Pairs, LossError> {
        let draw = self.draw(batch, rng, device)?;
        match self.pairing() {
            Some(p) => p.pair_labeled(draw),
            None => draw.into_labeled_pairs(),
        }
    }

    /// Draws `batch` pairs on `device`: both stages, here.
    fn sample(
        &mut self,
        batch: usize,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<(Tensor, Tensor), LossError> {
        let (x0, x1, _) = self.sample_labeled(batch, rng, device)?;
        Ok((x0, x1))
    }
}

/// A drawn batch before pairing: `x1` is absent where the pairing makes it (reflow's teacher).
pub struct Draw {
    /// Source points.
    pub x0: Tensor,
    /// Target points, when drawn.
    pub x1: Option<Tensor>,
    /// The targets' class labels, when the coupling draws them (a dropped label is `classes`).
    pub y: Option<Vec<u32>>,
    /// Uniforms in [0, 1) for a pairing that samples (one per pair; empty otherwise).
    pub u: Vec<f64>,
}

/// A batch of training pairs and, for a conditional model, the targets' labels.
pub type Pairs = (Tensor, Tensor, Option<Vec<u32>>);

impl Draw {
    /// The draw as it stands with its labels, for couplings without a pairing stage.
    pub fn into_labeled_pairs(mut self) -> Result<Pairs, LossError> {
        let y = self.y.take();
        let (x0, x1) = self.into_pairs()?;
        Ok((x0, x1, y))
    }

    /// The draw as it stands, for couplings without a pairing stage.
    pub fn into_pairs(self) -> Result<(Tensor, Tensor), LossError> {
        match self.x1 {
            Some(x1) => Ok((self.x0, x1)),
            None => Err(LossError::Invalid(
                "the coupling drew no targets and has no pairing".into(),
            )),
        }
    }
}

/// The deterministic stage of a coupling: no randomness, so it can run on any thread.
pub trait Pairing: Send + Sync {
    /// Turns a draw into training pairs.
    fn pair(&self, draw: Draw) -> Result<(Tensor, Tensor), LossError>;

    /// [`pair`](Self::pair) keeping the draw's labels with their targets. The default is for
    /// pairings that draw no labels.
    fn pair_labeled(&self, mut draw: Draw) -> Result<Pairs, LossError> {
        if draw.y.take().is_some() {
            return Err(LossError::Invalid(
                "this coupling cannot carry class labels".into(),
            ));
        }
        let (x0, x1) = self.pair(draw)?;
        Ok((x0, x1, None))
    }
}

/// How a conditional training draws its labels: `classes` of them, each replaced by
/// "no label" (`classes`) with probability `drop` (classifier-free guidance's training).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LabelDraw {
    pub classes: usize,
    pub drop: f64,
}

/// Checks a label-drop probability: in [0, 1) (1 would train no conditional velocity).
pub fn validate_label_drop(drop: f64) -> Result<(), LossError> {
    if (0.0..1.0).contains(&drop) {
        Ok(())
    } else {
        Err(LossError::setting(
            "label_drop",
            format!("must be in [0, 1), got {drop}"),
        ))
    }
}

/// Independent pairing: `x_0 ~ p_0`, `x_1 ~ p_1` drawn separately (I-CFM, the seeds' default).
pub struct Independent {
    source: Arc<dyn Sampler>,
    target: Arc<dyn Sampler>,
    labels: Option<LabelDraw>,
}

impl Independent {
    /// Pairs draws from `source` and `target` at random.
    pub fn new(source: Arc<dyn Sampler>, target: Arc<dyn Sampler>) -> Self {
        Self {
            source,
            target,
            labels: None,
        }
    }

    /// The same drawing the targets' labels (the same points as without).
    pub fn with_labels(mut self, labels: Option<LabelDraw>) -> Self {
        self.labels = labels;
        self
    }
}

impl Coupling for Independent {
    fn draw(&mut self, batch: usize, rng: &mut Rng, device: &Device) -> Result<Draw, LossError> {
        let x0 = self.source.sample(batch, rng, device)?;
        let Some(l) = self.labels else {
            let x1 = self.target.sample(batch, rng, device)?;
            return Ok(Draw {
                x0,
                x1: Some(x1),
                y: None,
                u: vec![],
            });
        };
        let (v, mut y) = self
            .target
            .sample_labeled_vec(batch, rng)
            .ok_or_else(|| LossError::Invalid("the target has no class labels".into()))?;
        for label in y.iter_mut() {
            if rand::Rng::random::<f64>(rng) < l.drop {
                *label = l.classes as u32;
            }
        }
        let x1 = Tensor::from_vec(v, (batch, self.target.dim()), device)?;
        Ok(Draw {
            x0,
            x1: Some(x1),
            y: Some(y),
            u: vec![],
        })
    }
}

/// The name of a coupling in a config (`loss.coupling`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CouplingKind {
    /// [`Independent`].
    Independent,
    /// [`MinibatchOt`].
    Ot,
    /// Entropic OT ([`crate::EntropicOt`]) at `loss.ot_reg` × the mean cost.
    Sinkhorn,
    /// The Schrödinger bridge: the entropic plan at `ε = 2σ²` and the Brownian-bridge path.
    SchrodingerBridge,
}

/// A coupling chosen by name, with its settings: a new coupling is one variant here (with its
/// settings in [`CouplingOptions`], its label and its check) and one [`Coupling`] impl; the
/// config adds its keys. (Reflow's teacher couplings are built by the reflow stages.)
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CouplingSpec {
    /// Independent pairs (I-CFM).
    Independent,
    /// Exact minibatch OT (OT-CFM) with its assignment solver; `within_class` solves it
    /// separately for each class's targets (and the label-dropped ones as one more group).
    Ot {
        solver: OtSolver,
        within_class: bool,
    },
    /// Entropic minibatch OT: pairs sampled from the Sinkhorn plan.
    Sinkhorn(EntropicOt),
    /// Schrödinger-bridge CFM (SF²M, Tong et al. 2024): pairs from the entropic plan at
    /// `ε = 2σ²` (`ot.eps` is that), trained on the Brownian bridge of std `σ`.
    SchrodingerBridge { sigma: f64, ot: EntropicOt },
}

/// The settings of every coupling (each kind reads its own).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CouplingOptions {
    /// The exact assignment's solver (OT).
    pub ot_solver: OtSolver,
    /// OT within each class (conditional training).
    pub ot_within_class: bool,
    /// Entropic OT: `ε` relative to the batch's mean cost (Sinkhorn).
    pub ot_reg: f64,
    /// Entropic OT: how pairs are drawn from the plan.
    pub ot_draw: OtDraw,
    /// Entropic OT: the marginal error at which Sinkhorn stops, and its iteration cap.
    pub ot_tol: f64,
    pub ot_max_iter: usize,
    /// The Schrödinger bridge's noise `σ`.
    pub sigma: f64,
}

impl Default for CouplingOptions {
    /// TorchCFM's defaults: `reg = 0.05`, draws with replacement, `σ = 1` for the bridge;
    /// POT's cap of 1000 iterations, at a marginal error (L1) of 1e-4.
    fn default() -> Self {
        Self {
            ot_solver: OtSolver::Jv,
            ot_within_class: false,
            ot_reg: 0.05,
            ot_draw: OtDraw::WithReplacement,
            ot_tol: 1e-4,
            ot_max_iter: 1000,
            sigma: 1.0,
        }
    }
}

impl CouplingSpec {
    /// The spec of `kind` with its settings.
    pub fn of(kind: CouplingKind, o: CouplingOptions) -> Self {
        let entropic = |eps| EntropicOt {
            eps,
            draw: o.ot_draw,
            tol: o.ot_tol,
            max_iter: o.ot_max_iter,
        };
        match kind {
            CouplingKind::Independent => Self::Independent,
            CouplingKind::Ot => Self::Ot {
                solver: o.ot_solver,
                within_class: o.ot_within_class,
            },
            CouplingKind::Sinkhorn => Self::Sinkhorn(entropic(Epsilon::OfMeanCost(o.ot_reg))),
            CouplingKind::SchrodingerBridge => Self::SchrodingerBridge {
                sigma: o.sigma,
                ot: entropic(Epsilon::Absolute(2.0 * o.sigma * o.sigma)),
            },
        }
    }

    /// Checks the settings; an error names the field of [`CouplingOptions`].
    pub fn validate(&self) -> Result<(), LossError> {
        match self {
            Self::Independent | Self::Ot { .. } => Ok(()),
            Self::Sinkhorn(ot) => ot.validate(),
            Self::SchrodingerBridge { sigma, ot } => {
                let eps = 2.0 * sigma * sigma;
                if !(sigma.is_finite() && *sigma > 0.0 && eps.is_finite() && eps > 0.0) {
                    return Err(LossError::setting(
                        "sigma",
                        format!("the bridge's noise must be a positive number whose 2σ² is a positive float, got {sigma:e}"),
                    ));
                }
                ot.validate()
            }
        }
    }

    /// The path the coupling trains on: `affine` (the config's), or the Brownian bridge.
    pub fn path(&self, affine: AffinePath) -> Box<dyn ProbabilityPath> {
        match *self {
            Self::SchrodingerBridge { sigma, .. } => Box::new(BrownianBridge { sigma }),
            _ => Box::new(affine),
        }
    }

    /// The spec whose [`label`](Self::label) is `s`.
    pub fn from_label(s: &str) -> Option<Self> {
        if let Some(c) = Self::entropic_from_label(s) {
            return Some(c);
        }
        let (s, within_class) = match s.strip_suffix("-within-class") {
            Some(s) => (s, true),
            None => (s, false),
        };
        let ot = |solver| Self::Ot {
            solver,
            within_class,
        };
        match s {
            "independent" if !within_class => Some(Self::Independent),
            "ot" => Some(ot(OtSolver::Jv)),
            "ot-pathfinding" => Some(ot(OtSolver::Pathfinding)),
            _ => None,
        }
    }

    /// The coupling, pairing draws from `source` and `target` (with `labels`, the targets'
    /// class labels too).
    pub fn build(
        self,
        source: Arc<dyn Sampler>,
        target: Arc<dyn Sampler>,
        labels: Option<LabelDraw>,
    ) -> Box<dyn Coupling> {
        let inner = Independent::new(source, target).with_labels(labels);
        match self {
            Self::Independent => Box::new(inner),
            Self::Sinkhorn(ot) | Self::SchrodingerBridge { ot, .. } => Box::new(ot.coupling(inner)),
            Self::Ot {
                solver,
                within_class,
            } => Box::new(MinibatchOt {
                inner,
                solver,
                within_class,
            }),
        }
    }

    /// The coupling's name in summaries: `independent`, `ot`, `ot-pathfinding`, with
    /// `-within-class` for label-aware OT (read back by [`from_label`](Self::from_label)).
    pub fn label(self) -> String {
        match self {
            Self::Independent => "independent".to_string(),
            Self::Ot {
                solver,
                within_class,
            } => {
                let name = match solver {
                    OtSolver::Jv => "ot",
                    OtSolver::Pathfinding => "ot-pathfinding",
                };
                let tail = if within_class { "-within-class" } else { "" };
                format!("{name}{tail}")
            }
            Self::Sinkhorn(ot) => format!("sinkhorn-eps{}{}", ot.eps.value(), ot.label_tail()),
            Self::SchrodingerBridge { sigma, ot } => {
                format!("schrodinger-bridge-sigma{sigma}{}", ot.label_tail())
            }
        }
    }

    /// An entropic coupling's label read back: `sinkhorn-eps0.05`, `schrodinger-bridge-sigma1`,
    /// then `-rows`, `-tol…` and `-iter…` where they differ from the defaults.
    fn entropic_from_label(s: &str) -> Option<Self> {
        let d = CouplingOptions::default();
        let (s, max_iter) = match s.rsplit_once("-iter") {
            Some((s, n)) => (s, n.parse().ok()?),
            None => (s, d.ot_max_iter),
        };
        let (s, tol) = match s.rsplit_once("-tol") {
            Some((s, t)) => (s, t.parse().ok()?),
            None => (s, d.ot_tol),
        };
        let (s, draw) = match s.strip_suffix("-rows") {
            Some(s) => (s, OtDraw::Rows),
            None => (s, OtDraw::WithReplacement),
        };
        let o = CouplingOptions {
            ot_draw: draw,
            ot_tol: tol,
            ot_max_iter: max_iter,
            ..d
        };
        if let Some(e) = s.strip_prefix("sinkhorn-eps") {
            let ot_reg = e.parse().ok()?;
            return Some(Self::of(
                CouplingKind::Sinkhorn,
                CouplingOptions { ot_reg, ..o },
            ));
        }
        let sigma = s.strip_prefix("schrodinger-bridge-sigma")?.parse().ok()?;
        Some(Self::of(
            CouplingKind::SchrodingerBridge,
            CouplingOptions { sigma, ..o },
        ))
    }

    /// Whether batches pair by optimal transport (the batch² cost matrix, for estimates).
    pub fn is_ot(self) -> bool {
        !matches!(self, Self::Independent)
    }

    /// Whether batches pair by the exact assignment (its n³ time, for estimates).
    pub fn is_exact_ot(self) -> bool {
        matches!(self, Self::Ot { .. })
    }
}

/// Exact minibatch optimal transport (Tong et al. 2023, OT-CFM): re-pairs an independent
/// batch by the exact assignment on squared Euclidean costs.
pub struct MinibatchOt {
    inner: Independent,
    solver: OtSolver,
    within_class: bool,
}

impl MinibatchOt {
    /// OT re-pairing of draws from `source` and `target` (our solver).
    pub fn new(source: Arc<dyn Sampler>, target: Arc<dyn Sampler>) -> Self {
        Self {
            inner: Independent::new(source, target),
            solver: OtSolver::Jv,
            within_class: false,
        }
    }

    /// The same with the assignment of `solver`.
    pub fn with_solver(mut self, solver: OtSolver) -> Self {
        self.solver = solver;
        self
    }
}

/// Reorders `x1` so that `x1'[i]` is `x0[i]`'s optimal partner.
pub fn ot_repair(x0: &Tensor, x1: &Tensor) -> Result<Tensor, LossError> {
    ot_repair_with(OtSolver::Jv, x0, x1)
}

/// [`ot_repair`] with the assignment of `solver`.
pub fn ot_repair_with(solver: OtSolver, x0: &Tensor, x1: &Tensor) -> Result<Tensor, LossError> {
    let (a, _, d) = rows(x0)?;
    let (b, _, _) = rows(x1)?;
    let (perm, _) = ot_pairing_with(solver, &a, &b, d)?;
    let idx = Tensor::from_vec(
        perm.iter().map(|&j| j as u32).collect::<Vec<_>>(),
        perm.len(),
        x1.device(),
    )?;
    Ok(x1.index_select(&idx, 0)?)
}

impl Coupling for MinibatchOt {
    fn draw(&mut self, batch: usize, rng: &mut Rng, device: &Device) -> Result<Draw, LossError> {
        self.inner.draw(batch, rng, device)
    }

    fn pairing(&self) -> Option<Arc<dyn Pairing>> {
        Some(Arc::new(OtPairing(self.solver, self.within_class)))
    }
}

/// The assignment re-pairing of [`MinibatchOt`] (within each label group, when asked).
struct OtPairing(OtSolver, bool);

impl Pairing for OtPairing {
    fn pair(&self, draw: Draw) -> Result<(Tensor, Tensor), LossError> {
        let (x0, x1, _) = self.pair_labeled(draw)?;
        Ok((x0, x1))
    }

    fn pair_labeled(&self, draw: Draw) -> Result<Pairs, LossError> {
        let (x0, x1, y) = draw.into_labeled_pairs()?;
        let (a, n, d) = rows(&x0)?;
        let (b, _, _) = rows(&x1)?;
        let perm = match (&y, self.1) {
            (Some(y), true) => within_groups(self.0, &a, &b, d, y)?,
            (None, true) => {
                return Err(LossError::Invalid(
                    "OT within classes needs class labels".into(),
                ))
            }
            _ => ot_pairing_with(self.0, &a, &b, d)?.0,
        };
        let idx: Vec<u32> = perm.iter().map(|&j| j as u32).collect();
        let x1 = x1.index_select(&Tensor::from_vec(idx, n, x1.device())?, 0)?;
        let y = y.map(|y| perm.iter().map(|&j| y[j]).collect());
        Ok((x0, x1, y))
    }
}

/// The exact assignment solved separately within each group of equal labels: row `i` of the
/// result is the target (a row of `b` with `y[i]`'s label) paired with source row `i`. The
/// source rows are i.i.d., so each group gets its own random share of the source.
pub fn within_groups(
    solver: OtSolver,
    a: &[f64],
    b: &[f64],
    d: usize,
    y: &[u32],
) -> Result<Vec<usize>, LossError> {
    let mut groups: Vec<u32> = y.to_vec();
    groups.sort_unstable();
    groups.dedup();
    let mut perm: Vec<usize> = (0..y.len()).collect();
    for g in groups {
        let idx: Vec<usize> = (0..y.len()).filter(|&i| y[i] == g).collect();
        let gather = |m: &[f64]| -> Vec<f64> {
            idx.iter()
                .flat_map(|&i| m[i * d..(i + 1) * d].iter().copied())
                .collect()
        };
        let (p, _) = ot_pairing_with(solver, &gather(a), &gather(b), d)?;
        for (k, &i) in idx.iter().enumerate() {
            perm[i] = idx[p[k]];
        }
    }
    Ok(perm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowmatch_data::{rng_from_seed, Distribution};

    fn mean_sq(x0: &Tensor, x1: &Tensor) -> f32 {
        (x1 - x0)
            .unwrap()
            .sqr()
            .unwrap()
            .sum(1)
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn ot_pairs_are_a_permutation_and_cheaper_than_independent() {
        let g: Arc<dyn Sampler> = Arc::new(Distribution::from_name("gaussian").unwrap());
        let m: Arc<dyn Sampler> = Arc::new(Distribution::from_name("moons").unwrap());
        let (x0, x1) = Independent::new(g.clone(), m.clone())
            .sample(128, &mut rng_from_seed(3), &Device::Cpu)
            .unwrap();
        let (y0, y1) = MinibatchOt::new(g, m)
            .sample(128, &mut rng_from_seed(3), &Device::Cpu)
            .unwrap();
        // Same draws, re-paired.
        assert_eq!(x0.to_vec2::<f32>().unwrap(), y0.to_vec2::<f32>().unwrap());
        let key = |t: &Tensor| {
            let mut v: Vec<Vec<u32>> = t
                .to_vec2::<f32>()
                .unwrap()
                .iter()
                .map(|r| r.iter().map(|x| x.to_bits()).collect())
                .collect();
            v.sort();
            v
        };
        assert_eq!(key(&x1), key(&y1));
        assert!(mean_sq(&y0, &y1) < 0.8 * mean_sq(&x0, &x1));
    }

    #[test]
    fn both_ot_solvers_give_the_same_pairs_and_training_batches() {
        let g: Arc<dyn Sampler> = Arc::new(Distribution::from_name("gaussian").unwrap());
        let m: Arc<dyn Sampler> = Arc::new(Distribution::from_name("moons").unwrap());
        for seed in 0..5 {
            let batch = |solver| {
                CouplingSpec::Ot {
                    solver,
                    within_class: false,
                }
                .build(g.clone(), m.clone(), None)
                .sample(256, &mut rng_from_seed(seed), &Device::Cpu)
                .unwrap()
            };
            let (a0, a1) = batch(OtSolver::Jv);
            let (b0, b1) = batch(OtSolver::Pathfinding);
            assert_eq!(a0.to_vec2::<f32>().unwrap(), b0.to_vec2::<f32>().unwrap());
            assert_eq!(
                a1.to_vec2::<f32>().unwrap(),
                b1.to_vec2::<f32>().unwrap(),
                "seed {seed}"
            );
        }
        let pathfinding = CouplingOptions {
            ot_solver: OtSolver::Pathfinding,
            ..Default::default()
        };
        let within = CouplingOptions {
            ot_within_class: true,
            ..pathfinding
        };
        let ot = CouplingSpec::of(CouplingKind::Ot, Default::default());
        assert_eq!(ot.label(), "ot");
        assert_eq!(
            CouplingSpec::of(CouplingKind::Independent, pathfinding),
            CouplingSpec::Independent
        );
        for c in [
            ot,
            CouplingSpec::Independent,
            CouplingSpec::of(CouplingKind::Ot, pathfinding),
            CouplingSpec::of(CouplingKind::Ot, within),
            CouplingSpec::of(CouplingKind::Sinkhorn, Default::default()),
            CouplingSpec::of(
                CouplingKind::Sinkhorn,
                CouplingOptions {
                    ot_reg: 0.01,
                    ot_draw: OtDraw::Rows,
                    ot_tol: 1e-9,
                    ot_max_iter: 50,
                    ..Default::default()
                },
            ),
            CouplingSpec::of(
                CouplingKind::SchrodingerBridge,
                CouplingOptions {
                    sigma: 0.25,
                    ot_tol: 1e-7,
                    ..Default::default()
                },
            ),
        ] {
            assert_eq!(
                CouplingSpec::from_label(&c.label()),
                Some(c),
                "{}",
                c.label()
            );
        }
        assert_eq!(
            CouplingSpec::of(CouplingKind::Sinkhorn, Default::default()).label(),
            "sinkhorn-eps0.05"
        );
        assert_eq!(
            CouplingSpec::of(CouplingKind::Ot, within).label(),
            "ot-pathfinding-within-class"
        );
    }

    /// Labelled OT batches on 8gaussians (label drop 0.2), by `solver`, within classes or not.
    fn labeled_batch(solver: OtSolver, within_class: bool, seed: u64) -> Pairs {
        let g: Arc<dyn Sampler> = Arc::new(Distribution::from_name("gaussian").unwrap());
        let m: Arc<dyn Sampler> = Arc::new(Distribution::from_name("8gaussians").unwrap());
        let labels = LabelDraw {
            classes: 8,
            drop: 0.2,
        };
        CouplingSpec::Ot {
            solver,
            within_class,
        }
        .build(g, m, Some(labels))
        .sample_labeled(64, &mut rng_from_seed(seed), &Device::Cpu)
        .unwrap()
    }

    #[test]
    fn ot_within_classes_never_pairs_across_groups_and_is_optimal_in_each() {
        for seed in 0..3 {
            let (x0, x1, y) = labeled_batch(OtSolver::Jv, true, seed);
            let y = y.unwrap();
            // The same draws as plain OT (the same x0, the same multiset of (x1, label)).
            let (p0, p1, py) = labeled_batch(OtSolver::Jv, false, seed);
            assert_eq!(x0.to_vec2::<f32>().unwrap(), p0.to_vec2::<f32>().unwrap());
            let set = |x: &Tensor, y: &[u32]| {
                let mut v: Vec<(Vec<u32>, u32)> = x
                    .to_vec2::<f32>()
                    .unwrap()
                    .iter()
                    .zip(y)
                    .map(|(r, &l)| (r.iter().map(|f| f.to_bits()).collect(), l))
                    .collect();
                v.sort();
                v
            };
            assert_eq!(set(&x1, &y), set(&p1, &py.unwrap()));
            // Every target keeps its label (mode of 8gaussians, or 8 = dropped): the pairing
            // moved targets only within their group.
            let (a, _, _) = rows(&x0).unwrap();
            let (b, _, _) = rows(&x1).unwrap();
            for g in 0..=8u32 {
                let idx: Vec<usize> = (0..64).filter(|&i| y[i] == g).collect();
                if idx.len() > 7 {
                    continue;
                }
                // Brute force over the group's assignments (small groups): ours is optimal.
                let cost = |perm: &[usize]| -> f64 {
                    idx.iter()
                        .zip(perm)
                        .map(|(&i, &j)| {
                            (0..2)
                                .map(|k| (a[i * 2 + k] - b[j * 2 + k]).powi(2))
                                .sum::<f64>()
                        })
                        .sum()
                };
                let ours = cost(&idx);
                let mut best = f64::INFINITY;
                permute(&mut idx.clone(), 0, &mut |p| best = best.min(cost(p)));
                assert!(ours <= best + 1e-9, "group {g}: {ours} > {best}");
            }
            // Both solvers give the same pairs.
            let (_, q1, qy) = labeled_batch(OtSolver::Pathfinding, true, seed);
            assert_eq!(x1.to_vec2::<f32>().unwrap(), q1.to_vec2::<f32>().unwrap());
            assert_eq!(Some(y), qy);
        }
    }

    fn permute(v: &mut Vec<usize>, k: usize, f: &mut dyn FnMut(&[usize])) {
        if k == v.len() {
            return f(v);
        }
        for i in k..v.len() {
            v.swap(k, i);
            permute(v, k + 1, f);
            v.swap(k, i);
        }
    }

    #[test]
    fn the_label_drop_follows_its_probability() {
        let g: Arc<dyn Sampler> = Arc::new(Distribution::from_name("gaussian").unwrap());
        let m: Arc<dyn Sampler> = Arc::new(Distribution::from_name("moons").unwrap());
        for drop in [0.0, 0.1, 0.5] {
            let labels = LabelDraw { classes: 2, drop };
            let mut c = CouplingSpec::Independent.build(g.clone(), m.clone(), Some(labels));
            let (_, _, y) = c
                .sample_labeled(20_000, &mut rng_from_seed(1), &Device::Cpu)
                .unwrap();
            let dropped = y.unwrap().iter().filter(|&&l| l == 2).count() as f64 / 20_000.0;
            assert!((dropped - drop).abs() < 0.01, "drop {drop}: {dropped}");
        }
        assert!(validate_label_drop(1.0).is_err() && validate_label_drop(-0.1).is_err());
    }

    #[test]
    fn nan_samples_give_an_error_not_a_hang() {
        let x0 = Tensor::new(&[[0.0f32, 0.0], [1.0, 1.0]], &Device::Cpu).unwrap();
        let x1 = Tensor::new(&[[f32::NAN, 0.0], [1.0, 1.0]], &Device::Cpu).unwrap();
        assert!(matches!(ot_repair(&x0, &x1), Err(LossError::Ot(_))));
    }
}
