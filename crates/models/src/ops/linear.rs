//! `Linear`, `y = x Wᵀ + b`, as one CPU custom op.
//!
//! candle's `x·Wᵀ + b` puts the bias gradient in a strided reduction over the batch (a fifth of
//! the blog's training step), and folding the bias in as `[x, 1]·[W, b]ᵀ` costs two
//! concatenations forward and their zero-padded gradients backward. On CPU the layer is one
//! op: the gemm writes onto the broadcast bias, and the backward is two gemms and a row sum,
//! packed in one output. Other devices use `[x, 1]·[W, b]ᵀ`.

use super::activation::{map_kind, Activation, FastGrad, Kind};
use super::cpu::{f32_slices3, matmul, unpack_grads};
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Module, Result, Shape, Tensor};
use std::sync::Mutex;

/// A dense layer `y = x Wᵀ + b` with PyTorch's `(out, in)` weight layout.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// Wraps a weight `(out, in)` and a bias `(out,)`.
    pub fn new(weight: Tensor, bias: Tensor) -> Self {
        Self { weight, bias }
    }
    /// The weight `(out, in)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    /// The bias `(out,)`.
    pub fn bias(&self) -> Option<&Tensor> {
        Some(&self.bias)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.rank() != 2 {
            return x
                .broadcast_matmul(&self.weight.t()?)?
                .broadcast_add(&self.bias);
        }
        if matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 {
            return x.contiguous()?.apply_op3(
                &self.weight.contiguous()?,
                &self.bias.contiguous()?,
                LinearOp,
            );
        }
        self.forward_folded(x)
    }
}

impl Linear {
    /// `act(x Wᵀ + b)` for training. On CPU, with GELU or SiLU, one op: the pre-activation
    /// stays inside it (kept for its backward), so candle's gradient store never holds (or
    /// zero-fills and adds) a gradient for it. The same values and gradients as
    /// [`forward`](Module::forward) then [`Activation::apply`], bit for bit (tested).
    pub fn forward_with(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        match act.kind() {
            Some(kind)
                if x.rank() == 2
                    && matches!(x.device(), Device::Cpu)
                    && x.dtype() == DType::F32 =>
            {
                x.contiguous()?.apply_op3(
                    &self.weight.contiguous()?,
                    &self.bias.contiguous()?,
                    LinearActOp {
                        kind,
                        pre: Mutex::new(None),
                    },
                )
            }
            _ => act.apply(&self.forward(x)?),
        }
    }

    /// `act(… act(act(x W₁ᵀ + b₁) W₂ᵀ + b₂) …)` through `layers`, each followed by `act`, for
    /// evaluation, not training: on CPU the fused tiles of `dense.rs` (the same values, no
    /// gradient), elsewhere layer by layer.
    pub fn forward_chain(x: &Tensor, layers: &[&Linear], act: Activation) -> Result<Tensor> {
        let pairs: Vec<(&Tensor, &Tensor)> = layers.iter().map(|l| (&l.weight, &l.bias)).collect();
        if let Some(y) = super::dense::chain(x, &pairs, act)? {
            return Ok(y);
        }
        let mut h = x.clone();
        for l in layers {
            h = act.apply(&l.forward(&h)?)?;
        }
        Ok(h)
    }

    /// `[x, 1]·[W, b]ᵀ` from candle ops (devices other than the CPU).
    fn forward_folded(&self, x: &Tensor) -> Result<Tensor> {
        let ones = Tensor::ones((x.dim(0)?, 1), x.dtype(), x.device())?;
        let xa = Tensor::cat(&[x, &ones], 1)?;
        let wa = Tensor::cat(&[&self.weight, &self.bias.unsqueeze(1)?], 1)?;
        xa.matmul(&wa.t()?)
    }
}

/// Threads for one layer's gemms: rayon's pool when the product is big enough to split.
fn threads_for(flops: usize) -> usize {
    if flops < 1 << 20 {
        1
    } else {
        rayon::current_num_threads()
    }
}

struct LinearOp;

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
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
        let (y, n, o) = affine(self.name(), (s1, l1), (s2, l2), (s3, l3))?;
        Ok((CpuStorage::F32(y), Shape::from((n, o))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &LinearGrad)?;
        unpack_grads(&packed, [x, w, b])
    }
}

/// `x Wᵀ + b` on a custom op's CPU inputs: the gemm onto the broadcast bias. Returns the
/// `n × o` values with `n` and `o`.
fn affine(
    op: &str,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
) -> Result<(Vec<f32>, usize, usize)> {
    let [x, w, b] = f32_slices3(op, (s1, l1), (s2, l2), (s3, l3))?;
    let (o, i) = l2.shape().dims2()?;
    let n = l1.shape().dims2()?.0;
    if l1.shape().dims2()?.1 != i || b.len() != o {
        candle_core::bail!("{op}: input {:?} against weight ({o}, {i})", l1.shape());
    }
    let mut y = Vec::with_capacity(n * o);
    for _ in 0..n {
        y.extend_from_slice(b);
    }
    // y (n×o) += x (n×i) · Wᵀ (i×o).
    matmul(
        (n, o, i),
        &mut y,
        true,
        x,
        (i, 1),
        w,
        (1, i),
        threads_for(n * o * i),
    );
    Ok((y, n, o))
}

/// `act(x Wᵀ + b)` as one op (GELU / SiLU, CPU): keeps the pre-activation `z` for its backward.
struct LinearActOp {
    kind: Kind,
    pre: Mutex<Option<Vec<f32>>>,
}

