//! Phase 3, scale: ADD latency as live attachments grow, and where an ADD's
//! time goes at each level (perf).

use crate::driver::{infra_pid, plugin, status, worker, Cx};
use crate::footprint::footprint;
use crate::netconf::{conflist, inner_list, stdin_conf, Chain, NetOpts};
use crate::stats::{floats, median, ms, pids, ratio};
use crate::trace;
use crate::Res;
use lab::Container;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::fmt::Write as _;

pub(crate) fn phase(cx: &mut Cx, section: &'static str) -> Res<()> {
    let full = conflist(Chain::Full, &NetOpts::default());
    let conf = stdin_conf(&full, None);
    let keeper = cx.lab.container();
    let probe = cx.lab.container();
    plugin(cx, "ADD", "bench-scale-0", &keeper, &conf)?;
    let mut live: Vec<(String, Container)> = vec![("bench-scale-0".into(), keeper)];
    let mut at: Vec<(usize, f64, f64)> = Vec::new();
    let mut by_binary: Vec<(usize, Attribution)> = Vec::new();
    // (level, iptables rules, chains) in the infra
    let mut rules: Vec<(usize, usize, usize)> = Vec::new();
    let levels = cx.plan.scale_levels.clone();
    let result = (|| -> Res<()> {
        for &level in &levels {
            if live.len() < level {
                let start = live.len();
                progress!("scale: {} containers to {level}", level - start);
                let new: Vec<(String, Container)> = (start..level)
                    .map(|i| (format!("bench-scale-{i}"), cx.lab.container()))
                    .collect();
                progress!("scale: ADD of {} attachments", new.len());
                let out = many(cx, "ADD", &conf, &new);
                live.extend(new);
                let out = out?;
                progress!(
                    "scale: {} attachments live ({:.1} s to add)",
                    live.len(),
                    out["ms"].as_f64().unwrap_or(0.0) / 1e3
                );
            }
            let sandbox = infra_pid(&status(cx, None)?, "sandbox")?;
            let tracer = trace::Tracer::start(&cx.scratch);
            let out = worker(
                cx,
                json!({
                    "task": "warm", "label": format!("ADD at {level} live"),
                    "iters": cx.plan.scale_iters,
                    "bin": cx.bin, "cni_path": cx.lab.cni_path(),
                    "a_conf": conf, "inner": inner_list(&full),
                    "netns": probe.netns(), "sandbox_pid": sandbox,
                    "a_id": "bench-scale-probe-a", "b_id": "bench-scale-probe-b",
                }),
            )?;
            let m = |k: &str| median(&floats(&out[k]));
            at.push((level, m("a_add"), m("b_add")));
            let saved = cx.lab.cli(&["exec", "--", "iptables-save"]);
            if saved.ok() {
                let count = |p: &str| saved.stdout.lines().filter(|l| l.starts_with(p)).count();
                rules.push((level, count("-A "), count(":")));
            }
            if let Some(t) = tracer.and_then(trace::Tracer::stop) {
                by_binary.push((level, scale_attribution(&t, &out)));
            }
        }
        let max = *levels.last().unwrap_or(&1);
        footprint(cx, "6. footprint", &format!("{max} attachments"), false)?;
        Ok(())
    })();
    // DEL everything, even after a failure.
    progress!("scale: DEL of {} attachments", live.len());
    let del = many(cx, "DEL", &conf, &live);
    for (_, c) in &live {
        cx.lab.kill_container(c);
    }
    cx.lab.kill_container(&probe);
    result?;
    del?;
    if !by_binary.is_empty() {
        cx.report.details.push(scale_table(&by_binary, &rules));
    }
    let n = cx.plan.scale_iters;
    for (level, a, b) in &at {
        cx.report.fig(
            section,
            format!("ADD with {level} live attachment(s): rootless-cni / inner plugins direct, median of {n}"),
            format!("{} / {}", ms(*a), ms(*b)),
        );
    }
    if let (Some(first), Some(last)) = (at.first(), at.last()) {
        let rr = last.1 / first.1;
        cx.report.target(
            section,
            format!("ADD latency {} vs {} live: rootless-cni", last.0, first.0),
            ratio(rr),
            "≤ 1.2×",
            rr <= 1.2,
        );
        cx.report.fig(
            section,
            format!(
                "ADD latency {} vs {} live: inner plugins direct (reference)",
                last.0, first.0
            ),
            ratio(last.2 / first.2),
        );
    }
    Ok(())
}

/// `verb` of every (id, container) of `attachments` through rootless-cni,
/// `scale_concurrency` at a time (the worker's task `many`).
fn many(cx: &Cx, verb: &str, conf: &Value, attachments: &[(String, Container)]) -> Res<Value> {
    worker(
        cx,
        json!({
            "task": "many", "verb": verb,
            "concurrency": cx.plan.scale_concurrency,
            "bin": cx.bin, "cni_path": cx.lab.cni_path(), "conf": conf,
            "ids": attachments.iter().map(|n| n.0.clone()).collect::<Vec<_>>(),
            "netns": attachments.iter().map(|n| n.1.netns()).collect::<Vec<_>>(),
        }),
    )
}

