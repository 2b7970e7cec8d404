use crate::ReflowError;
use candle_core::{Device, Tensor};
use flowmatch_data::{rng_from_seed, Rng, Sampler};
use flowmatch_losses::{Coupling, Draw, LabelDraw, LossError, Pairing, Pairs};
use flowmatch_models::{label_tensor, Guided, VelocityField};
use flowmatch_solvers::{solve, SolverSpec};
use rand::Rng as _;
use rayon::prelude::*;
use std::sync::Arc;

/// What a conditional teacher is asked for: each pair's class is drawn uniformly from
/// `0..classes`, or is "no label" (`classes`) with probability `drop`, and the teacher samples
/// guided at scale `guidance` towards it. A dropped pair is the teacher's unconditional sample,
/// so the student's "no label" velocity learns the teacher's unconditional flow, and each
/// class's velocity the teacher's guided flow of that class.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TeacherLabels {
    pub draw: LabelDraw,
    pub guidance: f64,
}

impl TeacherLabels {
    /// `n` labels from `rng`: drop or not, then (if kept) the class.
    fn sample(&self, n: usize, rng: &mut Rng) -> Vec<u32> {
        let k = self.draw.classes;
        (0..n)
            .map(|_| {
                if rng.random::<f64>() < self.draw.drop {
                    k as u32
                } else {
                    rng.random_range(0..k) as u32
                }
            })
            .collect()
    }
}

/// The teacher's endpoints from `x0`: plain, or guided towards `y` for a conditional teacher.
fn endpoints(
    teacher: &dyn VelocityField,
    solver: &SolverSpec,
    x0: &Tensor,
    y: Option<(&[u32], f64)>,
) -> Result<Tensor, ReflowError> {
    let x1 = match y {
        None => solve(teacher, x0, solver, false)?.x,
        Some((y, w)) => {
            let guided = Guided::new(teacher, label_tensor(y, x0.device())?, w)?;
            solve(&guided, x0, solver, false)?.x
        }
    };
    Ok(x1.detach())
}

/// Online reflow: every batch draws fresh `x_0` and integrates the teacher to get `x_1'`.
pub struct TeacherCoupling {
    source: Arc<dyn Sampler>,
    teacher: Arc<dyn VelocityField>,
    solver: SolverSpec,
    labels: Option<TeacherLabels>,
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
            labels: None,
        })
    }

    /// The same for a conditional teacher: every pair carries the label it was sampled for
    /// (drawn after its `x_0`; the unconditional draws stay as they were).
    pub fn with_labels(mut self, labels: Option<TeacherLabels>) -> Self {
        self.labels = labels;
        self
    }
}

impl Coupling for TeacherCoupling {
    fn draw(&mut self, batch: usize, rng: &mut Rng, device: &Device) -> Result<Draw, LossError> {
        let x0 = self.source.sample(batch, rng, device)?;
        let y = self.labels.map(|l| l.sample(batch, rng));
        Ok(Draw {
            x0,
            x1: None,
            y,
            u: vec![],
        })
    }

    fn pairing(&self) -> Option<Arc<dyn Pairing>> {
        Some(Arc::new(TeacherPairing {
            teacher: self.teacher.clone(),
            solver: self.solver,
            guidance: self.labels.map_or(1.0, |l| l.guidance),
        }))
    }
}

/// The teacher's integration from the drawn `x_0` (guided towards the drawn labels).
struct TeacherPairing {
    teacher: Arc<dyn VelocityField>,
    solver: SolverSpec,
    guidance: f64,
}

impl Pairing for TeacherPairing {
    fn pair(&self, draw: Draw) -> Result<(Tensor, Tensor), LossError> {
        let (x0, x1, _) = self.pair_labeled(draw)?;
        Ok((x0, x1))
    }

