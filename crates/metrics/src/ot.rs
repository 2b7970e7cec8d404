//! Exact minibatch optimal transport between two equal-size samples.

use crate::MetricsError;
use pathfinding::kuhn_munkres::kuhn_munkres_min;
use pathfinding::matrix::Matrix;
use rayon::prelude::*;

/// Pairwise squared Euclidean costs `C[i][j] = |a_i - b_j|²`, row-major, rows in parallel.
pub fn sq_cost_matrix(a: &[f64], b: &[f64], d: usize) -> Vec<f64> {
    let (n, m) = (a.len() / d, b.len() / d);
    let mut c = vec![0.0; n * m];
    c.par_chunks_mut(m.max(1)).enumerate().for_each(|(i, row)| {
        let ai = &a[i * d..(i + 1) * d];
        for (j, cell) in row.iter_mut().enumerate() {
            let bj = &b[j * d..(j + 1) * d];
            *cell = ai.iter().zip(bj).map(|(x, y)| (x - y) * (x - y)).sum();
        }
    });
    c
}

/// The assignment `perm` minimising `Σ_i C[i][perm[i]]` for a square `n × n` cost matrix.
///
/// `kuhn_munkres_min` needs `Ord` weights, so costs are scaled to integers with 2⁴⁰ levels
/// over their range (exact to ~1e-12 relative). Non-finite costs are an error, not a hang.
pub fn assignment(cost: &[f64], n: usize) -> Result<Vec<usize>, MetricsError> {
    if cost.len() != n * n {
        return Err(MetricsError::Shape(format!(
            "cost matrix has {} entries, expected {n}²",
            cost.len()
        )));
    }
    if n == 0 {
        return Ok(vec![]);
    }
    if cost.iter().any(|c| !c.is_finite()) {
        return Err(MetricsError::NonFinite("OT cost matrix"));
    }
    let (lo, hi) = cost
        .iter()
        .fold((f64::MAX, f64::MIN), |(l, h), &c| (l.min(c), h.max(c)));
    let scale = if hi > lo {
        (1u64 << 40) as f64 / (hi - lo)
    } else {
        0.0
    };
    let ints: Vec<i64> = cost
        .iter()
        .map(|&c| ((c - lo) * scale).round() as i64)
        .collect();
    let m = Matrix::from_vec(n, n, ints).map_err(|e| MetricsError::Shape(e.to_string()))?;
    let (_, perm) = kuhn_munkres_min(&m);
    Ok(perm)
}

/// Exact OT pairing of two equal-size samples (`n × d` row-major): `b[perm[i]]` pairs with `a[i]`.
/// Returns the permutation and the mean squared distance of the pairing.
pub fn ot_pairing(a: &[f64], b: &[f64], d: usize) -> Result<(Vec<usize>, f64), MetricsError> {
    if d == 0 || a.len() != b.len() || a.len() % d != 0 {
        return Err(MetricsError::Shape(format!(
            "OT needs two samples of equal size and dimension (got {} and {} values, d={d})",
            a.len(),
            b.len()
        )));
    }
    let n = a.len() / d;
    let c = sq_cost_matrix(a, b, d);
    let perm = assignment(&c, n)?;
    let total: f64 = perm.iter().enumerate().map(|(i, &j)| c[i * n + j]).sum();
    Ok((perm, total / n.max(1) as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 11) as f64 / (1u64 << 53) as f64
    }

    fn permutations(n: usize) -> Vec<Vec<usize>> {
        if n == 0 {
            return vec![vec![]];
        }
        let mut out = vec![];
        for p in permutations(n - 1) {
            for pos in 0..=p.len() {
                let mut q = p.clone();
                q.insert(pos, n - 1);
                out.push(q);
            }
        }
        out
    }

    #[test]
    fn hungarian_equals_brute_force_up_to_seven() {
        let mut seed = 42;
        for n in 1..=7 {
            for _ in 0..5 {
                let a: Vec<f64> = (0..2 * n).map(|_| lcg(&mut seed) * 4.0 - 2.0).collect();
                let b: Vec<f64> = (0..2 * n).map(|_| lcg(&mut seed) * 4.0 - 2.0).collect();
                let c = sq_cost_matrix(&a, &b, 2);
                let cost = |p: &[usize]| {
                    p.iter()
                        .enumerate()
                        .map(|(i, &j)| c[i * n + j])
                        .sum::<f64>()
                };
                let best = permutations(n)
                    .iter()
                    .map(|p| cost(p))
                    .fold(f64::MAX, f64::min);
                let perm = assignment(&c, n).unwrap();
                let mut sorted = perm.clone();
                sorted.sort();
                assert_eq!(sorted, (0..n).collect::<Vec<_>>());
                assert!(
                    (cost(&perm) - best).abs() < 1e-9,
                    "n={n}: {} vs {best}",
                    cost(&perm)
                );
            }
        }
    }

    #[test]
    fn hungarian_never_costs_more_than_random_pairing() {
        let mut seed = 7;
        for n in [16, 64, 200] {
            let a: Vec<f64> = (0..2 * n).map(|_| lcg(&mut seed)).collect();
            let b: Vec<f64> = (0..2 * n).map(|_| lcg(&mut seed) + 1.0).collect();
            let (_, ot) = ot_pairing(&a, &b, 2).unwrap();
            let c = sq_cost_matrix(&a, &b, 2);
            let identity: f64 = (0..n).map(|i| c[i * n + i]).sum::<f64>() / n as f64;
            assert!(ot <= identity + 1e-12);
            // A few random permutations as well.
            for _ in 0..5 {
                let mut p: Vec<usize> = (0..n).collect();
                for i in (1..n).rev() {
                    p.swap(i, (lcg(&mut seed) * (i + 1) as f64) as usize);
                }
                let r: f64 = p
                    .iter()
                    .enumerate()
                    .map(|(i, &j)| c[i * n + j])
                    .sum::<f64>()
                    / n as f64;
                assert!(ot <= r + 1e-12);
            }
        }
    }

    #[test]
    fn non_finite_costs_are_an_error_not_a_hang() {
        let c = vec![0.0, f64::NAN, 1.0, 2.0];
        assert!(matches!(assignment(&c, 2), Err(MetricsError::NonFinite(_))));
        let c = vec![0.0, f64::INFINITY, 1.0, 2.0];
        assert!(matches!(assignment(&c, 2), Err(MetricsError::NonFinite(_))));
        assert!(ot_pairing(&[0.0, 1.0], &[0.0], 1).is_err());
    }
}
