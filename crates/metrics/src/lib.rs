//! Metrics for flows and samples.
//!
//! - [`ot`]: exact assignment (Hungarian, via `pathfinding`) on squared Euclidean costs.
//! - [`distance`]: exact empirical W2, RBF-MMD², energy distance between two samples.
//! - [`trajectory`]: straightness (lesson), Liu et al.'s S, Tong et al.'s normalized path energy.

pub mod distance;
mod error;
pub mod frechet;
pub mod ot;
pub mod trajectory;

pub use distance::{energy_distance, median_bandwidth, mmd_rbf, w2};
pub use error::MetricsError;
pub use frechet::frechet_distance;
pub use trajectory::{normalized_path_energy, path_energy, rf_straightness, straightness};

use candle_core::{DType, Tensor};

/// A batch of points as row-major f64: `(data, n, d)`; `(B, ...)` tensors are flattened per row.
pub fn rows(t: &Tensor) -> Result<(Vec<f64>, usize, usize), MetricsError> {
    let n = t.dim(0)?;
    let d = t.elem_count() / n.max(1);
    let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok((v, n, d))
}
