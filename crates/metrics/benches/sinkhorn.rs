//! Log-domain Sinkhorn at n = 4096, ε = 0.05 × the mean cost, 100 iterations (issue 31's speed
//! check; POT's `ot.sinkhorn(…, method="sinkhorn_log", numItermax=100)` is the reference).

use criterion::{criterion_group, criterion_main, Criterion};
use flowmatch_metrics::{sinkhorn_log, sinkhorn_stabilized};

fn sinkhorn(c: &mut Criterion) {
    let n = 4096;
    let pt = |k: usize, s: f64| {
        (
            (k as f64 * 0.37 + s).sin() * 2.0,
            (k as f64 * 0.71 + s).cos(),
        )
    };
    let cost: Vec<f64> = (0..n * n)
        .map(|k| {
            let (p, q) = (pt(k / n, 0.0), pt(k % n, 1.3));
            (p.0 - q.0).powi(2) + (p.1 - q.1).powi(2)
        })
        .collect();
    let mean = cost.iter().sum::<f64>() / cost.len() as f64;
    let w = vec![1.0 / n as f64; n];
    let mut group = c.benchmark_group("sinkhorn");
    group.sample_size(10);
    group.bench_function("n4096_eps0.05_100iter", |b| {
        b.iter(|| sinkhorn_log(&w, &w, &cost, 0.05 * mean, 0.0, 100).unwrap())
    });
    group.bench_function("stabilized_n4096_eps0.05_100iter", |b| {
        b.iter(|| sinkhorn_stabilized(&w, &w, &cost, 0.05 * mean, 0.0, 100).unwrap())
    });
    let small = 1024;
    let cost_small: Vec<f64> = (0..small * small)
        .map(|k| {
            let (p, q) = (pt(k / small, 0.0), pt(k % small, 1.3));
            (p.0 - q.0).powi(2) + (p.1 - q.1).powi(2)
        })
        .collect();
    let w_small = vec![1.0 / small as f64; small];
    group.bench_function("n1024_eps0.05_20iter", |b| {
        b.iter(|| sinkhorn_log(&w_small, &w_small, &cost_small, 0.05 * mean, 0.0, 20).unwrap())
    });
    group.bench_function("stabilized_n1024_eps0.05_20iter", |b| {
        b.iter(|| {
            sinkhorn_stabilized(&w_small, &w_small, &cost_small, 0.05 * mean, 0.0, 20).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, sinkhorn);
criterion_main!(benches);
