//! AdamW with candle-nn's update rule, fused on CPU: one pass per parameter tensor, in place.
//!
//! candle-nn's `AdamW::step` spends about 18 tensor ops (each a fresh allocation) per
//! parameter tensor: 0.23 ms of the lesson's 1.8 ms step. Here the moments live in plain
//! vectors and an in-place candle op updates `m`, `v` and `θ` in one loop. The arithmetic is
//! candle's, in the same order and precision, so the two agree to float rounding (tested).
//! Parameters that are not CPU f32 tensors take candle-nn's `AdamW` rule as tensor ops.
//! Both keep their moments where [`FusedAdamW::state`] can read them, so a checkpoint can
//! hold the optimiser and a resumed run continues with the same numbers.
//!
//! On the CPU all parameters are updated in one parallel loop once a model has
//! [`PARALLEL_MIN`] weights: the parameters, and chunks of the large ones, spread over
//! rayon's threads. Each weight's arithmetic is the same wherever it runs, so every thread
//! count gives the same bits as the serial loop (tested).

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Device, InplaceOp2, Layout, Result, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use rayon::prelude::*;
use std::cell::RefCell;

/// A model with at least this many weights updates them on rayon's threads (below it, the
/// calling thread's loop is faster than handing work out).
pub const PARALLEL_MIN: usize = 1 << 15;

/// The weights of one parameter that one thread updates at a time.
pub(crate) const CHUNK: usize = 1 << 13;

/// Runs `f` on each item, on rayon's threads when `parallel` (every item independent, so the
/// result is the same either way).
pub(crate) fn for_each<T: Send>(
    items: Vec<T>,
    parallel: bool,
    f: impl Fn(T) -> Result<()> + Send + Sync,
) -> Result<()> {
    if parallel {
        items.into_par_iter().try_for_each(f)
    } else {
        items.into_iter().try_for_each(f)
    }
}

/// AdamW (decoupled weight decay, bias-corrected moments), as `candle_nn::AdamW`.
pub enum FusedAdamW {
    /// Every parameter a CPU f32 tensor: the fused update.
    Cpu(CpuAdamW),
    /// Anything else (CUDA, f64): candle-nn's update rule as tensor ops.
    Tensors(TensorAdamW),
}

/// The optimiser's state: its step count and each parameter's first and second moments, in
/// parameter order.
pub struct AdamState {
    /// Steps taken (the bias corrections depend on it).
    pub step_t: usize,
    /// `(m, v)` per parameter, shaped like the parameter.
    pub moments: Vec<(Tensor, Tensor)>,
}

/// candle-nn's `AdamW`, with its moments reachable.
pub struct TensorAdamW {
    vars: Vec<(Var, Var, Var)>,
    params: ParamsAdamW,
    step_t: usize,
}

impl TensorAdamW {
    fn new(vars: Vec<Var>, params: ParamsAdamW) -> Result<Self> {
        let vars = vars
            .into_iter()
            .map(|v| {
                let m = Var::zeros(v.shape(), v.dtype(), v.device())?;
                let s = Var::zeros(v.shape(), v.dtype(), v.device())?;
                Ok((v, m, s))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            vars,
            params,
            step_t: 0,
        })
    }

