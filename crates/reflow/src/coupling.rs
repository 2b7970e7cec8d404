use crate::ReflowError;
use candle_core::{Device, Tensor};
use flowmatch_data::{rng_from_seed, Rng, Sampler};
use flowmatch_losses::{Coupling, Draw, LossError, Pairing};
use flowmatch_models::VelocityField;
use flowmatch_solvers::{solve, SolverSpec};
use rand::Rng as _;
use rayon::prelude::*;
use std::sync::Arc;

/// Online reflow: every batch draws fresh `x_0` and integrates the teacher to get `x_1'`.
pub struct TeacherCoupling {
    source: Arc<dyn Sampler>,
    teacher: Arc<dyn VelocityField>,
    solver: SolverSpec,
}

impl TeacherCoupling {
    /// Pairs `x_0 ~ source` with the teacher's endpoint under `solver`.
    pub fn new(
        source: Arc<dyn Sampler>,
        teacher: Arc<dyn VelocityField>,
        solver: SolverSpec,
    ) -> Result<Self, ReflowError> {
        solver.validate()?;
        Ok(Self {
            source,
            teacher,
            solver,
        })
    }
}

impl Coupling for TeacherCoupling {
    fn draw(&mut self, batch: usize, rng: &mut Rng, device: &Device) -> Result<Draw, LossError> {
        let x0 = self.source.sample(batch, rng, device)?;
        Ok(Draw {
            x0,
            x1: None,
            y: None,
        })
    }

    fn pairing(&self) -> Option<Arc<dyn Pairing>> {
        Some(Arc::new(TeacherPairing {
            teacher: self.teacher.clone(),
            solver: self.solver,
        }))
    }
}

/// The teacher's integration from the drawn `x_0`.
struct TeacherPairing {
    teacher: Arc<dyn VelocityField>,
    solver: SolverSpec,
}

impl Pairing for TeacherPairing {
    fn pair(&self, draw: Draw) -> Result<(Tensor, Tensor), LossError> {
        let x1 = solve(self.teacher.as_ref(), &draw.x0, &self.solver, false)?
            .x
            .detach();
        Ok((draw.x0, x1))
    }
}

/// Offline reflow: a fixed set of teacher pairs; batches are drawn from it with replacement.
pub struct PairSet {
    x0: Tensor,
    x1: Tensor,
}

