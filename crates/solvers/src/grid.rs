use crate::SolverError;

/// The blog's time warp `f(t) = 4(1-s)t³ + 6(s-1)t² + (3-2s)t`, with slope `s` at t = 1/2.
///
/// `s = 1` is the identity; `s < 1` puts more points in the middle, `s > 1` at the ends.
pub fn warp_time(t: f64, s: f64) -> f64 {
    4.0 * (1.0 - s) * t.powi(3) + 6.0 * (s - 1.0) * t.powi(2) + (3.0 - 2.0 * s) * t
}

/// Derivative `f'(t) = 12(1-s)t² + 12(s-1)t + (3-2s)` of [`warp_time`].
pub fn warp_time_deriv(t: f64, s: f64) -> f64 {
    12.0 * (1.0 - s) * t * t + 12.0 * (s - 1.0) * t + (3.0 - 2.0 * s)
}

/// Checks the blog's range `s ∈ [0, 1.5]` (outside it `f` is not monotone).
pub fn check_warp(s: f64) -> Result<(), SolverError> {
    if !(0.0..=1.5).contains(&s) {
        return Err(SolverError::Invalid(format!(
            "warp s={s} is outside [0, 1.5]"
        )));
    }
    Ok(())
}

/// The times at which a fixed-step solver evaluates: `t_0, …, t_N`.
#[derive(Debug, Clone, PartialEq)]
pub struct TimeGrid {
    /// Grid points, monotone, from the start time to the end time.
    pub points: Vec<f64>,
}

impl TimeGrid {
    /// `steps` equal steps from 0 to 1.
    pub fn uniform(steps: usize) -> Result<Self, SolverError> {
        if steps == 0 {
            return Err(SolverError::Invalid("steps must be at least 1".into()));
        }
        Ok(Self {
            points: (0..=steps).map(|i| i as f64 / steps as f64).collect(),
        })
    }

    /// `steps` steps from 0 to 1 on the warped grid `f(i/N)`.
    pub fn warped(steps: usize, s: f64) -> Result<Self, SolverError> {
        check_warp(s)?;
        let mut g = Self::uniform(steps)?;
        for p in g.points.iter_mut() {
            *p = warp_time(*p, s);
        }
        // Exact end points despite rounding.
        g.points[0] = 0.0;
        *g.points.last_mut().expect("non-empty grid") = 1.0;
        Ok(g)
    }

    /// Uniform when `warp_s` is `None`, warped otherwise.
    pub fn new(steps: usize, warp_s: Option<f64>) -> Result<Self, SolverError> {
        match warp_s {
            Some(s) => Self::warped(steps, s),
            None => Self::uniform(steps),
        }
    }

    /// The same grid traversed from 1 back to 0.
    pub fn reversed(mut self) -> Self {
        self.points.reverse();
        self
    }

    /// Number of steps (intervals).
    pub fn steps(&self) -> usize {
        self.points.len().saturating_sub(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warp_has_fixed_ends_slope_s_and_is_monotone() {
        for s in [0.0, 0.25, 0.5, 1.0, 1.25, 1.5] {
            assert!(warp_time(0.0, s).abs() < 1e-15);
            assert!((warp_time(1.0, s) - 1.0).abs() < 1e-12);
            assert!((warp_time_deriv(0.5, s) - s).abs() < 1e-12);
            let mut prev = -1.0;
            for i in 0..=1000 {
                let v = warp_time(i as f64 / 1000.0, s);
                assert!(v >= prev - 1e-15, "s={s} not monotone at {i}");
                prev = v;
            }
            assert_eq!(warp_time(0.3, 1.0), 0.3);
        }
    }

    #[test]
    fn warp_derivative_matches_finite_differences() {
        for s in [0.0, 0.5, 0.9, 1.5] {
            for i in 1..100 {
                let t = i as f64 / 100.0;
                let h = 1e-6;
                let fd = (warp_time(t + h, s) - warp_time(t - h, s)) / (2.0 * h);
                assert!((fd - warp_time_deriv(t, s)).abs() < 1e-6, "s={s} t={t}");
            }
        }
    }

    #[test]
    fn grids_validate_and_cover_unit_interval() {
        assert!(TimeGrid::warped(10, 1.6).is_err());
        assert!(TimeGrid::warped(10, -0.1).is_err());
        assert!(TimeGrid::uniform(0).is_err());
        let g = TimeGrid::warped(7, 0.5).unwrap();
        assert_eq!(g.steps(), 7);
        assert_eq!((g.points[0], g.points[7]), (0.0, 1.0));
        // s < 1: denser in the middle than at the ends.
        let d_mid = g.points[4] - g.points[3];
        let d_end = g.points[1] - g.points[0];
        assert!(d_mid < d_end);
        let r = TimeGrid::uniform(4).unwrap().reversed();
        assert_eq!(r.points, vec![1.0, 0.75, 0.5, 0.25, 0.0]);
    }
}
