//! The Fréchet distance between two Gaussians fitted to feature sets (FID's formula):
//! `‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^{½} Σ₂ Σ₁^{½})^{½}`.

use crate::MetricsError;
use nalgebra::{DMatrix, DVector, SymmetricEigen};

fn moments(x: &[f64], d: usize) -> (DVector<f64>, DMatrix<f64>) {
    let n = x.len() / d;
    let m = DMatrix::from_row_slice(n, d, x);
    let mean = DVector::from_iterator(d, (0..d).map(|j| m.column(j).sum() / n as f64));
    let mut c = m.clone();
    for j in 0..d {
        let mu = mean[j];
        c.column_mut(j).add_scalar_mut(-mu);
    }
    let cov = c.transpose() * &c / (n as f64 - 1.0);
    (mean, cov)
}

/// Square root of a symmetric positive semi-definite matrix (negative eigenvalues, which are
/// round-off, are clamped to 0).
fn sqrtm_psd(a: &DMatrix<f64>) -> DMatrix<f64> {
    let sym = (a + a.transpose()) * 0.5;
    let e = SymmetricEigen::new(sym);
    let s = e.eigenvalues.map(|l| l.max(0.0).sqrt());
    &e.eigenvectors * DMatrix::from_diagonal(&s) * e.eigenvectors.transpose()
}

/// Fréchet distance between the Gaussians fitted to `a` and `b` (row-major, `d` features per
/// row, at least 2 rows each).
pub fn frechet_distance(a: &[f32], b: &[f32], d: usize) -> Result<f64, MetricsError> {
    if d == 0
        || !a.len().is_multiple_of(d)
        || !b.len().is_multiple_of(d)
        || a.len() < 2 * d
        || b.len() < 2 * d
    {
        return Err(MetricsError::Shape(format!(
            "frechet: need two sets of at least 2 rows of {d} features, got {} and {} values",
            a.len(),
            b.len()
        )));
    }
    if a.iter().chain(b).any(|v| !v.is_finite()) {
        return Err(MetricsError::NonFinite("frechet features"));
    }
    let to64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    let (ma, ca) = moments(&to64(a), d);
    let (mb, cb) = moments(&to64(b), d);
    let ra = sqrtm_psd(&ca);
    let inner = &ra * &cb * &ra;
    let cross: f64 = SymmetricEigen::new((&inner + inner.transpose()) * 0.5)
        .eigenvalues
        .iter()
        .map(|l| l.max(0.0).sqrt())
        .sum();
    let fd = (ma - mb).norm_squared() + ca.trace() + cb.trace() - 2.0 * cross;
    Ok(fd.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-normal numbers (Box–Muller on an LCG).
    fn normals(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let mut u = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        (0..n)
            .map(|_| (-2.0 * u().ln()).sqrt() * (2.0 * std::f64::consts::PI * u()).cos())
            .collect()
    }

    #[test]
    fn matches_the_closed_form_for_gaussians() {
        // N(0, I) vs N(m, s² I) in d dims: |m|² + d (1 - s)².
        let (n, d) = (20000, 3);
        let a: Vec<f32> = normals(n * d, 1).iter().map(|&x| x as f32).collect();
        let (m, s) = (0.7f64, 2.0f64);
        let b: Vec<f32> = normals(n * d, 2)
            .iter()
            .map(|&x| (m + s * x) as f32)
            .collect();
        let want = d as f64 * m * m + d as f64 * (1.0 - s).powi(2);
        let got = frechet_distance(&a, &b, d).unwrap();
        assert!((got - want).abs() < 0.1 * want, "{got} vs {want}");
        let same = frechet_distance(&a, &a, d).unwrap();
        assert!(same < 1e-9, "{same}");
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(frechet_distance(&[1.0, 2.0], &[1.0, 2.0, 3.0, 4.0], 2).is_err());
        assert!(frechet_distance(&[f32::NAN, 0.0, 1.0, 1.0], &[0.0, 0.0, 1.0, 1.0], 1).is_err());
    }
}
