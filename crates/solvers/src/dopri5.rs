use crate::stepper::{axpy, eval};
use crate::{Solution, SolverError, VelocityField};
use candle_core::{DType, Tensor};

/// Relative and absolute tolerances of the adaptive solver.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Tolerances {
    /// Relative tolerance.
    pub rtol: f64,
    /// Absolute tolerance.
    pub atol: f64,
}

impl Default for Tolerances {
    fn default() -> Self {
        Self {
            rtol: 1e-5,
            atol: 1e-5,
        }
    }
}

const C: [f64; 6] = [0.2, 0.3, 0.8, 8.0 / 9.0, 1.0, 1.0];
const A: [&[f64]; 6] = [
    &[0.2],
    &[3.0 / 40.0, 9.0 / 40.0],
    &[44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0],
    &[
        19372.0 / 6561.0,
        -25360.0 / 2187.0,
        64448.0 / 6561.0,
        -212.0 / 729.0,
    ],
    &[
        9017.0 / 3168.0,
        -355.0 / 33.0,
        46732.0 / 5247.0,
        49.0 / 176.0,
        -5103.0 / 18656.0,
    ],
    &[
        35.0 / 384.0,
        0.0,
        500.0 / 1113.0,
        125.0 / 192.0,
        -2187.0 / 6784.0,
        11.0 / 84.0,
    ],
];
/// 5th-order minus embedded 4th-order weights.
const E: [f64; 7] = [
    71.0 / 57600.0,
    0.0,
    -71.0 / 16695.0,
    71.0 / 1920.0,
    -17253.0 / 339200.0,
    22.0 / 525.0,
    -1.0 / 40.0,
];
const MAX_STEPS: usize = 100_000;

/// Adaptive Dormand–Prince 5(4) from `t0` to `t1` (either direction), first-same-as-last.
///
/// The error norm is the RMS over all elements of `err / (atol + rtol·max(|x|, |x'|))`.
/// `h0` is the first step size (its sign is ignored).
pub fn dopri5(
    f: &dyn VelocityField,
    x0: &Tensor,
    t0: f64,
    t1: f64,
    h0: f64,
    tol: Tolerances,
    record: bool,
) -> Result<Solution, SolverError> {
    if !(tol.rtol > 0.0 && tol.atol > 0.0) {
        return Err(SolverError::Invalid(
            "rtol and atol must be positive".into(),
        ));
    }
    let dir = if t1 >= t0 { 1.0 } else { -1.0 };
    let span = (t1 - t0).abs();
    let mut h = h0.abs().min(span).max(1e-6) * dir;
    let (mut t, mut x) = (t0, x0.clone());
    let mut k1 = eval(f, &x, t)?.detach();
    let mut nfe = 1;
    let mut traj = record.then(|| vec![x.clone()]);
    let mut times = vec![t0];
    let mut steps = 0;
    while (t1 - t) * dir > 1e-12 {
        steps += 1;
        if steps > MAX_STEPS {
            return Err(SolverError::StepFailed(format!(
                "more than {MAX_STEPS} steps"
            )));
        }
        if (t + h - t1) * dir > 0.0 {
            h = t1 - t;
        }
        let mut ks = vec![k1.clone()];
        for (i, row) in A.iter().enumerate() {
            let terms: Vec<(f64, &Tensor)> =
                row.iter().zip(ks.iter()).map(|(a, k)| (a * h, k)).collect();
            let xi = axpy(&x, &terms)?;
            let k = eval(f, &xi, t + C[i] * h)?;
            nfe += 1;
            if i == 5 {
                // The last stage point is the 5th-order solution (FSAL).
                ks.push(k);
                let terms: Vec<(f64, &Tensor)> =
                    E.iter().zip(ks.iter()).map(|(e, k)| (e * h, k)).collect();
                let zero = xi.zeros_like()?;
                let err = axpy(&zero, &terms)?;
                let scale = x.abs()?.maximum(&xi.abs()?)?.affine(tol.rtol, tol.atol)?;
                let ratio = (err / scale)?
                    .sqr()?
                    .mean_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?
                    .sqrt();
                if !ratio.is_finite() {
                    return Err(SolverError::StepFailed(format!(
                        "non-finite error estimate at t={t}"
                    )));
                }
                let factor = if ratio == 0.0 {
                    5.0
                } else {
                    (0.9 * ratio.powf(-0.2)).clamp(0.2, 5.0)
                };
                if ratio <= 1.0 {
                    t += h;
                    // Detached, as in the fixed-step solvers.
                    x = xi.detach();
                    k1 = ks.pop().expect("seven stages").detach();
                    if let Some(tr) = traj.as_mut() {
                        tr.push(x.clone());
                    }
                    times.push(t);
                }
                h *= factor;
                if h.abs() < 1e-10 {
                    return Err(SolverError::StepFailed(format!(
                        "step size underflow at t={t}"
                    )));
                }
                break;
            }
            ks.push(k);
        }
    }
    Ok(Solution {
        x,
        trajectory: traj,
        times,
        nfe,
    })
}
