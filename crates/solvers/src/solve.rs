use crate::{
    dopri5, Euler, Heun, Midpoint, Rk4, SolverError, Stepper, TimeGrid, Tolerances, VelocityField,
};
use candle_core::Tensor;

/// The integration method (config `solver.method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Forward Euler.
    Euler,
    /// Explicit midpoint.
    Midpoint,
    /// Heun (explicit trapezoid).
    Heun,
    /// Classic RK4.
    Rk4,
    /// Adaptive Dormand–Prince 5(4).
    Dopri5,
}

impl Method {
    /// The config name.
    /// Every method, in the order the docs list them.
    pub const ALL: [Method; 5] = [
        Method::Euler,
        Method::Midpoint,
        Method::Heun,
        Method::Rk4,
        Method::Dopri5,
    ];

    /// The method called `name` (its config name, as [`Self::name`] spells it).
    pub fn from_name(name: &str) -> Result<Method, String> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == name)
            .ok_or_else(|| {
                let known: Vec<&str> = Self::ALL.iter().map(|m| m.name()).collect();
                format!("unknown solver '{name}' ({})", known.join(", "))
            })
    }

    /// The config name of the method.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Euler => "euler",
            Self::Midpoint => "midpoint",
            Self::Heun => "heun",
            Self::Rk4 => "rk4",
            Self::Dopri5 => "dopri5",
        }
    }

    /// The fixed-step stepper (`None` for the adaptive method).
    pub fn stepper(&self) -> Option<&'static dyn Stepper> {
        match self {
            Self::Euler => Some(&Euler),
            Self::Midpoint => Some(&Midpoint),
            Self::Heun => Some(&Heun),
            Self::Rk4 => Some(&Rk4),
            Self::Dopri5 => None,
        }
    }
}

/// A complete solver choice: method, steps, optional warp, tolerances, direction.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SolverSpec {
    /// Integration method.
    pub method: Method,
    /// Number of steps (for dopri5: sets the first step size to 1/steps).
    pub steps: usize,
    /// Warp parameter `s ∈ [0, 1.5]` of the time grid; `None` for a uniform grid.
    pub warp_s: Option<f64>,
    /// Tolerances of the adaptive method.
    pub tol: Tolerances,
    /// Integrate from t=1 back to t=0 (target → source).
    pub reverse: bool,
}

impl SolverSpec {
    /// A forward fixed-step solver on a uniform grid.
    pub fn new(method: Method, steps: usize) -> Self {
        Self {
            method,
            steps,
            warp_s: None,
            tol: Tolerances::default(),
            reverse: false,
        }
    }

    /// The same solver on a grid warped with `s`.
    pub fn warped(mut self, s: f64) -> Self {
        self.warp_s = Some(s);
        self
    }

    /// Checks steps ≥ 1, `s ∈ [0, 1.5]` and positive tolerances; the error names the field.
    pub fn validate(&self) -> Result<(), SolverError> {
        let bad = |field, msg: String| Err(SolverError::Setting { field, msg });
        if self.steps == 0 {
            return bad("steps", "must be at least 1".into());
        }
        if let Some(s) = self.warp_s {
            if let Err(e) = crate::grid::check_warp(s) {
                let msg = e.to_string();
                let msg = msg.strip_prefix("invalid solver setting: ").unwrap_or(&msg);
                return bad("warp_s", msg.to_string());
            }
        }
        for (field, tol) in [("rtol", self.tol.rtol), ("atol", self.tol.atol)] {
            if !(tol > 0.0 && tol.is_finite()) {
                return bad(field, format!("must be a positive number, got {tol}"));
            }
        }
        Ok(())
    }

    /// A short label such as `rk4-warp0.5`.
    pub fn label(&self) -> String {
        match self.warp_s {
            Some(s) => format!("{}-warp{s}", self.method.name()),
            None => self.method.name().to_string(),
        }
    }
}

