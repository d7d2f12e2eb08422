//! Exact optimal transport for the EMD ablation (SPEC §7): the transportation problem with
//! uniform marginals, solved by successive shortest paths with Dijkstra and node potentials
//! (checked in the tests against brute force, LP vertex enumeration and a Hungarian solver).
//!
//! With `n` sources and `m` sinks the uniform marginals `1/n` and `1/m` are scaled to integer
//! supplies `m/g` and demands `n/g` (`g = gcd(n, m)`), so every flow is integral and the plan is
//! exact; the plan is the flow divided by `n·m/g`.

/// An optimal plan in sparse form.
#[derive(Debug, Clone, PartialEq)]
pub struct TransportPlan {
    /// `(source i, sink j, mass)` for every positive entry; the masses sum to 1.
    pub entries: Vec<(usize, usize, f64)>,
    /// `Σ mass · cost`.
    pub cost: f64,
}

/// A transport problem without a solution.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TransportError {
    #[error("transport needs non-empty sets, got {n}×{m}")]
    Empty { n: usize, m: usize },
    #[error("the cost matrix has {len} entries, not {n}×{m}")]
    Shape { len: usize, n: usize, m: usize },
    /// A NaN or infinite cost (features that diverged): no plan is meaningful.
    #[error("the cost matrix holds the non-finite value {value} at entry {index}")]
    NonFinite { index: usize, value: f64 },
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Solves `min Σ P_ij C_ij` over plans with row sums `1/n` and column sums `1/m`.
///
/// `cost` is row-major `[n, m]`; `n` and `m` must be positive and the costs finite, else
/// [`TransportError`].
pub fn transport_uniform(
    cost: &[f64],
    n: usize,
    m: usize,
) -> Result<TransportPlan, TransportError> {
    if n == 0 || m == 0 {
        return Err(TransportError::Empty { n, m });
    }
    if cost.len() != n * m {
        return Err(TransportError::Shape {
            len: cost.len(),
            n,
            m,
        });
    }
    if let Some((index, &value)) = cost.iter().enumerate().find(|(_, c)| !c.is_finite()) {
        return Err(TransportError::NonFinite { index, value });
    }
    let g = gcd(n, m);
    let (supply0, demand0) = ((m / g) as i64, (n / g) as i64);
    let mut supply = vec![supply0; n];
    let mut demand = vec![demand0; m];
    let mut flow = vec![0i64; n * m];
    // Rows with positive flow into each column: the reverse residual edges.
    let mut col_rows: Vec<Vec<usize>> = vec![Vec::new(); m];
    // Reduced cost of row i → col j is cost + pr[i] − pc[j] ≥ 0; reverse edges are tight.
    let mut pr = vec![0.0f64; n];
    let mut pc: Vec<f64> = (0..m)
        .map(|j| {
            (0..n)
                .map(|i| cost[i * m + j])
                .fold(f64::INFINITY, f64::min)
        })
        .collect();

    let mut dist_r = vec![0.0f64; n];
    let mut dist_c = vec![0.0f64; m];
    let mut done_r = vec![false; n];
    let mut done_c = vec![false; m];
    let mut pred_r: Vec<Option<usize>> = vec![None; n]; // column a row was reached from
    let mut pred_c = vec![0usize; m]; // row a column was reached from
    let mut remaining = supply0 * n as i64;

    while remaining > 0 {
        for i in 0..n {
            dist_r[i] = if supply[i] > 0 { 0.0 } else { f64::INFINITY };
            done_r[i] = false;
            pred_r[i] = None;
        }
        dist_c.fill(f64::INFINITY);
        done_c.fill(false);
        // Dense Dijkstra, stopped at the first column with unmet demand.
        let target = loop {
            let mut best = f64::INFINITY;
            let mut node: Option<(bool, usize)> = None; // (is_row, index)
            for i in 0..n {
                if !done_r[i] && dist_r[i] < best {
                    best = dist_r[i];
                    node = Some((true, i));
                }
            }
            for j in 0..m {
                if !done_c[j] && dist_c[j] < best {
                    best = dist_c[j];
                    node = Some((false, j));
                }
            }
            let (is_row, k) = node.expect("transport network always has an augmenting path");
            if is_row {
                done_r[k] = true;
                let row = &cost[k * m..(k + 1) * m];
                let base = dist_r[k] + pr[k];
                for j in 0..m {
                    if !done_c[j] {
                        let nd = base + row[j] - pc[j];
                        if nd < dist_c[j] {
                            dist_c[j] = nd;
                            pred_c[j] = k;
                        }
                    }
                }
            } else {
                done_c[k] = true;
                if demand[k] > 0 {
                    break k;
                }
                for &i in &col_rows[k] {
                    if !done_r[i] {
                        let nd = dist_c[k] - cost[i * m + k] + pc[k] - pr[i];
                        if nd < dist_r[i] {
                            dist_r[i] = nd;
                            pred_r[i] = Some(k);
                        }
                    }
                }
            }
        };
        let d = dist_c[target];
        for i in 0..n {
            pr[i] += dist_r[i].min(d);
        }
        for j in 0..m {
            pc[j] += dist_c[j].min(d);
        }
        // Bottleneck along the path target ← row ← col ← … ← source row.
        let mut delta = demand[target];
        let mut j = target;
        let source = loop {
            let i = pred_c[j];
            match pred_r[i] {
                None => break i,
                Some(prev) => {
                    delta = delta.min(flow[i * m + prev]);
                    j = prev;
                }
            }
        };
        delta = delta.min(supply[source]);
        let mut j = target;
        loop {
            let i = pred_c[j];
            if flow[i * m + j] == 0 {
                col_rows[j].push(i);
            }
            flow[i * m + j] += delta;
            match pred_r[i] {
                None => break,
                Some(prev) => {
                    flow[i * m + prev] -= delta;
                    if flow[i * m + prev] == 0 {
                        col_rows[prev].retain(|&r| r != i);
                    }
                    j = prev;
                }
            }
        }
        supply[source] -= delta;
        demand[target] -= delta;
        remaining -= delta;
    }

    let total = (supply0 * n as i64) as f64;
    let mut entries = Vec::new();
    let mut total_cost = 0.0;
    for i in 0..n {
        for j in 0..m {
            let f = flow[i * m + j];
            if f > 0 {
                let mass = f as f64 / total;
                total_cost += mass * cost[i * m + j];
                entries.push((i, j, mass));
            }
        }
    }
    Ok(TransportPlan {
        entries,
        cost: total_cost,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Minimum-cost perfect assignment of a square `[n, n]` row-major cost matrix (Hungarian
    /// algorithm with potentials, O(n³)). Returns the column assigned to each row.
    fn assignment(cost: &[f64], n: usize) -> Vec<usize> {
        assert_eq!(cost.len(), n * n, "assignment cost matrix is not {n}×{n}");
        // 1-based arrays: column 0 is a virtual column holding the row being inserted.
        let mut u = vec![0.0f64; n + 1];
        let mut v = vec![0.0f64; n + 1];
        let mut row_of = vec![0usize; n + 1];
        let mut way = vec![0usize; n + 1];
        for i in 1..=n {
            row_of[0] = i;
            let mut j0 = 0;
            let mut minv = vec![f64::INFINITY; n + 1];
            let mut used = vec![false; n + 1];
            loop {
                used[j0] = true;
                let i0 = row_of[j0];
                let mut delta = f64::INFINITY;
                let mut j1 = 0;
                for j in 1..=n {
                    if !used[j] {
                        let cur = cost[(i0 - 1) * n + (j - 1)] - u[i0] - v[j];
                        if cur < minv[j] {
                            minv[j] = cur;
                            way[j] = j0;
                        }
                        if minv[j] < delta {
                            delta = minv[j];
                            j1 = j;
                        }
                    }
                }
                for j in 0..=n {
                    if used[j] {
                        u[row_of[j]] += delta;
                        v[j] -= delta;
                    } else {
                        minv[j] -= delta;
                    }
                }
                j0 = j1;
                if row_of[j0] == 0 {
                    break;
                }
            }
            loop {
                let j1 = way[j0];
                row_of[j0] = row_of[j1];
                j0 = j1;
                if j0 == 0 {
                    break;
                }
            }
        }
        let mut col_of = vec![0usize; n];
        for j in 1..=n {
            col_of[row_of[j] - 1] = j - 1;
        }
        col_of
    }

    /// The mean cost of [`assignment`]'s optimal permutation of a square `[n, n]` cost matrix.
    fn assignment_cost(cost: &[f64], n: usize) -> f64 {
        assignment(cost, n)
            .iter()
            .enumerate()
            .map(|(i, &j)| cost[i * n + j])
            .sum::<f64>()
            / n as f64
    }

    fn transport(cost: &[f64], n: usize, m: usize) -> TransportPlan {
        transport_uniform(cost, n, m).expect("finite, well-shaped costs")
    }

    /// The plan of `cost` has the uniform marginals and the LP optimum's cost.
    fn check_against_lp(cost: &[f64], n: usize, m: usize) {
        let plan = transport(cost, n, m);
        check_marginals(&plan, n, m);
        let brute = lp_by_enumeration(cost, n, m);
        assert!(
            (plan.cost - brute).abs() < 1e-12,
            "{n}×{m}: {} vs {brute}",
            plan.cost
        );
    }

    fn random_cost(rng: &mut StdRng, n: usize, m: usize) -> Vec<f64> {
        (0..n * m).map(|_| rng.random_range(0.0..2.0)).collect()
    }

    fn permutations(n: usize) -> Vec<Vec<usize>> {
        if n == 0 {
            return vec![vec![]];
        }
        let mut out = Vec::new();
        for p in permutations(n - 1) {
            for pos in 0..=p.len() {
                let mut q = p.clone();
                q.insert(pos, n - 1);
                out.push(q);
            }
        }
        out
    }

    /// Exact LP optimum by enumerating every basis of n + m − 1 cells (the polytope's vertices).
    fn lp_by_enumeration(cost: &[f64], n: usize, m: usize) -> f64 {
        let cells: Vec<(usize, usize)> = (0..n).flat_map(|i| (0..m).map(move |j| (i, j))).collect();
        let k = n + m - 1;
        let mut best = f64::INFINITY;
        let mut idx: Vec<usize> = (0..k).collect();
        loop {
            // Constraints: row sums (n) and column sums except the last (m − 1; redundant).
            let mut a = vec![vec![0.0f64; k + 1]; k];
            for (c, &cell) in idx.iter().enumerate() {
                let (i, j) = cells[cell];
                a[i][c] = 1.0;
                if j + 1 < m {
                    a[n + j][c] = 1.0;
                }
            }
            for (r, row) in a.iter_mut().enumerate() {
                row[k] = if r < n {
                    1.0 / n as f64
                } else {
                    1.0 / m as f64
                };
            }
            if let Some(x) = solve(a) {
                if x.iter().all(|&v| v >= -1e-12) {
                    let c: f64 = idx.iter().zip(&x).map(|(&cell, &v)| v * cost[cell]).sum();
                    best = best.min(c);
                }
            }
            // Next combination.
            let mut p = k;
            loop {
                if p == 0 {
                    return best;
                }
                p -= 1;
                if idx[p] != p + cells.len() - k {
                    break;
                }
            }
            idx[p] += 1;
            for q in p + 1..k {
                idx[q] = idx[q - 1] + 1;
            }
        }
    }

    #[allow(clippy::needless_range_loop)]
    fn solve(mut a: Vec<Vec<f64>>) -> Option<Vec<f64>> {
        let k = a.len();
        for col in 0..k {
            let piv = (col..k).max_by(|&x, &y| a[x][col].abs().total_cmp(&a[y][col].abs()))?;
            if a[piv][col].abs() < 1e-12 {
                return None;
            }
            a.swap(col, piv);
            for r in 0..k {
                if r != col {
                    let f = a[r][col] / a[col][col];
                    for c in col..=k {
                        a[r][c] -= f * a[col][c];
                    }
                }
            }
        }
        Some((0..k).map(|r| a[r][k] / a[r][r]).collect())
    }

    fn check_marginals(plan: &TransportPlan, n: usize, m: usize) {
        let mut rows = vec![0.0; n];
        let mut cols = vec![0.0; m];
        for &(i, j, w) in &plan.entries {
            assert!(w > 0.0);
            rows[i] += w;
            cols[j] += w;
        }
        for r in rows {
            assert!((r - 1.0 / n as f64).abs() < 1e-12);
        }
        for c in cols {
            assert!((c - 1.0 / m as f64).abs() < 1e-12);
        }
    }

    #[test]
    fn equal_sizes_match_all_permutations() {
        let mut rng = StdRng::seed_from_u64(1);
        for n in 1..=6 {
            for _ in 0..5 {
                let c = random_cost(&mut rng, n, n);
                let brute = permutations(n)
                    .iter()
                    .map(|p| {
                        p.iter()
                            .enumerate()
                            .map(|(i, &j)| c[i * n + j])
                            .sum::<f64>()
                    })
                    .fold(f64::INFINITY, f64::min)
                    / n as f64;
                let plan = transport(&c, n, n);
                check_marginals(&plan, n, n);
                assert!(
                    (plan.cost - brute).abs() < 1e-12,
                    "{n}: {} vs {brute}",
                    plan.cost
                );
                assert!((assignment_cost(&c, n) - brute).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn unequal_sizes_match_lp_enumeration() {
        let mut rng = StdRng::seed_from_u64(2);
        for (n, m) in [
            (1, 3),
            (3, 1),
            (2, 3),
            (3, 2),
            (2, 4),
            (3, 4),
            (4, 3),
            (2, 5),
            (4, 6),
        ] {
            for _ in 0..3 {
                check_against_lp(&random_cost(&mut rng, n, m), n, m);
            }
        }
    }

    #[test]
    fn integer_costs_with_ties() {
        // Many equal costs stress the tie handling of Dijkstra and the reverse-edge bookkeeping.
        let mut rng = StdRng::seed_from_u64(3);
        for (n, m) in [(3, 4), (4, 2), (3, 5)] {
            for _ in 0..5 {
                let c: Vec<f64> = (0..n * m).map(|_| rng.random_range(0..3) as f64).collect();
                check_against_lp(&c, n, m);
            }
        }
    }

    #[test]
    fn equal_sizes_match_the_assignment_solver() {
        let mut rng = StdRng::seed_from_u64(4);
        for n in [20, 64, 100] {
            let c = random_cost(&mut rng, n, n);
            let plan = transport(&c, n, n);
            check_marginals(&plan, n, n);
            let hung = assignment_cost(&c, n);
            assert!(
                (plan.cost - hung).abs() < 1e-10,
                "{n}: {} vs {hung}",
                plan.cost
            );
            // Uniform square marginals: some optimal plan is a permutation, and SSP finds one.
            assert_eq!(plan.entries.len(), n);
        }
    }

    #[test]
    fn unequal_sizes_match_the_expanded_assignment() {
        // Supplies m/g and demands n/g expand to a square assignment of size n·m/g.
        let mut rng = StdRng::seed_from_u64(5);
        for (n, m) in [(6, 9), (10, 4), (12, 8)] {
            let c = random_cost(&mut rng, n, m);
            let g = gcd(n, m);
            let (s, d) = (m / g, n / g);
            let size = n * s;
            let mut big = vec![0.0; size * size];
            for r in 0..size {
                for q in 0..size {
                    big[r * size + q] = c[(r / s) * m + q / d];
                }
            }
            let plan = transport(&c, n, m);
            assert!((plan.cost - assignment_cost(&big, size)).abs() < 1e-10);
        }
    }

    #[test]
    fn bad_costs_are_errors_not_panics() {
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let mut c = vec![0.5; 6];
            c[4] = bad;
            match transport_uniform(&c, 2, 3) {
                Err(TransportError::NonFinite { index: 4, value }) => {
                    assert!(value.is_nan() == bad.is_nan())
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
        assert_eq!(
            transport_uniform(&[], 0, 3),
            Err(TransportError::Empty { n: 0, m: 3 })
        );
        assert_eq!(
            transport_uniform(&[0.0; 5], 2, 3),
            Err(TransportError::Shape { len: 5, n: 2, m: 3 })
        );
    }
}
