//! Contenders measured by turns, the order rotating from round to round, so
//! that whatever else the machine does falls on each of them alike.

use crate::Res;

/// Alternates `a` and `b` (ABBA…) for `rounds` rounds; each one's results.
pub(crate) fn alternate(
    rounds: usize,
    mut a: impl FnMut() -> Res<f64>,
    mut b: impl FnMut() -> Res<f64>,
) -> Res<(Vec<f64>, Vec<f64>)> {
    let mut runs = alternate_n(rounds, 2, |i| if i == 0 { a() } else { b() })?;
    let vb = runs.pop().unwrap_or_default();
    let va = runs.pop().unwrap_or_default();
    Ok((va, vb))
}

/// Runs `run(i)` for each of `k` contenders, `rounds` times, the order
/// rotating from round to round; each contender's results.
pub(crate) fn alternate_n(
    rounds: usize,
    k: usize,
    mut run: impl FnMut(usize) -> Res<f64>,
) -> Res<Vec<Vec<f64>>> {
    let mut out = vec![Vec::new(); k];
    for r in 0..rounds {
        for j in 0..k {
            let i = (r + j) % k;
            out[i].push(run(i)?);
        }
    }
    Ok(out)
}