/// The result of a solve.
#[derive(Debug, Clone)]
pub struct Solution {
    /// End state.
    pub x: Tensor,
    /// States at every grid point, start and end included, when recording was asked for.
    pub trajectory: Option<Vec<Tensor>>,
    /// The times of the grid points visited.
    pub times: Vec<f64>,
    /// Number of velocity evaluations.
    pub nfe: usize,
}

/// Integrates `f` from `x0` along `grid` with a fixed-step method.
pub fn integrate(
    f: &dyn VelocityField,
    x0: &Tensor,
    grid: &TimeGrid,
    stepper: &dyn Stepper,
    record: bool,
) -> Result<Solution, SolverError> {
    let mut x = x0.clone();
    let mut traj = record.then(|| vec![x.clone()]);
    for w in grid.points.windows(2) {
        // Detached: sampling never backpropagates, and a model with trainable weights would
        // otherwise chain every step's activations into one autograd graph (O(steps·batch)).
        x = stepper.step(f, &x, w[0], w[1] - w[0])?.detach();
        if let Some(tr) = traj.as_mut() {
            tr.push(x.clone());
        }
    }
    Ok(Solution {
        x,
        trajectory: traj,
        times: grid.points.clone(),
        nfe: grid.steps() * stepper.evals_per_step(),
    })
}

