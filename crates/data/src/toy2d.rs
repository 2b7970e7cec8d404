//! The blog's and the lesson's distributions (same parameters), plus the usual OT benchmarks.

use crate::{DataError, Rng, Sampler};
use rand::seq::SliceRandom;
use rand::Rng as _;
use rand_distr::StandardNormal;
use std::f64::consts::PI;

/// The largest `with_scale` accepted: the training loss squares distances in f32.
pub const MAX_SCALE: f64 = 1e6;

/// Names accepted by [`Distribution::from_name`].
pub const DISTRIBUTION_NAMES: &[&str] = &[
    "gaussian",
    "square",
    "heart",
    "spiral",
    "two-gaussians",
    "smiley",
    "moons",
    "moons-torchcfm",
    "8gaussians",
    "checkerboard",
    "gaussian-nd",
];

/// The unit-circle centres of `8gaussians`' modes, in TorchCFM's order (the mode's label);
/// `1 / √2` as TorchCFM computes it (not the correctly rounded constant, one bit away).
fn eight_centers() -> [[f64; 2]; 8] {
    let s = 1.0 / 2f64.sqrt();
    [
        [1.0, 0.0],
        [-1.0, 0.0],
        [0.0, 1.0],
        [0.0, -1.0],
        [s, s],
        [-s, s],
        [s, -s],
        [-s, -s],
    ]
}

/// A named distribution with its parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum Distribution {
    /// Isotropic 2D Gaussian `N(0, scale² I)` (blog `create_gaussian_data`, scale 1).
    Gaussian { scale: f64 },
    /// Uniform on `[-scale, scale]²` (blog `create_square_data`, scale 3).
    Square { scale: f64 },
    /// Uniform inside the blog's heart curve, scaled (blog `create_heart_data`, scale 3).
    Heart { scale: f64 },
    /// Archimedean spiral with noise `0.1·scale` (blog `create_spiral_data`, scale 1).
    Spiral { scale: f64 },
    /// Two Gaussians at `x = ±shift` (blog `create_two_gaussians_data`, scale 1, shift 2.5).
    TwoGaussians { scale: f64, shift: f64 },
    /// Two eyes and a smile (blog `create_smiley_data`, scale 2.5).
    Smiley { scale: f64 },
    /// sklearn's `make_moons` with Gaussian noise (lesson: noise 0.05).
    Moons { noise: f64 },
    /// TorchCFM's moons (torchdyn's `generate_moons(n, noise)`, scaled `3x − 1`): both
    /// coordinates of a point are shifted by one uniform draw in `[0, noise)` (noise 0.2), the
    /// target of TorchCFM's 8gaussians → moons and of C²OT's conditional example.
    TorchcfmMoons { noise: f64 },
    /// Eight Gaussians on a circle of radius `scale` (TorchCFM: scale 5, var 0.1).
    EightGaussians { scale: f64, var: f64 },
    /// The FFJORD checkerboard on `[-4, 4]²`.
    Checkerboard,
    /// Standard Gaussian in `dim` dimensions.
    GaussianNd { dim: usize },
}

impl Distribution {
    /// The distribution named `name` with the seeds' default parameters.
    pub fn from_name(name: &str) -> Result<Self, DataError> {
        Ok(match name {
            "gaussian" => Self::Gaussian { scale: 1.0 },
            "square" => Self::Square { scale: 3.0 },
            "heart" => Self::Heart { scale: 3.0 },
            "spiral" => Self::Spiral { scale: 1.0 },
            "two-gaussians" => Self::TwoGaussians {
                scale: 1.0,
                shift: 2.5,
            },
            "smiley" => Self::Smiley { scale: 2.5 },
            "moons" => Self::Moons { noise: 0.05 },
            "moons-torchcfm" => Self::TorchcfmMoons { noise: 0.2 },
            "8gaussians" => Self::EightGaussians {
                scale: 5.0,
                var: 0.1,
            },
            "checkerboard" => Self::Checkerboard,
            "gaussian-nd" => Self::GaussianNd { dim: 2 },
            _ => {
                return Err(DataError::UnknownDistribution {
                    name: name.to_string(),
                    known: DISTRIBUTION_NAMES.join(", "),
                })
            }
        })
    }

