//! One forward + backward pass of the image U-Nets on an MNIST-sized batch (64 × 1 × 28 × 28),
//! and the two pieces that dominate it: a 3×3 conv and GroupNorm + SiLU.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, Criterion};
use flowmatch_models::{ModelSpec, VelocityField};

fn unets(c: &mut Criterion) {
    // As the flowmatch binary runs (experiments/src/main.rs keep_freed_memory): mimalloc keeps
    // freed memory (option 15, purge_delay = -1) instead of faulting it in again every step.
    unsafe { libmimalloc_sys::mi_option_set(15, -1) }
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (64, 784), &dev).unwrap();
    let t = Tensor::rand(0f32, 1.0, 64, &dev).unwrap();
    let mut group = c.benchmark_group("unet_fwd_bwd_b64");
    group.sample_size(10);
    for (name, spec) in [
        (
            "unet_h16",
            ModelSpec::UNet {
                hidden: 16,
                mults: flowmatch_models::UNET_MULTS,
                attention: false,
                span: false,
                classes: 0,
            },
        ),
        (
            "unet_lesson_h32",
            ModelSpec::UNetLesson {
                hidden: 32,
                span: false,
                classes: 0,
            },
        ),
    ] {
        let model = spec.build(784, 0, &dev).unwrap();
        group.bench_function(name, |b| {
            b.iter(|| {
                let v = model.velocity(&x, &t).unwrap();
                v.sqr().unwrap().mean_all().unwrap().backward().unwrap()
            })
        });
    }
    group.finish();
}

/// One forward + backward of `conv` on `x`.
fn conv_step(conv: &flowmatch_models::conv::Conv, x: &Var) -> candle_core::backprop::GradStore {
    conv.forward(x.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
}

fn pieces(c: &mut Criterion) {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (64, 16, 28, 28), &dev).unwrap()).unwrap();
    let mut p = flowmatch_models::Params::new(0, &dev);
    let conv = p.conv("c", 16, 16, 3, 1, 1).unwrap();
    let gn = p.group_norm_silu("g", 8, 16).unwrap();
    let mut group = c.benchmark_group("unet_pieces_b64_c16_28x28");
    group.sample_size(10);
    group.bench_function("conv3x3_fwd_bwd", |b| b.iter(|| conv_step(&conv, &x)));
    group.bench_function("groupnorm_silu_fwd_bwd", |b| {
        b.iter(|| {
            let y = gn.forward(x.as_tensor()).unwrap();
            y.sum_all().unwrap().backward().unwrap()
        })
    });
    group.finish();
}

/// A 3×3 conv forward + backward at batch 64 for each of the U-Nets' (channels, side), by the
/// unfolded gemm and by Winograd F(2×2, 3×3), side by side.
fn conv_kernels(c: &mut Criterion) {
    let dev = Device::Cpu;
    let mut group = c.benchmark_group("conv3x3_b64");
    group.sample_size(10);
    for (ch, side) in [(16, 28), (32, 28), (32, 14), (64, 14), (64, 7), (128, 7)] {
        let x = Tensor::randn(0f32, 1.0, (64, ch, side, side), &dev).unwrap();
        let x = Var::from_tensor(&x).unwrap();
        let mut p = flowmatch_models::Params::new(0, &dev);
        let conv = p.conv("c", ch, ch, 3, 1, 1).unwrap();
        // Winograd on the even sides, the direct kernel on 7×7 (both on the padded layout).
        group.bench_function(format!("c{ch}_{side}x{side}_padded"), |b| {
            b.iter(|| conv_step(&conv, &x))
        });
    }
    group.finish();
}

