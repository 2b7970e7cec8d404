//! GELU (exact, erf form, as PyTorch's `F.gelu`) and SiLU for CPU f32 tensors, as candle custom
//! ops whose forward and backward are branch-free loops the compiler vectorises.
//!
//! candle's own CPU kernels call a scalar `tanh`/`exp` per element (~22 ns for GELU); these
//! use a Cephes-style polynomial `exp` (relative error < 2e-7) and a rational `erf` (absolute
//! error < 4e-7 in f32). Other devices and dtypes fall back to candle's kernels.

use super::cpu::{f32_blocks, f32_slice, uniform_blocks};
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};

/// Which activation a network uses between its linear layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// Exact GELU, `x·Φ(x)` (the blog's `F.gelu`).
    Gelu,
    /// SiLU, `x·σ(x)` (the lesson's `nn.SiLU`).
    Silu,
    /// ReLU.
    Relu,
}

impl Activation {
    /// The fast kernels' kind (ReLU has none: candle's is fast).
    pub(crate) fn kind(&self) -> Option<Kind> {
        match self {
            Self::Gelu => Some(Kind::Gelu),
            Self::Silu => Some(Kind::Silu),
            Self::Relu => None,
        }
    }

    /// Applies the activation to `x`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let fast = matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32;
        match (self, fast) {
            (Self::Relu, _) => x.relu(),
            (Self::Gelu, true) => x.contiguous()?.apply_op1(Fast(Kind::Gelu)),
            (Self::Silu, true) => x.contiguous()?.apply_op1(Fast(Kind::Silu)),
            (Self::Gelu, false) => x.gelu_erf(),
            (Self::Silu, false) => x.silu(),
        }
    }
}

#[derive(Clone, Copy)]
pub(crate) enum Kind {
    Gelu,
    Silu,
}

struct Fast(Kind);
pub(crate) struct FastGrad(pub(crate) Kind);

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// `a·b + c`: one fused multiply-add in the kernels compiled for FMA, a multiply and an add
/// in the baseline ones (where `mul_add` would be a slow library call).
#[inline(always)]
pub(crate) fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `e^x` for f32 without branches: round-to-nearest via the 1.5·2²³ trick, Cephes polynomial.
#[inline(always)]
pub fn exp_f32<const FMA: bool>(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    const MAGIC: f32 = 12_582_912.0;
    // k = round(x·log2 e) sits in the low mantissa bits of `kf`: no float→int conversion
    // (Rust's saturating `as i32` keeps LLVM from vectorising the loop).
    let kf = madd::<FMA>(x, LOG2E, MAGIC);
    let n = kf - MAGIC;
    let r = madd::<FMA>(-n, LN2_LO, madd::<FMA>(-n, LN2_HI, x));
    let mut p = 1.987_569_2e-4_f32;
    p = madd::<FMA>(p, r, 1.398_2e-3);
    p = madd::<FMA>(p, r, 8.333_452e-3);
    p = madd::<FMA>(p, r, 4.166_579_6e-2);
    p = madd::<FMA>(p, r, 0.166_666_65);
    p = madd::<FMA>(p, r, 0.5);
    let e = madd::<FMA>(p * r, r, r + 1.0);
    let scale =
        f32::from_bits((kf.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127)) << 23);
    e * scale
}

/// `erf(x)` for f32: the rational minimax form of Eigen and XLA, `x·P(x²) / Q(x²)` on `x`
/// clamped to ±4 (beyond which erf is ±1 in f32): twelve multiply-adds and one division,
/// no `exp`, no branch.
#[inline(always)]
pub fn erf_f32<const FMA: bool>(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let z = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = madd::<FMA>(p, z, 2.770_681_4e-8);
    p = madd::<FMA>(p, z, -2.101_024e-6);
    p = madd::<FMA>(p, z, -5.692_506_4e-5);
    p = madd::<FMA>(p, z, -7.349_906_3e-4);
    p = madd::<FMA>(p, z, -2.954_600_2e-3);
    p = madd::<FMA>(p, z, -1.609_603_3e-2);
    let mut q = -1.456_607_2e-5_f32;
    q = madd::<FMA>(q, z, -2.133_740_6e-4);
    q = madd::<FMA>(q, z, -1.682_827e-3);
    q = madd::<FMA>(q, z, -7.373_329e-3);
    q = madd::<FMA>(q, z, -1.426_474e-2);
    x * p / q
}

