//! `flowmatch bench`: the blog's training step at a large batch and sampling many points, to
//! measure a device (steps/s and points/s).

use anyhow::{anyhow, Result};
use candle_core::Device;
use flowmatch_data::{rng_from_seed, Distribution, Sampler};
use flowmatch_losses::{AffinePath, Independent, OptimConfig, Schedule, TimeSampler, Trainer};
use flowmatch_models::{activation::Activation, ModelSpec};
use flowmatch_solvers::{solve, Method, SolverSpec};
use std::sync::Arc;
use std::time::Instant;

/// What to measure.
#[derive(Debug, Clone, Copy)]
pub struct BenchSpec {
    pub batch: usize,
    pub steps: usize,
    pub points: usize,
    pub sample_steps: usize,
}

impl BenchSpec {
    /// Refuses sizes whose memory is over a run's default `limits.memory_gb`, naming the flag
    /// behind the largest term (as a run's config is checked).
    pub fn check_memory(&self, model: &ModelSpec) -> Result<()> {
        use crate::limits::{activations_per_sample, grid_bytes, human, over_default_limit};
        let terms = [
            (
                self.batch as f64 * (activations_per_sample(model, 2.0) + 16.0) * 4.0,
                "--batch",
            ),
            (self.points as f64 * 2.0 * 4.0 * 4.0, "--points"),
            (grid_bytes(self.sample_steps), "--sample-steps"),
        ];
        match over_default_limit(&terms) {
            Some((flag, need, limit)) => Err(anyhow!(
                "{flag}: this benchmark would need about {} of memory, over the {} a run may use (limits.memory_gb); lower it",
                human(need),
                human(limit)
            )),
            None => Ok(()),
        }
    }
}

/// What was measured.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub train_seconds: f64,
    pub last_loss: f32,
    pub sample_seconds: f64,
    pub values: usize,
}

impl BenchReport {
    /// The two result lines, as `flowmatch bench` prints them.
    pub fn lines(&self, spec: &BenchSpec) -> [String; 2] {
        let (t, s) = (self.train_seconds, self.sample_seconds);
        [
            format!(
                "train: VelocityNet h=64, batch {}: {:.2} steps/s ({:.2} ms/step, {:.3e} samples/s), loss {:.4}",
                spec.batch,
                spec.steps as f64 / t,
                1e3 * t / spec.steps as f64,
                (spec.steps * spec.batch) as f64 / t,
                self.last_loss
            ),
            format!(
                "sample: {} points, Euler {} steps: {:.3} s ({:.3e} points/s), {} values",
                spec.points,
                spec.sample_steps,
                s,
                spec.points as f64 / s,
                self.values
            ),
        ]
    }
}

/// Trains the blog's VelocityNet (h = 64, GELU) on gaussian → spiral for `spec.steps` steps
/// after one warm-up step, then samples `spec.points` points with Euler.
pub fn run(spec: &BenchSpec, device: &Device) -> Result<BenchReport> {
    if spec.batch == 0 || spec.steps == 0 || spec.points == 0 || spec.sample_steps == 0 {
        return Err(anyhow!(
            "bench: batch, steps, points and sample-steps must be positive"
        ));
    }
    let model = ModelSpec::VelocityNet {
        hidden: 64,
        activation: Activation::Gelu,
        span: false,
        score: false,
        classes: 0,
    };
    spec.check_memory(&model)?;
    let g: Arc<dyn Sampler> = Arc::new(Distribution::from_name("gaussian")?);
    let t: Arc<dyn Sampler> = Arc::new(Distribution::from_name("spiral")?);
    let mut trainer = Trainer::new(
        model.build(2, 0, device)?,
        Box::new(AffinePath::new(Schedule::Linear, 0.0)?),
        Box::new(Independent::new(g.clone(), t)),
        TimeSampler::Uniform,
        spec.batch,
        OptimConfig {
            lr: 3e-3,
            ..Default::default()
        },
    )?;
    let mut rng = rng_from_seed(0);
    trainer.step(&mut rng)?; // warm-up (kernel loading, allocator)
    let started = Instant::now();
    let mut last_loss = 0.0;
    for _ in 0..spec.steps {
        last_loss = trainer.step(&mut rng)?;
    }
    let train_seconds = started.elapsed().as_secs_f64();
    let model = trainer.into_model();
    let x0 = g.sample(spec.points, &mut rng, device)?;
    let started = Instant::now();
    let sol = solve(
        &model,
        &x0,
        &SolverSpec::new(Method::Euler, spec.sample_steps),
        false,
    )?;
    let x = sol.x.to_device(&Device::Cpu)?; // waits for the device
    Ok(BenchReport {
        train_seconds,
        last_loss,
        sample_seconds: started.elapsed().as_secs_f64(),
        values: x.elem_count(),
    })
}
