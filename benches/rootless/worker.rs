//! The worker: the bench binary run inside the lab's session as the lab user.
//! It spawns and times the plugin calls itself, so getting into the session
//! is not in the figures.

use crate::ports;
use crate::stats::parse_duration_ms;
use crate::Res;
use crate::PLUGIN_DIR;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};
use std::thread;
use std::time::Instant;

pub(crate) fn main() -> i32 {
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("bench worker: reading the task: {e}");
        return 1;
    }
    let task: Value = match serde_json::from_str(&input) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("bench worker: the task is not JSON: {e}");
            return 1;
        }
    };
    let out = match task["task"].as_str() {
        Some("warm") => warm(&task),
        Some("cold") => cold(&task),
        Some("many") => many(&task),
        Some("parallel") => parallel(&task),
        Some("echo_server") => ports::echo_server(&task),
        other => Err(format!("unknown task {other:?}")),
    };
    match out {
        Ok(v) => {
            println!("{v}");
            0
        }
        Err(e) => {
            eprintln!("bench worker: {e}");
            1
        }
    }
}

pub(crate) fn s<'a>(t: &'a Value, k: &str) -> Res<&'a str> {
    t[k].as_str().ok_or_else(|| format!("task without {k:?}"))
}

pub(crate) fn n(t: &Value, k: &str) -> Res<usize> {
    t[k].as_u64()
        .map(|v| v as usize)
        .ok_or_else(|| format!("task without {k:?}"))
}

pub(crate) fn strs(t: &Value, k: &str) -> Res<Vec<String>> {
    t[k].as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .ok_or_else(|| format!("task without {k:?}"))
}

/// The infra's namespaces, opened once.
pub(crate) struct Infra {
    mnt: fs::File,
    net: fs::File,
}

impl Infra {
    fn open(sandbox_pid: u64) -> Res<Infra> {
        let open = |kind: &str| {
            let p = format!("/proc/{sandbox_pid}/ns/{kind}");
            fs::File::open(&p).map_err(|e| format!("opening {p}: {e}"))
        };
        Ok(Infra {
            mnt: open("mnt")?,
            net: open("net")?,
        })
    }
}

