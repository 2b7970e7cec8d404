//! A small MNIST classifier whose penultimate features give flowmatch's FID-like score.

use crate::Linear;
use crate::{ModelError, Params};
use candle_core::{Module, Result, Tensor};
use std::path::Path;

/// `784 → 256 → 128 → 10`, ReLU; `features` are the 128 penultimate activations.
pub struct Classifier {
    pub params: Params,
    fc1: Linear,
    fc2: Linear,
    fc3: Linear,
}

impl Classifier {
    /// Feature width (the Fréchet distance is computed in this space).
    pub const FEATURES: usize = 128;

    /// A fresh classifier for `dim` inputs and `classes` outputs, weights drawn from `seed`.
    pub fn new(
        dim: usize,
        classes: usize,
        seed: u64,
        device: &candle_core::Device,
    ) -> std::result::Result<Self, ModelError> {
        let mut params = Params::new(seed, device);
        let fc1 = params.linear("fc1", dim, 256)?;
        let fc2 = params.linear("fc2", 256, Self::FEATURES)?;
        let fc3 = params.linear("fc3", Self::FEATURES, classes)?;
        Ok(Self {
            params,
            fc1,
            fc2,
            fc3,
        })
    }

    /// Loads weights saved by [`Params::save`].
    pub fn load(
        path: &Path,
        dim: usize,
        classes: usize,
        device: &candle_core::Device,
    ) -> std::result::Result<Self, ModelError> {
        let mut c = Self::new(dim, classes, 0, device)?;
        c.params.load(path)?;
        Ok(c)
    }

    /// Penultimate features `(B, 128)`.
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.flatten_from(1)?;
        self.fc2.forward(&self.fc1.forward(&x)?.relu()?)?.relu()
    }

    /// Class logits `(B, classes)`.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.fc3.forward(&self.features(x)?)
    }
}
