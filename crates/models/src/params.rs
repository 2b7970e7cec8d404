use crate::Linear;
use crate::ModelError;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::Rng as _;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::Path;

/// A model's trainable parameters: a named `VarMap` initialised from a seeded RNG.
///
/// Names follow PyTorch's `state_dict` (`fc_in.weight`, `net.0.bias`, …), so a safetensors
/// checkpoint reads like the model it came from.
pub struct Params {
    varmap: VarMap,
    device: Device,
    rng: ChaCha8Rng,
}

impl Params {
    /// Empty parameter set whose initial values are drawn from `seed`.
    pub fn new(seed: u64, device: &Device) -> Self {
        Self {
            varmap: VarMap::new(),
            device: device.clone(),
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The underlying variable map (for optimisers).
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// All trainable variables, in name order (stable across runs).
    pub fn vars(&self) -> Vec<Var> {
        let data = self.varmap.data().lock().expect("varmap lock poisoned");
        let mut named: Vec<(&String, &Var)> = data.iter().collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        named.into_iter().map(|(_, v)| v.clone()).collect()
    }

    /// All trainable variables with their names, in name order (the order of [`Self::vars`]).
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().expect("varmap lock poisoned");
        let mut named: Vec<(String, Var)> =
            data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
    }

    /// Number of scalar parameters.
    pub fn count(&self) -> usize {
        self.vars().iter().map(|v| v.elem_count()).sum()
    }

    fn uniform(&mut self, name: &str, shape: &[usize], bound: f64) -> Result<Tensor, ModelError> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| ((self.rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
            .collect();
        let t = Tensor::from_vec(data, shape, &self.device)?;
        self.register(name, &t)
    }

    /// A `Linear(in, out)` layer named `name`, initialised like PyTorch's `nn.Linear`
    /// (weight and bias uniform in ±1/sqrt(in)).
    pub fn linear(&mut self, name: &str, d_in: usize, d_out: usize) -> Result<Linear, ModelError> {
        let bound = 1.0 / (d_in as f64).sqrt();
        let w = self.uniform(&format!("{name}.weight"), &[d_out, d_in], bound)?;
        let b = self.uniform(&format!("{name}.bias"), &[d_out], bound)?;
        Ok(Linear::new(w, b))
    }

    /// Conv weights `(out, in, k, k)` and bias, uniform in ±1/sqrt(in·k²) as in PyTorch.
    fn conv_weights(
        &mut self,
        name: &str,
        c_in: usize,
        c_out: usize,
        k: usize,
    ) -> Result<(Tensor, Tensor), ModelError> {
        let bound = 1.0 / ((c_in * k * k) as f64).sqrt();
        let w = self.uniform(&format!("{name}.weight"), &[c_out, c_in, k, k], bound)?;
        let b = self.uniform(&format!("{name}.bias"), &[c_out], bound)?;
        Ok((w, b))
    }

    /// A `k×k` convolution as unfold + matmul ([`crate::ops::conv::Conv`]), PyTorch layout and init.
    pub fn conv(
        &mut self,
        name: &str,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> Result<crate::ops::conv::Conv, ModelError> {
        let (w, b) = self.conv_weights(name, c_in, c_out, k)?;
        Ok(crate::ops::conv::Conv::new(w, b, stride, pad)?)
    }

    /// A `ConvTranspose2d(in, out, k, stride, padding)` named `name` (PyTorch's weight layout
    /// `(in, out, k, k)` and initialisation, uniform in ±1/sqrt(out·k²)), as gemm + col2im
    /// ([`crate::ops::conv_transpose::ConvTranspose`]).
    pub fn conv_transpose(
        &mut self,
        name: &str,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> Result<crate::ops::conv_transpose::ConvTranspose, ModelError> {
        let bound = 1.0 / ((c_out * k * k) as f64).sqrt();
        let w = self.uniform(&format!("{name}.weight"), &[c_in, c_out, k, k], bound)?;
        let b = self.uniform(&format!("{name}.bias"), &[c_out], bound)?;
        Ok(crate::ops::conv_transpose::ConvTranspose::new(
            w, b, stride, pad,
        )?)
    }

    /// A `GroupNorm(groups, channels)` named `name` (weight 1, bias 0, eps 1e-5) followed by
    /// SiLU, fused on CPU ([`crate::ops::norm::GroupNormSilu`]).
    pub fn group_norm_silu(
        &mut self,
        name: &str,
        groups: usize,
        channels: usize,
    ) -> Result<crate::ops::norm::GroupNormSilu, ModelError> {
        let w = self.constant(&format!("{name}.weight"), &[channels], 1.0)?;
        let b = self.constant(&format!("{name}.bias"), &[channels], 0.0)?;
        Ok(crate::ops::norm::GroupNormSilu::new(w, b, groups, 1e-5)?)
    }

    /// Makes `t` a trainable variable named `name` and returns its tensor.
    fn register(&mut self, name: &str, t: &Tensor) -> Result<Tensor, ModelError> {
        let var = Var::from_tensor(t)?;
        let tensor = var.as_tensor().clone();
        self.varmap
            .data()
            .lock()
            .expect("varmap lock poisoned")
            .insert(name.to_string(), var);
        Ok(tensor)
    }

    fn constant(&mut self, name: &str, shape: &[usize], v: f32) -> Result<Tensor, ModelError> {
        let n: usize = shape.iter().product();
        let t = Tensor::from_vec(vec![v; n], shape, &self.device)?;
        self.register(name, &t)
    }

    /// A parameter tensor of `shape` initialised uniformly in ±`bound`.
    pub fn tensor(
        &mut self,
        name: &str,
        shape: &[usize],
        bound: f64,
    ) -> Result<Tensor, ModelError> {
        self.uniform(name, shape, bound)
    }

    /// Writes every parameter to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        self.varmap.save(path).map_err(|e| ModelError::Checkpoint {
            path: path.display().to_string(),
            msg: e.to_string(),
        })
    }

    /// Overwrites every parameter with the values stored in a safetensors file.
    pub fn load(&mut self, path: &Path) -> Result<(), ModelError> {
        let err = |msg: String| ModelError::Checkpoint {
            path: path.display().to_string(),
            msg,
        };
        let tensors =
            candle_core::safetensors::load(path, &self.device).map_err(|e| err(e.to_string()))?;
        let data = self.varmap.data().lock().expect("varmap lock poisoned");
        // A tensor the model has no place for is another architecture's (or another class
        // count's): loading the rest would evaluate something else without a word.
        if let Some(extra) = tensors.keys().filter(|k| !data.contains_key(*k)).min() {
            return Err(err(format!(
                "tensor '{extra}' has no place in this model (another architecture or model.classes?)"
            )));
        }
        for (name, var) in data.iter() {
            let t = tensors
                .get(name)
                .ok_or_else(|| err(format!("tensor '{name}' is missing")))?;
            if t.dims() != var.dims() {
                return Err(err(format!(
                    "tensor '{name}' has shape {:?}, the model expects {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
            // Weights are saved as f32; another dtype is another program's file, and casting
            // it (bytes to floats, f64 rounded) would evaluate something else without a word.
            if t.dtype() != DType::F32 {
                return Err(err(format!(
                    "tensor '{name}' is {:?}, the model's weights are F32",
                    t.dtype()
                )));
            }
            var.set(t)?;
        }
        Ok(())
    }

    /// Copies every parameter value from `other` (same architecture), e.g. teacher → student.
    pub fn copy_from(&self, other: &Params) -> Result<(), ModelError> {
        let src = other.varmap.data().lock().expect("varmap lock poisoned");
        let dst = self.varmap.data().lock().expect("varmap lock poisoned");
        for (name, var) in dst.iter() {
            let s = src.get(name).ok_or_else(|| {
                ModelError::Invalid(format!("parameter '{name}' missing in source"))
            })?;
            var.set(&s.as_tensor().to_device(&self.device)?)?;
        }
        Ok(())
    }
}
