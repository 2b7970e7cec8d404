//! Distances between two samples of points.

use crate::ot::ot_pairing;
use crate::{rows, MetricsError};
use candle_core::Tensor;
use rayon::prelude::*;

fn pair_rows(a: &Tensor, b: &Tensor) -> Result<(Vec<f64>, Vec<f64>, usize), MetricsError> {
    let (va, na, da) = rows(a)?;
    let (vb, nb, db) = rows(b)?;
    if da != db {
        return Err(MetricsError::Shape(format!(
            "dimension mismatch: {da} vs {db}"
        )));
    }
    if na == 0 || nb == 0 {
        return Err(MetricsError::Shape("empty sample".into()));
    }
    if va.iter().chain(&vb).any(|x| !x.is_finite()) {
        return Err(MetricsError::NonFinite("samples"));
    }
    Ok((va, vb, da))
}

/// Exact empirical 2-Wasserstein distance between two equal-size samples (Hungarian).
pub fn w2(a: &Tensor, b: &Tensor) -> Result<f64, MetricsError> {
    let (va, vb, d) = pair_rows(a, b)?;
    let (_, mean_sq) = ot_pairing(&va, &vb, d)?;
    Ok(mean_sq.sqrt())
}

/// The leave-one-out 1-nearest-neighbour two-sample accuracy (Lopez-Paz & Oquab 2017,
/// "Revisiting classifier two-sample tests"): every point of `a ∪ b` is labelled by its
/// nearest other point (squared Euclidean distance, the lower index on a tie), and the
/// fraction labelled with its own sample is returned. 0.5 means the samples cannot be told
/// apart; 1.0 that they are fully separated (a generator that copies the real points scores
/// near 0).
pub fn nn_accuracy(a: &Tensor, b: &Tensor) -> Result<f64, MetricsError> {
    let (va, vb, d) = pair_rows(a, b)?;
    let na = va.len() / d;
    let all: Vec<f64> = va.into_iter().chain(vb).collect();
    let n = all.len() / d;
    let correct: usize = (0..n)
        .into_par_iter()
        .map(|i| {
            let p = &all[i * d..(i + 1) * d];
            let mut best = (f64::INFINITY, usize::MAX);
            for j in (0..n).filter(|&j| j != i) {
                let q = &all[j * d..(j + 1) * d];
                let dist: f64 = p.iter().zip(q).map(|(x, y)| (x - y) * (x - y)).sum();
                if dist < best.0 {
                    best = (dist, j);
                }
            }
            usize::from((best.1 < na) == (i < na))
        })
        .sum();
    Ok(correct as f64 / n as f64)
}

/// A real sample that several generated samples are measured against (one flow at 100, 50,
/// 10 … steps): its rows are read once, its own MMD kernel term is computed once, and each
/// exact W2 solve is warm-started from the column potentials of the last one
/// ([`ot::assignment_warm`](crate::ot::assignment_warm)), so that a sequence of similar
/// samples costs a fraction of cold solves. Every value is the one [`w2`] and [`mmd_rbf`]
/// give, bit for bit (the optimal pairing does not depend on the start).
#[derive(Clone)]
pub struct Reference {
    real: Vec<f64>,
    n: usize,
    d: usize,
    duals: Option<Vec<f64>>,
    /// The MMD bandwidth and the real sample's mean kernel at it.
    kernel: Option<(f64, f64)>,
}

impl Reference {
    pub fn new(real: &Tensor) -> Result<Self, MetricsError> {
        let (real, n, d) = rows(real)?;
        if n == 0 {
            return Err(MetricsError::Shape("empty sample".into()));
        }
        if real.iter().any(|x| !x.is_finite()) {
            return Err(MetricsError::NonFinite("samples"));
        }
        Ok(Self {
            real,
            n,
            d,
            duals: None,
            kernel: None,
        })
    }

    /// The rows of `gen`, checked against the real sample's shape.
    fn rows_of(&self, gen: &Tensor, same_size: bool) -> Result<Vec<f64>, MetricsError> {
        let (g, n, d) = rows(gen)?;
        if d != self.d || (same_size && n != self.n) || n == 0 {
            return Err(MetricsError::Shape(format!(
                "samples of {n}×{d} against a real sample of {}×{}",
                self.n, self.d
            )));
        }
        if g.iter().any(|x| !x.is_finite()) {
            return Err(MetricsError::NonFinite("samples"));
        }
        Ok(g)
    }