#[inline(always)]
pub(crate) fn forward<const FMA: bool>(kind: Kind, x: f32) -> f32 {
    match kind {
        Kind::Gelu => 0.5 * x * (1.0 + erf_f32::<FMA>(x * FRAC_1_SQRT_2)),
        Kind::Silu => x / (1.0 + exp_f32::<FMA>(-x)),
    }
}

/// SiLU′(x) = σ(x)·(1 + x·(1 − σ(x))). (GELU′ is computed from the forward's output:
/// [`gelu_derivative_from_output`].)
#[inline(always)]
pub(crate) fn silu_derivative<const FMA: bool>(x: f32) -> f32 {
    let s = 1.0 / (1.0 + exp_f32::<FMA>(-x));
    s * madd::<FMA>(x, 1.0 - s, 1.0)
}

/// GELU′(x) = Φ(x) + x·φ(x), reading Φ(x) = y / x off the forward's output y = x·Φ(x): one
/// `exp` and a division instead of recomputing `erf`. Near 0, where y / x loses precision,
/// Φ's Taylor series (to x⁹, error < 3e-7 for |x| < ½) takes over; a select, not a branch.
#[inline(always)]
pub(crate) fn gelu_derivative_from_output<const FMA: bool>(x: f32, y: f32) -> f32 {
    let z = x * x;
    let mut s = 1.0 / 3456.0;
    s = madd::<FMA>(s, z, -1.0 / 336.0);
    s = madd::<FMA>(s, z, 1.0 / 40.0);
    s = madd::<FMA>(s, z, -1.0 / 6.0);
    s = madd::<FMA>(s, z, 1.0);
    let series = madd::<FMA>(INV_SQRT_2PI * x, s, 0.5);
    let cdf = if x.abs() < 0.5 { series } else { y / x };
    madd::<FMA>(x * INV_SQRT_2PI, exp_f32::<FMA>(-0.5 * z), cdf)
}

