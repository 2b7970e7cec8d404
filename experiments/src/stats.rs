//! Replicate statistics for sweep reports: mean, sample standard deviation and the 95%
//! confidence interval of the mean from Student's t distribution.

/// Two-sided 97.5% quantiles of Student's t for 1 to 30 degrees of freedom.
const T975: [f64; 30] = [
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010,
    2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687,
    2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
];

/// The 97.5% quantile of Student's t with `df` degrees of freedom (a table up to 30, then
/// the Cornish–Fisher expansion around the normal quantile, good to 1e-4).
pub fn t975(df: usize) -> f64 {
    match df {
        0 => f64::NAN,
        1..=30 => T975[df - 1],
        _ => {
            let (z, n) = (1.959_963_984_540_054_f64, df as f64);
            z + (z.powi(3) + z) / (4.0 * n)
                + (5.0 * z.powi(5) + 16.0 * z.powi(3) + 3.0 * z) / (96.0 * n * n)
        }
    }
}

/// The summary of `n` replicate values of one metric.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    pub n: usize,
    pub mean: f64,
    /// Sample standard deviation (divisor n − 1); NaN for one value.
    pub std: f64,
    /// Half-width of the 95% interval of the mean: t₀.₉₇₅(n − 1) · std / √n.
    pub half: f64,
}

impl Interval {
    /// The interval of `xs` (non-finite values left out).
    pub fn of(xs: &[f64]) -> Interval {
        let xs: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
        let n = xs.len();
        if n == 0 {
            return Interval {
                n,
                mean: f64::NAN,
                std: f64::NAN,
                half: f64::NAN,
            };
        }
        let mean = xs.iter().sum::<f64>() / n as f64;
        let std = if n > 1 {
            (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            f64::NAN
        };
        Interval {
            n,
            mean,
            std,
            half: t975(n.saturating_sub(1)) * std / (n as f64).sqrt(),
        }
    }

    /// Whether the interval leaves out 0 (a difference beyond the seed noise).
    pub fn excludes_zero(&self) -> bool {
        self.half.is_finite() && (self.mean - self.half > 0.0 || self.mean + self.half < 0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_matches_a_hand_computation() {
        // 1..5: mean 3, s² = 10/4, s = 1.58114, half = 2.7764 · 1.58114 / √5 = 1.96326.
        let i = Interval::of(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(i.n, 5);
        assert!((i.mean - 3.0).abs() < 1e-12);
        assert!((i.std - 2.5f64.sqrt()).abs() < 1e-12);
        assert!((i.half - 1.96326).abs() < 1e-4, "{i:?}");
        assert!(i.excludes_zero());
        // Two values: df 1, the wide t of 12.706.
        let i = Interval::of(&[0.1, 0.3]);
        assert!((i.half - 12.7062 * (0.02f64).sqrt() / 2f64.sqrt()).abs() < 1e-9);
        assert!(!Interval::of(&[-1.0, 1.0, 0.5]).excludes_zero());
        let one = Interval::of(&[2.0]);
        assert!(one.std.is_nan() && one.half.is_nan() && !one.excludes_zero());
        // Past the table the expansion joins it smoothly and tends to the normal quantile.
        assert!((t975(31) - 2.0395).abs() < 2e-4 && t975(31) < t975(30));
        assert!((t975(120) - 1.9799).abs() < 2e-4);
        assert!((t975(100_000) - 1.96).abs() < 1e-3);
    }
}
