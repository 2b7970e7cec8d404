//! Metrics for flows and samples.
//!
//! - [`ot`]: exact assignment on squared Euclidean costs: our shortest-augmenting-path
//!   solver (Jonker–Volgenant, the default) or `pathfinding`'s Kuhn–Munkres.
//! - [`distance`]: exact empirical W2, RBF-MMD², energy distance between two samples.
//! - [`trajectory`]: straightness (lesson), Liu et al.'s S, Tong et al.'s normalized path energy.

pub mod distance;
mod error;
pub mod frechet;
pub mod ot;
pub mod sinkhorn;
pub mod trajectory;

pub use distance::{energy_distance, median_bandwidth, mmd_rbf, nn_accuracy, w2, Reference};
pub use error::MetricsError;
pub use frechet::frechet_distance;
pub use sinkhorn::{sinkhorn_log, sinkhorn_stabilized, Sinkhorn};
pub use trajectory::{normalized_path_energy, path_energy, rf_straightness, straightness};

use candle_core::{DType, Tensor};

/// A batch of points as row-major f64: `(data, n, d)`; `(B, ...)` tensors are flattened per row.
pub fn rows(t: &Tensor) -> Result<(Vec<f64>, usize, usize), MetricsError> {
    let n = t.dim(0)?;
    let d = t.elem_count() / n.max(1);
    let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok((v, n, d))
}

/// Says on the terminal that a test could not run on this machine, and why, in the manner of
/// candle's `test_device!`: libtest hides what a passing test prints, but not a direct write
/// to stderr, so a skip never passes silently.
#[cfg(test)]
pub(crate) fn skipped(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "test {test} ... skipped: {why}");
}

/// Whether `python3` can import POT (the reference of the OT tests, which `.ci/run` installs);
/// says the test `what` is skipped when it cannot.
#[cfg(test)]
pub(crate) fn pot_here(what: &str) -> bool {
    let have = std::process::Command::new("python3")
        .args(["-c", "import ot"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        eprintln!("test {what} ... skipped: python3 with POT (pip install pot) is not here");
    }
    have
}

/// The standard output of `python3 -c script` (a POT reference), which must succeed.
#[cfg(test)]
pub(crate) fn python(script: &str) -> String {
    let o = std::process::Command::new("python3")
        .args(["-c", script])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}