    /// The standard deviation of an isotropic Gaussian (`gaussian`, `gaussian-nd`), whose
    /// density a likelihood starts from; `None` for the other shapes.
    pub fn gaussian_std(&self) -> Option<f64> {
        match *self {
            Self::Gaussian { scale } => Some(scale),
            Self::GaussianNd { .. } => Some(1.0),
            _ => None,
        }
    }

    /// Replaces the distribution's main parameter: `scale` (or `noise` for moons, `dim` for
    /// gaussian-nd). Errors for a non-positive value or a distribution without one.
    pub fn with_scale(self, value: f64) -> Result<Self, DataError> {
        if !(value.is_finite() && value > 0.0) {
            return Err(DataError::InvalidParameter {
                dist: self.name(),
                msg: format!("scale must be a positive number, got {value}"),
            });
        }
        if value > MAX_SCALE {
            return Err(DataError::InvalidParameter {
                dist: self.name(),
                msg: format!(
                    "scale must be at most {MAX_SCALE:e} (squared distances of larger points overflow f32), got {value}"
                ),
            });
        }
        Ok(match self {
            Self::Gaussian { .. } => Self::Gaussian { scale: value },
            Self::Square { .. } => Self::Square { scale: value },
            Self::Heart { .. } => Self::Heart { scale: value },
            Self::Spiral { .. } => Self::Spiral { scale: value },
            Self::TwoGaussians { shift, .. } => Self::TwoGaussians {
                scale: value,
                shift,
            },
            Self::Smiley { .. } => Self::Smiley { scale: value },
            Self::Moons { .. } => Self::Moons { noise: value },
            Self::TorchcfmMoons { .. } => Self::TorchcfmMoons { noise: value },
            Self::EightGaussians { var, .. } => Self::EightGaussians { scale: value, var },
            Self::Checkerboard => {
                return Err(DataError::InvalidParameter {
                    dist: "checkerboard",
                    msg: "has no scale parameter".into(),
                })
            }
            Self::GaussianNd { .. } => Self::GaussianNd {
                dim: value.round() as usize,
            },
        })
    }

    /// Sets the dimension (only `gaussian-nd` has a free dimension; 2D shapes require 2).
    pub fn with_dim(self, dim: usize) -> Result<Self, DataError> {
        match self {
            Self::GaussianNd { .. } if dim > 0 => Ok(Self::GaussianNd { dim }),
            other if dim == 2 => Ok(other),
            other => Err(DataError::InvalidParameter {
                dist: other.name(),
                msg: format!("dimension {dim} is not supported (2D shape)"),
            }),
        }
    }

    /// The class the generating rule gives a point `[x, y]`: the nearest mode (8gaussians),
    /// the nearer moon, the side (two-gaussians), the cell (checkerboard); `None` for the
    /// shapes without classes. Points drawn with a label get that label back, but for the
    /// few that the noise carries across (two-gaussians overlap).
    pub fn class_of(&self, p: &[f32]) -> Option<u32> {
        let (x, y) = (p[0] as f64, p[1] as f64);
        Some(match *self {
            Self::EightGaussians { scale, .. } => {
                let c = eight_centers();
                let d = |k: usize| (x - scale * c[k][0]).powi(2) + (y - scale * c[k][1]).powi(2);
                (0..8).min_by(|&a, &b| d(a).total_cmp(&d(b)))? as u32
            }
            Self::Moons { .. } => nearer_moon(x, y),
            // Undo the scaling and the mean of the diagonal shift.
            Self::TorchcfmMoons { noise } => {
                nearer_moon((x + 1.0) / 3.0 - noise / 2.0, (y + 1.0) / 3.0 - noise / 2.0)
            }
            Self::TwoGaussians { .. } => (x > 0.0) as u32,
            Self::Checkerboard => {
                let (col, y) = ((x / 2.0).floor(), y / 2.0);
                let parity = col.rem_euclid(2.0);
                (col + 2.0).clamp(0.0, 3.0) as u32 * 2 + (y - parity < -1.0) as u32
            }
            _ => return None,
        })
    }

    /// The config name of this distribution.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Gaussian { .. } => "gaussian",
            Self::Square { .. } => "square",
            Self::Heart { .. } => "heart",
            Self::Spiral { .. } => "spiral",
            Self::TwoGaussians { .. } => "two-gaussians",
            Self::Smiley { .. } => "smiley",
            Self::Moons { .. } => "moons",
            Self::TorchcfmMoons { .. } => "moons-torchcfm",
            Self::EightGaussians { .. } => "8gaussians",
            Self::Checkerboard => "checkerboard",
            Self::GaussianNd { .. } => "gaussian-nd",
        }
    }
}