    /// candle-nn 0.11's `AdamW::step`, op for op.
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_t += 1;
        let p = &self.params;
        let (beta1, beta2) = (p.beta1, p.beta2);
        let lr_lambda = p.lr * p.weight_decay;
        let scale_m = 1f64 / (1f64 - beta1.powi(self.step_t as i32));
        let scale_v = 1f64 / (1f64 - beta2.powi(self.step_t as i32));
        for (theta, m, v) in &self.vars {
            if let Some(g) = grads.get(theta) {
                let next_m = ((m.as_tensor() * beta1)? + (g * (1.0 - beta1))?)?;
                let next_v = ((v.as_tensor() * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
                let m_hat = (&next_m * scale_m)?;
                let v_hat = (&next_v * scale_v)?;
                let next_theta = (theta.as_tensor() * (1f64 - lr_lambda))?;
                let adjusted_grad = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
                let next_theta = (next_theta - (adjusted_grad * p.lr)?)?;
                m.set(&next_m)?;
                v.set(&next_v)?;
                theta.set(&next_theta)?;
            }
        }
        Ok(())
    }
}

impl FusedAdamW {
    /// A copy of the step count and the moments.
    pub fn state(&self) -> Result<AdamState> {
        let moments = match self {
            Self::Cpu(o) => o
                .vars
                .iter()
                .map(|(var, m, v)| {
                    let dev = var.device();
                    Ok((
                        Tensor::from_slice(m, var.shape(), dev)?,
                        Tensor::from_slice(v, var.shape(), dev)?,
                    ))
                })
                .collect::<Result<_>>()?,
            Self::Tensors(o) => o
                .vars
                .iter()
                .map(|(_, m, v)| Ok((m.as_tensor().copy()?, v.as_tensor().copy()?)))
                .collect::<Result<_>>()?,
        };
        let step_t = match self {
            Self::Cpu(o) => o.step_t,
            Self::Tensors(o) => o.step_t,
        };
        Ok(AdamState { step_t, moments })
    }

    /// Puts back a state taken by [`Self::state`] from an optimiser of the same parameters.
    pub fn restore(&mut self, state: &AdamState) -> Result<()> {
        let n = match self {
            Self::Cpu(o) => o.vars.len(),
            Self::Tensors(o) => o.vars.len(),
        };
        if state.moments.len() != n {
            candle_core::bail!(
                "optimizer state holds {} parameters, the model has {n}",
                state.moments.len()
            );
        }
        match self {
            Self::Cpu(o) => {
                for ((var, m, v), (sm, sv)) in o.vars.iter_mut().zip(&state.moments) {
                    if sm.dims() != var.dims() || sv.dims() != var.dims() {
                        candle_core::bail!(
                            "optimizer state: moment shape {:?} for a parameter of shape {:?}",
                            sm.dims(),
                            var.dims()
                        );
                    }
                    *m = sm.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
                    *v = sv.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
                }
                o.step_t = state.step_t;
            }
            Self::Tensors(o) => {
                for ((var, m, v), (sm, sv)) in o.vars.iter().zip(&state.moments) {
                    if sm.dims() != var.dims() || sv.dims() != var.dims() {
                        candle_core::bail!(
                            "optimizer state: moment shape {:?} for a parameter of shape {:?}",
                            sm.dims(),
                            var.dims()
                        );
                    }
                    m.set(&sm.to_device(var.device())?.to_dtype(var.dtype())?)?;
                    v.set(&sv.to_device(var.device())?.to_dtype(var.dtype())?)?;
                }
                o.step_t = state.step_t;
            }
        }
        Ok(())
    }
}

/// The fused CPU state: each parameter with its first and second moments.
pub struct CpuAdamW {
    vars: Vec<(Var, Vec<f32>, Vec<f32>)>,
    params: ParamsAdamW,
    step_t: usize,
    /// The parameters' weights in all.
    weights: usize,
    /// Forces the parallel (Some(true)) or the serial loop (tests); None: by `weights`.
    parallel: Option<bool>,
}

impl Optimizer for FusedAdamW {
    type Config = ParamsAdamW;

    fn new(vars: Vec<Var>, params: ParamsAdamW) -> Result<Self> {
        let vars: Vec<Var> = vars.into_iter().filter(|v| v.dtype().is_float()).collect();
        let cpu = vars
            .iter()
            .all(|v| matches!(v.device(), Device::Cpu) && v.dtype() == DType::F32);
        if !cpu {
            return Ok(Self::Tensors(TensorAdamW::new(vars, params)?));
        }
        let weights = vars.iter().map(|v| v.elem_count()).sum();
        let vars = vars
            .into_iter()
            .map(|v| {
                let n = v.elem_count();
                (v, vec![0f32; n], vec![0f32; n])
            })
            .collect();
        Ok(Self::Cpu(CpuAdamW {
            vars,
            params,
            step_t: 0,
            weights,
            parallel: None,
        }))
    }

    fn learning_rate(&self) -> f64 {
        match self {
            Self::Cpu(o) => o.params.lr,
            Self::Tensors(o) => o.params.lr,
        }
    }