/// The elementwise kernels, written once and compiled three times: for the build's baseline
/// and, on x86-64, for AVX2 + FMA (8 lanes) and AVX-512 (16 lanes), chosen at run time, so the
/// binary stays portable. The AVX-512 build does the same per-element arithmetic (tested).
/// They collect into fresh vectors (no zero-fill first).
macro_rules! kernels {
    ($fwd:ident, $bwd:ident, $fma:literal $(, #[$attr:meta])?) => {
        $(#[$attr])?
        unsafe fn $fwd(kind: Kind, xs: &[f32]) -> Vec<f32> {
            match kind {
                Kind::Gelu => xs.iter().map(|&x| forward::<$fma>(Kind::Gelu, x)).collect(),
                Kind::Silu => xs.iter().map(|&x| forward::<$fma>(Kind::Silu, x)).collect(),
            }
        }
        $(#[$attr])?
        unsafe fn $bwd(kind: Kind, xs: &[f32], ys: &[f32], gs: &[f32], out: &mut Vec<f32>) {
            match kind {
                Kind::Gelu => out.extend(xs.iter().zip(ys).zip(gs).map(|((&x, &y), &g)| g * gelu_derivative_from_output::<$fma>(x, y))),
                Kind::Silu => out.extend(xs.iter().zip(gs).map(|(&x, &g)| g * silu_derivative::<$fma>(x))),
            }
        }
    };
}
kernels!(fwd_base, bwd_base, false);
#[cfg(target_arch = "x86_64")]
kernels!(fwd_avx2, bwd_avx2, true, #[target_feature(enable = "avx2,fma")]);
#[cfg(target_arch = "x86_64")]
kernels!(fwd_avx512, bwd_avx512, true, #[target_feature(enable = "avx512f,avx2,fma")]);

/// Tests set it to run the conv kernels' AVX2 code on a CPU with AVX-512 (to compare bits).
#[cfg(test)]
pub(crate) static AVX2_ONLY: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Whether the conv kernels run their AVX-512 code: the CPU has it (and, in tests, it is not
/// turned off by `AVX2_ONLY`).
pub(crate) fn wide_kernels() -> bool {
    #[cfg(test)]
    if AVX2_ONLY.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    has_avx512()
}

/// Whether the CPU has AVX-512F (with AVX2 and FMA), checked once.
pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX512: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX512.get_or_init(|| has_avx2() && is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX2.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

pub(crate) fn map_kind(kind: Kind, xs: &[f32]) -> Vec<f32> {
    // SAFETY: the AVX-512 path runs only where the CPU reports AVX-512F (`has_avx512`), the
    // AVX2 path only where it reports AVX2 and FMA (`has_avx2`).
    unsafe {
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            return fwd_avx512(kind, xs);
        }
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            return fwd_avx2(kind, xs);
        }
        fwd_base(kind, xs)
    }
}

fn map_grad(kind: Kind, xs: &[f32], ys: &[f32], gs: &[f32], out: &mut Vec<f32>) {
    // SAFETY: as in `map_kind`.
    unsafe {
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            return bwd_avx512(kind, xs, ys, gs, out);
        }
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            return bwd_avx2(kind, xs, ys, gs, out);
        }
        bwd_base(kind, xs, ys, gs, out)
    }
}

impl CustomOp1 for Fast {
    fn name(&self) -> &'static str {
        match self.0 {
            Kind::Gelu => "fast-gelu",
            Kind::Silu => "fast-silu",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let xs = f32_slice(s, l, self.name())?;
        Ok((CpuStorage::F32(map_kind(self.0, xs)), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // A gradient in equal blocks (a `cat`'s, kept as a view) is read where it lies: the
        // kernel runs block by block, with no contiguous copy first.
        let g = match uniform_blocks(grad_res.layout()) {
            Some(_) if matches!(grad_res.device(), Device::Cpu) => grad_res.clone(),
            _ => grad_res.contiguous()?,
        };
        Ok(Some(arg.apply_op3_no_bwd(res, &g, &FastGrad(self.0))?))
    }
}

impl CustomOp3 for FastGrad {
    fn name(&self) -> &'static str {
        "fast-activation-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (xs, ys) = (
            f32_slice(s1, l1, self.name())?,
            f32_slice(s2, l2, self.name())?,
        );
        let (gs, (block, stride, count)) = f32_blocks(s3, l3, self.name())?;
        if xs.len() != block * count || ys.len() != xs.len() {
            candle_core::bail!("{}: shape mismatch", self.name());
        }
        let mut out = Vec::with_capacity(xs.len());
        for (i, (x, y)) in xs
            .chunks(block.max(1))
            .zip(ys.chunks(block.max(1)))
            .enumerate()
        {
            map_grad(self.0, x, y, &gs[i * stride..][..block], &mut out);
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::cpu::erf::erf_f64;
    use candle_core::Var;

    fn grid() -> Vec<f32> {
        (0..4001).map(|i| -20.0 + i as f32 * 0.01).collect()
    }

    #[test]
    fn exp_and_erf_match_std_to_float_precision() {
        // Both builds of the math: plain multiply-adds and fused ones.
        fn check<const FMA: bool>() {
            for x in grid() {
                let e = (x as f64).exp();
                let ours = exp_f32::<FMA>(x) as f64;
                assert!(((ours - e) / e).abs() < 3e-7, "exp({x}), fma {FMA}");
                let r = erf_f64(x as f64);
                let err = erf_f32::<FMA>(x) as f64 - r;
                assert!(err.abs() < 4e-7, "erf({x}) err {err}, fma {FMA}");
            }
            assert!(exp_f32::<FMA>(-1000.0) < 1e-37 && exp_f32::<FMA>(1000.0).is_finite());
        }
        check::<false>();
        check::<true>();
    }

    #[test]
    fn every_build_of_the_kernels_gives_the_same_bits() {
        let xs = grid();
        let ys: Vec<f32> = xs.iter().map(|&x| forward::<true>(Kind::Gelu, x)).collect();
        let gs: Vec<f32> = xs.iter().map(|&x| 0.5 - x / 40.0).collect();
        let bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        if !has_avx512() {
            crate::skipped(
                "activation::every_build_of_the_kernels_gives_the_same_bits",
                "this CPU has no AVX-512F, so only one vector build runs on it",
            );
            return;
        }
        for kind in [Kind::Gelu, Kind::Silu] {
            // SAFETY: each build runs only where the CPU has its features.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                if has_avx512() {
                    assert_eq!(bits(fwd_avx512(kind, &xs)), bits(fwd_avx2(kind, &xs)));
                    let (mut wide, mut narrow) = (vec![], vec![]);
                    bwd_avx512(kind, &xs, &ys, &gs, &mut wide);
                    bwd_avx2(kind, &xs, &ys, &gs, &mut narrow);
                    assert_eq!(bits(wide), bits(narrow));
                }
            }
        }
    }

    #[test]
    fn a_gradient_in_blocks_gives_the_contiguous_gradients_bits() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (4, 3, 5, 5), &dev).unwrap();
        // A `cat`'s gradient kept as a view: channels 2..5 of a (4, 7, 5, 5) tensor.
        let whole = Tensor::randn(0f32, 1.0, (4, 7, 5, 5), &dev).unwrap();
        let view = whole.narrow(1, 2, 3).unwrap();
        assert!(!view.is_contiguous() && uniform_blocks(view.layout()).is_some());
        for kind in [Kind::Gelu, Kind::Silu] {
            let op = Fast(kind);
            let y = x.apply_op1_no_bwd(&op).unwrap();
            let grad = |g: &Tensor| -> Vec<u32> {
                let d = op.bwd(&x, &y, g).unwrap().unwrap();
                let v: Vec<f32> = d.flatten_all().unwrap().to_vec1().unwrap();
                v.iter().map(|f| f.to_bits()).collect()
            };
            assert_eq!(
                grad(&view),
                grad(&view.contiguous().unwrap()),
                "{}",
                op.name()
            );
        }
    }

    #[test]
    fn forward_matches_exact_functions() {
        let xs = grid();
        let t = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap();
        let g: Vec<f32> = Activation::Gelu.apply(&t).unwrap().to_vec1().unwrap();
        let s: Vec<f32> = Activation::Silu.apply(&t).unwrap().to_vec1().unwrap();
        for (i, &x) in xs.iter().enumerate() {
            let x = x as f64;
            let ge = 0.5 * x * (1.0 + erf_f64(x / 2f64.sqrt()));
            let se = x / (1.0 + (-x).exp());
            assert!(
                (g[i] as f64 - ge).abs() < 1e-5 * (1.0 + x.abs()),
                "gelu({x})"
            );
            assert!(
                (s[i] as f64 - se).abs() < 1e-5 * (1.0 + x.abs()),
                "silu({x})"
            );
        }
    }

    #[test]
    fn gradients_match_finite_differences_and_candle() {
        let xs: Vec<f32> = (0..401).map(|i| -12.0 + i as f32 * 0.06).collect();
        for act in [Activation::Gelu, Activation::Silu] {
            let v = Var::new(xs.as_slice(), &Device::Cpu).unwrap();
            let y = act.apply(v.as_tensor()).unwrap().sum_all().unwrap();
            let grads = y.backward().unwrap();
            let g: Vec<f32> = grads.get(v.as_tensor()).unwrap().to_vec1().unwrap();
            for (i, &x) in xs.iter().enumerate() {
                let f = |x: f64| match act {
                    Activation::Gelu => 0.5 * x * (1.0 + erf_f64(x / 2f64.sqrt())),
                    _ => x / (1.0 + (-x).exp()),
                };
                let h = 1e-5;
                let fd = (f(x as f64 + h) - f(x as f64 - h)) / (2.0 * h);
                assert!(
                    (g[i] as f64 - fd).abs() < 1e-5,
                    "{act:?}'({x}) = {} vs {fd}",
                    g[i]
                );
            }
        }
    }
}