pub(crate) struct Call {
    pub ms: f64,
    pub pid: u32,
    pub ok: bool,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Call {
    fn check(self, what: &str) -> Res<Call> {
        if self.ok {
            Ok(self)
        } else {
            Err(format!(
                "{what} failed: {}{}",
                String::from_utf8_lossy(&self.stdout),
                self.stderr
            ))
        }
    }
}

/// Runs `program` with our PATH, HOME and XDG_RUNTIME_DIR plus `env`,
/// `input` on stdin; with `infra`, inside its mount and net namespaces.
/// Timed from before the spawn to after the exit.
pub(crate) fn run(
    program: &str,
    env: &[(&str, String)],
    input: &[u8],
    infra: Option<&Infra>,
) -> Res<Call> {
    let mut cmd = Command::new(program);
    cmd.env_clear();
    for k in ["PATH", "HOME", "XDG_RUNTIME_DIR"] {
        if let Some(v) = std::env::var_os(k) {
            cmd.env(k, v);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(infra) = infra {
        let (mnt, net) = (infra.mnt.as_raw_fd(), infra.net.as_raw_fd());
        // SAFETY: between fork and exec in the single-threaded child;
        // join_namespaces is async-signal-safe and `infra` outlives it.
        unsafe {
            cmd.pre_exec(move || {
                use std::os::fd::BorrowedFd;
                // SAFETY: `infra` holds both fds open past the spawn below.
                let (mnt, net) = (BorrowedFd::borrow_raw(mnt), BorrowedFd::borrow_raw(net));
                rootless_cni::exec::join_namespaces(mnt, net)
            });
        }
    }
    let t = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("running {program}: {e}"))?;
    let pid = child.id();
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input);
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for {program}: {e}"))?;
    Ok(Call {
        ms: t.elapsed().as_secs_f64() * 1e3,
        pid,
        ok: out.status.success(),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

pub(crate) fn cni_env<'a>(
    verb: &str,
    id: &str,
    netns: &str,
    cni_path: &str,
    extra: &[(&'a str, &str)],
) -> Vec<(&'a str, String)> {
    let mut env = vec![
        ("CNI_COMMAND", verb.to_string()),
        ("CNI_CONTAINERID", id.to_string()),
        ("CNI_NETNS", netns.to_string()),
        ("CNI_IFNAME", "eth0".to_string()),
        ("CNI_PATH", cni_path.to_string()),
    ];
    env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    env
}

/// rootless-cni as the plugin: the outer config on stdin.
pub(crate) struct Outer<'a> {
    bin: &'a str,
    cni_path: &'a str,
    conf: Vec<u8>,
}

impl Outer<'_> {
    fn call(&self, verb: &str, id: &str, netns: &str, extra: &[(&str, &str)]) -> Res<Call> {
        let env = cni_env(verb, id, netns, self.cni_path, extra);
        run(self.bin, &env, &self.conf, None)?.check(&format!("rootless-cni {verb} {id}"))
    }
}

/// The inner chain run directly inside the infra, libcni's way: ADD in
/// order with prevResult threaded, DEL in reverse with the result.
/// Returns the time, the plugins' pids and (ADD) the result.
pub(crate) fn direct(
    verb: &str,
    list: &Value,
    infra: &Infra,
    id: &str,
    netns: &str,
    cached: Option<&Value>,
) -> Res<(f64, Vec<u32>, Value)> {
    let plugins = list["plugins"]
        .as_array()
        .ok_or("the inner list has no plugins")?;
    let env = cni_env(verb, id, netns, PLUGIN_DIR, &[("CNI_ARGS", "")]);
    let order: Vec<&Value> = if verb == "DEL" {
        plugins.iter().rev().collect()
    } else {
        plugins.iter().collect()
    };
    let t = Instant::now();
    let mut prev = cached.cloned();
    let mut pids = Vec::new();
    for p in order {
        let mut conf = p.clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["name"] = list["name"].clone();
        if let Some(prev) = &prev {
            conf["prevResult"] = prev.clone();
        }
        let ty = p["type"].as_str().ok_or("a plugin without type")?;
        let input = serde_json::to_vec(&conf).map_err(|e| e.to_string())?;
        let call = run(&format!("{PLUGIN_DIR}/{ty}"), &env, &input, Some(infra))?
            .check(&format!("{ty} {verb} {id} (direct)"))?;
        pids.push(call.pid);
        if verb == "ADD" {
            prev = Some(
                serde_json::from_slice(&call.stdout)
                    .map_err(|e| format!("{ty} printed no JSON: {e}"))?,
            );
        }
    }
    Ok((
        t.elapsed().as_secs_f64() * 1e3,
        pids,
        prev.unwrap_or(Value::Null),
    ))
}

/// A (rootless-cni) and B (the inner plugins directly in the infra)
/// ADD+DEL on the same container netns, alternating.
pub(crate) fn warm(t: &Value) -> Res<Value> {
    let iters = n(t, "iters")?;
    let label = s(t, "label")?;
    let netns = s(t, "netns")?;
    let (a_id, b_id) = (s(t, "a_id")?, s(t, "b_id")?);
    let outer = Outer {
        bin: s(t, "bin")?,
        cni_path: s(t, "cni_path")?,
        conf: serde_json::to_vec(&t["a_conf"]).map_err(|e| e.to_string())?,
    };
    let list = &t["inner"];
    let infra = Infra::open(t["sandbox_pid"].as_u64().ok_or("no sandbox_pid")?)?;
    let mut r: HashMap<&str, Vec<Value>> = HashMap::new();
    for i in 0..iters {
        let sides = if i % 2 == 0 { ["A", "B"] } else { ["B", "A"] };
        for side in sides {
            if side == "A" {
                let add = outer.call("ADD", a_id, netns, &[])?;
                let del = outer.call("DEL", a_id, netns, &[])?;
                r.entry("a_add").or_default().push(json!(add.ms));
                r.entry("a_del").or_default().push(json!(del.ms));
                r.entry("a_add_pid").or_default().push(json!(add.pid));
                r.entry("a_del_pid").or_default().push(json!(del.pid));
            } else {
                let (add_ms, add_pids, result) = direct("ADD", list, &infra, b_id, netns, None)?;
                let (del_ms, del_pids, _) =
                    direct("DEL", list, &infra, b_id, netns, Some(&result))?;
                r.entry("b_add").or_default().push(json!(add_ms));
                r.entry("b_del").or_default().push(json!(del_ms));
                r.entry("b_add_pids").or_default().push(json!(add_pids));
                r.entry("b_del_pids").or_default().push(json!(del_pids));
            }
        }
        if (i + 1) % 10 == 0 || i + 1 == iters {
            eprintln!("bench worker: {label}: {}/{iters} A/B pairs", i + 1);
        }
    }
    Ok(json!(r))
}

/// Each iteration: a cold ADD (no infra: it starts one), a warm ADD,
/// DEL of the warm one, DEL of the cold one (the last: stops the infra).
pub(crate) fn cold(t: &Value) -> Res<Value> {
    let iters = n(t, "iters")?;
    let (cold_ns, warm_ns) = (s(t, "cold_netns")?, s(t, "warm_netns")?);
    let outer = Outer {
        bin: s(t, "bin")?,
        cni_path: s(t, "cni_path")?,
        conf: serde_json::to_vec(&t["conf"]).map_err(|e| e.to_string())?,
    };
    let log = [("ROOTLESS_CNI_LOG", "info")];
    let mut r: HashMap<&str, Vec<Value>> = HashMap::new();
    for i in 0..iters {
        let cold = outer.call("ADD", "bench-cold", cold_ns, &log)?;
        let warm = outer.call("ADD", "bench-cold-warm", warm_ns, &log)?;
        let del_warm = outer.call("DEL", "bench-cold-warm", warm_ns, &log)?;
        let del_last = outer.call("DEL", "bench-cold", cold_ns, &log)?;
        let started = cold
            .stderr
            .lines()
            .find_map(|l| l.split("infra started in ").nth(1))
            .and_then(|d| parse_duration_ms(d.trim()));
        r.entry("cold_add").or_default().push(json!(cold.ms));
        r.entry("warm_add").or_default().push(json!(warm.ms));
        r.entry("del_warm").or_default().push(json!(del_warm.ms));
        r.entry("del_last").or_default().push(json!(del_last.ms));
        r.entry("cold_pid").or_default().push(json!(cold.pid));
        r.entry("warm_pid").or_default().push(json!(warm.pid));
        if let Some(ms) = started {
            r.entry("infra_started").or_default().push(json!(ms));
        }
        eprintln!("bench worker: cold start: {}/{iters}", i + 1);
    }
    Ok(json!(r))
}

/// ADD or DEL of many containers, `concurrency` at a time.
pub(crate) fn many(t: &Value) -> Res<Value> {
    let verb = s(t, "verb")?;
    let concurrency = n(t, "concurrency")?.max(1);
    let (ids, netns) = (strs(t, "ids")?, strs(t, "netns")?);
    let outer = Outer {
        bin: s(t, "bin")?,
        cni_path: s(t, "cni_path")?,
        conf: serde_json::to_vec(&t["conf"]).map_err(|e| e.to_string())?,
    };
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    let start = Instant::now();
    thread::scope(|scope| {
        for _ in 0..concurrency {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= ids.len() {
                    break;
                }
                if let Err(e) = outer.call(verb, &ids[i], &netns[i], &[]) {
                    failures.lock().unwrap_or_else(|e| e.into_inner()).push(e);
                }
                let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                if d % 50 == 0 {
                    eprintln!("bench worker: {verb} {d}/{}", ids.len());
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap_or_default();
    if let Some(first) = failures.first() {
        return Err(format!(
            "{} of {} failed; first: {first}",
            failures.len(),
            ids.len()
        ));
    }
    Ok(json!({ "ms": start.elapsed().as_secs_f64() * 1e3 }))
}

/// Runs `f(i)` for every i at once (threads released together); the
/// wall time from the release to the last exit.
pub(crate) fn all_at_once(count: usize, f: impl Fn(usize) -> Res<Call> + Sync) -> Res<f64> {
    let barrier = Barrier::new(count + 1);
    let (wall, results) = thread::scope(|scope| {
        let handles: Vec<_> = (0..count)
            .map(|i| {
                let (b, f) = (&barrier, &f);
                scope.spawn(move || {
                    b.wait();
                    f(i)
                })
            })
            .collect();
        barrier.wait();
        let t = Instant::now();
        let results: Vec<Res<Call>> = handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("a thread panicked".into())))
            .collect();
        (t.elapsed().as_secs_f64() * 1e3, results)
    });
    for r in results {
        r?;
    }
    Ok(wall)
}

/// Rounds of: `count` ADDs at once, and `count` ADDs one after the
/// other (order alternating), each followed by DEL of them all.
pub(crate) fn parallel(t: &Value) -> Res<Value> {
    let rounds = n(t, "rounds")?;
    let netns = strs(t, "netns")?;
    let outer = Outer {
        bin: s(t, "bin")?,
        cni_path: s(t, "cni_path")?,
        conf: serde_json::to_vec(&t["conf"]).map_err(|e| e.to_string())?,
    };
    let id = |i: usize| format!("bench-par-{i}");
    let count = netns.len();
    let (mut par, mut seq) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let order = if r % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for concurrent in order {
            if concurrent {
                par.push(all_at_once(count, |i| {
                    outer.call("ADD", &id(i), &netns[i], &[])
                })?);
            } else {
                let t = Instant::now();
                for (i, ns) in netns.iter().enumerate() {
                    outer.call("ADD", &id(i), ns, &[])?;
                }
                seq.push(t.elapsed().as_secs_f64() * 1e3);
            }
            all_at_once(count, |i| outer.call("DEL", &id(i), &netns[i], &[]))?;
        }
        eprintln!("bench worker: parallelism: round {}/{rounds}", r + 1);
    }
    Ok(json!({ "par": par, "seq": seq }))
}