    fn set_learning_rate(&mut self, lr: f64) {
        match self {
            Self::Cpu(o) => o.params.lr = lr,
            Self::Tensors(o) => o.params.lr = lr,
        }
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let o = match self {
            Self::Cpu(o) => o,
            Self::Tensors(o) => return o.step(grads),
        };
        o.step_t += 1;
        let p = &o.params;
        let h = Hyper {
            beta1: p.beta1,
            beta2: p.beta2,
            scale_m: 1.0 / (1.0 - p.beta1.powi(o.step_t as i32)),
            scale_v: 1.0 / (1.0 - p.beta2.powi(o.step_t as i32)),
            decay: 1.0 - p.lr * p.weight_decay,
            lr: p.lr,
            eps: p.eps,
        };
        let parallel = o.parallel.unwrap_or(o.weights >= PARALLEL_MIN);
        let work: Vec<_> = o
            .vars
            .iter_mut()
            .filter_map(|(var, m, v)| grads.get(var.as_tensor()).map(|g| (&*var, m, v, g)))
            .collect();
        for_each(work, parallel, |(var, m, v, g)| {
            let g = g.contiguous()?;
            var.as_tensor().inplace_op2(
                &g,
                &Update {
                    m: RefCell::new(m),
                    v: RefCell::new(v),
                    h,
                    parallel,
                },
            )
        })
    }
}

/// One step's constants (f64, cast to f32 where candle's scalar ops cast them).
#[derive(Clone, Copy)]
struct Hyper {
    beta1: f64,
    beta2: f64,
    scale_m: f64,
    scale_v: f64,
    decay: f64,
    lr: f64,
    eps: f64,
}

/// The contiguous f32 data of an in-place op's two tensors, of one size.
pub(crate) fn same_size_f32<'a>(
    s1: &'a mut CpuStorage,
    l1: &Layout,
    s2: &'a CpuStorage,
    l2: &Layout,
    name: &str,
) -> Result<(&'a mut [f32], &'a [f32])> {
    let (CpuStorage::F32(x), CpuStorage::F32(y)) = (s1, s2) else {
        candle_core::bail!("{name}: expected f32 tensors");
    };
    let (Some((a, b)), Some((c, d))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
        candle_core::bail!("{name}: expected contiguous tensors");
    };
    if b - a != d - c {
        candle_core::bail!("{name}: shape mismatch");
    }
    Ok((&mut x[a..b], &y[c..d]))
}

/// `θ` in place, given `g`: candle-nn's AdamW step for one parameter.
struct Update<'a> {
    m: RefCell<&'a mut Vec<f32>>,
    v: RefCell<&'a mut Vec<f32>>,
    h: Hyper,
    /// Split a large parameter into chunks for rayon's threads.
    parallel: bool,
}