/// (binary, calls, ms) rows.
pub(crate) type Attribution = Vec<(String, f64, f64)>;

/// Per binary under the ADDs `adds` (rootless-cni's descendants): the
/// median over the ADDs of (calls, exec-to-exit ms summed), and
/// rootless-cni's own time (before + gaps + after).
pub(crate) fn scale_attribution(t: &trace::Trace, out: &Value) -> Attribution {
    // Aligned with the worker's lists; None where perf missed a process.
    let adds: Vec<Option<trace::Id>> = t.resolve(&pids(&out["a_add_pid"]), "/rootless-cni");
    let per_add: Vec<HashMap<String, (usize, f64)>> = adds
        .iter()
        .flatten()
        .map(|p| trace::descendants_by_binary(t, *p))
        .collect();
    let mut names: Vec<String> = per_add.iter().flat_map(|m| m.keys().cloned()).collect();
    names.sort();
    names.dedup();
    let mut rows: Vec<(String, f64, f64)> = names
        .into_iter()
        .map(|name| {
            let get = |m: &HashMap<String, (usize, f64)>| m.get(&name).copied().unwrap_or((0, 0.0));
            let calls: Vec<f64> = per_add.iter().map(|m| get(m).0 as f64).collect();
            let time: Vec<f64> = per_add.iter().map(|m| get(m).1).collect();
            (name.clone(), median(&calls), median(&time))
        })
        .collect();
    // Outside the inner plugins' exec-to-exit: what rootless-cni adds
    // (A), and what the worker running them directly takes (B).
    let outside = |wall: &[f64], plugins: &[Option<Vec<trace::Id>>]| -> Vec<f64> {
        wall.iter()
            .zip(plugins)
            .filter_map(|(w, ps)| {
                let inside: Option<f64> = ps
                    .as_ref()?
                    .iter()
                    .map(|p| Some(t.exit_time(*p)? - t.exec_time(*p)?))
                    .sum();
                Some(w - inside? * 1e3)
            })
            .collect()
    };
    let a_inner: Vec<Option<Vec<trace::Id>>> = adds
        .iter()
        .map(|p| p.map(|p| trace::inner_of(t, p)))
        .collect();
    let b_inner = t.resolve_groups(&out["b_add_pids"]);
    let phases: Vec<trace::Phases> = adds
        .iter()
        .flatten()
        .filter_map(|p| trace::plugin_phases(t, *p))
        .collect();
    let col = |f: fn(&trace::Phases) -> f64| median(&phases.iter().map(f).collect::<Vec<_>>());
    let nan = f64::NAN;
    rows.push((
        "**rootless-cni: wall − inner plugins' exec-to-exit**".into(),
        nan,
        median(&outside(&floats(&out["a_add"]), &a_inner)),
    ));
    rows.push((
        "… rootless-cni before the first plugin".into(),
        nan,
        col(|p| p.before),
    ));
    rows.push((
        "… rootless-cni between plugins".into(),
        nan,
        col(|p| p.gaps),
    ));
    rows.push((
        "… rootless-cni after the last plugin".into(),
        nan,
        col(|p| p.after),
    ));
    rows.push((
        "**direct: wall − plugins' exec-to-exit** (the worker spawning and reaping them)".into(),
        nan,
        median(&outside(&floats(&out["b_add"]), &b_inner)),
    ));
    rows
}

pub(crate) fn scale_table(
    levels: &[(usize, Attribution)],
    rules: &[(usize, usize, usize)],
) -> String {
    let mut md = String::from(
        "### Where an ADD's time goes as attachments grow (perf; medians per ADD through \
         rootless-cni, full chain)\n\n\
         Processes below rootless-cni by binary: calls × and exec-to-exit ms summed (a \
         plugin's time includes its children's, e.g. bridge's includes host-local and \
         iptables).\n\n| binary |",
    );
    for (level, _) in levels {
        let _ = write!(md, " {level} live |");
    }
    md.push_str("\n|---|");
    md.push_str(&"---|".repeat(levels.len()));
    md.push('\n');
    // Binaries sorted, then the summary rows in the order made.
    let mut names: Vec<&String> = Vec::new();
    for (_, r) in levels {
        for x in r {
            if !names.contains(&&x.0) {
                names.push(&x.0);
            }
        }
    }
    for name in names {
        let _ = write!(md, "| {name} |");
        for (_, rows) in levels {
            match rows.iter().find(|r| &r.0 == name) {
                Some((_, calls, ms)) if calls.is_nan() => {
                    let _ = write!(md, " {ms:.1} ms |");
                }
                Some((_, calls, ms)) => {
                    let _ = write!(md, " {calls:.0} × {ms:.1} ms |");
                }
                None => md.push_str(" |"),
            }
        }
        md.push('\n');
    }
    md.push_str("| *iptables rules / chains in the infra (iptables-save)* |");
    for (level, _) in levels {
        match rules.iter().find(|r| r.0 == *level) {
            Some((_, r, c)) => {
                let _ = write!(md, " {r} / {c} |");
            }
            None => md.push_str(" |"),
        }
    }
    md.push('\n');
    md
}
