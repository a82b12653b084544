//! The driver: runs as root, builds the lab, runs the phases, writes the report.

use crate::opts::{Opts, Plan};
use crate::procs::{load_average, session};
use crate::report::{self, Report};
use crate::trace;
use crate::Res;
use crate::WORKER_ARG;
use crate::{cleanup, footprint};
use crate::{cold, dataplane, outbound, parallel, ports, scale, warm};
use lab::{find_in_path, result_ipv4, Container, Lab};
use serde_json::Value;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Stdio;

pub(crate) struct Cx<'a> {
    pub lab: &'a Lab,
    pub plan: Plan,
    pub worker: String,
    pub bin: String,
    pub report: Report,
    /// Root's scratch dir (perf data).
    pub scratch: PathBuf,
}

pub(crate) fn run(opts: &Opts) -> i32 {
    let plan = Plan::new(opts.quick);
    progress!(
        "rootless-cni benchmark ({}), report to {}",
        if opts.quick { "quick" } else { "full" },
        opts.out.display()
    );
    if !nix::unistd::geteuid().is_root() {
        eprintln!("bench: must run as root (it builds the rootless lab); use scripts/bench");
        return 1;
    }
    if find_in_path("iperf3").is_none() {
        eprintln!("bench: iperf3 is missing (scripts/deps iperf3)");
        return 1;
    }
    let Some(lab) = Lab::new(lab::binary!(), "bench") else {
        eprintln!("bench: the rootless lab cannot run on this machine (see above)");
        return 1;
    };
    cleanup::with(|l| {
        l.uid = Some(lab.uid);
        l.dirs.push(lab.dir.clone());
    });
    let worker = lab.dir.join("tools/bench-worker");
    let copied = std::env::current_exe()
        .and_then(|exe| fs::copy(exe, &worker))
        .and_then(|_| fs::set_permissions(&worker, fs::Permissions::from_mode(0o755)));
    if let Err(e) = copied {
        eprintln!("bench: copying the worker into the lab: {e}");
        return 1;
    }
    let scratch = std::env::temp_dir().join(format!("rootless-cni-bench.{}", std::process::id()));
    if let Err(e) = fs::create_dir_all(&scratch) {
        eprintln!("bench: {}: {e}", scratch.display());
        return 1;
    }
    cleanup::with(|l| l.dirs.push(scratch.clone()));
    let mut cx = Cx {
        lab: &lab,
        plan,
        worker: worker.display().to_string(),
        bin: lab.bin().join("rootless-cni").display().to_string(),
        report: Report::default(),
        scratch: scratch.clone(),
    };
    progress!("lab: uid {}, dir {}", lab.uid, lab.dir.display());

    let tracer = if opts.runs("warm") || opts.runs("cold") {
        trace::Tracer::start(&scratch)
    } else {
        None
    };
    if tracer.is_none() {
        progress!("perf is not available: no breakdowns from scheduler tracepoints");
    }
    let warm = opts
        .runs("warm")
        .then(|| guarded(&mut cx, "1. warm overhead", warm::phase))
        .flatten();
    let cold = opts
        .runs("cold")
        .then(|| guarded(&mut cx, "2. cold start", cold::phase))
        .flatten();
    let trace = tracer.and_then(|t| {
        progress!("reading the perf trace");
        t.stop()
    });
    if let Some(trace) = &trace {
        if let Some(w) = &warm {
            warm::breakdown(&mut cx, trace, w);
        }
        if let Some(c) = &cold {
            cold::breakdown(&mut cx, trace, c);
        }
    }
    if opts.runs("scale") {
        guarded(&mut cx, "3. scale", scale::phase);
    }
    if opts.runs("parallel") {
        guarded(&mut cx, "4. parallelism", parallel::phase);
    }
    if opts.runs("dataplane") {
        guarded(&mut cx, "5. data plane", dataplane::phase);
    }
    if opts.runs("outbound") {
        guarded(
            &mut cx,
            "6. outbound: slirp4netns vs pasta",
            outbound::phase,
        );
    }
    if opts.runs("ports") {
        guarded(&mut cx, "7. published ports", ports::phase);
    }
    if opts.only.is_none() {
        footprint::binary_size(&mut cx);
    }

    let _ = fs::remove_dir_all(&scratch);
    let report = std::mem::take(&mut cx.report);
    drop(cx);
    drop(lab);
    cleanup::with(|l| {
        l.uid = None;
        l.dirs.clear();
    });
    let md = report::markdown(opts, &report);
    println!("\n{}", report.table());
    for d in &report.details {
        println!("{d}");
    }
    if let Err(e) = fs::write(&opts.out, md) {
        eprintln!("bench: writing {}: {e}", opts.out.display());
        return 1;
    }
    progress!("wrote {}", opts.out.display());
    let missed = report
        .rows
        .iter()
        .filter(|r| r.target.is_some() && r.met == Some(false))
        .count();
    progress!(
        "{} targets met, {missed} missed, {} errors",
        report.rows.iter().filter(|r| r.met == Some(true)).count(),
        report.errors.len()
    );
    if report.errors.is_empty() {
        0
    } else {
        for e in &report.errors {
            eprintln!("bench: error: {e}");
        }
        1
    }
}

