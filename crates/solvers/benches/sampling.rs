//! Sampling 10,000 points through the lesson's VelocityMLP (h = 128): 100 Euler steps and
//! 20 RK4 steps, one candle thread. `scripts/bench.sh` compares these with PyTorch.

use candle_core::Device;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use criterion::{criterion_group, criterion_main, Criterion};
use flowmatch_data::{rng_from_seed, Distribution, Sampler};
use flowmatch_models::{activation::Activation, ModelSpec};
use flowmatch_solvers::{solve, Method, SolverSpec};

fn sampling(c: &mut Criterion) {
    let spec = ModelSpec::VelocityMlp {
        hidden: 128,
        layers: 3,
        activation: Activation::Silu,
        span: false,
        score: false,
        classes: 0,
    };
    let model = spec.build(2, 0, &Device::Cpu).unwrap();
    let x0 = Distribution::from_name("gaussian")
        .unwrap()
        .sample(10_000, &mut rng_from_seed(0), &Device::Cpu)
        .unwrap();
    let mut group = c.benchmark_group("sample");
    group.sample_size(10);
    for (name, method, steps) in [
        ("euler100", Method::Euler, 100),
        ("rk4_20", Method::Rk4, 20),
    ] {
        let spec = SolverSpec::new(method, steps);
        group.bench_function(name, |b| {
            b.iter(|| solve(&model, &x0, &spec, false).unwrap())
        });
    }
    group.finish();
}

fn config() -> Criterion {
    std::env::set_var("RAYON_NUM_THREADS", "1");
    Criterion::default()
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(5))
}

criterion_group! { name = benches; config = config(); targets = sampling }
criterion_main!(benches);
