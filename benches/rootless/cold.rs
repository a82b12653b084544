//! Phase 2, cold start: the first ADD (it starts the infra) vs. a warm one,
//! and its breakdown from the perf trace.

use crate::driver::{status, worker, Cx};
use crate::netconf::{conflist, stdin_conf, Chain, NetOpts};
use crate::stats::{floats, median, ms, pids};
use crate::trace;
use crate::Res;
use serde_json::{json, Value};
use std::fmt::Write as _;

pub(crate) struct Cold {
    out: Value,
}

pub(crate) fn phase(cx: &mut Cx, section: &'static str) -> Res<Cold> {
    if !status(cx, None)?["infra"].is_null() {
        return Err("an infra is still running before the cold start test".into());
    }
    let cold_c = cx.lab.container();
    let warm_c = cx.lab.container();
    let full = conflist(Chain::Full, &NetOpts::default());
    let out = worker(
        cx,
        json!({
            "task": "cold", "iters": cx.plan.cold_iters,
            "bin": cx.bin, "cni_path": cx.lab.cni_path(),
            "conf": stdin_conf(&full, None),
            "cold_netns": cold_c.netns(), "warm_netns": warm_c.netns(),
        }),
    )?;
    let m = |k: &str| median(&floats(&out[k]));
    let n = cx.plan.cold_iters;
    let r = &mut cx.report;
    r.fig(
        section,
        format!("cold ADD (no infra; full chain), median of {n}"),
        ms(m("cold_add")),
    );
    r.fig(
        section,
        "warm ADD (same chain, infra running)",
        ms(m("warm_add")),
    );
    let diff = m("cold_add") - m("warm_add");
    r.target(
        section,
        "infra ready beyond the inner chain: cold ADD − warm ADD",
        ms(diff),
        "≤ 100 ms",
        diff <= 100.0,
    );
    r.fig(
        section,
        "\"infra started in\" (the plugin's own log, ROOTLESS_CNI_LOG=info)",
        ms(m("infra_started")),
    );
    r.fig(
        section,
        "DEL of the last attachment (stops the infra) / DEL with others left",
        format!("{} / {}", ms(m("del_last")), ms(m("del_warm"))),
    );
    cx.lab.kill_container(&cold_c);
    cx.lab.kill_container(&warm_c);
    Ok(Cold { out })
}

pub(crate) fn breakdown(cx: &mut Cx, trace: &trace::Trace, cold: &Cold) {
    let cold_ids: Vec<trace::Id> = trace
        .resolve(&pids(&cold.out["cold_pid"]), "/rootless-cni")
        .into_iter()
        .flatten()
        .collect();
    let steps: Vec<[f64; 7]> = cold_ids
        .iter()
        .filter_map(|p| trace::cold_steps(trace, *p))
        .collect();
    let warm: Vec<trace::Phases> = trace
        .resolve(&pids(&cold.out["warm_pid"]), "/rootless-cni")
        .into_iter()
        .flatten()
        .filter_map(|p| trace::plugin_phases(trace, p))
        .collect();
    if steps.is_empty() {
        cx.report
            .details
            .push("### Cold start breakdown\n\nperf saw no complete cold ADD.\n".into());
        return;
    }
    let seg = |i: usize| median(&steps.iter().map(|s| s[i + 1] - s[i]).collect::<Vec<_>>());
    let warm_before = median(&warm.iter().map(|w| w.before).collect::<Vec<_>>());
    let warm_inner = median(&warm.iter().map(|w| w.span).collect::<Vec<_>>());
    let names = [
        "rootless-cni exec → supervisor exec (config, lock, state dirs, spawn)",
        "supervisor exec → sandbox exec (fork, unshare net+mnt)",
        "sandbox exec → slirp4netns exec (sandbox: mounts, lo, ip_forward, ready)",
        "slirp4netns exec → first inner plugin exec (slirp4netns ready, infra.json, record)",
        "inner plugins (first exec → last exit)",
        "last inner exit → rootless-cni exit (record, reply)",
    ];
    let mut md = format!(
        "### Cold start breakdown (perf sched tracepoints; medians of {} cold ADDs, ms)\n\n\
         | step | cold ADD | warm ADD |\n|---|---|---|\n",
        steps.len()
    );
    let unshare: Vec<f64> = cold_ids
        .iter()
        .filter_map(|p| trace::sandbox_unshare(trace, *p))
        .collect();
    for (i, name) in names.iter().enumerate() {
        let w = match i {
            4 => format!("{warm_inner:.1}"),
            _ => String::new(),
        };
        let _ = writeln!(md, "| {name} | {:.1} | {w} |", seg(i));
        if i == 1 && !unshare.is_empty() {
            let lo = unshare.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = unshare.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let _ = writeln!(
                md,
                "| … of which unshare(CLONE_NEWNET\\|CLONE_NEWNS) in the sandbox's pre-exec \
                 (min {lo:.1}, max {hi:.1}) | {:.1} | |",
                median(&unshare)
            );
        }
    }
    let before = median(&steps.iter().map(|s| s[4]).collect::<Vec<_>>());
    let _ = writeln!(
        md,
        "| **exec → first inner plugin** | **{before:.1}** | **{warm_before:.1}** |"
    );
    cx.report.details.push(md);
    cx.report.fig(
        "2. cold start",
        "from rootless-cni's exec to the first inner plugin: cold / warm (perf)",
        format!("{} / {}", ms(before), ms(warm_before)),
    );
    for (i, label) in [
        (1, "supervisor start (exec → sandbox exec)"),
        (2, "sandbox setup (exec → slirp4netns exec)"),
        (3, "slirp4netns ready + records (→ first inner plugin)"),
    ] {
        cx.report.fig("2. cold start", label, ms(seg(i)));
        if i == 1 && !unshare.is_empty() {
            cx.report.fig(
                "2. cold start",
                "… of which unshare(net+mnt) for the sandbox",
                ms(median(&unshare)),
            );
        }
    }
}
