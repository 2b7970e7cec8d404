//! How source and target samples are paired for one training batch.

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

    /// Draws `batch` pairs on `device`: both stages, here.
    fn sample(
        &mut self,
        batch: usize,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<(Tensor, Tensor), LossError> {
        let draw = self.draw(batch, rng, device)?;
        match self.pairing() {
            Some(p) => p.pair(draw),
            None => draw.into_pairs(),
        }
    }
}

/// A drawn batch before pairing: `x1` is absent where the pairing makes it (reflow's teacher).
pub struct Draw {
    /// Source points.
    pub x0: Tensor,
    /// Target points, when drawn.
    pub x1: Option<Tensor>,
}

impl Draw {
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
}

/// Independent pairing: `x_0 ~ p_0`, `x_1 ~ p_1` drawn separately (I-CFM, the seeds' default).
pub struct Independent {
    source: Arc<dyn Sampler>,
    target: Arc<dyn Sampler>,
}

impl Independent {
    /// Pairs draws from `source` and `target` at random.
    pub fn new(source: Arc<dyn Sampler>, target: Arc<dyn Sampler>) -> Self {
        Self { source, target }
    }
}

impl Coupling for Independent {
    fn draw(&mut self, batch: usize, rng: &mut Rng, device: &Device) -> Result<Draw, LossError> {
        let x0 = self.source.sample(batch, rng, device)?;
        let x1 = self.target.sample(batch, rng, device)?;
        Ok(Draw { x0, x1: Some(x1) })
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
}

/// A coupling chosen by name, with its settings: a new coupling is one variant here (with its
/// settings in [`CouplingOptions`], its label and its check) and one [`Coupling`] impl; the
/// config adds its keys. (Reflow's teacher couplings are built by the reflow stages.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CouplingSpec {
    /// Independent pairs (I-CFM).
    Independent,
    /// Exact minibatch OT (OT-CFM) with its assignment solver.
    Ot { solver: OtSolver },
}

/// The settings of every coupling (each kind reads its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CouplingOptions {
    /// The exact assignment's solver (OT).
    pub ot_solver: OtSolver,
}

impl CouplingSpec {
    /// The spec of `kind` with its settings.
    pub fn of(kind: CouplingKind, o: CouplingOptions) -> Self {
        match kind {
            CouplingKind::Independent => Self::Independent,
            CouplingKind::Ot => Self::Ot {
                solver: o.ot_solver,
            },
        }
    }

    /// Checks the settings; an error names the field of [`CouplingOptions`].
    pub fn validate(&self) -> Result<(), LossError> {
        match self {
            Self::Independent | Self::Ot { .. } => Ok(()),
        }
    }

    /// The spec whose [`label`](Self::label) is `s`.
    pub fn from_label(s: &str) -> Option<Self> {
        let ot = |solver| Self::Ot { solver };
        match s {
            "independent" => Some(Self::Independent),
            "ot" => Some(ot(OtSolver::Jv)),
            "ot-pathfinding" => Some(ot(OtSolver::Pathfinding)),
            _ => None,
        }
    }

    /// The coupling, pairing draws from `source` and `target`.
    pub fn build(self, source: Arc<dyn Sampler>, target: Arc<dyn Sampler>) -> Box<dyn Coupling> {
        match self {
            Self::Independent => Box::new(Independent::new(source, target)),
            Self::Ot { solver } => Box::new(MinibatchOt::new(source, target).with_solver(solver)),
        }
    }

    /// The coupling's name in summaries: `independent`, `ot`, `ot-pathfinding` (read back
    /// by [`from_label`](Self::from_label)).
    pub fn label(self) -> String {
        match self {
            Self::Independent => "independent",
            Self::Ot {
                solver: OtSolver::Jv,
            } => "ot",
            Self::Ot {
                solver: OtSolver::Pathfinding,
            } => "ot-pathfinding",
        }
        .to_string()
    }

    /// Whether batches pair by optimal transport (the batch² cost matrix, for estimates).
    pub fn is_ot(self) -> bool {
        matches!(self, Self::Ot { .. })
    }
}

/// Exact minibatch optimal transport (Tong et al. 2023, OT-CFM): re-pairs an independent
/// batch by the exact assignment on squared Euclidean costs.
pub struct MinibatchOt {
    inner: Independent,
    solver: OtSolver,
}

impl MinibatchOt {
    /// OT re-pairing of draws from `source` and `target` (our solver).
    pub fn new(source: Arc<dyn Sampler>, target: Arc<dyn Sampler>) -> Self {
        Self {
            inner: Independent::new(source, target),
            solver: OtSolver::Jv,
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
        Some(Arc::new(OtPairing(self.solver)))
    }
}

/// The assignment re-pairing of [`MinibatchOt`].
struct OtPairing(OtSolver);

impl Pairing for OtPairing {
    fn pair(&self, draw: Draw) -> Result<(Tensor, Tensor), LossError> {
        let (x0, x1) = draw.into_pairs()?;
        let x1 = ot_repair_with(self.0, &x0, &x1)?;
        Ok((x0, x1))
    }
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
                CouplingSpec::Ot { solver }
                    .build(g.clone(), m.clone())
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
        ] {
            assert_eq!(CouplingSpec::from_label(&c.label()), Some(c));
        }
    }

    #[test]
    fn nan_samples_give_an_error_not_a_hang() {
        let x0 = Tensor::new(&[[0.0f32, 0.0], [1.0, 1.0]], &Device::Cpu).unwrap();
        let x1 = Tensor::new(&[[f32::NAN, 0.0], [1.0, 1.0]], &Device::Cpu).unwrap();
        assert!(matches!(ot_repair(&x0, &x1), Err(LossError::Ot(_))));
    }
}