/// Which of sklearn's unit moons is nearer to `(x, y)`: 0 for the outer one (the upper half
/// circle around (0, 0)), 1 for the inner one (the lower half around (1, 0.5)).
fn nearer_moon(x: f64, y: f64) -> u32 {
    let arc = |cx: f64, cy: f64, upper: bool| {
        let (dx, dy) = (x - cx, y - cy);
        if (dy >= 0.0) == upper {
            ((dx * dx + dy * dy).sqrt() - 1.0).abs()
        } else {
            ((dx.abs() - 1.0).powi(2) + dy * dy).sqrt()
        }
    };
    (arc(1.0, 0.5, false) < arc(0.0, 0.0, true)) as u32
}

/// The two unit moons' points with their labels, as sklearn and torchdyn lay them out: the
/// outer moon's `n / 2` points, then the inner one's, each evenly spaced in angle.
fn moon_points(n: usize) -> Vec<([f64; 2], u32)> {
    let n_out = n / 2;
    let n_in = n - n_out;
    let lin = |i: usize, m: usize| {
        if m <= 1 {
            0.0
        } else {
            PI * i as f64 / (m - 1) as f64
        }
    };
    let mut pts = Vec::with_capacity(n);
    for i in 0..n_out {
        let a = lin(i, n_out);
        pts.push(([a.cos(), a.sin()], 0));
    }
    for i in 0..n_in {
        let a = lin(i, n_in);
        pts.push(([1.0 - a.cos(), 1.0 - a.sin() - 0.5], 1));
    }
    pts
}

fn normal(rng: &mut Rng) -> f64 {
    rng.sample::<f64, _>(StandardNormal)
}

fn uniform(rng: &mut Rng) -> f64 {
    rng.random::<f64>()
}

fn push(out: &mut Vec<f32>, x: f64, y: f64) {
    out.push(x as f32);
    out.push(y as f32);
}

fn shuffled_points(mut pts: Vec<[f64; 2]>, n: usize, rng: &mut Rng) -> Vec<f32> {
    pts.shuffle(rng);
    pts.truncate(n);
    pts.into_iter()
        .flat_map(|[x, y]| [x as f32, y as f32])
        .collect()
}

impl Sampler for Distribution {
    fn dim(&self) -> usize {
        match self {
            Self::GaussianNd { dim } => *dim,
            _ => 2,
        }
    }

    fn sample_vec(&self, n: usize, rng: &mut Rng) -> Vec<f32> {
        self.draw(n, rng, &mut Vec::new())
    }

    fn classes(&self) -> usize {
        match self {
            Self::TwoGaussians { .. } | Self::Moons { .. } | Self::TorchcfmMoons { .. } => 2,
            Self::EightGaussians { .. } | Self::Checkerboard => 8,
            _ => 0,
        }
    }

    fn sample_labeled_vec(&self, n: usize, rng: &mut Rng) -> Option<(Vec<f32>, Vec<u32>)> {
        if self.classes() == 0 {
            return None;
        }
        let mut labels = Vec::with_capacity(n);
        let x = self.draw(n, rng, &mut labels);
        Some((x, labels))
    }
}

/// Points `[x, y]` with their labels, shuffled together, flattened; the labels go to `labels`.
fn flatten_labeled(pts: Vec<([f64; 2], u32)>, labels: &mut Vec<u32>) -> Vec<f32> {
    labels.extend(pts.iter().map(|p| p.1));
    pts.into_iter()
        .flat_map(|([x, y], _)| [x as f32, y as f32])
        .collect()
}