    /// Exact W2 between `gen` and the real sample (equal sizes).
    pub fn w2(&mut self, gen: &Tensor) -> Result<f64, MetricsError> {
        let g = self.rows_of(gen, true)?;
        let (n, d) = (self.n, self.d);
        let c = crate::ot::sq_cost_matrix(&g, &self.real, d);
        let (perm, duals) = crate::ot::assignment_warm(&c, n, self.duals.as_deref())?;
        self.duals = Some(duals);
        Ok(crate::ot::paired_mean(&c, &perm).sqrt())
    }

    /// Squared MMD between `gen` and the real sample at bandwidth `sigma` ([`mmd_rbf`]).
    pub fn mmd(&mut self, gen: &Tensor, sigma: f64) -> Result<f64, MetricsError> {
        if sigma.is_nan() || sigma <= 0.0 {
            return Err(MetricsError::Shape(format!(
                "MMD bandwidth must be positive, got {sigma}"
            )));
        }
        let g = self.rows_of(gen, false)?;
        let gamma = 1.0 / (2.0 * sigma * sigma);
        let k = |sq: f64| (-gamma * sq).exp();
        let kyy = match self.kernel {
            Some((s, kyy)) if s == sigma => kyy,
            _ => {
                let kyy = mean_kernel(&self.real, &self.real, self.d, k);
                self.kernel = Some((sigma, kyy));
                kyy
            }
        };
        Ok(
            (mean_kernel(&g, &g, self.d, k) + kyy - 2.0 * mean_kernel(&g, &self.real, self.d, k))
                .max(0.0),
        )
    }
}

fn mean_kernel(a: &[f64], b: &[f64], d: usize, k: impl Fn(f64) -> f64 + Sync) -> f64 {
    let (n, m) = (a.len() / d, b.len() / d);
    // Rows in parallel, summed in a fixed order: the same numbers whatever the thread count.
    let per_row: Vec<f64> = (0..n)
        .into_par_iter()
        .map(|i| {
            let ai = &a[i * d..(i + 1) * d];
            (0..m)
                .map(|j| {
                    let bj = &b[j * d..(j + 1) * d];
                    k(ai.iter().zip(bj).map(|(x, y)| (x - y) * (x - y)).sum())
                })
                .sum::<f64>()
        })
        .collect();
    per_row.iter().sum::<f64>() / (n * m) as f64
}

/// Squared MMD (biased V-statistic) with a Gaussian kernel `exp(-|x-y|²/(2σ²))`.
/// With `sigma = None` the bandwidth is the median pairwise distance of the pooled sample.
pub fn mmd_rbf(a: &Tensor, b: &Tensor, sigma: Option<f64>) -> Result<f64, MetricsError> {
    let (va, vb, d) = pair_rows(a, b)?;
    let sigma = match sigma {
        Some(s) if s > 0.0 => s,
        Some(s) => {
            return Err(MetricsError::Shape(format!(
                "MMD bandwidth must be positive, got {s}"
            )))
        }
        None => median_distance(&va, &vb, d),
    };
    let g = 1.0 / (2.0 * sigma * sigma);
    let k = |sq: f64| (-g * sq).exp();
    Ok((mean_kernel(&va, &va, d, k) + mean_kernel(&vb, &vb, d, k)
        - 2.0 * mean_kernel(&va, &vb, d, k))
    .max(0.0))
}

/// Median pairwise distance within one sample (a bandwidth for [`mmd_rbf`]).
pub fn median_bandwidth(a: &Tensor) -> Result<f64, MetricsError> {
    let (v, _, d) = rows(a)?;
    Ok(median_distance(&v, &[], d))
}

fn median_distance(a: &[f64], b: &[f64], d: usize) -> f64 {
    // Median over a bounded subsample of pooled pairs.
    let pooled: Vec<&[f64]> = a.chunks(d).chain(b.chunks(d)).collect();
    let stride = (pooled.len() / 500).max(1);
    let sub: Vec<&[f64]> = pooled.into_iter().step_by(stride).collect();
    let mut dists = Vec::new();
    for i in 0..sub.len() {
        for j in i + 1..sub.len() {
            dists.push(
                sub[i]
                    .iter()
                    .zip(sub[j])
                    .map(|(x, y)| (x - y) * (x - y))
                    .sum::<f64>()
                    .sqrt(),
            );
        }
    }
    if dists.is_empty() {
        return 1.0;
    }
    dists.sort_by(|x, y| x.total_cmp(y));
    dists[dists.len() / 2].max(1e-12)
}

