//! Phase 1, warm overhead: ADD+DEL through rootless-cni vs. the inner chain
//! run directly in the infra, and where the time goes (perf).

use crate::driver::{infra_pid, plugin, status, worker, Cx};
use crate::footprint::footprint;
use crate::netconf::{conflist, inner_list, stdin_conf, Chain, NetOpts};
use crate::stats::{floats, median, ms, pids, quartiles, ratio};
use crate::trace;
use crate::Res;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::fs;

pub(crate) struct Warm {
    /// (label, worker output) per chain
    runs: Vec<(&'static str, Value)>,
}

pub(crate) fn phase(cx: &mut Cx, section: &'static str) -> Res<Warm> {
    let keeper = cx.lab.container();
    let keeper2 = cx.lab.container();
    let probe = cx.lab.container();
    let full = conflist(Chain::Full, &NetOpts::default());
    plugin(cx, "ADD", "bench-keeper", &keeper, &stdin_conf(&full, None))?;
    footprint(cx, "6. footprint", "1 attachment", true)?;
    let sandbox = infra_pid(&status(cx, None)?, "sandbox")?;
    // A state dir on a tmpfs, as XDG_RUNTIME_DIR (/run/user/UID) is on
    // a real machine; the lab's is on /tmp, where fsync costs.
    let tmpfs = cx.lab.dir.join("tmpfs-run");
    fs::create_dir_all(&tmpfs).map_err(|e| format!("{}: {e}", tmpfs.display()))?;
    std::os::unix::fs::chown(&tmpfs, Some(cx.lab.uid), Some(cx.lab.uid))
        .map_err(|e| format!("chown {}: {e}", tmpfs.display()))?;
    let t = tmpfs.display().to_string();
    let out = cx.lab.exec(
        &[],
        None,
        &["mount", "-t", "tmpfs", "-o", "mode=0700", "tmpfs", &t],
    );
    if !out.ok() {
        return Err(format!("mounting a tmpfs in the session: {out}"));
    }
    let on_tmpfs = NetOpts {
        state_dir: Some(format!("{t}/rootless-cni")),
        ..NetOpts::default()
    };
    let mut runs = Vec::new();
    for (label, chain, opts) in [
        ("(a) bridge+host-local", Chain::Bridge, NetOpts::default()),
        (
            "(b) bridge+portmap+firewall+tuning",
            Chain::Full,
            NetOpts::default(),
        ),
        (
            "(b') as (b), state dir on a tmpfs",
            Chain::Full,
            on_tmpfs.clone(),
        ),
    ] {
        let conf = conflist(chain, &opts);
        let mut sandbox = sandbox;
        if opts.state_dir.is_some() {
            plugin(
                cx,
                "ADD",
                "bench-keeper-tmpfs",
                &keeper2,
                &stdin_conf(&conf, None),
            )?;
            sandbox = infra_pid(&status(cx, opts.state_dir.as_deref())?, "sandbox")?;
        }
        let out = worker(
            cx,
            json!({
                "task": "warm", "label": label, "iters": cx.plan.warm_iters,
                "bin": cx.bin, "cni_path": cx.lab.cni_path(),
                "a_conf": stdin_conf(&conf, None), "inner": inner_list(&conf),
                "netns": probe.netns(), "sandbox_pid": sandbox,
                "a_id": "bench-warm-a", "b_id": "bench-warm-b",
            }),
        )?;
        if opts.state_dir.is_some() {
            plugin(
                cx,
                "DEL",
                "bench-keeper-tmpfs",
                &keeper2,
                &stdin_conf(&conf, None),
            )?;
        }
        let m = |k: &str| median(&floats(&out[k]));
        let sums = |x: &str, y: &str| -> Vec<f64> {
            floats(&out[x])
                .iter()
                .zip(floats(&out[y]))
                .map(|(p, q)| p + q)
                .collect()
        };
        let (a, b) = (
            median(&sums("a_add", "a_del")),
            median(&sums("b_add", "b_del")),
        );
        let n = cx.plan.warm_iters;
        let r = &mut cx.report;
        r.fig(
            section,
            format!("{label}: ADD+DEL through rootless-cni (A), median of {n}"),
            ms(a),
        );
        r.fig(
            section,
            format!("{label}: ADD+DEL of the inner plugins run directly in the infra (B)"),
            ms(b),
        );
        r.fig(
            section,
            format!("{label}: ADD alone A / B; DEL alone A / B"),
            format!(
                "{} / {}; {} / {}",
                ms(m("a_add")),
                ms(m("b_add")),
                ms(m("a_del")),
                ms(m("b_del"))
            ),
        );
        r.target(
            section,
            format!("{label}: ratio A/B"),
            ratio(a / b),
            "≤ 1.10",
            a / b <= 1.10,
        );
        let pairs: Vec<f64> = sums("a_add", "a_del")
            .iter()
            .zip(sums("b_add", "b_del"))
            .map(|(x, y)| x - y)
            .collect();
        let (q1, q3) = quartiles(&pairs);
        r.target(
            section,
            format!("{label}: overhead A−B (difference of the medians; per pair: median, IQR)"),
            format!(
                "{} (pairs: {:.1} ms, IQR {:.1} … {:.1})",
                ms(a - b),
                median(&pairs),
                q1,
                q3
            ),
            "≤ 3 ms",
            a - b <= 3.0,
        );
        runs.push((label, out));
    }
    plugin(cx, "DEL", "bench-keeper", &keeper, &stdin_conf(&full, None))?;
    for c in [&keeper, &keeper2, &probe] {
        cx.lab.kill_container(c);
    }
    Ok(Warm { runs })
}

pub(crate) fn breakdown(cx: &mut Cx, trace: &trace::Trace, warm: &Warm) {
    let mut md = String::from(
        "### Where a warm call's time goes (perf sched tracepoints; medians, ms)\n\n\
         A = rootless-cni as the plugin, B = the inner plugins run directly. \
         *spawn*: the worker's wall time minus rootless-cni's exec-to-exit (fork, exec, \
         loading, reaping); *before*: rootless-cni's exec to the first inner plugin's exec \
         (config, lock, state, record, namespaces, spawning the first plugin); *gaps*: \
         between one inner plugin's exit and the next one's exec (spawning it); *after*: \
         the last inner plugin's exit to rootless-cni's exit (record, reply); *outside*: \
         wall time minus the span from the first inner exec to the last inner exit \
         (A: spawn + before + after; B: the worker spawning the first plugin and reaping \
         the last). The inner plugins' own time is noisy (tens of ms of iptables) and \
         the same for A and B; what rootless-cni adds is **overhead = (A outside − B \
         outside) + (A gaps − B gaps)**, measured without that noise.\n\n\
         | chain | verb | A wall | B wall | A spawn | A before | A gaps | A after | A outside | B outside | B gaps | overhead |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (label, out) in &warm.runs {
        let mut total = 0.0;
        for verb in ["add", "del"] {
            let a_pids = pids(&out[format!("a_{verb}_pid").as_str()]);
            let a_wall = floats(&out[format!("a_{verb}").as_str()]);
            let b_wall = floats(&out[format!("b_{verb}").as_str()]);
            let (mut spawn, mut before, mut a_gaps, mut after, mut a_out) =
                (vec![], vec![], vec![], vec![], vec![]);
            let a_ids = trace.resolve(&a_pids, "/rootless-cni");
            for (id, w) in a_ids.iter().zip(&a_wall) {
                let Some(id) = *id else { continue };
                let (Some(ph), Some(exec), Some(exit)) = (
                    trace::plugin_phases(trace, id),
                    trace.exec_time(id),
                    trace.exit_time(id),
                ) else {
                    continue;
                };
                spawn.push(w - (exit - exec) * 1e3);
                before.push(ph.before);
                a_gaps.push(ph.gaps);
                after.push(ph.after);
                a_out.push(w - ph.span);
            }
            let (mut b_out, mut b_gaps) = (vec![], vec![]);
            let b_ids = trace.resolve_groups(&out[format!("b_{verb}_pids").as_str()]);
            for (ids, w) in b_ids.iter().zip(&b_wall) {
                let Some(ids) = ids else { continue };
                if let Some((span, gaps)) = trace::span_and_gaps(trace, ids) {
                    b_out.push(w - span);
                    b_gaps.push(gaps);
                }
            }
            let overhead = median(&a_out) - median(&b_out) + median(&a_gaps) - median(&b_gaps);
            total += overhead;
            let _ = writeln!(
                md,
                "| {label} | {} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | **{:.2}** |",
                verb.to_uppercase(),
                median(&a_wall),
                median(&b_wall),
                median(&spawn),
                median(&before),
                median(&a_gaps),
                median(&after),
                median(&a_out),
                median(&b_out),
                median(&b_gaps),
                overhead,
            );
        }
        cx.report.target(
            "1. warm overhead",
            format!(
                "{label}: overhead per ADD+DEL measured with perf (outside + gaps, see details)"
            ),
            ms(total),
            "≤ 3 ms",
            total <= 3.0,
        );
    }
    cx.report.details.push(md);
}