impl CustomOp3 for LinearActOp {
    fn name(&self) -> &'static str {
        "linear-act-train"
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
        let (z, n, o) = affine(self.name(), (s1, l1), (s2, l2), (s3, l3))?;
        let y = map_kind(self.kind, &z);
        *self.pre.lock().unwrap_or_else(|e| e.into_inner()) = Some(z);
        Ok((CpuStorage::F32(y), Shape::from((n, o))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let kept = self.pre.lock().unwrap_or_else(|e| e.into_inner()).take();
        // A second backward through the same graph recomputes z.
        let z = match kept {
            Some(z) => Tensor::from_vec(z, res.shape(), res.device())?,
            None => x.apply_op3_no_bwd(w, b, &LinearOp)?,
        };
        // dz = dy · act′(z), then the layer's backward: the same ops as the unfused pair.
        let dz = z.apply_op3_no_bwd(res, &grad.contiguous()?, &FastGrad(self.kind))?;
        let packed = x.apply_op3_no_bwd(w, &dz, &LinearGrad)?;
        unpack_grads(&packed, [x, w, b])
    }
}

/// Backward of [`LinearOp`]: inputs x, W, dy; output `[dx; dW; db]` flattened.
struct LinearGrad;

impl CustomOp3 for LinearGrad {
    fn name(&self) -> &'static str {
        "linear-grad"
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
        let [x, w, dy] = f32_slices3(self.name(), (s1, l1), (s2, l2), (s3, l3))?;
        let (n, i) = l1.shape().dims2()?;
        let o = l2.shape().dims2()?.0;
        if dy.len() != n * o {
            candle_core::bail!("linear-grad: gradient shape mismatch");
        }
        let mut out = vec![0f32; n * i + o * i + o];
        let (dx, rest) = out.split_at_mut(n * i);
        let (dw, db) = rest.split_at_mut(o * i);
        let th = threads_for(n * o * i);
        // dx (n×i) = dy (n×o) · W (o×i); dW (o×i) = dyᵀ (o×n) · x (n×i); db = Σ_rows dy.
        matmul((n, i, o), dx, false, dy, (o, 1), w, (i, 1), th);
        matmul((o, i, n), dw, false, dy, (1, o), x, (i, 1), th);
        for row in dy.chunks_exact(o) {
            db.iter_mut().zip(row).for_each(|(d, g)| *d += g);
        }
        Ok((CpuStorage::F32(out), Shape::from(n * i + o * i + o)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fused_activation_gives_the_same_values_and_gradients_bit_for_bit() {
        let dev = Device::Cpu;
        let bits = |t: &Tensor| -> Vec<u32> {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        };
        for act in [Activation::Gelu, Activation::Silu] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (300, 40), &dev).unwrap()).unwrap();
            let w = Var::from_tensor(&Tensor::randn(0f32, 0.3, (64, 40), &dev).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, 64, &dev).unwrap()).unwrap();
            let lin = Linear::new(w.as_tensor().clone(), b.as_tensor().clone());
            let fused = lin.forward_with(x.as_tensor(), act).unwrap();
            let plain = act.apply(&lin.forward(x.as_tensor()).unwrap()).unwrap();
            assert_eq!(bits(&fused), bits(&plain), "{act:?} values");
            let loss = |y: &Tensor| y.sqr().unwrap().sum_all().unwrap();
            let g1 = loss(&fused).backward().unwrap();
            let g2 = loss(&plain).backward().unwrap();
            for v in [&x, &w, &b] {
                let (a, c) = (
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap(),
                );
                assert_eq!(bits(a), bits(c), "{act:?} gradients");
            }
            // A second backward through the same graph recomputes the pre-activation.
            let again = loss(&fused).backward().unwrap();
            assert_eq!(
                bits(again.get(w.as_tensor()).unwrap()),
                bits(g2.get(w.as_tensor()).unwrap())
            );
        }
    }

    #[test]
    fn values_and_gradients_match_the_plain_form() {
        let dev = Device::Cpu;
        // A small layer, and one big enough for the gemms to split across threads.
        for (n, i, o) in [(5, 3, 4), (600, 64, 40)] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, i), &dev).unwrap()).unwrap();
            let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (o, i), &dev).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, o, &dev).unwrap()).unwrap();
            let lin = Linear::new(w.as_tensor().clone(), b.as_tensor().clone());
            let plain = x
                .as_tensor()
                .matmul(&w.as_tensor().t().unwrap())
                .unwrap()
                .broadcast_add(b.as_tensor())
                .unwrap();
            let g2 = plain.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            // The CPU op and the folded form other devices use.
            for (path, ours) in [
                ("op", lin.forward(x.as_tensor()).unwrap()),
                ("folded", lin.forward_folded(x.as_tensor()).unwrap()),
            ] {
                let d = crate::max_abs_diff(&ours, &plain);
                assert!(d < 1e-4, "{path} {n}x{i}x{o}: {d}");
                let g1 = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                for v in [&x, &w, &b] {
                    let a = g1.get(v.as_tensor()).unwrap();
                    let c = g2.get(v.as_tensor()).unwrap();
                    assert_eq!(a.dims(), c.dims());
                    // Relative: the big layer's gradients are sums of hundreds of terms.
                    let scale = c
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    let d = crate::max_abs_diff(a, c) / scale.max(1.0);
                    assert!(d < 1e-5, "{path} {n}x{i}x{o}: {d}");
                }
            }
        }
    }
}
