//! Exact minibatch optimal transport between two equal-size samples.

use crate::MetricsError;
use pathfinding::kuhn_munkres::kuhn_munkres_min;
use pathfinding::matrix::Matrix;
use rayon::prelude::*;

/// Pairwise squared Euclidean costs `C[i][j] = |a_i - b_j|²`, row-major. Each entry sums its
/// `d` squares in order (as `Iterator::sum`), with `b` transposed so that the sweep over `j`
/// vectorises; rows in parallel only for large matrices (a minibatch's is done sooner alone).
pub fn sq_cost_matrix(a: &[f64], b: &[f64], d: usize) -> Vec<f64> {
    let (n, m) = (a.len() / d, b.len() / d);
    // bt[k][j] = b[j][k].
    let mut bt = vec![0.0; m * d];
    for (j, bj) in b.chunks_exact(d).enumerate() {
        for (k, &v) in bj.iter().enumerate() {
            bt[k * m + j] = v;
        }
    }
    let mut c = vec![0.0; n * m];
    let fill = |(i, row): (usize, &mut [f64])| {
        for (k, col) in bt.chunks_exact(m.max(1)).enumerate() {
            let x = a[i * d + k];
            row.iter_mut()
                .zip(col)
                .for_each(|(cell, &y)| *cell += (x - y) * (x - y));
        }
    };
    if n * m * d >= 1 << 20 {
        c.par_chunks_mut(m.max(1)).enumerate().for_each(fill);
    } else {
        c.chunks_mut(m.max(1)).enumerate().for_each(fill);
    }
    c
}

/// The assignment `perm` minimising `Σ_i C[i][perm[i]]` for a square `n × n` cost matrix.
///
/// Shortest augmenting paths with dual potentials (Jonker & Volgenant 1987; Crouse 2016, the
/// algorithm of SciPy's `linear_sum_assignment`), each Dijkstra sweep reading one cost row
/// contiguously. Non-finite costs are an error, not a hang.
pub fn assignment(cost: &[f64], n: usize) -> Result<Vec<usize>, MetricsError> {
    check_square(cost, n)?;
    Ok(shortest_augmenting_path(cost, n, None, dijkstra_scan_fn()).0)
}

/// [`assignment`] started from column potentials `warm` (those a solve against the same
/// columns returned; `None`: a cold start, as [`assignment`]), returning the assignment and
/// its column potentials for the next solve.
///
/// Any column potentials give a valid start: the row potentials are set to the row minima
/// of the reduced costs, so every reduced cost is ≥ 0, and each row whose minimum lies in a
/// free column is assigned there (reduced cost 0). The shortest augmenting paths then place
/// the other rows, and the result is an optimal assignment as from a cold start. Potentials
/// of a similar problem (the same real samples against a generated sample close to the last
/// one) leave few rows free, with short paths.
pub fn assignment_warm(
    cost: &[f64],
    n: usize,
    warm: Option<&[f64]>,
) -> Result<(Vec<usize>, Vec<f64>), MetricsError> {
    check_square(cost, n)?;
    if let Some(v) = warm {
        if v.len() != n || v.iter().any(|x| !x.is_finite()) {
            return Err(MetricsError::Shape(format!(
                "warm start has {} column potentials for {n} columns",
                v.len()
            )));
        }
    }
    Ok(shortest_augmenting_path(cost, n, warm, dijkstra_scan_fn()))
}

/// Which exact assignment solver pairs a minibatch (config `loss.ot_solver`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OtSolver {
    /// Our shortest-augmenting-path solver ([`assignment`], Jonker–Volgenant): the default.
    #[default]
    Jv,
    /// `pathfinding`'s Kuhn–Munkres ([`assignment_kuhn_munkres`]), the design card's Hungarian.
    Pathfinding,
}

impl OtSolver {
    /// The optimal assignment of a square `n × n` cost matrix.
    pub fn assign(self, cost: &[f64], n: usize) -> Result<Vec<usize>, MetricsError> {
        match self {
            Self::Jv => assignment(cost, n),
            Self::Pathfinding => assignment_kuhn_munkres(cost, n),
        }
    }
}

