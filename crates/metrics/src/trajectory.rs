//! How straight a flow's trajectories are, from a recorded solve.

use crate::{rows, MetricsError};
use candle_core::Tensor;

fn to_rows(traj: &[Tensor]) -> Result<(Vec<Vec<f64>>, usize, usize), MetricsError> {
    if traj.len() < 2 {
        return Err(MetricsError::Shape(
            "a trajectory needs at least two states".into(),
        ));
    }
    let mut out = Vec::with_capacity(traj.len());
    let (mut n, mut d) = (0, 0);
    for t in traj {
        let (v, nn, dd) = rows(t)?;
        (n, d) = (nn, dd);
        out.push(v);
    }
    Ok((out, n, d))
}

fn norm(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt()
}

/// The lesson's straightness: mean `|x_1 - x_0|` over mean path length (1 = straight lines).
pub fn straightness(traj: &[Tensor]) -> Result<f64, MetricsError> {
    let (s, n, d) = to_rows(traj)?;
    let (first, last) = (&s[0], &s[s.len() - 1]);
    let mut direct = 0.0;
    let mut length = 0.0;
    for i in 0..n {
        let r = i * d..(i + 1) * d;
        direct += norm(&first[r.clone()], &last[r.clone()]);
        for w in s.windows(2) {
            length += norm(&w[0][r.clone()], &w[1][r.clone()]);
        }
    }
    Ok(direct / (length + 1e-12))
}

fn check_times(traj_len: usize, times: &[f64]) -> Result<(), MetricsError> {
    if times.len() != traj_len {
        return Err(MetricsError::Shape(format!(
            "trajectory has {traj_len} states but {} times",
            times.len()
        )));
    }
    Ok(())
}

/// Liu et al. (2022)'s straightness `S = E ∫₀¹ |(x_1 - x_0) - v(x_t, t)|² dt` (0 = straight),
/// with `v` on each grid interval taken as the step's mean velocity `Δx/Δt`.
pub fn rf_straightness(traj: &[Tensor], times: &[f64]) -> Result<f64, MetricsError> {
    check_times(traj.len(), times)?;
    let (s, n, d) = to_rows(traj)?;
    let span = times[times.len() - 1] - times[0];
    let (first, last) = (&s[0], &s[s.len() - 1]);
    let mut total = 0.0;
    for (k, w) in s.windows(2).enumerate() {
        let dt = times[k + 1] - times[k];
        if dt == 0.0 {
            continue;
        }
        let mut acc = 0.0;
        for j in 0..n * d {
            let chord = (last[j] - first[j]) / span;
            let v = (w[1][j] - w[0][j]) / dt;
            acc += (chord - v) * (chord - v);
        }
        total += acc / n as f64 * dt.abs();
    }
    Ok(total)
}

/// Path energy `E ∫₀¹ |v(x_t, t)|² dt` from a recorded trajectory.
pub fn path_energy(traj: &[Tensor], times: &[f64]) -> Result<f64, MetricsError> {
    check_times(traj.len(), times)?;
    let (s, n, _) = to_rows(traj)?;
    let mut total = 0.0;
    for (k, w) in s.windows(2).enumerate() {
        let dt = times[k + 1] - times[k];
        if dt == 0.0 {
            continue;
        }
        let sq: f64 = w[1].iter().zip(&w[0]).map(|(b, a)| (b - a) * (b - a)).sum();
        total += sq / n as f64 / dt.abs();
    }
    Ok(total)
}

/// Tong et al. (2023)'s normalized path energy `|PE - W2²| / W2²`, given `W2²` between the
/// source and target samples (0 = the flow is as cheap as optimal transport).
pub fn normalized_path_energy(
    traj: &[Tensor],
    times: &[f64],
    w2_sq: f64,
) -> Result<f64, MetricsError> {
    if !(w2_sq > 0.0 && w2_sq.is_finite()) {
        return Err(MetricsError::Shape(format!(
            "W2² must be positive, got {w2_sq}"
        )));
    }
    Ok((path_energy(traj, times)? - w2_sq).abs() / w2_sq)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// States of points moving from `a` to `b` along `x(t) = a + (b-a)t + bump·sin(πt)·e_y`.
    fn path(bump: f64, steps: usize) -> (Vec<Tensor>, Vec<f64>) {
        let a = [[0.0, 0.0], [1.0, 1.0]];
        let b = [[2.0, 0.0], [1.0, 3.0]];
        let times: Vec<f64> = (0..=steps).map(|k| k as f64 / steps as f64).collect();
        let traj = times
            .iter()
            .map(|&t| {
                let v: Vec<f32> = (0..2)
                    .flat_map(|i| {
                        let x = a[i][0] + (b[i][0] - a[i][0]) * t;
                        let y = a[i][1]
                            + (b[i][1] - a[i][1]) * t
                            + bump * (std::f64::consts::PI * t).sin();
                        [x as f32, y as f32]
                    })
                    .collect();
                Tensor::from_vec(v, (2, 2), &Device::Cpu).unwrap()
            })
            .collect();
        (traj, times)
    }

    #[test]
    fn straight_paths_score_perfectly() {
        let (traj, times) = path(0.0, 10);
        assert!((straightness(&traj).unwrap() - 1.0).abs() < 1e-6);
        assert!(rf_straightness(&traj, &times).unwrap() < 1e-10);
        // Straight constant-speed paths have path energy = mean |b - a|² = (4 + 4) / 2.
        assert!((path_energy(&traj, &times).unwrap() - 4.0).abs() < 1e-5);
        assert!(normalized_path_energy(&traj, &times, 4.0).unwrap() < 1e-5);
    }

    #[test]
    fn curved_paths_match_closed_forms() {
        let (traj, times) = path(0.5, 2000);
        assert!(straightness(&traj).unwrap() < 0.99);
        // v - chord = bump·π·cos(πt) e_y ⇒ S = bump²π²/2 per point.
        let s = rf_straightness(&traj, &times).unwrap();
        let exact = 0.25 * std::f64::consts::PI.powi(2) / 2.0;
        assert!((s - exact).abs() < 1e-3, "{s} vs {exact}");
    }
}
