//! The benchmark behind `scripts/bench` (issue #6). Not a test: it measures
//! rootless-cni in the rootless lab of the integration tests (the lab crate, lab/)
//! and writes a report.
//!
//! 1. warm overhead: ADD+DEL through rootless-cni vs. the same inner chain
//!    run directly inside the infra's mount+net namespaces;
//! 2. cold start: the first ADD (no infra) vs. a warm ADD, broken down with
//!    `perf` scheduler tracepoints (fork/exec/exit) when perf is there;
//! 3. scale: ADD latency with 1, 100 and 500 live attachments;
//! 4. parallelism: 32 concurrent ADDs vs. 32 sequential ones;
//! 5. data plane with iperf3 (loopback and namespaces of our own only);
//! 6. footprint: VmRSS of the infra's processes, binary size;
//! 7. published ports at scale: 10,000 held connections, throughput beside
//!    rootlesskit's and pasta's port forwarding, connections per second,
//!    the slirp4netns driver under 500 connections (benches/rootless/ports.rs).
//!
//! Every figure is a median; every comparison is a ratio of medians
//! measured in the same run with A and B alternating.
//!
//! Run as root (it builds the lab): `cargo bench --bench rootless --
//! [--quick] [--only PHASES] [--out FILE] [--command TEXT]`. The same binary, copied into the
//! lab, is the *worker*: run inside the lab's session as the lab user, it
//! spawns and times the plugin calls itself, so that getting into the
//! session (setpriv + nsenter) is not in the figures.

use lab::{
    example_conflist, find_in_path, free_tcp_port, kill_processes_of, outer, plugin_stdin,
    result_ipv4, sigkill, Container, Lab, LAB_PATH,
};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Barrier, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// argv[1] of the bench binary when it runs as the worker.
const WORKER_ARG: &str = "__bench_worker";
/// The reference plugins.
const PLUGIN_DIR: &str = "/usr/lib/cni";
/// The port iperf3 servers listen on inside containers.
const IPERF_PORT: u16 = 5201;

static START: OnceLock<Instant> = OnceLock::new();

/// Progress on stderr, with the time since start.
macro_rules! progress {
    ($($arg:tt)*) => {
        eprintln!(
            "bench [{:6.1}s] {}",
            $crate::START.get_or_init(Instant::now).elapsed().as_secs_f64(),
            format!($($arg)*)
        )
    };
}

type Res<T> = Result<T, String>;

#[path = "rootless/outbound.rs"]
mod outbound;

// After `progress!`, which it uses.
#[path = "rootless/ports.rs"]
mod ports;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(WORKER_ARG) {
        std::process::exit(worker::main());
    }
    START.get_or_init(Instant::now);
    let opts = match Opts::parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench: {e}\n{}", Opts::USAGE);
            std::process::exit(2);
        }
    };
    cleanup::install();
    // Before the lab starts: every process of it, the infra's supervisor
    // among them, inherits the fd limit a user's session would give it.
    ports::raise_nofile();
    std::process::exit(driver::run(&opts));
}

// ---------------------------------------------------------------------------
// Options and plan

struct Opts {
    quick: bool,
    /// Only these phases (`Opts::PHASES`); None: all.
    only: Option<Vec<String>>,
    out: PathBuf,
    command: String,
}

impl Opts {
    const USAGE: &'static str =
        "usage: rootless [--quick] [--only PHASE,...] [--out FILE] [--command TEXT]\n\
         phases: warm, cold, scale, parallel, dataplane, outbound, ports";
    const PHASES: [&'static str; 7] = [
        "warm",
        "cold",
        "scale",
        "parallel",
        "dataplane",
        "outbound",
        "ports",
    ];

    fn parse(args: &[String]) -> Res<Opts> {
        let (mut quick, mut out, mut command, mut only) = (false, None, None, None);
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--bench" => {} // what `cargo bench` passes
                "--quick" => quick = true,
                "--only" => {
                    let list: Vec<String> = it
                        .next()
                        .ok_or("--only needs a list of phases")?
                        .split(',')
                        .map(|p| p.trim().to_string())
                        .collect();
                    if let Some(bad) = list.iter().find(|p| !Opts::PHASES.contains(&p.as_str())) {
                        return Err(format!("unknown phase {bad:?}"));
                    }
                    only = Some(list);
                }
                "--out" => out = Some(PathBuf::from(it.next().ok_or("--out needs a file")?)),
                "--command" => command = Some(it.next().ok_or("--command needs a value")?.clone()),
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        // A partial run never overwrites the report of a full one.
        let out = out.unwrap_or_else(|| match (&only, quick) {
            (Some(list), _) => manifest.join(format!(
                "target/BENCHMARKS-{}{}.md",
                list.join("-"),
                if quick { "-quick" } else { "" }
            )),
            (None, true) => manifest.join("target/BENCHMARKS-quick.md"),
            (None, false) => manifest.join("BENCHMARKS.md"),
        });
        let command = command.unwrap_or_else(|| {
            format!(
                "cargo bench --bench rootless --{}",
                if quick { " --quick" } else { "" }
            )
        });
        Ok(Opts {
            quick,
            only,
            out,
            command,
        })
    }

    /// Whether phase `name` runs.
    fn runs(&self, name: &str) -> bool {
        self.only
            .as_ref()
            .map_or(true, |o| o.iter().any(|p| p == name))
    }
}

/// How many of everything.
struct Plan {
    /// Container → host connections held at once, per outbound engine.
    outbound_held: usize,
    warm_iters: usize,
    cold_iters: usize,
    scale_levels: Vec<usize>,
    scale_iters: usize,
    scale_concurrency: usize,
    par_n: usize,
    par_rounds: usize,
    iperf_secs: u32,
    iperf_rounds: usize,
    ports: ports::Plan,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                outbound_held: 100,
                warm_iters: 3,
                cold_iters: 2,
                scale_levels: vec![1, 5, 10],
                scale_iters: 2,
                scale_concurrency: 4,
                par_n: 32,
                par_rounds: 1,
                iperf_secs: 1,
                iperf_rounds: 1,
                ports: ports::Plan::new(true),
            }
        } else {
            Plan {
                outbound_held: 1000,
                warm_iters: 30,
                cold_iters: 15,
                scale_levels: vec![1, 100, 500],
                scale_iters: 15,
                scale_concurrency: 4,
                par_n: 32,
                par_rounds: 5,
                iperf_secs: 3,
                iperf_rounds: 5,
                ports: ports::Plan::new(false),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Statistics

fn median(v: &[f64]) -> f64 {
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
fn quartiles(v: &[f64]) -> (f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let half = s.len() / 2;
    (median(&s[..half]), median(&s[s.len() - half..]))
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

fn pids(v: &Value) -> Vec<u32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_u64().map(|p| p as u32))
                .collect()
        })
        .unwrap_or_default()
}

