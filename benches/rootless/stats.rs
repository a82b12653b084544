//! Medians, quartiles, ratios of medians and how figures are written.

use serde_json::Value;

pub(crate) fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// First and third quartiles (medians of the lower and upper halves).
pub(crate) fn quartiles(v: &[f64]) -> (f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let half = s.len() / 2;
    (median(&s[..half]), median(&s[s.len() - half..]))
}

pub(crate) fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

pub(crate) fn pids(v: &Value) -> Vec<u32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_u64().map(|p| p as u32))
                .collect()
        })
        .unwrap_or_default()
}

/// "12.3456ms", "1.2s", "950.1µs" (a Duration's Debug form) in ms.
pub(crate) fn parse_duration_ms(s: &str) -> Option<f64> {
    let units = [
        ("ms", 1.0),
        ("µs", 1e-3),
        ("us", 1e-3),
        ("ns", 1e-6),
        ("s", 1e3),
    ];
    units.iter().find_map(|(unit, factor)| {
        let n = s.strip_suffix(unit)?;
        n.parse::<f64>().ok().map(|n| n * factor)
    })
}

pub(crate) fn ms(v: f64) -> String {
    format!("{v:.1} ms")
}

pub(crate) fn ratio(v: f64) -> String {
    format!("{v:.2}×")
}

pub(crate) fn gbits(v: f64) -> String {
    format!("{v:.2} Gbit/s")
}

pub(crate) fn mib(kib: u64) -> String {
    format!("{:.2} MiB", kib as f64 / 1024.0)
}

/// "median Gbit/s (runs min–max)".
pub(crate) fn gbits_runs(v: &[f64]) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{} (runs {lo:.1}–{hi:.1})", gbits(median(v)))
}

/// The ratio of the medians, and it as text with the per-round ratios'
/// range.
pub(crate) fn ratio_runs(a: &[f64], b: &[f64]) -> (f64, String) {
    let r = median(a) / median(b);
    let per: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
    let lo = per.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = per.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (r, format!("{} (per round {lo:.2}–{hi:.2})", ratio(r)))
}
