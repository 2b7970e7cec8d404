//! One training step of each seed config, and the exact OT assignment at n = 256, 512, 1024
//! with both solvers (`loss.ot_solver`: ours, `jv`, and `pathfinding`'s Kuhn–Munkres).
//!
//! candle runs single-threaded here (RAYON_NUM_THREADS=1), as flowmatch runs small models;
//! `scripts/bench.sh` compares these figures with PyTorch on the same machine.

use candle_core::Device;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use criterion::{criterion_group, criterion_main, Criterion};
use flowmatch_data::{rng_from_seed, Distribution, Sampler};
use flowmatch_losses::{
    AffinePath, Coupling, Independent, MinibatchOt, OptimConfig, Schedule, TimeSampler, Trainer,
};
use flowmatch_metrics::ot::{sq_cost_matrix, OtSolver};
use flowmatch_models::{activation::Activation, ModelSpec};
use std::sync::Arc;

fn trainer(
    spec: ModelSpec,
    target: &str,
    batch: usize,
    lr: f64,
    ot: bool,
    prefetch: bool,
) -> Trainer {
    let g: Arc<dyn Sampler> = Arc::new(Distribution::from_name("gaussian").unwrap());
    let t: Arc<dyn Sampler> = Arc::new(Distribution::from_name(target).unwrap());
    let coupling: Box<dyn Coupling> = if ot {
        Box::new(MinibatchOt::new(g, t))
    } else {
        Box::new(Independent::new(g, t))
    };
    let model = spec.build(2, 0, &Device::Cpu).unwrap();
    let path = Box::new(AffinePath::new(Schedule::Linear, 0.0).unwrap());
    Trainer::new(
        model,
        path,
        coupling,
        TimeSampler::Uniform,
        batch,
        OptimConfig {
            lr,
            ..Default::default()
        },
    )
    .unwrap()
    .with_prefetch(prefetch)
}

/// The lesson's VelocityMLP (h = 128, 3 layers, SiLU).
fn lesson() -> ModelSpec {
    ModelSpec::VelocityMlp {
        hidden: 128,
        layers: 3,
        activation: Activation::Silu,
        span: false,
        score: false,
        classes: 0,
    }
}

fn train_steps(c: &mut Criterion) {
    let cases = [
        (
            "blog_velocitynet_h64_b2048",
            ModelSpec::VelocityNet {
                hidden: 64,
                activation: Activation::Gelu,
                span: false,
                score: false,
                classes: 0,
            },
            "spiral",
            2048,
            3e-3,
            false,
            false,
        ),
        (
            "lesson_velocitymlp_h128_b256",
            lesson(),
            "moons",
            256,
            1e-3,
            false,
            false,
        ),
        // As `flowmatch run` trains: the next batch's assignment on a second thread.
        (
            "lesson_otcfm_h128_b256",
            lesson(),
            "moons",
            256,
            1e-3,
            true,
            true,
        ),
        // Everything on the one thread (`train.prefetch = false`).
        (
            "lesson_otcfm_h128_b256_serial",
            lesson(),
            "moons",
            256,
            1e-3,
            true,
            false,
        ),
    ];
    let mut group = c.benchmark_group("train_step");
    for (name, spec, target, batch, lr, ot, prefetch) in cases {
        let mut tr = trainer(spec, target, batch, lr, ot, prefetch);
        let mut rng = rng_from_seed(0);
        if tr.prefetches() {
            // As the binary runs a prefetching step: on the calling thread.
            group.bench_function(name, |b| b.iter(|| tr.step(&mut rng).unwrap()));
            continue;
        }
        // As the binary runs the other steps (experiments' `runtime::on_pool`): on a worker of
        // rayon's pool, so the ops' parallel loops run from it instead of waking a worker and
        // sleeping at every op. (A prefetching step must not: it waits on a thread whose ops
        // need the pool.)
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rayon::scope(|_| {
                    let t = std::time::Instant::now();
                    for _ in 0..iters {
                        tr.step(&mut rng).unwrap();
                    }
                    t.elapsed()
                })
            })
        });
    }
    group.finish();
}

fn hungarian(c: &mut Criterion) {
    for n in [256usize, 512, 1024] {
        let mut rng = rng_from_seed(n as u64);
        let a: Vec<f64> = Distribution::from_name("gaussian")
            .unwrap()
            .sample_vec(n, &mut rng)
            .iter()
            .map(|&x| x as f64)
            .collect();
        let b: Vec<f64> = Distribution::from_name("moons")
            .unwrap()
            .sample_vec(n, &mut rng)
            .iter()
            .map(|&x| x as f64)
            .collect();
        let cost = sq_cost_matrix(&a, &b, 2);
        let mut group = c.benchmark_group("hungarian");
        group.sample_size(10);
        group.bench_function(format!("n{n}"), |bch| {
            bch.iter(|| OtSolver::Jv.assign(&cost, n).unwrap())
        });
        group.bench_function(format!("pathfinding_n{n}"), |bch| {
            bch.iter(|| OtSolver::Pathfinding.assign(&cost, n).unwrap())
        });
        group.finish();
    }
}

fn config() -> Criterion {
    std::env::set_var("RAYON_NUM_THREADS", "1");
    Criterion::default()
        .sample_size(30)
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(3))
}

criterion_group! { name = benches; config = config(); targets = train_steps, hungarian }
criterion_main!(benches);