/// The same assignment computed with `pathfinding`'s Kuhn–Munkres (kept as a cross-check and
/// a baseline): it needs `Ord` weights, so costs are scaled to integers with 2⁴⁰ levels.
pub fn assignment_kuhn_munkres(cost: &[f64], n: usize) -> Result<Vec<usize>, MetricsError> {
    check_square(cost, n)?;
    if n == 0 {
        return Ok(vec![]);
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

fn check_square(cost: &[f64], n: usize) -> Result<(), MetricsError> {
    if cost.len() != n * n {
        return Err(MetricsError::Shape(format!(
            "cost matrix has {} entries, expected {n}²",
            cost.len()
        )));
    }
    if cost.iter().any(|c| !c.is_finite()) {
        return Err(MetricsError::NonFinite("OT cost matrix"));
    }
    Ok(())
}

fn shortest_augmenting_path(
    cost: &[f64],
    n: usize,
    warm: Option<&[f64]>,
    scan: fn(Scan) -> (f64, usize),
) -> (Vec<usize>, Vec<f64>) {
    const NONE: usize = usize::MAX;
    let mut u = vec![0.0f64; n];
    let mut v = match warm {
        Some(v) => v.to_vec(),
        None => {
            // Column reduction: start the column potentials at the column minima.
            let mut v = vec![f64::INFINITY; n];
            for row in cost.chunks_exact(n.max(1)).take(n) {
                for (vj, &c) in v.iter_mut().zip(row) {
                    *vj = vj.min(c);
                }
            }
            v
        }
    };
    let mut col4row = vec![NONE; n];
    let mut row4col = vec![NONE; n];
    // No augmenting row reduction (Jonker & Volgenant's second phase): measured on Gaussian →
    // moons batches it left half the rows free and made the whole solve 1.1–1.5× slower.
    // Row potentials consistent with v: u_i = min_j (c_ij - v_j), attained at i's column.
    for (i, ui) in u.iter_mut().enumerate() {
        let row = &cost[i * n..(i + 1) * n];
        let (low, at) = row.iter().zip(&v).map(|(c, vj)| c - vj).enumerate().fold(
            (f64::INFINITY, NONE),
            |(m, a), (j, x)| {
                if x < m {
                    (x, j)
                } else {
                    (m, a)
                }
            },
        );
        *ui = low;
        // A warm start assigns each row whose minimum lies in a free column (a cold start
        // leaves every row to the augmenting paths, as it always has).
        if warm.is_some() && at != NONE && row4col[at] == NONE {
            row4col[at] = i;
            col4row[i] = at;
        }
    }
    let mut shortest = vec![f64::INFINITY; n];
    let mut path = vec![0f64; n];
    // The scan's copy of v: v_j for columns outside the shortest-path tree, -∞ for those in it
    // (SC). Their reduced cost is then +∞ and their `shortest` is parked at +∞ (the final
    // distance kept in `dist`), so the sweep skips them without a branch or a second array.
    let mut v_scan = v.clone();
    let mut dist = vec![0.0f64; n];
    let mut rows_seen: Vec<usize> = Vec::with_capacity(n);
    let mut cols_seen: Vec<usize> = Vec::with_capacity(n);
    for cur in 0..n {
        if col4row[cur] != NONE {
            continue;
        }
        shortest.iter_mut().for_each(|s| *s = f64::INFINITY);
        rows_seen.clear();
        cols_seen.clear();
        let mut min_val = 0.0;
        let mut i = cur;
        let sink;
        loop {
            rows_seen.push(i);
            let row = &cost[i * n..(i + 1) * n];
            let (lowest, best) = scan(Scan {
                row,
                v: &v_scan,
                shortest: &mut shortest,
                path: &mut path,
                base: min_val - u[i],
                i,
            });
            min_val = lowest;
            let j = best;
            dist[j] = lowest;
            shortest[j] = f64::INFINITY;
            v_scan[j] = f64::NEG_INFINITY;
            cols_seen.push(j);
            if row4col[j] == NONE {
                sink = j;
                break;
            }
            i = row4col[j];
        }
        // Update the duals.
        u[cur] += min_val;
        for &r in &rows_seen[1..] {
            u[r] += min_val - dist[col4row[r]];
        }
        for &c in &cols_seen {
            v[c] -= min_val - dist[c];
            v_scan[c] = v[c];
        }
        // Augment along the path back to `cur`.
        let mut j = sink;
        loop {
            let i = path[j] as usize;
            row4col[j] = i;
            std::mem::swap(&mut col4row[i], &mut j);
            if i == cur {
                break;
            }
        }
    }
    (col4row, v)
}

/// One Dijkstra step's sweep over the columns for row `i`.
struct Scan<'a> {
    row: &'a [f64],
    /// v_j, or -∞ for the columns already in the tree.
    v: &'a [f64],
    shortest: &'a mut [f64],
    /// Predecessor rows, as f64 (exact below 2⁵³) so the vector sweep updates them with
    /// arithmetic.
    path: &'a mut [f64],
    base: f64,
    i: usize,
}

/// Relaxes every column outside the tree through row `i` (`shortest_j ← min(shortest_j,
/// base + c_ij − v_j)`, recording `i` as the predecessor) and returns the smallest `shortest_j`
/// with its column (the first, on ties). With AVX-512 or AVX2 (chosen at run time) eight or
/// four columns at a time, compares instead of branches; SciPy's loop is scalar. Every build
/// picks the same column.
fn dijkstra_scan_fn() -> fn(Scan) -> (f64, usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: called only where the CPU reports AVX-512F.
            return |s| unsafe { scan_avx512(s) };
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: called only where the CPU reports AVX2.
            return |s| unsafe { scan_avx2(s) };
        }
    }
    scan_scalar
}

