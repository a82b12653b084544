//! Memory of the infra's processes (/proc) and the binary's size.

use crate::driver::{infra_pid, status, Cx};
use crate::procs::relative;
use crate::stats::mib;
use crate::Res;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;

/// A field of /proc/PID/status (or smaps_rollup) in KiB.
pub(crate) fn proc_kib(pid: u64, file: &str, field: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Rss of a process by mapped file ("[anon]" for the rest), largest first,
/// in KiB.
pub(crate) fn rss_by_mapping(pid: u64) -> Vec<(String, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut by: HashMap<String, u64> = HashMap::new();
    let mut current = String::from("[anon]");
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // "start-end perms offset dev inode [path]"
            let path = fields.nth(4).unwrap_or("[anon]");
            current = path.rsplit('/').next().unwrap_or(path).to_string();
        } else if first == "Rss:" {
            *by.entry(current.clone()).or_default() +=
                fields.next().and_then(|k| k.parse().ok()).unwrap_or(0);
        }
    }
    let mut v: Vec<(String, u64)> = by.into_iter().filter(|(_, k)| *k > 0).collect();
    v.sort_by_key(|m| std::cmp::Reverse(m.1));
    v
}

pub(crate) fn vm_rss_kib(pid: u64) -> Option<u64> {
    proc_kib(pid, "status", "VmRSS:")
}

/// "| name | VmRSS | RssAnon | RssFile | RssShmem | Pss |" in MiB.
pub(crate) fn memory_row(name: &str, pid: u64) -> String {
    let f = |file: &str, field: &str| {
        proc_kib(pid, file, field).map_or("?".to_string(), |k| format!("{:.2}", k as f64 / 1024.0))
    };
    format!(
        "| {name} | {} | {} | {} | {} | {} |\n",
        f("status", "VmRSS:"),
        f("status", "RssAnon:"),
        f("status", "RssFile:"),
        f("status", "RssShmem:"),
        f("smaps_rollup", "Pss:"),
    )
}

/// Footprint of the running infra of the default state dir.
pub(crate) fn footprint(
    cx: &mut Cx,
    section: &'static str,
    when: &str,
    with_target: bool,
) -> Res<()> {
    let st = status(cx, None)?;
    let sup = infra_pid(&st, "supervisor")?;
    let sandbox = infra_pid(&st, "sandbox")?;
    let rss = |pid| vm_rss_kib(pid).ok_or(format!("no VmRSS for {pid}"));
    let (a, b) = (rss(sup)?, rss(sandbox)?);
    let measure = format!("VmRSS supervisor + sandbox, {when}");
    let value = format!("{} ({} + {})", mib(a + b), mib(a), mib(b));
    if with_target {
        cx.report
            .target(section, measure, value, "≤ 4 MiB", a + b <= 4 * 1024);
    } else {
        cx.report.fig(section, measure, value);
    }
    let mut md = format!(
        "### Memory of the infra, {when} (MiB; RssFile is pages of the binary and \
         libraries, shared with every other process mapping them)\n\n\
         | process | VmRSS | RssAnon | RssFile | RssShmem | Pss |\n|---|---|---|---|---|---|\n"
    );
    md.push_str(&memory_row("supervisor", sup));
    md.push_str(&memory_row("sandbox", sandbox));
    let mut maps = String::new();
    for (name, pid) in [("supervisor", sup), ("sandbox", sandbox)] {
        let list: Vec<String> = rss_by_mapping(pid)
            .iter()
            .map(|(m, k)| format!("{m} {:.2}", *k as f64 / 1024.0))
            .collect();
        let _ = writeln!(maps, "- {name} Rss by mapping (MiB): {}", list.join(", "));
    }
    if let Ok(slirp) = infra_pid(&st, "slirp4netns") {
        if let Some(k) = vm_rss_kib(slirp) {
            cx.report
                .fig(section, format!("VmRSS slirp4netns, {when}"), mib(k));
        }
        md.push_str(&memory_row("slirp4netns", slirp));
    }
    md.push('\n');
    md.push_str(&maps);
    cx.report.details.push(md);
    Ok(())
}

pub(crate) fn binary_size(cx: &mut Cx) {
    let bin = Path::new(env!("CARGO_BIN_EXE_rootless-cni"));
    if let Ok(m) = fs::metadata(bin) {
        cx.report.fig(
            "6. footprint",
            format!("size of {}", relative(bin)),
            format!("{} ({} bytes)", mib(m.len() / 1024), m.len()),
        );
    }
}