/// The lesson U-Net's two up-convolutions (k 4, stride 2, padding 1), forward + backward at
/// batch 64.
fn conv_transposes(c: &mut Criterion) {
    let dev = Device::Cpu;
    let mut group = c.benchmark_group("conv_transpose_b64");
    group.sample_size(10);
    for (ci, co, side) in [(64, 64, 7), (128, 32, 14)] {
        let x = Tensor::randn(0f32, 1.0, (64, ci, side, side), &dev).unwrap();
        let x = Var::from_tensor(&x).unwrap();
        let mut p = flowmatch_models::Params::new(0, &dev);
        let up = p.conv_transpose("u", ci, co, 4, 2, 1).unwrap();
        group.bench_function(format!("c{ci}_to_c{co}_{side}x{side}"), |b| {
            b.iter(|| {
                let y = up.forward(x.as_tensor()).unwrap();
                y.sum_all().unwrap().backward().unwrap()
            })
        });
    }
    group.finish();
}

/// Each layer of the lesson U-Net (hidden 32) on its own, forward + backward at batch 64: where
/// its step's time goes, layer by layer, to set beside PyTorch's.
fn lesson_layers(c: &mut Criterion) {
    let dev = Device::Cpu;
    let mut group = c.benchmark_group("lesson_layers_b64");
    group.sample_size(10);
    // (name, in, out, kernel, stride, side of the input, transposed)
    for (name, ci, co, k, s, side, up) in [
        ("enc1_c1_to_c32_28", 1, 32, 3, 1, 28, false),
        ("enc2_c32_to_c64_28s2", 32, 64, 3, 2, 28, false),
        ("enc3_c64_to_c64_14s2", 64, 64, 3, 2, 14, false),
        ("dec3_c64_to_c64_7up", 64, 64, 4, 2, 7, true),
        ("dec2_c128_to_c32_14up", 128, 32, 4, 2, 14, true),
        ("dec1_c64_to_c1_28", 64, 1, 3, 1, 28, false),
    ] {
        let x = Tensor::randn(0f32, 1.0, (64, ci, side, side), &dev).unwrap();
        let x = Var::from_tensor(&x).unwrap();
        let mut p = flowmatch_models::Params::new(0, &dev);
        if up {
            let op = p.conv_transpose("u", ci, co, k, s, 1).unwrap();
            group.bench_function(name, |b| {
                b.iter(|| {
                    let y = op.forward(x.as_tensor()).unwrap();
                    y.sum_all().unwrap().backward().unwrap()
                })
            });
        } else {
            let conv = p.conv("c", ci, co, k, s, 1).unwrap();
            group.bench_function(name, |b| b.iter(|| conv_step(&conv, &x)));
        }
    }
    group.finish();
}

/// This core's matrix-product ceiling: one 512³ f32 product with the `gemm` crate the
/// convolutions use (2·512³ flops; `scripts/bench.sh` reports it in GFLOP/s).
fn gemm_ceiling(c: &mut Criterion) {
    let n = 512;
    let a = vec![0.5f32; n * n];
    let b = vec![0.25f32; n * n];
    let mut d = vec![0f32; n * n];
    let mut group = c.benchmark_group("gemm_ceiling");
    group.sample_size(20);
    group.bench_function("sgemm_512", |bench| {
        bench.iter(|| {
            // SAFETY: three n×n row-major buffers, strides within them.
            unsafe {
                gemm::gemm(
                    n,
                    n,
                    n,
                    d.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    1,
                    n as isize,
                    b.as_ptr(),
                    1,
                    n as isize,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            }
        })
    });
    group.finish();
}

fn config() -> Criterion {
    std::env::set_var("RAYON_NUM_THREADS", "1");
    Criterion::default()
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(4))
}

criterion_group! { name = benches; config = config(); targets = unets, pieces, conv_kernels, conv_transposes, lesson_layers, gemm_ceiling }
// As the flowmatch binary runs a training step (experiments' `runtime::on_pool`): on a worker
// of rayon's pool, so the ops' parallel loops run from it instead of waking a worker and
// sleeping at every op.
fn main() {
    rayon::scope(|_| benches());
    Criterion::default().configure_from_args().final_summary();
}