impl Distribution {
    /// Draws `n` points; the shapes with classes push each point's label to `labels` (the
    /// draws are the same whether or not anyone reads the labels).
    fn draw(&self, n: usize, rng: &mut Rng, labels: &mut Vec<u32>) -> Vec<f32> {
        let mut out = Vec::with_capacity(n * self.dim());
        match *self {
            Self::Gaussian { scale } => {
                for _ in 0..n {
                    push(&mut out, normal(rng) * scale, normal(rng) * scale);
                }
            }
            Self::GaussianNd { dim } => {
                out.extend((0..n * dim).map(|_| normal(rng) as f32));
            }
            Self::Square { scale } => {
                for _ in 0..n {
                    let (x, y) = (uniform(rng), uniform(rng));
                    push(&mut out, (x * 2.0 - 1.0) * scale, (y * 2.0 - 1.0) * scale);
                }
            }
            Self::Heart { scale } => {
                // Rejection from [-1, 1]², accept x² + (5(y + 1/4)/4 - sqrt|x|)² <= 1.
                while out.len() < 2 * n {
                    let x = uniform(rng) * 2.0 - 1.0;
                    let y = uniform(rng) * 2.0 - 1.0;
                    let h = 5.0 * (y + 0.25) / 4.0 - x.abs().sqrt();
                    if x * x + h * h <= 1.0 {
                        push(&mut out, x * scale, y * scale);
                    }
                }
            }
            Self::Spiral { scale } => {
                let noise = 0.1 * scale;
                for _ in 0..n {
                    let theta = 6.0 * PI * uniform(rng);
                    let r = theta / (2.0 * PI) * scale;
                    let x = r * theta.cos() + noise * normal(rng);
                    let y = r * theta.sin() + noise * normal(rng);
                    push(&mut out, x, y);
                }
            }
            Self::TwoGaussians { scale, shift } => {
                // Label 0: the left Gaussian, 1: the right one.
                let mut pts: Vec<([f64; 2], u32)> = (0..n)
                    .map(|i| {
                        let (dx, side) = if i < n / 2 { (-shift, 0) } else { (shift, 1) };
                        ([normal(rng) * scale + dx, normal(rng) * scale], side)
                    })
                    .collect();
                pts.shuffle(rng);
                return flatten_labeled(pts, labels);
            }
            Self::Smiley { scale } => {
                let m = n / 3 + 20;
                let mut pts = Vec::with_capacity(3 * m);
                for eye in [[-1.0, 0.9], [1.0, 0.9]] {
                    for _ in 0..m {
                        pts.push([
                            normal(rng) * 0.2 + eye[0] * scale * 0.4,
                            normal(rng) * 0.2 + eye[1] * scale * 0.4,
                        ]);
                    }
                }
                for _ in 0..m {
                    let theta = -PI / 6.0 - 2.0 * PI / 3.0 * uniform(rng);
                    let r = scale * 0.6 + (scale / 4.0) * uniform(rng);
                    pts.push([r * theta.cos(), r * theta.sin()]);
                }
                return shuffled_points(pts, n, rng);
            }
            Self::Moons { noise } => {
                // sklearn.datasets.make_moons(n, shuffle=True, noise=noise).
                // Label 0: the outer (upper) moon, 1: the inner one (sklearn's y).
                let mut pts = moon_points(n);
                pts.shuffle(rng);
                for (p, _) in pts.iter_mut() {
                    p[0] += noise * normal(rng);
                    p[1] += noise * normal(rng);
                }
                return flatten_labeled(pts, labels);
            }
            Self::TorchcfmMoons { noise } => {
                // torchdyn: X += rand(n, 1) * noise (one shift for both coordinates), then
                // TorchCFM's 3X − 1. Shuffled here (torchdyn keeps the outer moon first), so
                // that any leading part of a batch holds both moons.
                let mut pts = moon_points(n);
                pts.shuffle(rng);
                for (p, _) in pts.iter_mut() {
                    let u = noise * uniform(rng);
                    *p = [(p[0] + u) * 3.0 - 1.0, (p[1] + u) * 3.0 - 1.0];
                }
                return flatten_labeled(pts, labels);
            }
            Self::EightGaussians { scale, var } => {
                // TorchCFM's eight_normal_sample: covariance sqrt(var)·I around 8 centres.
                let std = var.sqrt().sqrt();
                let centers = eight_centers();
                // Label: the index of the mode.
                for _ in 0..n {
                    let k = rng.random_range(0..8);
                    labels.push(k as u32);
                    let c = centers[k];
                    let x = c[0] * scale + std * normal(rng);
                    let y = c[1] * scale + std * normal(rng);
                    push(&mut out, x, y);
                }
            }
            Self::Checkerboard => {
                // Label: the cell, 2·column + row among the 8 filled cells.
                for _ in 0..n {
                    let x1 = uniform(rng) * 4.0 - 2.0;
                    let u = uniform(rng);
                    let row = rng.random_range(0..2);
                    let x2 = u - row as f64 * 2.0 + (x1.floor().rem_euclid(2.0));
                    labels.push(((x1.floor() + 2.0) as u32) * 2 + row as u32);
                    push(&mut out, x1 * 2.0, x2 * 2.0);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng_from_seed;
    use candle_core::Device;

    fn stats(v: &[f32], dim: usize) -> (Vec<f64>, Vec<f64>) {
        let n = v.len() / dim;
        let mut mean = vec![0.0; dim];
        let mut var = vec![0.0; dim];
        for p in v.chunks(dim) {
            for d in 0..dim {
                mean[d] += p[d] as f64 / n as f64;
            }
        }
        for p in v.chunks(dim) {
            for d in 0..dim {
                var[d] += (p[d] as f64 - mean[d]).powi(2) / n as f64;
            }
        }
        (mean, var)
    }

    #[test]
    fn every_name_builds_and_samples_finite_points_of_right_shape() {
        for name in DISTRIBUTION_NAMES {
            let d = Distribution::from_name(name).unwrap();
            let mut rng = rng_from_seed(0);
            let t = d.sample(513, &mut rng, &Device::Cpu).unwrap();
            assert_eq!(t.dims(), &[513, d.dim()], "{name}");
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "{name}");
        }
        assert!(Distribution::from_name("banana").is_err());
    }

    #[test]
    fn same_seed_same_points_other_seed_other_points() {
        let d = Distribution::from_name("spiral").unwrap();
        let a = d.sample_vec(100, &mut rng_from_seed(7));
        let b = d.sample_vec(100, &mut rng_from_seed(7));
        let c = d.sample_vec(100, &mut rng_from_seed(8));
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn gaussian_moments_match_scale() {
        let d = Distribution::Gaussian { scale: 2.0 };
        let v = d.sample_vec(40_000, &mut rng_from_seed(1));
        let (m, var) = stats(&v, 2);
        for k in 0..2 {
            assert!(m[k].abs() < 0.05, "mean {m:?}");
            assert!((var[k] - 4.0).abs() < 0.15, "var {var:?}");
        }
        let nd = Distribution::GaussianNd { dim: 5 };
        let v = nd.sample_vec(20_000, &mut rng_from_seed(2));
        let (_, var) = stats(&v, 5);
        assert!(var.iter().all(|x| (x - 1.0).abs() < 0.05), "{var:?}");
    }

    #[test]
    fn square_is_uniform_on_its_box() {
        let v = Distribution::Square { scale: 3.0 }.sample_vec(20_000, &mut rng_from_seed(3));
        assert!(v.iter().all(|x| x.abs() <= 3.0));
        let (_, var) = stats(&v, 2);
        // Var of U(-3, 3) = 36 / 12 = 3.
        assert!(var.iter().all(|x| (x - 3.0).abs() < 0.1), "{var:?}");
    }

    #[test]
    fn heart_points_satisfy_the_heart_inequality() {
        let v = Distribution::Heart { scale: 3.0 }.sample_vec(2000, &mut rng_from_seed(4));
        for p in v.chunks(2) {
            let (x, y) = (p[0] as f64 / 3.0, p[1] as f64 / 3.0);
            let h = 5.0 * (y + 0.25) / 4.0 - x.abs().sqrt();
            assert!(x * x + h * h <= 1.0 + 1e-5);
        }
    }

    #[test]
    fn moons_match_sklearn_geometry() {
        // Without noise every point lies on one of the two unit half circles.
        let v = Distribution::Moons { noise: 1e-9 }.sample_vec(1001, &mut rng_from_seed(5));
        let mut upper = 0;
        for p in v.chunks(2) {
            let (x, y) = (p[0] as f64, p[1] as f64);
            let r_out = (x * x + y * y).sqrt();
            let r_in = ((x - 1.0).powi(2) + (y - 0.5).powi(2)).sqrt();
            assert!((r_out - 1.0).abs() < 1e-5 && y >= -1e-6 || (r_in - 1.0).abs() < 1e-5);
            if (r_out - 1.0).abs() < 1e-5 && y >= -1e-6 {
                upper += 1;
            }
        }
        assert!((500..=501).contains(&upper), "{upper}");
    }

    #[test]
    fn spiral_radius_grows_with_angle_and_stays_within_three_turns() {
        let v = Distribution::Spiral { scale: 1.0 }.sample_vec(5000, &mut rng_from_seed(6));
        let rmax = v
            .chunks(2)
            .map(|p| ((p[0] * p[0] + p[1] * p[1]) as f64).sqrt())
            .fold(0.0, f64::max);
        assert!(rmax > 2.7 && rmax < 3.6, "{rmax}");
    }

    #[test]
    fn two_gaussians_and_smiley_are_balanced() {
        let v = Distribution::from_name("two-gaussians")
            .unwrap()
            .sample_vec(4000, &mut rng_from_seed(9));
        let left = v.chunks(2).filter(|p| p[0] < 0.0).count();
        assert!((1900..=2100).contains(&left), "{left}");
        let v = Distribution::from_name("smiley")
            .unwrap()
            .sample_vec(3000, &mut rng_from_seed(9));
        let eyes = v.chunks(2).filter(|p| p[1] > 0.4).count();
        assert!((1850..=2150).contains(&eyes), "{eyes}");
    }

    #[test]
    fn with_scale_and_dim_validate() {
        assert!(Distribution::from_name("gaussian")
            .unwrap()
            .with_scale(-1.0)
            .is_err());
        let e = Distribution::from_name("moons")
            .unwrap()
            .with_scale(1e308)
            .unwrap_err()
            .to_string();
        assert!(e.contains("at most 1e6"), "{e}");
        assert!(Distribution::from_name("moons")
            .unwrap()
            .with_dim(3)
            .is_err());
        let nd = Distribution::from_name("gaussian-nd")
            .unwrap()
            .with_dim(7)
            .unwrap();
        assert_eq!(nd.dim(), 7);
    }
}

#[cfg(test)]
mod label_tests {
    use super::*;
    use crate::rng_from_seed;

    /// torchdyn's moons: each point is a unit-moon point shifted along (1, 1) by one draw in
    /// [0, 0.2), then scaled 3x − 1; half of the points on each moon.
    #[test]
    fn torchcfm_moons_follow_torchdyn() {
        let d = Distribution::from_name("moons-torchcfm").unwrap();
        let (x, y) = d.sample_labeled_vec(1001, &mut rng_from_seed(3)).unwrap();
        assert_eq!(y.iter().filter(|&&l| l == 0).count(), 500);
        for (p, &l) in x.chunks(2).zip(&y) {
            let q = [(p[0] as f64 + 1.0) / 3.0, (p[1] as f64 + 1.0) / 3.0];
            // The shift u that puts q back on its moon's circle, searched on a fine grid.
            let (c, upper) = if l == 0 {
                ([0.0, 0.0], true)
            } else {
                ([1.0, 0.5], false)
            };
            let best = (0..=2000)
                .map(|i| {
                    let u = 0.2 * i as f64 / 2000.0;
                    let (dx, dy) = (q[0] - u - c[0], q[1] - u - c[1]);
                    let on_half = (dy >= -1e-6) == upper || dy.abs() < 1e-6;
                    if on_half {
                        ((dx * dx + dy * dy).sqrt() - 1.0).abs()
                    } else {
                        1.0
                    }
                })
                .fold(f64::INFINITY, f64::min);
            assert!(best < 2e-4, "{p:?} (label {l}) is {best} off its moon");
        }
    }

    #[test]
    fn labeled_draws_are_the_same_points_and_their_labels_follow_the_rule() {
        for name in [
            "moons",
            "moons-torchcfm",
            "8gaussians",
            "two-gaussians",
            "checkerboard",
        ] {
            let d = Distribution::from_name(name).unwrap();
            let plain = d.sample_vec(2000, &mut rng_from_seed(7));
            let (x, y) = d.sample_labeled_vec(2000, &mut rng_from_seed(7)).unwrap();
            assert_eq!(plain, x, "{name}: labels change the draws");
            for c in 0..d.classes() as u32 {
                assert!(y.contains(&c), "{name}: class {c} never drawn");
            }
            let agree = x
                .chunks(2)
                .zip(&y)
                .filter(|(p, &l)| d.class_of(p) == Some(l))
                .count();
            // Two-gaussians overlap a little (shift 2.5, std 1); the others are separated.
            let need = if name == "two-gaussians" { 0.98 } else { 0.995 };
            assert!(
                agree as f64 >= need * 2000.0,
                "{name}: {agree} of 2000 agree"
            );
        }
        for name in ["gaussian", "spiral", "square", "gaussian-nd"] {
            let d = Distribution::from_name(name).unwrap();
            assert_eq!(d.classes(), 0);
            assert!(d.sample_labeled_vec(4, &mut rng_from_seed(0)).is_none());
            assert_eq!(d.class_of(&[0.0, 0.0]), None);
        }
    }
}
