//! Seeded samplers for flow-matching experiments.
//!
//! Every distribution draws `n` points with a caller-owned ChaCha RNG (candle's CPU RNG is
//! not seedable) and returns an `(n, dim)` f32 [`candle_core::Tensor`] on the requested device.
//! Any distribution may serve as the source or the target of a flow.

mod error;
pub mod mnist;
mod toy2d;

pub use error::DataError;
pub use mnist::{Mnist, MnistSampler};
pub use toy2d::{Distribution, DISTRIBUTION_NAMES};

use candle_core::{Device, Tensor};
use rand_chacha::ChaCha8Rng;

/// The RNG every sampler and initialiser in flowmatch draws from.
pub type Rng = ChaCha8Rng;

/// Builds the project RNG from a seed.
pub fn rng_from_seed(seed: u64) -> Rng {
    use rand::SeedableRng;
    ChaCha8Rng::seed_from_u64(seed)
}

/// Something that draws i.i.d. points of a fixed dimension.
pub trait Sampler: Send + Sync {
    /// Dimension of one point.
    fn dim(&self) -> usize;
    /// Draws `n` points as a flat row-major `n * dim` buffer.
    fn sample_vec(&self, n: usize, rng: &mut Rng) -> Vec<f32>;
    /// Draws `n` points as an `(n, dim)` tensor on `device`.
    fn sample(&self, n: usize, rng: &mut Rng, device: &Device) -> Result<Tensor, DataError> {
        let v = self.sample_vec(n, rng);
        Ok(Tensor::from_vec(v, (n, self.dim()), device)?)
    }
    /// The number of classes its points fall into (0: it has no labels).
    fn classes(&self) -> usize {
        0
    }
    /// Draws `n` points with their class labels in `0..classes()`: the same points, from the
    /// same draws, as [`sample_vec`](Self::sample_vec). `None` without labels.
    fn sample_labeled_vec(&self, n: usize, rng: &mut Rng) -> Option<(Vec<f32>, Vec<u32>)> {
        let _ = (n, rng);
        None
    }
}

impl<S: Sampler + ?Sized> Sampler for std::sync::Arc<S> {
    fn dim(&self) -> usize {
        (**self).dim()
    }
    fn sample_vec(&self, n: usize, rng: &mut Rng) -> Vec<f32> {
        (**self).sample_vec(n, rng)
    }
    fn sample(&self, n: usize, rng: &mut Rng, device: &Device) -> Result<Tensor, DataError> {
        (**self).sample(n, rng, device)
    }
    fn classes(&self) -> usize {
        (**self).classes()
    }
    fn sample_labeled_vec(&self, n: usize, rng: &mut Rng) -> Option<(Vec<f32>, Vec<u32>)> {
        (**self).sample_labeled_vec(n, rng)
    }
}