    fn pair_labeled(&self, draw: Draw) -> Result<Pairs, LossError> {
        let y = draw.y.as_deref().map(|y| (y, self.guidance));
        let x1 = endpoints(self.teacher.as_ref(), &self.solver, &draw.x0, y)?;
        Ok((draw.x0, x1, draw.y))
    }
}

/// The teacher of an offline pair set: its field, its solver and, for a conditional teacher,
/// the labels it is asked for.
pub struct Teacher<'a> {
    pub field: &'a dyn VelocityField,
    pub solver: SolverSpec,
    pub labels: Option<TeacherLabels>,
}

/// Offline reflow: a fixed set of teacher pairs; batches are drawn from it with replacement.
pub struct PairSet {
    x0: Tensor,
    x1: Tensor,
    /// The label each pair was sampled for (a conditional teacher).
    y: Option<Vec<u32>>,
}

impl PairSet {
    /// Generates `n` pairs in chunks of `chunk`, the chunks in parallel (each with its own RNG
    /// stream derived from `seed`, so the set does not depend on the thread count).
    pub fn generate(
        source: &dyn Sampler,
        teacher: &Teacher,
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
        teacher.solver.validate()?;
        let starts: Vec<usize> = (0..n).step_by(chunk).collect();
        type Part = (Tensor, Tensor, Option<Vec<u32>>);
        let parts: Result<Vec<Part>, ReflowError> = starts
            .par_iter()
            .enumerate()
            .map(|(k, &start)| {
                let m = chunk.min(n - start);
                let mut rng =
                    rng_from_seed(seed ^ (0x9E37_79B9_7F4A_7C15u64.wrapping_mul(k as u64 + 1)));
                let x0 = source.sample(m, &mut rng, device)?;
                let y = teacher.labels.map(|l| l.sample(m, &mut rng));
                let guided = y.as_deref().zip(teacher.labels.map(|l| l.guidance));
                let x1 = endpoints(teacher.field, &teacher.solver, &x0, guided)?;
                Ok((x0, x1, y))
            })
            .collect();
        let (mut a, mut b, mut labels) = (vec![], vec![], teacher.labels.map(|_| vec![]));
        for (x0, x1, y) in parts? {
            a.push(x0);
            b.push(x1);
            if let (Some(all), Some(y)) = (labels.as_mut(), y) {
                all.extend(y);
            }
        }
        Ok(Self {
            x0: Tensor::cat(&a, 0)?,
            x1: Tensor::cat(&b, 0)?,
            y: labels,
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
        let y = self
            .y
            .as_ref()
            .map(|y| idx.iter().map(|&i| y[i as usize]).collect());
        let idx = Tensor::from_vec(idx, batch, self.x0.device())?;
        let x0 = self.x0.index_select(&idx, 0)?.to_device(device)?;
        let x1 = self.x1.index_select(&idx, 0)?.to_device(device)?;
        Ok(Draw {
            x0,
            x1: Some(x1),
            y,
            u: vec![],
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
        let teacher = Teacher {
            field: t.as_ref(),
            solver: SolverSpec::new(Method::Euler, 10),
            labels: None,
        };
        let a = PairSet::generate(&g, &teacher, 1000, 128, 7, &Device::Cpu).unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let b =
            pool.install(|| PairSet::generate(&g, &teacher, 1000, 128, 7, &Device::Cpu).unwrap());
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
        assert!(PairSet::generate(&g, &teacher, 0, 128, 7, &Device::Cpu).is_err());
    }

    /// A conditional teacher whose velocity is `(y, 1)` for label `y` in 0..2, and `(0, 0)` for
    /// "no label" (2): from `x_0`, one Euler step lands on `x_0 + (y, 1)` (guidance 1), on
    /// `x_0 + w·(y, 1)` (guidance w), and on `x_0` for a dropped label.
    struct Shift;
    impl VelocityField for Shift {
        fn velocity(&self, _x: &Tensor, _t: &Tensor) -> candle_core::Result<Tensor> {
            candle_core::bail!("conditional only")
        }
        fn classes(&self) -> usize {
            2
        }
        fn labeled_velocity(
            &self,
            x: &Tensor,
            _t: &Tensor,
            _h: Option<&Tensor>,
            y: &Tensor,
        ) -> candle_core::Result<Tensor> {
            let y = y.to_vec1::<u32>()?;
            let v: Vec<f32> = y
                .iter()
                .flat_map(|&c| if c == 2 { [0.0, 0.0] } else { [c as f32, 1.0] })
                .collect();
            Tensor::from_vec(v, x.shape(), x.device())
        }
    }

    /// Checks that each pair is `x_0 + w·(y, 1)`, or `x_0` for a dropped label, and returns
    /// the dropped fraction.
    fn check_pairs(x0: &Tensor, x1: &Tensor, y: &[u32], w: f32) -> f64 {
        let (a, b): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (x0.to_vec2().unwrap(), x1.to_vec2().unwrap());
        for ((p, q), &c) in a.iter().zip(&b).zip(y) {
            let want = if c == 2 {
                [0.0, 0.0]
            } else {
                [w * c as f32, w]
            };
            assert!(
                (q[0] - p[0] - want[0]).abs() < 1e-5,
                "label {c}: {p:?} -> {q:?}"
            );
            assert!(
                (q[1] - p[1] - want[1]).abs() < 1e-5,
                "label {c}: {p:?} -> {q:?}"
            );
        }
        y.iter().filter(|&&c| c == 2).count() as f64 / y.len() as f64
    }

    /// Conditional reflow: the pairs carry the labels the teacher sampled for, guided at the
    /// teacher's scale; a dropped label is the teacher's unconditional sample. Online and
    /// offline alike, and the offline set does not depend on the thread count.
    #[test]
    fn conditional_teacher_pairs_carry_their_labels() {
        let g: Arc<dyn Sampler> = Arc::new(Distribution::from_name("gaussian").unwrap());
        let labels = TeacherLabels {
            draw: LabelDraw {
                classes: 2,
                drop: 0.2,
            },
            guidance: 2.0,
        };
        let euler = SolverSpec::new(Method::Euler, 1);
        let mut c = TeacherCoupling::new(g.clone(), Arc::new(Shift), euler)
            .unwrap()
            .with_labels(Some(labels));
        let (x0, x1, y) = c
            .sample_labeled(4000, &mut rng_from_seed(3), &Device::Cpu)
            .unwrap();
        let y = y.expect("labels");
        let dropped = check_pairs(&x0, &x1, &y, 2.0);
        assert!((dropped - 0.2).abs() < 0.03, "dropped {dropped}");
        assert!(y.contains(&0) && y.contains(&1));
        // The unconditional coupling draws the same x_0 (labels come after them).
        let mut plain = TeacherCoupling::new(g.clone(), Arc::new(Shift), euler).unwrap();
        let d = plain
            .draw(4000, &mut rng_from_seed(3), &Device::Cpu)
            .unwrap();
        assert_eq!(d.x0.to_vec2::<f32>().unwrap(), x0.to_vec2::<f32>().unwrap());

        let teacher = Teacher {
            field: &Shift,
            solver: euler,
            labels: Some(labels),
        };
        let set = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| PairSet::generate(g.as_ref(), &teacher, 1000, 128, 7, &Device::Cpu))
                .unwrap()
        };
        let mut a = set(1);
        let b = set(2);
        assert_eq!(a.y, b.y);
        assert_eq!(
            a.pairs().1.to_vec2::<f32>().unwrap(),
            b.pairs().1.to_vec2::<f32>().unwrap()
        );
        let all_y = a.y.clone().unwrap();
        check_pairs(a.pairs().0, a.pairs().1, &all_y, 2.0);
        let (x0, x1, y) = a
            .sample_labeled(500, &mut rng_from_seed(1), &Device::Cpu)
            .unwrap();
        check_pairs(&x0, &x1, &y.unwrap(), 2.0);
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
            score: false,
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