/// Solves the flow ODE from `x0` with the given solver.
pub fn solve(
    f: &dyn VelocityField,
    x0: &Tensor,
    spec: &SolverSpec,
    record: bool,
) -> Result<Solution, SolverError> {
    spec.validate()?;
    let (t0, t1) = if spec.reverse { (1.0, 0.0) } else { (0.0, 1.0) };
    match spec.method.stepper() {
        Some(stepper) => {
            let mut grid = TimeGrid::new(spec.steps, spec.warp_s)?;
            if spec.reverse {
                grid = grid.reversed();
            }
            integrate(f, x0, &grid, stepper, record)
        }
        None => dopri5(f, x0, t0, t1, 1.0 / spec.steps as f64, spec.tol, record),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::warp_time;
    use candle_core::{DType, Device, Result as CResult};
    use flowmatch_models::FnField;

    /// dx/dt = -2 t x, x(t) = x0 exp(-t²).
    fn gauss_field() -> FnField<impl Fn(&Tensor, &Tensor) -> CResult<Tensor> + Send + Sync> {
        FnField(|x: &Tensor, t: &Tensor| x.broadcast_mul(&t.affine(-2.0, 0.0)?.unsqueeze(1)?))
    }

    fn x0() -> Tensor {
        Tensor::new(&[[1.0f64, -0.5], [2.0, 0.25]], &Device::Cpu).unwrap()
    }

    fn error_of(x: &Tensor, t_end: f64) -> f64 {
        let exact = (x0() * (-t_end * t_end).exp()).unwrap();
        (x - exact)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn fixed_step_methods_converge_at_their_order() {
        let f = gauss_field();
        for (m, order) in [
            (Method::Euler, 1.0),
            (Method::Midpoint, 2.0),
            (Method::Heun, 2.0),
            (Method::Rk4, 4.0),
        ] {
            let errs: Vec<f64> = [8, 16, 32, 64]
                .iter()
                .map(|&n| {
                    error_of(
                        &solve(&f, &x0(), &SolverSpec::new(m, n), false).unwrap().x,
                        1.0,
                    )
                })
                .collect();
            for w in errs.windows(2) {
                let p = (w[0] / w[1]).log2();
                assert!(
                    (p - order).abs() < 0.25,
                    "{m:?}: observed order {p}, errors {errs:?}"
                );
            }
        }
    }

    #[test]
    fn nfe_and_trajectory_are_reported() {
        let f = gauss_field();
        let s = solve(&f, &x0(), &SolverSpec::new(Method::Rk4, 5), true).unwrap();
        assert_eq!(s.nfe, 20);
        assert_eq!(s.trajectory.as_ref().unwrap().len(), 6);
        assert_eq!(s.times.len(), 6);
        let s = solve(
            &f,
            &x0(),
            &SolverSpec::new(Method::Euler, 7).warped(0.5),
            false,
        )
        .unwrap();
        assert_eq!(s.nfe, 7);
    }

    #[test]
    fn reverse_solve_returns_to_start() {
        let f = gauss_field();
        let fwd = solve(&f, &x0(), &SolverSpec::new(Method::Rk4, 20), false).unwrap();
        let mut back_spec = SolverSpec::new(Method::Rk4, 20);
        back_spec.reverse = true;
        let back = solve(&f, &fwd.x, &back_spec, false).unwrap();
        let d = (back.x - x0())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(d < 1e-7, "{d}");
    }

    #[test]
    fn dopri5_meets_tolerance_and_spends_more_nfe_for_tighter_ones() {
        let f = gauss_field();
        let mut spec = SolverSpec::new(Method::Dopri5, 10);
        spec.tol = Tolerances {
            rtol: 1e-3,
            atol: 1e-3,
        };
        let loose = solve(&f, &x0(), &spec, false).unwrap();
        spec.tol = Tolerances {
            rtol: 1e-9,
            atol: 1e-9,
        };
        let tight = solve(&f, &x0(), &spec, true).unwrap();
        assert!(error_of(&loose.x, 1.0) < 1e-3);
        assert!(
            error_of(&tight.x, 1.0) < 1e-8,
            "{}",
            error_of(&tight.x, 1.0)
        );
        assert!(tight.nfe > loose.nfe);
        assert_eq!(*tight.times.last().unwrap(), 1.0);
        assert_eq!(tight.trajectory.unwrap().len(), tight.times.len());
        spec.tol.rtol = 0.0;
        assert!(solve(&f, &x0(), &spec, false).is_err());
    }

    /// The blog's parabola: unit speed along y = 4(x - 1/2)², scaled by the arc length.
    #[test]
    fn blog_parabola_rk4_six_points_beats_euler_twenty_eight() {
        // Arc length of the parabola on [0, 1] (closed form).
        let arc = {
            let g = |u: f64| 0.5 * u * (1.0 + u * u).sqrt() + 0.5 * (u + (1.0 + u * u).sqrt()).ln();
            (g(4.0) - g(-4.0)) / 8.0
        };
        let field = FnField(move |x: &Tensor, _t: &Tensor| {
            let px = x.narrow(1, 0, 1)?;
            let slope = px.affine(8.0, -4.0)?;
            let dir = Tensor::cat(&[slope.ones_like()?, slope], 1)?;
            let norm = dir.sqr()?.sum_keepdim(1)?.sqrt()?;
            dir.broadcast_div(&norm)?.affine(arc, 0.0)
        });
        let err = |stepper: &dyn Stepper, points: usize| {
            let mut g = TimeGrid::uniform(points - 1).unwrap();
            for p in g.points.iter_mut() {
                *p = warp_time(*p, 0.5);
            }
            let x0 = Tensor::new(&[[0.0f64, 1.0]], &Device::Cpu).unwrap();
            let sol = integrate(&field, &x0, &g, stepper, true).unwrap();
            let tr = Tensor::cat(&sol.trajectory.unwrap(), 0)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            let v: Vec<Vec<f64>> = tr.to_vec2().unwrap();
            v.iter()
                .map(|p| (4.0 * (p[0] - 0.5).powi(2) - p[1]).powi(2))
                .sum::<f64>()
                / v.len() as f64
        };
        let (e_euler, e_rk4) = (err(&Euler, 28), err(&Rk4, 6));
        assert!(e_rk4 < e_euler, "rk4 {e_rk4} vs euler {e_euler}");
        assert!(e_rk4 < 0.1 * e_euler, "rk4 {e_rk4} vs euler {e_euler}");
    }
}