fn scan_scalar(s: Scan) -> (f64, usize) {
    scan_tail(s, 0, f64::INFINITY, usize::MAX)
}

/// The scalar sweep over columns `from..`, continuing from (`lowest`, `best`).
fn scan_tail(s: Scan, from: usize, mut lowest: f64, mut best: usize) -> (f64, usize) {
    for j in from..s.row.len() {
        let x = s.base + s.row[j] - s.v[j];
        if x < s.shortest[j] {
            s.shortest[j] = x;
            s.path[j] = s.i as f64;
        }
        if s.shortest[j] < lowest {
            lowest = s.shortest[j];
            best = j;
        }
    }
    (lowest, best)
}

/// The smallest of per-lane minima (each lane holding its first), then the lowest column.
fn lanes_min(values: &[f64], columns: &[i64]) -> (f64, usize) {
    let (mut lowest, mut best) = (f64::INFINITY, usize::MAX);
    for (&v, &c) in values.iter().zip(columns) {
        if c >= 0 && (v < lowest || (v == lowest && (c as usize) < best)) {
            lowest = v;
            best = c as usize;
        }
    }
    (lowest, best)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn scan_avx2(s: Scan) -> (f64, usize) {
    use std::arch::x86_64::*;
    let n = s.row.len();
    let m = n / 4 * 4;
    let base = _mm256_set1_pd(s.base);
    let row_i = _mm256_set1_pd(s.i as f64);
    let one = _mm256_set1_pd(1.0);
    let mut idx = _mm256_set_epi64x(3, 2, 1, 0);
    let four = _mm256_set1_epi64x(4);
    let mut low = _mm256_set1_pd(f64::INFINITY);
    let mut low_idx = _mm256_castsi256_pd(_mm256_set1_epi64x(-1));
    let (r, v) = (s.row.as_ptr(), s.v.as_ptr());
    let (sh, pa) = (s.shortest.as_mut_ptr(), s.path.as_mut_ptr());
    let mut j = 0;
    while j < m {
        let x = _mm256_sub_pd(
            _mm256_add_pd(base, _mm256_loadu_pd(r.add(j))),
            _mm256_loadu_pd(v.add(j)),
        );
        let old = _mm256_loadu_pd(sh.add(j));
        // Arithmetic, not blends: LLVM turns "blend with the loaded value, store" into masked
        // stores (vmaskmovpd), which are microcoded on AMD and took 75% of the time.
        let better = _mm256_and_pd(_mm256_cmp_pd::<_CMP_LT_OQ>(x, old), one);
        let new = _mm256_min_pd(x, old);
        _mm256_storeu_pd(sh.add(j), new);
        let pold = _mm256_loadu_pd(pa.add(j));
        _mm256_storeu_pd(
            pa.add(j),
            _mm256_add_pd(pold, _mm256_mul_pd(better, _mm256_sub_pd(row_i, pold))),
        );
        let lt = _mm256_cmp_pd::<_CMP_LT_OQ>(new, low);
        low = _mm256_blendv_pd(low, new, lt);
        low_idx = _mm256_blendv_pd(low_idx, _mm256_castsi256_pd(idx), lt);
        idx = _mm256_add_epi64(idx, four);
        j += 4;
    }
    let (mut lv, mut li) = ([0f64; 4], [0i64; 4]);
    _mm256_storeu_pd(lv.as_mut_ptr(), low);
    _mm256_storeu_si256(
        li.as_mut_ptr() as *mut __m256i,
        _mm256_castpd_si256(low_idx),
    );
    let (lowest, best) = lanes_min(&lv, &li);
    scan_tail(s, m, lowest, best)
}

/// The AVX-512 sweep: eight columns at a time, the predecessor written under a mask (a
/// masked store is cheap here, unlike AVX2's vmaskmovpd).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scan_avx512(s: Scan) -> (f64, usize) {
    use std::arch::x86_64::*;
    let n = s.row.len();
    let m = n / 8 * 8;
    let base = _mm512_set1_pd(s.base);
    let row_i = _mm512_set1_pd(s.i as f64);
    let mut idx = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    let eight = _mm512_set1_epi64(8);
    let mut low = _mm512_set1_pd(f64::INFINITY);
    let mut low_idx = _mm512_set1_epi64(-1);
    let (r, v) = (s.row.as_ptr(), s.v.as_ptr());
    let (sh, pa) = (s.shortest.as_mut_ptr(), s.path.as_mut_ptr());
    let mut j = 0;
    while j < m {
        let x = _mm512_sub_pd(
            _mm512_add_pd(base, _mm512_loadu_pd(r.add(j))),
            _mm512_loadu_pd(v.add(j)),
        );
        let old = _mm512_loadu_pd(sh.add(j));
        let better = _mm512_cmp_pd_mask::<_CMP_LT_OQ>(x, old);
        let new = _mm512_min_pd(x, old);
        _mm512_storeu_pd(sh.add(j), new);
        _mm512_mask_storeu_pd(pa.add(j), better, row_i);
        let lt = _mm512_cmp_pd_mask::<_CMP_LT_OQ>(new, low);
        low = _mm512_mask_mov_pd(low, lt, new);
        low_idx = _mm512_mask_mov_epi64(low_idx, lt, idx);
        idx = _mm512_add_epi64(idx, eight);
        j += 8;
    }
    let (mut lv, mut li) = ([0f64; 8], [0i64; 8]);
    _mm512_storeu_pd(lv.as_mut_ptr(), low);
    _mm512_storeu_si512(li.as_mut_ptr() as *mut __m512i, low_idx);
    let (lowest, best) = lanes_min(&lv, &li);
    scan_tail(s, m, lowest, best)
}