/// "12.3456ms", "1.2s", "950.1µs" (a Duration's Debug form) in ms.
fn parse_duration_ms(s: &str) -> Option<f64> {
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

// ---------------------------------------------------------------------------
// Emergency cleanup (Ctrl-C, or a panic when panics abort)

mod cleanup {
    use super::*;

    #[derive(Default)]
    pub struct Leftovers {
        pub uid: Option<u32>,
        /// Labs of other phases (their own uids).
        pub more_uids: Vec<u32>,
        pub dirs: Vec<PathBuf>,
        pub pids: Vec<u32>,
    }

    pub static LEFTOVERS: Mutex<Leftovers> = Mutex::new(Leftovers {
        uid: None,
        more_uids: Vec::new(),
        dirs: Vec::new(),
        pids: Vec::new(),
    });

    pub fn with<R>(f: impl FnOnce(&mut Leftovers) -> R) -> R {
        let mut l = LEFTOVERS.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut l)
    }

    /// The write end of the self-pipe the signal handler writes to.
    static SIGNAL_PIPE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

    extern "C" fn on_signal(sig: libc::c_int) {
        let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
        let b = sig as u8;
        // SAFETY: write(2) is async-signal-safe; b lives for the call.
        unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
    }

    /// SIGINT/SIGTERM/SIGHUP: undo what is recorded, then exit. A handler
    /// (reset to the default by exec) and a self-pipe, not a blocked mask:
    /// a blocked mask is inherited by every process we start.
    pub fn install() {
        use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
        let Ok((r, w)) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) else {
            return;
        };
        SIGNAL_PIPE.store(w.as_raw_fd(), Ordering::Relaxed);
        std::mem::forget(w);
        let action = SigAction::new(
            SigHandler::Handler(on_signal),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            // SAFETY: the handler only calls write(2).
            let _ = unsafe { sigaction(s, &action) };
        }
        thread::spawn(move || {
            let mut b = [0u8; 1];
            if let Ok(1) = fs::File::from(r).read(&mut b) {
                eprintln!("bench: signal {}: cleaning up", b[0]);
                run();
                std::process::exit(130);
            }
        });
        if cfg!(panic = "abort") {
            let default = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                default(info);
                run();
            }));
        }
    }

    /// Kills recorded pids and every process of the lab uid, removes the
    /// lab dir.
    pub fn run() {
        let l = with(std::mem::take);
        for pid in &l.pids {
            sigkill(*pid);
        }
        for uid in l.uid.into_iter().chain(l.more_uids.iter().copied()) {
            kill_processes_of(uid, Duration::from_secs(5));
        }
        for dir in &l.dirs {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

// ---------------------------------------------------------------------------
// Processes: the lab session, children that die with us

/// A command inside the lab's session as the lab user (what `Lab::exec`
/// runs, without its timeout and output collection).
fn session(lab: &Lab, env: &[(&str, &str)], argv: &[&str]) -> Command {
    lab.command(env, argv).0
}

/// A background process, killed and reaped on drop.
struct Background {
    child: Child,
    what: String,
}

impl Background {
    fn spawn(mut cmd: Command, what: &str) -> Res<Background> {
        cmd.stdin(Stdio::null());
        let child = cmd.spawn().map_err(|e| format!("starting {what}: {e}"))?;
        cleanup::with(|l| l.pids.push(child.id()));
        Ok(Background {
            child,
            what: what.to_string(),
        })
    }

    /// Waits until a line of stdout contains `needle` (stdout must be piped).
    fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> Res<()> {
        let stdout = self
            .child
            .stdout
            .take()
            .ok_or_else(|| format!("{}: stdout not piped", self.what))?;
        let (tx, rx) = mpsc::channel();
        let needle = needle.to_string();
        thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let mut seen = false;
            for line in lines.by_ref() {
                let Ok(line) = line else { break };
                if !seen && line.contains(&needle) {
                    seen = true;
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(timeout)
            .map_err(|_| format!("{} did not come up within {timeout:?}", self.what))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let pid = self.child.id();
        let _ = self.child.kill();
        let _ = self.child.wait();
        cleanup::with(|l| l.pids.retain(|p| *p != pid));
    }
}

/// A field of /proc/PID/status (or smaps_rollup) in KiB.
fn proc_kib(pid: u64, file: &str, field: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Rss of a process by mapped file ("[anon]" for the rest), largest first,
/// in KiB.
fn rss_by_mapping(pid: u64) -> Vec<(String, u64)> {
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

fn vm_rss_kib(pid: u64) -> Option<u64> {
    proc_kib(pid, "status", "VmRSS:")
}

/// "| name | VmRSS | RssAnon | RssFile | RssShmem | Pss |" in MiB.
fn memory_row(name: &str, pid: u64) -> String {
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

fn first_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// The 1-minute load average (the machine is shared: other work shows).
fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(String::from))
        .unwrap_or_else(|| "?".into())
}

/// `p` relative to the repository, when it is inside.
fn relative(p: &Path) -> String {
    p.strip_prefix(env!("CARGO_MANIFEST_DIR"))
        .unwrap_or(p)
        .display()
        .to_string()
}

// ---------------------------------------------------------------------------
// Network configs

#[derive(Clone, Copy, PartialEq)]
enum Chain {
    /// bridge (+ host-local IPAM)
    Bridge,
    /// bridge, portmap, firewall, tuning: conf-examples/rootless.conflist
    Full,
}

/// How a config differs from the example's.
#[derive(Default, Clone)]
struct NetOpts {
    /// Outer `mtu` and the bridge's `mtu`.
    mtu: Option<u32>,
    state_dir: Option<String>,
    port_driver: Option<&'static str>,
    /// Outer `outbound`: the infra's way out.
    outbound: Option<&'static str>,
}

/// conf-examples/rootless.conflist with a /16 subnet, host loopback allowed,
/// and `o` applied.
fn conflist(chain: Chain, o: &NetOpts) -> Value {
    let mut c = example_conflist();
    {
        let inner = &mut c["plugins"][0]["delegate"];
        inner["plugins"][0]["ipam"]["ranges"] = json!([[{ "subnet": "10.89.0.0/16" }]]);
        if let Some(mtu) = o.mtu {
            inner["plugins"][0]["mtu"] = json!(mtu);
        }
        if chain == Chain::Bridge {
            let bridge = inner["plugins"][0].clone();
            inner["plugins"] = json!([bridge]);
        }
    }
    let out = outer(&mut c);
    out.insert("allowHostLoopback".into(), json!(true));
    if let Some(mtu) = o.mtu {
        out.insert("mtu".into(), json!(mtu));
    }
    if let Some(dir) = &o.state_dir {
        out.insert("stateDir".into(), json!(dir));
    }
    if let Some(driver) = o.port_driver {
        out.insert("portDriver".into(), json!(driver));
    }
    if let Some(engine) = o.outbound {
        out.insert("outbound".into(), json!(engine));
    }
    c
}

/// What a runtime feeds rootless-cni on stdin, with capability args.
fn stdin_conf(conflist: &Value, runtime_config: Option<Value>) -> Value {
    let mut conf = plugin_stdin(conflist);
    if let Some(rc) = runtime_config {
        conf["runtimeConfig"] = rc;
    }
    conf
}

/// The inner conflist as rootless-cni runs it.
fn inner_list(conflist: &Value) -> Value {
    conflist["plugins"][0]["delegate"].clone()
}

// ---------------------------------------------------------------------------
// perf: fork/exec/exit of every process, for the breakdowns

mod trace {
    use super::*;

    pub struct Tracer {
        child: Child,
        file: PathBuf,
    }

    /// One process (one incarnation of a pid: pid_max may be small and
    /// pids get reused within a trace).
    #[derive(Default)]
    pub struct Proc {
        /// The last exec: (time, filename).
        pub exec: Option<(f64, String)>,
        /// When the whole process exited.
        pub exit: Option<f64>,
        /// Children (processes and threads), in fork order.
        pub children: Vec<Id>,
        /// unshare(2) calls: (enter, exit).
        pub unshare: Vec<(f64, f64)>,
    }

    /// A process of a trace.
    pub type Id = usize;

    #[derive(Default)]
    pub struct Trace {
        pub procs: Vec<Proc>,
        by_pid: HashMap<u32, Vec<Id>>,
    }

    impl Tracer {
        /// perf record of the scheduler's fork/exec/exit tracepoints,
        /// machine-wide; None when perf is missing or refuses.
        pub fn start(dir: &Path) -> Option<Tracer> {
            find_in_path("perf")?;
            // unshare(2) too, when the kernel has syscall tracepoints.
            Tracer::start_with(dir, true).or_else(|| Tracer::start_with(dir, false))
        }

        fn start_with(dir: &Path, syscalls: bool) -> Option<Tracer> {
            let file = dir.join("sched.perf");
            let _ = fs::remove_file(&file);
            let mut events = vec![
                "sched:sched_process_fork",
                "sched:sched_process_exec",
                "sched:sched_process_exit",
            ];
            if syscalls {
                events.extend(["syscalls:sys_enter_unshare", "syscalls:sys_exit_unshare"]);
            }
            let mut cmd = Command::new("perf");
            // -B -N: no build-id collection at the end, which takes tens
            // of seconds machine-wide and is useless for tracepoints.
            cmd.args(["record", "-q", "-a", "-B", "-N", "-o"])
                .arg(&file);
            for e in events {
                cmd.args(["-e", e]);
            }
            let child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .ok()?;
            cleanup::with(|l| l.pids.push(child.id()));
            let mut t = Tracer { child, file };
            // perf writes its header once it is recording.
            let deadline = Instant::now() + Duration::from_secs(5);
            while fs::metadata(&t.file).map(|m| m.len()).unwrap_or(0) == 0 {
                if Instant::now() > deadline || t.child.try_wait().ok().flatten().is_some() {
                    t.kill();
                    return None;
                }
                thread::sleep(Duration::from_millis(20));
            }
            thread::sleep(Duration::from_millis(300));
            if t.child.try_wait().ok().flatten().is_some() {
                t.kill();
                return None;
            }
            Some(t)
        }

        fn kill(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let pid = self.child.id();
            cleanup::with(|l| l.pids.retain(|p| *p != pid));
        }

        /// Stops recording and reads the events back.
        pub fn stop(mut self) -> Option<Trace> {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.child.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            );
            let deadline = Instant::now() + Duration::from_secs(20);
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            self.kill();
            let out = Command::new("perf")
                .args(["script", "-F", "pid,time,event,trace", "-i"])
                .arg(&self.file)
                .stderr(Stdio::null())
                .output()
                .ok()?;
            let _ = fs::remove_file(&self.file);
            Some(Trace::parse(&String::from_utf8_lossy(&out.stdout)))
        }
    }

    /// "  PID  TIME: EVENT: FIELDS" (EVENT like sched:sched_process_exec).
    fn parse_line(line: &str) -> Option<(u32, f64, &str, &str)> {
        let (head, rest) = line.split_once(": ")?;
        let mut head = head.split_whitespace();
        let pid = head.next()?.parse().ok()?;
        let time = head.next()?.parse().ok()?;
        let (event, fields) = rest.trim_start().split_once(": ")?;
        Some((pid, time, event, fields))
    }

    impl Trace {
        pub fn parse(text: &str) -> Trace {
            let mut t = Trace::default();
            // pid -> its current incarnation
            let mut current: HashMap<u32, Id> = HashMap::new();
            let mut entered: HashMap<u32, f64> = HashMap::new();
            for line in text.lines() {
                let Some((pid, time, event, fields)) = parse_line(line) else {
                    continue;
                };
                let kv: HashMap<&str, &str> = fields
                    .split_whitespace()
                    .filter_map(|f| f.split_once('='))
                    .collect();
                match event {
                    "sched:sched_process_fork" => {
                        let parent = t.current(&mut current, pid);
                        if let Some(child) = kv.get("child_pid").and_then(|c| c.parse().ok()) {
                            let id = t.new_proc(child);
                            current.insert(child, id);
                            t.procs[parent].children.push(id);
                        }
                    }
                    "sched:sched_process_exec" => {
                        let id = t.current(&mut current, pid);
                        let file = kv.get("filename").copied().unwrap_or("").to_string();
                        t.procs[id].exec = Some((time, file));
                    }
                    "sched:sched_process_exit" => {
                        let tid = kv.get("pid").and_then(|p| p.parse::<u32>().ok());
                        let whole = kv
                            .get("group_dead")
                            .map_or(tid == Some(pid), |g| *g == "true");
                        if whole {
                            let id = t.current(&mut current, pid);
                            t.procs[id].exit = Some(time);
                            current.remove(&pid);
                        }
                        if let Some(tid) = tid.filter(|tid| *tid != pid) {
                            current.remove(&tid);
                        }
                    }
                    "syscalls:sys_enter_unshare" => {
                        entered.insert(pid, time);
                    }
                    "syscalls:sys_exit_unshare" => {
                        if let Some(start) = entered.remove(&pid) {
                            let id = t.current(&mut current, pid);
                            t.procs[id].unshare.push((start, time));
                        }
                    }
                    _ => {}
                }
            }
            t
        }

        fn new_proc(&mut self, pid: u32) -> Id {
            self.procs.push(Proc::default());
            let id = self.procs.len() - 1;
            self.by_pid.entry(pid).or_default().push(id);
            id
        }

        /// The current incarnation of `pid`; a process that was there
        /// before the trace started gets one on first sight.
        fn current(&mut self, current: &mut HashMap<u32, Id>, pid: u32) -> Id {
            if let Some(id) = current.get(&pid) {
                return *id;
            }
            let id = self.new_proc(pid);
            current.insert(pid, id);
            id
        }

        /// The processes the worker reported, by pid and in the order it
        /// ran them: each is the first incarnation of its pid that exec'd
        /// a file ending in `suffix` after the previous one's exec.
        pub fn resolve(&self, pids: &[u32], suffix: &str) -> Vec<Option<Id>> {
            let mut after = f64::NEG_INFINITY;
            pids.iter()
                .map(|pid| {
                    let id = self.by_pid.get(pid)?.iter().copied().find(|id| {
                        matches!(&self.procs[*id].exec, Some((t, f)) if *t >= after && f.ends_with(suffix))
                    })?;
                    after = self.exec_time(id)?;
                    Some(id)
                })
                .collect()
        }

        /// `resolve` for the worker's lists of directly run plugins (a JSON
        /// list of lists of pids, in the order run).
        pub fn resolve_groups(&self, groups: &Value) -> Vec<Option<Vec<Id>>> {
            let groups: Vec<Vec<u32>> = groups
                .as_array()
                .map(|a| a.iter().map(pids).collect())
                .unwrap_or_default();
            let flat: Vec<u32> = groups.iter().flatten().copied().collect();
            let mut ids = self.resolve(&flat, "").into_iter();
            groups
                .iter()
                .map(|g| ids.by_ref().take(g.len()).collect())
                .collect()
        }

        pub fn exec_time(&self, id: Id) -> Option<f64> {
            self.procs[id].exec.as_ref().map(|e| e.0)
        }

        pub fn exit_time(&self, id: Id) -> Option<f64> {
            self.procs[id].exit
        }

        /// Children of `id` that exec'd, by exec time, with their file.
        pub fn exec_children(&self, id: Id) -> Vec<(Id, f64, &str)> {
            let mut v: Vec<(Id, f64, &str)> = self.procs[id]
                .children
                .iter()
                .filter_map(|c| {
                    let (t, f) = self.procs[*c].exec.as_ref()?;
                    Some((*c, *t, f.as_str()))
                })
                .collect();
            v.sort_by(|a, b| a.1.total_cmp(&b.1));
            v
        }
    }

    /// The inner plugins rootless-cni (pid `p`) exec'd, in order.
    pub fn inner_of(t: &Trace, p: Id) -> Vec<Id> {
        t.exec_children(p)
            .into_iter()
            .filter(|(_, _, f)| f.starts_with(PLUGIN_DIR))
            .map(|(c, _, _)| c)
            .collect()
    }

    /// A chain of plugins run one after the other: from the first one's
    /// exec to the last one's exit, and the gaps between one's exit and the
    /// next one's exec (spawning them). In ms.
    pub fn span_and_gaps(t: &Trace, plugins: &[Id]) -> Option<(f64, f64)> {
        let first = t.exec_time(*plugins.first()?)?;
        let last = t.exit_time(*plugins.last()?)?;
        let mut gaps = 0.0;
        for w in plugins.windows(2) {
            gaps += t.exec_time(w[1])? - t.exit_time(w[0])?;
        }
        Some(((last - first) * 1e3, gaps * 1e3))
    }

    /// Where an ADD or DEL through rootless-cni (pid `p`) spends its time,
    /// in ms: before the first inner plugin's exec, the inner plugins'
    /// span and the gaps in it, after the last one's exit.
    pub struct Phases {
        pub before: f64,
        pub span: f64,
        pub gaps: f64,
        pub after: f64,
    }

    pub fn plugin_phases(t: &Trace, p: Id) -> Option<Phases> {
        let start = t.exec_time(p)?;
        let end = t.exit_time(p)?;
        let inner = inner_of(t, p);
        let first = t.exec_time(*inner.first()?)?;
        let last = t.exit_time(*inner.last()?)?;
        let (span, gaps) = span_and_gaps(t, &inner)?;
        Some(Phases {
            before: (first - start) * 1e3,
            span,
            gaps,
            after: (end - last) * 1e3,
        })
    }

    /// Every process below `p` (transitively) that exec'd, by binary name:
    /// (how many, their exec-to-exit time summed, in ms). A process's time
    /// includes its children's.
    pub fn descendants_by_binary(t: &Trace, p: Id) -> HashMap<String, (usize, f64)> {
        let mut by: HashMap<String, (usize, f64)> = HashMap::new();
        let mut todo = t.procs[p].children.clone();
        while let Some(q) = todo.pop() {
            todo.extend(t.procs[q].children.iter().copied());
            if let (Some((start, file)), Some(end)) = (&t.procs[q].exec, t.procs[q].exit) {
                let name = file.rsplit('/').next().unwrap_or(file).to_string();
                let e = by.entry(name).or_default();
                e.0 += 1;
                e.1 += (end - start) * 1e3;
            }
        }
        by
    }

    /// A cold ADD (pid `p`): timestamps of the plugin's exec, the
    /// supervisor's exec, the sandbox's exec, slirp4netns's exec, the first
    /// inner plugin's exec, the last inner plugin's exit and the plugin's
    /// exit, as ms since the plugin's exec.
    pub fn cold_steps(t: &Trace, p: Id) -> Option<[f64; 7]> {
        let t0 = t.exec_time(p)?;
        let kids = t.exec_children(p);
        let (sup, t1, _) = *kids.iter().find(|(_, _, f)| f.ends_with("/rootless-cni"))?;
        let sup_kids = t.exec_children(sup);
        let (_, t2, _) = *sup_kids
            .iter()
            .find(|(_, _, f)| f.ends_with("/rootless-cni"))?;
        let (_, t3, _) = *sup_kids
            .iter()
            .find(|(_, _, f)| f.ends_with("/slirp4netns"))?;
        let inner: Vec<&(Id, f64, &str)> = kids
            .iter()
            .filter(|(_, _, f)| f.starts_with(PLUGIN_DIR))
            .collect();
        let t4 = inner.first()?.1;
        let t5 = inner
            .iter()
            .filter_map(|(c, _, _)| t.exit_time(*c))
            .fold(f64::NAN, f64::max);
        let t6 = t.exit_time(p)?;
        let ms = |x: f64| (x - t0) * 1e3;
        Some([0.0, ms(t1), ms(t2), ms(t3), ms(t4), ms(t5), ms(t6)])
    }

    /// Time a cold ADD's sandbox spent in unshare(2) (the new network and
    /// mount namespaces), in ms.
    pub fn sandbox_unshare(t: &Trace, p: Id) -> Option<f64> {
        let sup = t
            .exec_children(p)
            .into_iter()
            .find(|(_, _, f)| f.ends_with("/rootless-cni"))?
            .0;
        let sandbox = t
            .exec_children(sup)
            .into_iter()
            .find(|(_, _, f)| f.ends_with("/rootless-cni"))?
            .0;
        let calls = &t.procs[sandbox].unshare;
        if calls.is_empty() {
            return None;
        }
        Some(calls.iter().map(|(a, b)| (b - a) * 1e3).sum())
    }
}

// ---------------------------------------------------------------------------
// The worker: runs inside the lab's session as the lab user

mod worker {
    use super::*;

    pub fn main() -> i32 {
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

    fn s<'a>(t: &'a Value, k: &str) -> Res<&'a str> {
        t[k].as_str().ok_or_else(|| format!("task without {k:?}"))
    }

    fn n(t: &Value, k: &str) -> Res<usize> {
        t[k].as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| format!("task without {k:?}"))
    }

    fn strs(t: &Value, k: &str) -> Res<Vec<String>> {
        t[k].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .ok_or_else(|| format!("task without {k:?}"))
    }

    /// The infra's namespaces, opened once.
    struct Infra {
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

    pub struct Call {
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
    fn run(
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

    fn cni_env<'a>(
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
    struct Outer<'a> {
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
    fn direct(
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
    fn warm(t: &Value) -> Res<Value> {
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
                    let (add_ms, add_pids, result) =
                        direct("ADD", list, &infra, b_id, netns, None)?;
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
    fn cold(t: &Value) -> Res<Value> {
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
    fn many(t: &Value) -> Res<Value> {
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
    fn all_at_once(count: usize, f: impl Fn(usize) -> Res<Call> + Sync) -> Res<f64> {
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
    fn parallel(t: &Value) -> Res<Value> {
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
}

// ---------------------------------------------------------------------------
// The report

struct Row {
    section: &'static str,
    measure: String,
    result: String,
    target: Option<String>,
    met: Option<bool>,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    /// Extra tables and notes, markdown.
    details: Vec<String>,
    errors: Vec<String>,
    /// The 1-minute load average before → after each phase.
    loads: Vec<String>,
}

impl Report {
    fn fig(&mut self, section: &'static str, measure: impl Into<String>, result: String) {
        self.rows.push(Row {
            section,
            measure: measure.into(),
            result,
            target: None,
            met: None,
        });
    }

    fn target(
        &mut self,
        section: &'static str,
        measure: impl Into<String>,
        result: String,
        target: &str,
        met: bool,
    ) {
        self.rows.push(Row {
            section,
            measure: measure.into(),
            result,
            target: Some(target.to_string()),
            met: Some(met),
        });
    }

    fn error(&mut self, section: &'static str, e: String) {
        progress!("{section}: FAILED: {e}");
        self.errors.push(format!("{section}: {e}"));
        self.rows.push(Row {
            section,
            measure: "error".into(),
            result: e.lines().next().unwrap_or("").chars().take(200).collect(),
            target: None,
            met: Some(false),
        });
    }

    /// Sections in order, rows within one as measured.
    fn sorted(&self) -> Vec<&Row> {
        let mut rows: Vec<&Row> = self.rows.iter().collect();
        rows.sort_by_key(|r| r.section);
        rows
    }

    fn table(&self) -> String {
        let mut s = String::from("| | measure | result | target | |\n|---|---|---|---|---|\n");
        let mut last = "";
        for r in self.sorted() {
            let section = if r.section == last { "" } else { r.section };
            last = r.section;
            let met = match r.met {
                Some(true) => "met",
                Some(false) => "**missed**",
                None => "",
            };
            let _ = writeln!(
                s,
                "| {section} | {} | {} | {} | {met} |",
                r.measure,
                r.result,
                r.target.as_deref().unwrap_or("")
            );
        }
        s
    }
}

fn ms(v: f64) -> String {
    format!("{v:.1} ms")
}

fn ratio(v: f64) -> String {
    format!("{v:.2}×")
}

fn gbits(v: f64) -> String {
    format!("{v:.2} Gbit/s")
}

fn mib(kib: u64) -> String {
    format!("{:.2} MiB", kib as f64 / 1024.0)
}

// ---------------------------------------------------------------------------
// The driver: runs as root, builds the lab, runs the phases

mod driver {
    use super::*;

    pub struct Cx<'a> {
        pub lab: &'a Lab,
        pub plan: Plan,
        pub worker: String,
        pub bin: String,
        pub report: Report,
        /// Root's scratch dir (perf data).
        pub scratch: PathBuf,
    }

    pub fn run(opts: &Opts) -> i32 {
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
        let scratch =
            std::env::temp_dir().join(format!("rootless-cni-bench.{}", std::process::id()));
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
            .then(|| guarded(&mut cx, "1. warm overhead", phase_warm))
            .flatten();
        let cold = opts
            .runs("cold")
            .then(|| guarded(&mut cx, "2. cold start", phase_cold))
            .flatten();
        let trace = tracer.and_then(|t| {
            progress!("reading the perf trace");
            t.stop()
        });
        if let Some(trace) = &trace {
            if let Some(w) = &warm {
                warm_breakdown(&mut cx, trace, w);
            }
            if let Some(c) = &cold {
                cold_breakdown(&mut cx, trace, c);
            }
        }
        if opts.runs("scale") {
            guarded(&mut cx, "3. scale", phase_scale);
        }
        if opts.runs("parallel") {
            guarded(&mut cx, "4. parallelism", phase_parallel);
        }
        if opts.runs("dataplane") {
            guarded(&mut cx, "5. data plane", phase_dataplane);
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
            binary_size(&mut cx);
        }

        let _ = fs::remove_dir_all(&scratch);
        let report = std::mem::take(&mut cx.report);
        drop(cx);
        drop(lab);
        cleanup::with(|l| {
            l.uid = None;
            l.dirs.clear();
        });
        let md = markdown(opts, &report);
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
    fn guarded<T>(
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

    pub fn worker(cx: &Cx, task: Value) -> Res<Value> {
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
    fn plugin(cx: &Cx, verb: &str, id: &str, c: &Container, conf: &Value) -> Res<Value> {
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

    /// Footprint of the running infra of the default state dir.
    fn footprint(cx: &mut Cx, section: &'static str, when: &str, with_target: bool) -> Res<()> {
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

    fn binary_size(cx: &mut Cx) {
        let bin = Path::new(env!("CARGO_BIN_EXE_rootless-cni"));
        if let Ok(m) = fs::metadata(bin) {
            cx.report.fig(
                "6. footprint",
                format!("size of {}", relative(bin)),
                format!("{} ({} bytes)", mib(m.len() / 1024), m.len()),
            );
        }
    }

    // --- 1. warm overhead --------------------------------------------------

    pub struct Warm {
        /// (label, worker output) per chain
        runs: Vec<(&'static str, Value)>,
    }

    fn phase_warm(cx: &mut Cx, section: &'static str) -> Res<Warm> {
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

    fn warm_breakdown(cx: &mut Cx, trace: &trace::Trace, warm: &Warm) {
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
                format!("{label}: overhead per ADD+DEL measured with perf (outside + gaps, see details)"),
                ms(total),
                "≤ 3 ms",
                total <= 3.0,
            );
        }
        cx.report.details.push(md);
    }

    // --- 2. cold start -----------------------------------------------------

    pub struct Cold {
        out: Value,
    }

    fn phase_cold(cx: &mut Cx, section: &'static str) -> Res<Cold> {
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

    fn cold_breakdown(cx: &mut Cx, trace: &trace::Trace, cold: &Cold) {
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

    // --- 3. scale ----------------------------------------------------------

    fn phase_scale(cx: &mut Cx, section: &'static str) -> Res<()> {
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
                    let out = worker(
                        cx,
                        json!({
                            "task": "many", "verb": "ADD",
                            "concurrency": cx.plan.scale_concurrency,
                            "bin": cx.bin, "cni_path": cx.lab.cni_path(), "conf": conf,
                            "ids": new.iter().map(|n| n.0.clone()).collect::<Vec<_>>(),
                            "netns": new.iter().map(|n| n.1.netns()).collect::<Vec<_>>(),
                        }),
                    );
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
        let del = worker(
            cx,
            json!({
                "task": "many", "verb": "DEL",
                "concurrency": cx.plan.scale_concurrency,
                "bin": cx.bin, "cni_path": cx.lab.cni_path(), "conf": conf,
                "ids": live.iter().map(|n| n.0.clone()).collect::<Vec<_>>(),
                "netns": live.iter().map(|n| n.1.netns()).collect::<Vec<_>>(),
            }),
        );
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

    /// (binary, calls, ms) rows.
    type Attribution = Vec<(String, f64, f64)>;

    /// Per binary under the ADDs `adds` (rootless-cni's descendants): the
    /// median over the ADDs of (calls, exec-to-exit ms summed), and
    /// rootless-cni's own time (before + gaps + after).
    fn scale_attribution(t: &trace::Trace, out: &Value) -> Attribution {
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
                let get =
                    |m: &HashMap<String, (usize, f64)>| m.get(&name).copied().unwrap_or((0, 0.0));
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
            "**direct: wall − plugins' exec-to-exit** (the worker spawning and reaping them)"
                .into(),
            nan,
            median(&outside(&floats(&out["b_add"]), &b_inner)),
        ));
        rows
    }

    fn scale_table(levels: &[(usize, Attribution)], rules: &[(usize, usize, usize)]) -> String {
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

    // --- 4. parallelism ----------------------------------------------------

    fn phase_parallel(cx: &mut Cx, section: &'static str) -> Res<()> {
        let full = conflist(Chain::Full, &NetOpts::default());
        let conf = stdin_conf(&full, None);
        let keeper = cx.lab.container();
        plugin(cx, "ADD", "bench-par-keeper", &keeper, &conf)?;
        let n = cx.plan.par_n;
        let containers: Vec<Container> = (0..n).map(|_| cx.lab.container()).collect();
        let out = worker(
            cx,
            json!({
                "task": "parallel", "rounds": cx.plan.par_rounds,
                "bin": cx.bin, "cni_path": cx.lab.cni_path(), "conf": conf,
                "netns": containers.iter().map(Container::netns).collect::<Vec<_>>(),
            }),
        );
        let del = plugin(cx, "DEL", "bench-par-keeper", &keeper, &conf);
        for c in containers.iter().chain([&keeper]) {
            cx.lab.kill_container(c);
        }
        let out = out?;
        del?;
        let (par, seq) = (median(&floats(&out["par"])), median(&floats(&out["seq"])));
        let rounds = cx.plan.par_rounds;
        let r = &mut cx.report;
        r.fig(
            section,
            format!("{n} sequential ADDs, wall (median of {rounds})"),
            format!("{} ({} each)", ms(seq), ms(seq / n as f64)),
        );
        r.fig(section, format!("{n} concurrent ADDs, wall"), ms(par));
        r.fig(
            section,
            "speed-up sequential / concurrent",
            ratio(seq / par),
        );
        Ok(())
    }

    // --- 5. data plane -------------------------------------------------------

    /// A bridge of root's own in throwaway namespaces: c1 and c2 on br0 in
    /// a third namespace, as the infra has them, removed on drop.
    /// Root's own bridge and two "containers": network namespaces held by
    /// processes of ours, never named under /run/netns, so the benchmark
    /// mounts nothing in the machine's mount namespace (a test running
    /// beside it compares that namespace's mounts).
    struct RootBridge {
        holders: Vec<Child>,
    }

    impl RootBridge {
        const C1_IP: &'static str = "10.199.0.1";

        fn create(mtu: u32) -> Res<RootBridge> {
            let mut me = RootBridge {
                holders: Vec::new(),
            };
            for _ in 0..3 {
                let holder = Command::new("unshare")
                    .args(["--net", "sleep", "infinity"])
                    .stdin(Stdio::null())
                    .spawn()
                    .map_err(|e| format!("unshare --net: {e}"))?;
                cleanup::with(|l| l.pids.push(holder.id()));
                me.holders.push(holder);
            }
            // The holders' namespaces are theirs once unshare has exec'd sleep.
            let deadline = Instant::now() + Duration::from_secs(10);
            while me.holders.iter().any(|h| !is_sleep(h.id())) {
                if Instant::now() > deadline {
                    return Err("the namespace holders did not start".into());
                }
                thread::sleep(Duration::from_millis(5));
            }
            let ip = |i: usize, args: &[&str]| -> Res<()> {
                let out = me
                    .exec(i)
                    .arg("ip")
                    .args(args)
                    .output()
                    .map_err(|e| format!("ip: {e}"))?;
                if out.status.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "ip {}: {}",
                        args.join(" "),
                        String::from_utf8_lossy(&out.stderr)
                    ))
                }
            };
            let mtu = mtu.to_string();
            let br_pid = me.holders[0].id().to_string();
            ip(0, &["link", "add", "br0", "type", "bridge"])?;
            for (i, addr, port) in [(1, "10.199.0.1/24", "v1"), (2, "10.199.0.2/24", "v2")] {
                ip(
                    i,
                    &[
                        "link", "add", "eth0", "mtu", &mtu, "type", "veth", "peer", "name", port,
                        "mtu", &mtu, "netns", &br_pid,
                    ],
                )?;
                ip(0, &["link", "set", port, "master", "br0", "up"])?;
                ip(i, &["addr", "add", addr, "dev", "eth0"])?;
                ip(i, &["link", "set", "eth0", "up"])?;
                ip(i, &["link", "set", "lo", "up"])?;
            }
            ip(0, &["link", "set", "br0", "up"])?;
            Ok(me)
        }

        /// A command in namespace `i` (0 the bridge's, 1 and 2 the
        /// containers'); the program and its arguments follow.
        fn exec(&self, i: usize) -> Command {
            let mut cmd = Command::new("nsenter");
            cmd.arg(format!("--net=/proc/{}/ns/net", self.holders[i].id()))
                .arg("--");
            cmd
        }
    }

    fn is_sleep(pid: u32) -> bool {
        fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
    }

    impl Drop for RootBridge {
        fn drop(&mut self) {
            let pids: Vec<u32> = self.holders.iter().map(Child::id).collect();
            for h in &mut self.holders {
                let _ = h.kill();
                let _ = h.wait();
            }
            cleanup::with(|l| l.pids.retain(|p| !pids.contains(p)));
        }
    }

    /// An iperf3 server, up when this returns.
    pub(crate) fn iperf_server(mut cmd: Command, what: &str) -> Res<Background> {
        cmd.stdout(Stdio::piped()).stderr(Stdio::null());
        let mut bg = Background::spawn(cmd, what)?;
        bg.wait_for_line("Server listening", Duration::from_secs(10))?;
        Ok(bg)
    }

    /// Runs an iperf3 client (`-J`), returns what the server received. A
    /// server still finishing the previous test refuses the next ("busy"):
    /// on a loaded machine that takes a moment, so that is tried again.
    pub(crate) fn iperf_client(mut cmd: Command, what: &str) -> Res<f64> {
        let mut tries = 0;
        loop {
            match iperf_client_once(&mut cmd, what) {
                Err(e) if e.contains("the server is busy") && tries < 5 => {
                    tries += 1;
                    thread::sleep(Duration::from_millis(500));
                }
                other => return other,
            }
        }
    }

    fn iperf_client_once(cmd: &mut Command, what: &str) -> Res<f64> {
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{what}: {e}"))?;
        let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "{what}: no JSON from iperf3 ({e}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        if let Some(err) = v["error"].as_str() {
            return Err(format!("{what}: iperf3: {err}"));
        }
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .map(|b| b / 1e9)
            .ok_or_else(|| format!("{what}: no end.sum_received in {v}"))
    }

    pub(crate) fn client_args(ip: &str, port: u16, secs: u32) -> Vec<String> {
        [
            "iperf3",
            "-c",
            ip,
            "-p",
            &port.to_string(),
            "-t",
            &secs.to_string(),
            "-J",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// iperf3 in a container's netns, inside the session.
    pub(crate) fn in_container(cx: &Cx, c: &Container, argv: &[String]) -> Command {
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        cx.lab.in_netns_command(c, &argv)
    }

    pub(crate) fn container_server(cx: &Cx, c: &Container, what: &str) -> Res<Background> {
        let argv: Vec<String> = [
            "iperf3",
            "-s",
            "-p",
            &IPERF_PORT.to_string(),
            "--forceflush",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        iperf_server(in_container(cx, c, &argv), what)
    }

    /// Alternates `a` and `b` for `rounds` rounds; the medians.
    pub(crate) fn alternate(
        rounds: usize,
        mut a: impl FnMut() -> Res<f64>,
        mut b: impl FnMut() -> Res<f64>,
    ) -> Res<(Vec<f64>, Vec<f64>)> {
        let (mut va, mut vb) = (Vec::new(), Vec::new());
        for i in 0..rounds {
            if i % 2 == 0 {
                va.push(a()?);
                vb.push(b()?);
            } else {
                vb.push(b()?);
                va.push(a()?);
            }
        }
        Ok((va, vb))
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

        fn ip(&self) -> Res<String> {
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

    fn phase_dataplane(cx: &mut Cx, section: &'static str) -> Res<()> {
        // (measure, result, (target, met))
        type Line = (String, String, Option<(&'static str, bool)>);
        let mut rows: Vec<Line> = Vec::new();
        {
            let cx: &Cx = cx;
            let secs = cx.plan.iperf_secs;
            let rounds = cx.plan.iperf_rounds;
            let default = NetOpts::default();
            let conf = |o: &NetOpts, rc: Option<Value>| stdin_conf(&conflist(Chain::Full, o), rc);

            // container <-> container: the infra's bridge vs root's own.
            let s1 = Attached::add(cx, "bench-dp-s1", conf(&default, None))?;
            let s2 = Attached::add(cx, "bench-dp-s2", conf(&default, None))?;
            let root = RootBridge::create(65520)?;
            let _srv_infra = container_server(cx, &s1.c, "iperf3 server in a container")?;
            let mut root_srv = root.exec(1);
            root_srv.args([
                "iperf3",
                "-s",
                "-B",
                RootBridge::C1_IP,
                "-p",
                &IPERF_PORT.to_string(),
                "--forceflush",
            ]);
            let _srv_root = iperf_server(root_srv, "iperf3 server on root's bridge")?;
            let s1_ip = s1.ip()?;
            progress!("data plane: container → container, infra bridge vs root's bridge");
            let (infra_bw, root_bw) = alternate(
                rounds,
                || {
                    iperf_client(
                        in_container(cx, &s2.c, &client_args(&s1_ip, IPERF_PORT, secs)),
                        "infra bridge client",
                    )
                },
                || {
                    let mut c = root.exec(2);
                    c.args(client_args(RootBridge::C1_IP, IPERF_PORT, secs));
                    iperf_client(c, "root bridge client")
                },
            )?;
            rows.push((
                "container → container over the infra bridge (MTU 65520)".into(),
                gbits_runs(&infra_bw),
                None,
            ));
            rows.push((
                "container → container over a root-owned bridge (MTU 65520)".into(),
                gbits_runs(&root_bw),
                None,
            ));
            let (r, text) = ratio_runs(&infra_bw, &root_bw);
            rows.push((
                "ratio infra bridge / root bridge".into(),
                text,
                Some(("≥ 0.9", r >= 0.9)),
            ));

            // container -> host through each way out: phase 6 (rootless/outbound.rs).

            // host -> container through a published port, each driver.
            let (hp_builtin, hp_slirp) = (free_tcp_port(), free_tcp_port());
            let mapping = |hp: u16| json!({ "portMappings": [{ "hostPort": hp, "containerPort": IPERF_PORT, "protocol": "tcp", "hostIP": "127.0.0.1" }] });
            let pb = Attached::add(
                cx,
                "bench-dp-builtin",
                conf(&default, Some(mapping(hp_builtin))),
            )?;
            let slirp_opts = NetOpts {
                state_dir: Some(state_dir_path(cx, "bench-slirp-ports")),
                port_driver: Some("slirp4netns"),
                ..NetOpts::default()
            };
            let ps = Attached::add(
                cx,
                "bench-dp-slirp",
                conf(&slirp_opts, Some(mapping(hp_slirp))),
            )?;
            let _srv_pb = container_server(cx, &pb.c, "iperf3 server behind the builtin driver")?;
            let _srv_ps =
                container_server(cx, &ps.c, "iperf3 server behind the slirp4netns driver")?;
            progress!("data plane: host → container through a published port, builtin vs slirp4netns driver");
            let host_client = |hp: u16, what: &str| {
                let mut c = Command::new("iperf3");
                c.args(&client_args("127.0.0.1", hp, secs)[1..]);
                iperf_client(c, what)
            };
            let (bw_builtin, bw_slirp) = alternate(
                rounds,
                || host_client(hp_builtin, "builtin driver client"),
                || host_client(hp_slirp, "slirp4netns driver client"),
            )?;
            rows.push((
                "host → container through a published port, portDriver builtin".into(),
                gbits_runs(&bw_builtin),
                None,
            ));
            rows.push((
                "host → container through a published port, portDriver slirp4netns".into(),
                gbits_runs(&bw_slirp),
                None,
            ));
            let (r, text) = ratio_runs(&bw_builtin, &bw_slirp);
            rows.push((
                "ratio builtin / slirp4netns".into(),
                text,
                Some(("≥ 3×", r >= 3.0)),
            ));
            drop((pb, ps));
            drop((s1, s2, root));
        }
        for (measure, result, target) in rows {
            match target {
                Some((t, met)) => cx.report.target(section, measure, result, t, met),
                None => cx.report.fig(section, measure, result),
            }
        }
        Ok(())
    }

    // --- markdown --------------------------------------------------------------

    fn machine() -> Vec<(String, String)> {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, m)| m.trim().to_string())
            .unwrap_or_else(|| "?".into());
        let nproc = thread::available_parallelism().map_or(0, |n| n.get());
        let mem = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                let kib: u64 = m.lines().next()?.split_whitespace().nth(1)?.parse().ok()?;
                Some(format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0))
            })
            .unwrap_or_default();
        let os = fs::read_to_string("/etc/os-release")
            .ok()
            .and_then(|o| {
                o.lines()
                    .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                    .map(|v| v.trim_matches('"').to_string())
            })
            .unwrap_or_default();
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string();
        let plugins = first_line(
            "dpkg-query",
            &["-W", "-f=${Version}", "containernetworking-plugins"],
        );
        vec![
            ("CPU".into(), format!("{nproc} × {model} (nproc {nproc})")),
            ("memory".into(), mem),
            ("kernel".into(), kernel),
            ("OS".into(), os),
            (
                "slirp4netns".into(),
                first_line("slirp4netns", &["--version"]),
            ),
            ("iperf3".into(), first_line("iperf3", &["--version"])),
            (
                "reference plugins".into(),
                format!("containernetworking-plugins {plugins}"),
            ),
            ("iptables".into(), first_line("iptables", &["--version"])),
        ]
    }

    pub fn markdown(opts: &Opts, report: &Report) -> String {
        let date = first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
        let commit = first_line(
            "git",
            &[
                "-C",
                env!("CARGO_MANIFEST_DIR"),
                "describe",
                "--always",
                "--dirty",
            ],
        );
        let mut md = String::from("# Benchmarks\n\n");
        let _ = writeln!(
            md,
            "Generated by `{}` on {date} (commit {commit}{}{}). \
             Every figure is a median over repeated runs; every comparison is a ratio of \
             medians measured in the same run with A and B alternating. Re-run to \
             update; this file is overwritten.\n",
            opts.command,
            if opts.quick {
                "; **quick mode: a few iterations each, figures not meaningful**"
            } else {
                ""
            },
            opts.only.as_ref().map_or(String::new(), |o| format!(
                "; **only the phases {}**",
                o.join(", ")
            ))
        );
        md.push_str("## Machine\n\n| | |\n|---|---|\n");
        for (k, v) in machine() {
            let _ = writeln!(md, "| {k} | {v} |");
        }
        let _ = writeln!(
            md,
            "| build | {} profile: {} |",
            if cfg!(debug_assertions) {
                "dev"
            } else {
                "release"
            },
            relative(Path::new(env!("CARGO_BIN_EXE_rootless-cni")))
        );
        let _ = writeln!(
            md,
            "| load average (1 min) before → after each phase | {} |",
            report.loads.join("; ")
        );
        md.push_str("\n## Results\n\n");
        md.push_str(&report.table());
        md.push_str("\n## Targets\n\n");
        for r in report.sorted().into_iter().filter(|r| r.target.is_some()) {
            let _ = writeln!(
                md,
                "- {} {} — {}: {} (target {})",
                if r.met == Some(true) {
                    "✅ met"
                } else {
                    "❌ **missed**"
                },
                r.section,
                r.measure,
                r.result,
                r.target.as_deref().unwrap_or("")
            );
        }
        for e in &report.errors {
            let _ = writeln!(md, "- ❌ **error** {e}");
        }
        md.push_str("\n## Details\n\n");
        for d in &report.details {
            md.push_str(d);
            md.push('\n');
        }
        md.push_str(METHOD);
        md
    }

    const METHOD: &str = "## How it is measured\n\n\
The lab is the integration tests' (the lab crate, lab/): an unprivileged uid in its own user and \
mount namespace, containers are `unshare --net sleep infinity` holders, rootless-cni is \
called directly as a plugin with the CNI environment and the config of \
conf-examples/rootless.conflist (subnet widened to 10.89.0.0/16, `allowHostLoopback` on). \
Timed calls are spawned by a worker process inside the session (the bench binary itself), \
so getting into the session (setpriv + nsenter) is not in the figures; a call is timed from \
before fork to after exit.\n\n\
1. **Warm overhead**: the infra is kept running by another attachment. A = rootless-cni ADD \
then DEL; B = the same inner plugins exec'd by the worker with `setns` into the sandbox's \
mount and network namespaces (libcni semantics: ADD in order with prevResult, DEL in reverse \
with the result), `CNI_NETNS=/proc/PID/ns/net` of the container's holder. A and B alternate \
(ABBA), on the same container netns. The inner plugins' own run time varies by tens of ms \
from call to call, so A−B of the medians is noise-limited; the same calls are also traced \
(perf) and rootless-cni's overhead computed from the time outside and between the inner \
plugins, which that noise does not touch. (b') repeats (b) with the state dir on a tmpfs \
(mounted in the session), as `XDG_RUNTIME_DIR` is on a real machine; the lab's own \
`XDG_RUNTIME_DIR` is on /tmp (ext4 here), where the records' fsync costs.\n\
2. **Cold start**: each iteration is a cold ADD (no infra: it starts one), a warm ADD, DEL \
of the warm one, DEL of the cold one (the last DEL stops the infra). The breakdown comes from \
`perf record` of the sched_process_fork/exec/exit tracepoints during phases 1 and 2.\n\
3. **Scale**: attachments are added 4 at a time through rootless-cni; at each level the warm \
test (full chain) runs on one more container.\n\
4. **Parallelism**: 32 ADDs released together by a barrier vs. the same 32 one after the \
other, rounds alternating which goes first; DEL of all after each.\n\
5. **Data plane**: iperf3, TCP, one stream, `-t` seconds per run, runs alternating. The \
root-owned bridge lives in three throwaway namespaces (`ip netns add`), veths at MTU 65520 \
like the infra's bridge. container → host: iperf3 server on the host's 127.0.0.1, client in \
a container to 10.0.2.2 (two infras at once, by `stateDir`). host → container: iperf3 server \
in a container on port 5201, published on 127.0.0.1:hostPort by `runtimeConfig.portMappings`, \
client on the host; one infra per port driver.\n\
6. **Footprint**: VmRSS from /proc/PID/status; binary size of the release build.\n\n\
The machine may be shared: other work on it shows in the figures (most in the data plane, \
where a run takes both cores); the 1-minute load average before and after each phase is in \
the machine table.\n";
}