impl PairSet {
    /// Generates `n` pairs in chunks of `chunk`, the chunks in parallel (each with its own RNG
    /// stream derived from `seed`, so the set does not depend on the thread count).
    pub fn generate(
        source: &dyn Sampler,
        teacher: &dyn VelocityField,
        solver: &SolverSpec,
        n: usize,
        chunk: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self, ReflowError> {
        if n == 0 || chunk == 0 {
            return Err(ReflowError::Invalid(
                "pair count and chunk size must be at least 1".into(),
            ));
        }
        solver.validate()?;
        let starts: Vec<usize> = (0..n).step_by(chunk).collect();
        let parts: Result<Vec<(Tensor, Tensor)>, ReflowError> = starts
            .par_iter()
            .enumerate()
            .map(|(k, &start)| {
                let m = chunk.min(n - start);
                let mut rng =
                    rng_from_seed(seed ^ (0x9E37_79B9_7F4A_7C15u64.wrapping_mul(k as u64 + 1)));
                let x0 = source.sample(m, &mut rng, device)?;
                let x1 = solve(teacher, &x0, solver, false)?.x.detach();
                Ok((x0, x1))
            })
            .collect();
        let (a, b): (Vec<Tensor>, Vec<Tensor>) = parts?.into_iter().unzip();
        Ok(Self {
            x0: Tensor::cat(&a, 0)?,
            x1: Tensor::cat(&b, 0)?,
        })
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.x0.dim(0).unwrap_or(0)
    }

    /// Whether the set is empty (never, once built).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The source points and their teacher endpoints.
    pub fn pairs(&self) -> (&Tensor, &Tensor) {
        (&self.x0, &self.x1)
    }
}

impl Coupling for PairSet {
    fn draw(&mut self, batch: usize, rng: &mut Rng, device: &Device) -> Result<Draw, LossError> {
        let n = self.len();
        let idx: Vec<u32> = (0..batch).map(|_| rng.random_range(0..n) as u32).collect();
        let idx = Tensor::from_vec(idx, batch, self.x0.device())?;
        let x0 = self.x0.index_select(&idx, 0)?.to_device(device)?;
        let x1 = self.x1.index_select(&idx, 0)?.to_device(device)?;
        Ok(Draw {
            x0,
            x1: Some(x1),
            y: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowmatch_data::Distribution;
    use flowmatch_losses::{AffinePath, OptimConfig, Schedule, TimeSampler, Trainer};
    use flowmatch_metrics::{rf_straightness, straightness};
    use flowmatch_models::{activation::Activation, FnField, ModelSpec};
    use flowmatch_solvers::Method;

    /// A curved teacher: rotation by π/2 over [0, 1] (dx/dt = (π/2)·J x).
    fn rotation() -> Arc<dyn VelocityField> {
        Arc::new(FnField(|x: &Tensor, _t: &Tensor| {
            let a = x.narrow(1, 0, 1)?;
            let b = x.narrow(1, 1, 1)?;
            Tensor::cat(&[b.neg()?, a], 1)?.affine(std::f64::consts::FRAC_PI_2, 0.0)
        }))
    }

    #[test]
    fn teacher_pairs_are_the_teacher_endpoints() {
        let g: Arc<dyn Sampler> = Arc::new(Distribution::from_name("gaussian").unwrap());
        let mut c = TeacherCoupling::new(g, rotation(), SolverSpec::new(Method::Rk4, 20)).unwrap();
        let (x0, x1) = c.sample(64, &mut rng_from_seed(0), &Device::Cpu).unwrap();
        let (a, b): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (x0.to_vec2().unwrap(), x1.to_vec2().unwrap());
        for (p, q) in a.iter().zip(&b) {
            // A quarter turn: (x, y) -> (-y, x).
            assert!((q[0] + p[1]).abs() < 1e-4 && (q[1] - p[0]).abs() < 1e-4);
        }
    }

    #[test]
    fn offline_set_does_not_depend_on_threads_and_samples_from_itself() {
        let g = Distribution::from_name("gaussian").unwrap();
        let t = rotation();
        let solver = SolverSpec::new(Method::Euler, 10);
        let a = PairSet::generate(&g, t.as_ref(), &solver, 1000, 128, 7, &Device::Cpu).unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let b = pool.install(|| {
            PairSet::generate(&g, t.as_ref(), &solver, 1000, 128, 7, &Device::Cpu).unwrap()
        });
        assert_eq!(a.len(), 1000);
        assert_eq!(
            a.pairs().1.to_vec2::<f32>().unwrap(),
            b.pairs().1.to_vec2::<f32>().unwrap()
        );
        let mut a = a;
        let (x0, _) = a.sample(5, &mut rng_from_seed(1), &Device::Cpu).unwrap();
        let all: Vec<Vec<f32>> = a.pairs().0.to_vec2().unwrap();
        for row in x0.to_vec2::<f32>().unwrap() {
            assert!(all.contains(&row));
        }
        assert!(PairSet::generate(&g, t.as_ref(), &solver, 0, 128, 7, &Device::Cpu).is_err());
    }

    /// Reflow straightens a curved teacher: a student trained on its pairs has straighter
    /// paths (both measures) than the teacher.
    #[test]
    fn student_of_a_curved_teacher_is_straighter() {
        let g: Arc<dyn Sampler> = Arc::new(Distribution::from_name("gaussian").unwrap());
        let teacher = rotation();
        let measure = |f: &dyn VelocityField| {
            let x0 = g.sample(300, &mut rng_from_seed(99), &Device::Cpu).unwrap();
            let sol = solve(f, &x0, &SolverSpec::new(Method::Euler, 50), true).unwrap();
            let tr = sol.trajectory.unwrap();
            (
                straightness(&tr).unwrap(),
                rf_straightness(&tr, &sol.times).unwrap(),
            )
        };
        let coupling =
            TeacherCoupling::new(g.clone(), teacher.clone(), SolverSpec::new(Method::Rk4, 8))
                .unwrap();
        let model = ModelSpec::VelocityMlp {
            hidden: 64,
            layers: 2,
            activation: Activation::Silu,
            span: false,
            classes: 0,
        }
        .build(2, 0, &Device::Cpu)
        .unwrap();
        let mut tr = Trainer::new(
            model,
            Box::new(AffinePath::new(Schedule::Linear, 0.0).unwrap()),
            Box::new(coupling),
            TimeSampler::Uniform,
            256,
            OptimConfig {
                lr: 3e-3,
                ..Default::default()
            },
        )
        .unwrap();
        let mut rng = rng_from_seed(2);
        for _ in 0..400 {
            tr.step(&mut rng).unwrap();
        }
        let (s_t, rf_t) = measure(teacher.as_ref());
        let (s_s, rf_s) = measure(tr.model());
        assert!(s_t < 0.91, "teacher straightness {s_t}");
        assert!(s_s > 0.97 && s_s > s_t, "student {s_s} vs teacher {s_t}");
        assert!(rf_s < 0.2 * rf_t, "S: student {rf_s} vs teacher {rf_t}");
    }
}