/// Exact OT pairing of two equal-size samples (`n × d` row-major): `b[perm[i]]` pairs with `a[i]`.
/// Returns the permutation and the mean squared distance of the pairing.
pub fn ot_pairing(a: &[f64], b: &[f64], d: usize) -> Result<(Vec<usize>, f64), MetricsError> {
    ot_pairing_with(OtSolver::Jv, a, b, d)
}

/// [`ot_pairing`] with the assignment of `solver`.
pub fn ot_pairing_with(
    solver: OtSolver,
    a: &[f64],
    b: &[f64],
    d: usize,
) -> Result<(Vec<usize>, f64), MetricsError> {
    if d == 0 || a.len() != b.len() || !a.len().is_multiple_of(d) {
        return Err(MetricsError::Shape(format!(
            "OT needs two samples of equal size and dimension (got {} and {} values, d={d})",
            a.len(),
            b.len()
        )));
    }
    let n = a.len() / d;
    let c = sq_cost_matrix(a, b, d);
    let perm = solver.assign(&c, n)?;
    let mean = paired_mean(&c, &perm);
    Ok((perm, mean))
}

/// The mean cost `Σ_i C[i][perm[i]] / n` of an assignment of the square matrix `c`.
pub(crate) fn paired_mean(c: &[f64], perm: &[usize]) -> f64 {
    let n = perm.len();
    let total: f64 = perm.iter().enumerate().map(|(i, &j)| c[i * n + j]).sum();
    total / n.max(1) as f64
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

    /// The scalar sweep and each vector sweep the CPU supports.
    fn sweeps() -> Vec<fn(Scan) -> (f64, usize)> {
        let mut all: Vec<fn(Scan) -> (f64, usize)> = vec![scan_scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") {
                all.push(|s| unsafe { scan_avx2(s) });
            } else {
                crate::skipped("ot sweeps (AVX2)", "this CPU has no AVX2");
            }
            if is_x86_feature_detected!("avx512f") {
                all.push(|s| unsafe { scan_avx512(s) });
            } else {
                crate::skipped("ot sweeps (AVX-512)", "this CPU has no AVX-512F");
            }
        }
        all
    }

    #[test]
    fn warm_starts_reach_the_same_optimum_from_any_column_potentials() {
        let mut seed = 5;
        let n = 400;
        let real: Vec<f64> = (0..2 * n).map(|_| lcg(&mut seed) * 2.0).collect();
        let mut gen: Vec<f64> = (0..2 * n).map(|_| lcg(&mut seed) * 2.0 - 0.5).collect();
        let (_, mut duals) = assignment_warm(&sq_cost_matrix(&gen, &real, 2), n, None).unwrap();
        type Start = Box<dyn Fn(&[f64]) -> Vec<f64>>;
        let starts: [Start; 3] = [
            // The last solve's potentials (the intended use) …
            Box::new(|d: &[f64]| d.to_vec()),
            // … and arbitrary ones: any start is exact.
            Box::new(|d: &[f64]| d.iter().map(|x| -x * 3.0 + 1.0).collect()),
            Box::new(|d: &[f64]| vec![0.0; d.len()]),
        ];
        for step in 0..4 {
            // The next generated sample: the last one moved a little.
            gen.iter_mut()
                .for_each(|x| *x += (lcg(&mut seed) - 0.5) * 0.1);
            let c = sq_cost_matrix(&gen, &real, 2);
            let cold = assignment(&c, n).unwrap();
            for (k, start) in starts.iter().enumerate() {
                let (warm, v) = assignment_warm(&c, n, Some(&start(&duals))).unwrap();
                assert_eq!(warm, cold, "step {step}, start {k}");
                if k == 0 {
                    duals = v;
                }
            }
        }
        let e = assignment_warm(&[1.0; 4], 2, Some(&[0.0])).unwrap_err();
        assert!(e.to_string().contains("1 column potentials for 2"), "{e}");
    }

    #[test]
    fn shortest_path_and_kuhn_munkres_agree_on_larger_problems() {
        let mut seed = 11;
        for n in [50, 301] {
            let a: Vec<f64> = (0..2 * n).map(|_| lcg(&mut seed) * 3.0).collect();
            let b: Vec<f64> = (0..2 * n).map(|_| lcg(&mut seed) * 3.0 - 1.0).collect();
            let c = sq_cost_matrix(&a, &b, 2);
            let cost = |p: &[usize]| {
                p.iter()
                    .enumerate()
                    .map(|(i, &j)| c[i * n + j])
                    .sum::<f64>()
            };
            let y = assignment_kuhn_munkres(&c, n).unwrap();
            // Every sweep this CPU has reaches the optimum, and they all pick the same pairs.
            let x = assignment(&c, n).unwrap();
            for sweep in sweeps() {
                assert_eq!(shortest_augmenting_path(&c, n, None, sweep).0, x, "n={n}");
            }
            assert!(
                (cost(&x) - cost(&y)).abs() < 1e-8 * cost(&y),
                "n={n}: {} vs {}",
                cost(&x),
                cost(&y)
            );
            // Costs on a coarse grid tie often: the sweeps still break ties alike.
            let coarse: Vec<f64> = c.iter().map(|v| (v * 2.0).round()).collect();
            let x = assignment(&coarse, n).unwrap();
            for sweep in sweeps() {
                assert_eq!(
                    shortest_augmenting_path(&coarse, n, None, sweep).0,
                    x,
                    "n={n}"
                );
            }
        }
        // Ties and duplicates: all-equal costs still give a permutation.
        let p = assignment_warm(&[1.0; 16], 4, Some(&[0.5, -3.0, 2.0, 0.0]))
            .unwrap()
            .0;
        let mut s = p.clone();
        s.sort();
        assert_eq!(s, vec![0, 1, 2, 3]);
        let p = assignment(&[1.0; 16], 4).unwrap();
        let mut s = p.clone();
        s.sort();
        assert_eq!(s, vec![0, 1, 2, 3]);
    }

    #[test]
    fn non_finite_costs_are_an_error_not_a_hang() {
        let c = vec![0.0, f64::NAN, 1.0, 2.0];
        assert!(matches!(assignment(&c, 2), Err(MetricsError::NonFinite(_))));
        assert!(matches!(
            assignment_kuhn_munkres(&c, 2),
            Err(MetricsError::NonFinite(_))
        ));
        let c = vec![0.0, f64::INFINITY, 1.0, 2.0];
        assert!(matches!(assignment(&c, 2), Err(MetricsError::NonFinite(_))));
        assert!(ot_pairing(&[0.0, 1.0], &[0.0], 1).is_err());
    }

    /// The exact assignment's cost agrees with POT's `ot.emd2` (network simplex) to 1e-6
    /// relative at n = 256 and 512, for both solvers (POT from PyPI, which `.ci/run` installs;
    /// "skipped" without it).
    #[test]
    fn exact_cost_agrees_with_pot_emd2() {
        if !crate::pot_here("exact OT against POT's emd2") {
            return;
        }
        let dir = std::env::temp_dir().join(format!("fm-emd2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for n in [256usize, 512] {
            let pt = |k: usize, s: f64| {
                let h = ((k as f64 + s) * 12.9898).sin() * 43_758.545_3;
                let g = ((k as f64 + s) * 78.233).sin() * 12_345.678_9;
                [h - h.floor() - 0.5, (g - g.floor()) * 2.0 - 1.0]
            };
            let a: Vec<f64> = (0..n).flat_map(|k| pt(k, 0.0)).collect();
            let b: Vec<f64> = (0..n).flat_map(|k| pt(k, 0.5)).collect();
            let cost = sq_cost_matrix(&a, &b, 2);
            let input = dir.join(format!("cost{n}.txt"));
            let text: Vec<String> = cost.iter().map(|c| format!("{c:e}")).collect();
            std::fs::write(&input, text.join(" ")).unwrap();
            let script = format!(
                "import numpy as np, ot\n\
                 M = np.loadtxt('{}').reshape({n}, {n})\n\
                 w = np.ones({n}) / {n}\n\
                 print(repr(float(ot.emd2(w, w, M, numItermax=10_000_000))))",
                input.display()
            );
            let stdout = crate::python(&script);
            let theirs: f64 = stdout.trim().parse().unwrap();
            for solver in [OtSolver::Jv, OtSolver::Pathfinding] {
                let perm = solver.assign(&cost, n).unwrap();
                let ours = perm
                    .iter()
                    .enumerate()
                    .map(|(i, &j)| cost[i * n + j])
                    .sum::<f64>()
                    / n as f64;
                let rel = (ours - theirs).abs() / theirs;
                eprintln!("exact OT ({solver:?}) vs POT's emd2, n = {n}: {rel:.1e} relative");
                assert!(rel < 1e-6, "{solver:?}, n = {n}: {ours} against {theirs}");
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