impl InplaceOp2 for Update<'_> {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (theta, g) = same_size_f32(s1, l1, s2, l2, self.name())?;
        let (mut m, mut v) = (self.m.borrow_mut(), self.v.borrow_mut());
        if m.len() != g.len() {
            candle_core::bail!("adamw-update: shape mismatch");
        }
        let h = self.h;
        // candle's affine casts its scalars to f32: x·(a as f32) + (b as f32).
        let (b1, c1) = (h.beta1 as f32, (1.0 - h.beta1) as f32);
        let (b2, c2) = (h.beta2 as f32, (1.0 - h.beta2) as f32);
        let (sm, sv, decay, lr, eps) = (
            h.scale_m as f32,
            h.scale_v as f32,
            h.decay as f32,
            h.lr as f32,
            h.eps as f32,
        );
        let update = |theta: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]| {
            for (((t, &gj), mj), vj) in theta.iter_mut().zip(g).zip(m).zip(v) {
                let next_m = *mj * b1 + gj * c1;
                let next_v = *vj * b2 + (gj * gj) * c2;
                *mj = next_m;
                *vj = next_v;
                let adjusted = (next_m * sm) / ((next_v * sv).sqrt() + eps);
                *t = *t * decay - adjusted * lr;
            }
        };
        if self.parallel && g.len() > CHUNK {
            theta
                .par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .for_each(|(((t, g), m), v)| update(t, g, m, v));
        } else {
            update(theta, g, &mut m[..], &mut v[..]);
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_nn::AdamW;

    #[test]
    fn matches_candle_adamw_step_for_step() {
        let dev = Device::Cpu;
        let init = Tensor::randn(0f32, 1.0, (7, 5), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 5, &dev).unwrap();
        let target = Tensor::randn(0f32, 1.0, (3, 5), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, 7), &dev).unwrap();
        let params = ParamsAdamW {
            lr: 0.05,
            weight_decay: 0.1,
            ..Default::default()
        };
        let make = || {
            (
                Var::from_tensor(&init).unwrap(),
                Var::from_tensor(&bias).unwrap(),
            )
        };
        let (w1, b1) = make();
        let (w2, b2) = make();
        let mut ours = FusedAdamW::new(vec![w1.clone(), b1.clone()], params.clone()).unwrap();
        assert!(matches!(ours, FusedAdamW::Cpu(_)));
        let mut theirs = AdamW::new(vec![w2.clone(), b2.clone()], params).unwrap();
        let loss = |w: &Var, b: &Var| {
            (x.matmul(w.as_tensor())
                .unwrap()
                .broadcast_add(b.as_tensor())
                .unwrap()
                - &target)
                .unwrap()
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap()
        };
        let max_abs =
            |t: Tensor| -> f32 { t.abs().unwrap().max_all().unwrap().to_scalar().unwrap() };
        for step in 0..20 {
            ours.backward_step(&loss(&w1, &b1)).unwrap();
            theirs.backward_step(&loss(&w2, &b2)).unwrap();
            for (a, b) in [(&w1, &w2), (&b1, &b2)] {
                let d = max_abs((a.as_tensor() - b.as_tensor()).unwrap());
                assert!(d < 1e-6, "step {step}: {d}");
            }
        }
        // The parameters moved: the comparison above is not between two idle optimizers.
        let moved = max_abs((w1.as_tensor() - &init).unwrap());
        assert!(moved > 0.1, "{moved}");
    }

    /// A least-squares problem `(x·w + b − y)²` in `dtype`, and its loss for given weights.
    fn problem(dtype: DType) -> (Tensor, Tensor, Tensor, Tensor) {
        let dev = Device::Cpu;
        let r = |shape: &[usize]| {
            Tensor::randn(0f32, 1.0, shape, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        (r(&[7, 5]), r(&[5]), r(&[3, 5]), r(&[3, 7]))
    }

    fn loss(x: &Tensor, target: &Tensor, w: &Var, b: &Var) -> Tensor {
        (x.matmul(w.as_tensor())
            .unwrap()
            .broadcast_add(b.as_tensor())
            .unwrap()
            - target)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    }

    fn values(v: &Var) -> Vec<f64> {
        v.as_tensor()
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// A tensor's f32 values as bits (to compare them exactly).
    pub(crate) fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f32::to_bits)
            .collect()
    }

    #[test]
    fn the_parallel_update_gives_the_serial_bits() {
        // A parameter of several chunks (split over threads), and small ones beside it.
        let dev = Device::Cpu;
        let shapes: [&[usize]; 3] = [&[CHUNK * 3 + 17], &[5, 7], &[1]];
        let inits: Vec<Tensor> = shapes
            .iter()
            .map(|s| Tensor::randn(0f32, 1.0, *s, &dev).unwrap())
            .collect();
        let params = ParamsAdamW {
            lr: 0.01,
            weight_decay: 0.05,
            ..Default::default()
        };
        let run = |parallel: bool| {
            let vars: Vec<Var> = inits.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
            let mut opt = FusedAdamW::new(vars.clone(), params.clone()).unwrap();
            if let FusedAdamW::Cpu(o) = &mut opt {
                o.parallel = Some(parallel);
            }
            for step in 1..=5 {
                // A loss whose gradient differs per weight: Σ sin(k·θ)·θ².
                let loss = vars
                    .iter()
                    .map(|v| {
                        let t = v.as_tensor();
                        (t.affine(step as f64, 0.0).unwrap().sin().unwrap() * t.sqr().unwrap())
                            .unwrap()
                            .sum_all()
                            .unwrap()
                    })
                    .reduce(|a, b| (a + b).unwrap())
                    .unwrap();
                opt.backward_step(&loss).unwrap();
            }
            let flat: Vec<u32> = vars
                .iter()
                .flat_map(|v| values(v).into_iter().map(|x| (x as f32).to_bits()))
                .collect();
            (flat, opt.state().unwrap())
        };
        let (serial, s_state) = run(false);
        let (parallel, p_state) = run(true);
        assert_eq!(serial, parallel);
        for ((a, b), (c, d)) in s_state.moments.iter().zip(&p_state.moments) {
            assert_eq!((bits(a), bits(b)), (bits(c), bits(d)));
        }
        assert_ne!(
            serial[..10],
            inits[0].to_vec1::<f32>().unwrap()[..10]
                .iter()
                .map(|x| x.to_bits())
                .collect::<Vec<_>>()[..]
        );
    }

    #[test]
    fn tensor_arm_is_candle_adamw_bit_for_bit() {
        // f64 parameters take the tensor-op arm: it must give candle's numbers exactly.
        let (init, bias, target, x) = problem(DType::F64);
        let params = ParamsAdamW {
            lr: 0.05,
            weight_decay: 0.1,
            ..Default::default()
        };
        let (w1, b1) = (
            Var::from_tensor(&init).unwrap(),
            Var::from_tensor(&bias).unwrap(),
        );
        let (w2, b2) = (
            Var::from_tensor(&init).unwrap(),
            Var::from_tensor(&bias).unwrap(),
        );
        let mut ours = FusedAdamW::new(vec![w1.clone(), b1.clone()], params.clone()).unwrap();
        assert!(matches!(ours, FusedAdamW::Tensors(_)));
        let mut theirs = AdamW::new(vec![w2.clone(), b2.clone()], params).unwrap();
        for _ in 0..10 {
            ours.backward_step(&loss(&x, &target, &w1, &b1)).unwrap();
            theirs.backward_step(&loss(&x, &target, &w2, &b2)).unwrap();
        }
        assert_eq!(values(&w1), values(&w2));
        assert_eq!(values(&b1), values(&b2));
        assert_ne!(values(&w1), values(&Var::from_tensor(&init).unwrap()));
    }

    #[test]
    fn state_taken_mid_run_and_restored_continues_identically() {
        for dtype in [DType::F32, DType::F64] {
            let (init, bias, target, x) = problem(dtype);
            let params = ParamsAdamW {
                lr: 0.02,
                weight_decay: 0.01,
                ..Default::default()
            };
            let fresh = || {
                (
                    Var::from_tensor(&init).unwrap(),
                    Var::from_tensor(&bias).unwrap(),
                )
            };
            // Uninterrupted: 12 steps.
            let (w, b) = fresh();
            let mut opt = FusedAdamW::new(vec![w.clone(), b.clone()], params.clone()).unwrap();
            for _ in 0..12 {
                opt.backward_step(&loss(&x, &target, &w, &b)).unwrap();
            }
            // Interrupted after 5: weights and state carried into a new optimiser.
            let (w1, b1) = fresh();
            let mut first = FusedAdamW::new(vec![w1.clone(), b1.clone()], params.clone()).unwrap();
            for _ in 0..5 {
                first.backward_step(&loss(&x, &target, &w1, &b1)).unwrap();
            }
            let state = first.state().unwrap();
            assert_eq!(state.step_t, 5);
            let w2 = Var::from_tensor(&w1.as_tensor().copy().unwrap()).unwrap();
            let b2 = Var::from_tensor(&b1.as_tensor().copy().unwrap()).unwrap();
            let mut second = FusedAdamW::new(vec![w2.clone(), b2.clone()], params.clone()).unwrap();
            second.restore(&state).unwrap();
            for _ in 0..7 {
                second.backward_step(&loss(&x, &target, &w2, &b2)).unwrap();
            }
            assert_eq!(values(&w), values(&w2), "{dtype:?}");
            assert_eq!(values(&b), values(&b2), "{dtype:?}");
            // A state of other parameters is refused.
            let short = AdamState {
                step_t: 1,
                moments: state.moments[..1].to_vec(),
            };
            assert!(second.restore(&short).is_err());
        }
    }
}