/// Energy distance `2E|X-Y| - E|X-X'| - E|Y-Y'|` (Székely & Rizzo).
pub fn energy_distance(a: &Tensor, b: &Tensor) -> Result<f64, MetricsError> {
    let (va, vb, d) = pair_rows(a, b)?;
    let k = |sq: f64| sq.sqrt();
    Ok(2.0 * mean_kernel(&va, &vb, d, k)
        - mean_kernel(&va, &va, d, k)
        - mean_kernel(&vb, &vb, d, k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nn_accuracy_is_one_half_for_one_distribution_and_one_for_two_apart() {
        // Uniform points on the unit square from a xorshift generator.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut uniform = |n: usize| -> Tensor {
            let v: Vec<f32> = (0..2 * n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state >> 11) as f32 / (1u64 << 53) as f32
                })
                .collect();
            Tensor::from_vec(v, (n, 2), &Device::Cpu).unwrap()
        };
        let (a, b) = (uniform(1000), uniform(1000));
        let same = nn_accuracy(&a, &b).unwrap();
        assert!((same - 0.5).abs() < 0.05, "{same}");
        let far = (b.clone() + 100.0).unwrap();
        assert_eq!(nn_accuracy(&a, &far).unwrap(), 1.0);
        // Copies of the real points: each one's neighbour is its twin, in the other sample.
        assert_eq!(nn_accuracy(&a, &a.clone()).unwrap(), 0.0);
    }
    use candle_core::Device;

    fn sample(n: usize, shift: f64) -> Tensor {
        // A deterministic, spread-out 2D sample.
        let v: Vec<f32> = (0..n)
            .flat_map(|i| {
                let a = i as f64 * 2.399963;
                let r = (i as f64 / n as f64).sqrt();
                [(r * a.cos() + shift) as f32, (r * a.sin()) as f32]
            })
            .collect();
        Tensor::from_vec(v, (n, 2), &Device::Cpu).unwrap()
    }

    #[test]
    fn a_reference_gives_the_bits_of_cold_w2_and_mmd() {
        let real = sample(300, 0.0);
        let mut r = Reference::new(&real).unwrap();
        for shift in [0.5, 0.45, 0.1, 1.5, 0.0] {
            let gen = sample(300, shift).affine(1.0 + shift / 3.0, 0.0).unwrap();
            assert_eq!(
                r.w2(&gen).unwrap().to_bits(),
                w2(&gen, &real).unwrap().to_bits()
            );
            assert_eq!(
                r.mmd(&gen, 0.7).unwrap().to_bits(),
                mmd_rbf(&gen, &real, Some(0.7)).unwrap().to_bits()
            );
        }
        assert!(r.w2(&sample(299, 0.0)).is_err());
        assert!(r.mmd(&sample(10, 0.0), 0.0).is_err());
    }

    #[test]
    fn w2_of_a_shifted_copy_equals_the_shift() {
        let a = sample(300, 0.0);
        for shift in [0.0, 0.5, 3.0] {
            let b = sample(300, shift);
            assert!((w2(&a, &b).unwrap() - shift).abs() < 1e-5, "shift {shift}");
        }
    }

    #[test]
    fn mmd_and_energy_vanish_on_identical_samples_and_grow_with_shift() {
        let a = sample(200, 0.0);
        let near = sample(200, 0.1);
        let far = sample(200, 1.0);
        assert!(mmd_rbf(&a, &a, None).unwrap() < 1e-12);
        assert!(energy_distance(&a, &a).unwrap().abs() < 1e-12);
        let (m1, m2) = (
            mmd_rbf(&a, &near, Some(0.5)).unwrap(),
            mmd_rbf(&a, &far, Some(0.5)).unwrap(),
        );
        assert!(0.0 < m1 && m1 < m2);
        let (e1, e2) = (
            energy_distance(&a, &near).unwrap(),
            energy_distance(&a, &far).unwrap(),
        );
        assert!(0.0 < e1 && e1 < e2);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let a = sample(10, 0.0);
        let b = sample(11, 0.0);
        assert!(w2(&a, &b).is_err());
        let nan = Tensor::new(&[[f32::NAN, 0.0]], &Device::Cpu).unwrap();
        let one = Tensor::new(&[[0.0f32, 0.0]], &Device::Cpu).unwrap();
        assert!(matches!(w2(&nan, &one), Err(MetricsError::NonFinite(_))));
    }
}