/// Runs a phase; an error is reported, the infra and its attachments
/// are forcibly stopped, and the run goes on.
pub(crate) fn guarded<T>(
    cx: &mut Cx,
    section: &'static str,
    phase: fn(&mut Cx, &'static str) -> Res<T>,
) -> Option<T> {
    progress!("{section}");
    let load_before = load_average();
    let outcome = phase(cx, section);
    let number = section.split('.').next().unwrap_or(section);
    cx.report
        .loads
        .push(format!("{number}. {load_before} → {}", load_average()));
    match outcome {
        Ok(v) => Some(v),
        Err(e) => {
            cx.report.error(section, e);
            let dirs = [cx.lab.dir.join("run"), cx.lab.dir.join("tmpfs-run")];
            for dir in dirs.iter().filter_map(|d| d.read_dir().ok()).flatten() {
                let Ok(dir) = dir else { continue };
                let d = dir.path().display().to_string();
                cx.lab.cli(&["--state-dir", &d, "stop", "--force"]);
            }
            None
        }
    }
}

pub(crate) fn worker(cx: &Cx, task: Value) -> Res<Value> {
    let mut cmd = session(cx.lab, &[], &[&cx.worker, WORKER_ARG]);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting the worker: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(task.to_string().as_bytes())
            .map_err(|e| format!("writing the task: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for the worker: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "worker task {} failed ({})",
            task["task"], out.status
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("worker output: {e}"))
}

/// rootless-cni ADD/DEL from the driver (set-up, not timed).
pub(crate) fn plugin(cx: &Cx, verb: &str, id: &str, c: &Container, conf: &Value) -> Res<Value> {
    let env = cx.lab.plugin_env(verb, id, &c.netns());
    let out = cx.lab.plugin(&env, &conf.to_string());
    if !out.ok() {
        return Err(format!("rootless-cni {verb} {id}: {out}"));
    }
    Ok(out.json().unwrap_or(Value::Null))
}

/// status --json of a state dir (None: the default one).
pub(crate) fn status(cx: &Cx, state_dir: Option<&str>) -> Res<Value> {
    let out = match state_dir {
        Some(d) => cx.lab.cli(&["--state-dir", d, "status", "--json"]),
        None => cx.lab.cli(&["status", "--json"]),
    };
    if !out.ok() {
        return Err(format!("status: {out}"));
    }
    out.json()
        .ok_or_else(|| format!("status is not JSON: {out}"))
}

pub(crate) fn infra_pid(status: &Value, which: &str) -> Res<u64> {
    status["infra"][which]["pid"]
        .as_u64()
        .ok_or_else(|| format!("status names no {which}: {status}"))
}

pub(crate) fn state_dir_path(cx: &Cx, name: &str) -> String {
    cx.lab.run_dir().join(name).display().to_string()
}

/// An attachment made by the driver, DEL'd on drop.
pub(crate) struct Attached<'a> {
    cx: &'a Cx<'a>,
    id: String,
    pub(crate) c: Container,
    conf: Value,
    result: Value,
}

impl<'a> Attached<'a> {
    pub(crate) fn add(cx: &'a Cx<'a>, id: &str, conf: Value) -> Res<Attached<'a>> {
        let c = cx.lab.container();
        let result = match plugin(cx, "ADD", id, &c, &conf) {
            Ok(r) => r,
            Err(e) => {
                cx.lab.kill_container(&c);
                return Err(e);
            }
        };
        Ok(Attached {
            cx,
            id: id.to_string(),
            c,
            conf,
            result,
        })
    }

    pub(crate) fn ip(&self) -> Res<String> {
        result_ipv4(&self.result).ok_or_else(|| format!("no IPv4 in {}", self.result))
    }
}

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        if let Err(e) = plugin(self.cx, "DEL", &self.id, &self.c, &self.conf) {
            progress!("data plane: {e}");
        }
        self.cx.lab.kill_container(&self.c);
    }
}
