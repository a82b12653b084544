//! The rootless lab shared by the integration tests.
//!
//! Every test builds its own lab, as root: an unused unprivileged uid, a lab
//! dir under /tmp that is that user's home and `XDG_RUNTIME_DIR` parent, and
//! a *session*: a process of that uid in its own user namespace (uid mapped
//! to root) and mount namespace, exactly what a rootless runtime has. Inside
//! the session `/dev/net/tun` is a usable node of the lab's own and
//! `/var/lib/cni` is writable (libcni's result cache; `LabOptions` can leave
//! it out, as on a host that never ran rootful CNI). Commands run inside
//! the session through `setpriv` + `nsenter`, with a clean environment.
//!
//! Containers are `unshare --net sleep infinity` processes started inside the
//! session, referenced as `/proc/PID/ns/net`.
//!
//! `LabOptions` can give the lab a host of its own (tests/common/hosts.rs):
//! one where a rootful CNI runtime ran (root-owned /var/lib/cni, /run/netns,
//! /etc/cni/net.d), or XDG_RUNTIME_DIR as logind makes it (a 0700 tmpfs at
//! /run/user/UID). A root process holds that mount namespace; the session
//! and the commands outside it start there, and `host_command` runs root's
//! commands there.
//!
//! Dropping the lab kills every process of its uid and removes its dir; all
//! mounts live in the session's mount namespace and die with it.
//!
//! Prerequisites missing (not root, no cnitool, no slirp4netns, no reference
//! plugins): with `CI=true` the test fails naming them, else it is skipped.
#![allow(dead_code)] // each test file uses a different part of the harness

pub mod containerd;
pub mod gocni;
pub mod host_tools;
mod hosts;
mod leaks;
pub mod net;
pub mod outbound;
pub mod podman;
pub mod testdata;
#[allow(unused_imports)] // each test file uses a different part of the harness
pub use hosts::{Host, RuntimeDir, USED_HOST_DIRS};
pub use leaks::Snapshot;

use serde_json::Value;
use std::cell::RefCell;
use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

/// The network of conf-examples/rootless.conflist (outer and inner name).
pub const NET: &str = "rootless";
/// The gateway of that network's bridge.
pub const GATEWAY: &str = "10.89.0.1";
/// The host's loopback as seen through slirp4netns.
pub const SLIRP_HOST: &str = "10.0.2.2";

/// The PATH everything inside the lab gets: no root-only dirs, since a
/// PATH entry the lab user cannot search breaks `nsenter … ping` for it;
/// /usr/sbin and /sbin for iptables and ip.
pub const LAB_PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin";
/// The plugins the example network uses.
const REFERENCE_PLUGINS: &[&str] = &["bridge", "host-local", "portmap", "firewall", "tuning"];
/// Host tools the lab itself needs.
const LAB_TOOLS: &[&str] = &[
    "setpriv", "nsenter", "unshare", "mknod", "sh", "sleep", "env", "ip", "busybox", "curl",
    "findmnt",
];
/// How long a command inside the lab may take before it is killed.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a command's stdout/stderr may stay open after it exited.
const PIPE_GRACE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Command output

/// What a command run in the lab did.
#[derive(Debug, Clone)]
pub struct Out {
    /// The command line, for messages.
    pub what: String,
    /// Exit code; None when killed by a signal or by the lab's timeout.
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn ok(&self) -> bool {
        self.status == Some(0)
    }

    /// stdout as JSON.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_str(self.stdout.trim()).ok()
    }

    /// stdout as a CNI error object.
    pub fn cni_error(&self) -> Option<CniError> {
        let v = self.json()?;
        let code = v.get("code")?.as_u64()?;
        let text = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        Some(CniError {
            code,
            msg: text("msg"),
            details: text("details"),
        })
    }
}

impl Out {
    /// The parsed result of an ADD that must have succeeded (`what` names
    /// it): the check every attaching test makes.
    pub fn add_result(&self, what: &str) -> Value {
        assert!(self.ok(), "{what}: {self}");
        self.json()
            .unwrap_or_else(|| panic!("ADD result is not JSON: {self}"))
    }

    /// The IPv4 address in the result of an ADD that must have succeeded.
    pub fn added_ipv4(&self, what: &str) -> String {
        let result = self.add_result(what);
        result_ipv4(&result).unwrap_or_else(|| panic!("no IPv4 in result: {self}"))
    }
}

impl fmt::Display for Out {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = match self.status {
            Some(c) => format!("exit {c}"),
            None => "no exit status".to_string(),
        };
        write!(
            f,
            "`{}`: {status}\n--- stdout\n{}\n--- stderr\n{}\n---",
            self.what,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// A CNI error object (`{"code":..,"msg":..,"details":..}`).
#[derive(Debug, Clone)]
pub struct CniError {
    pub code: u64,
    pub msg: String,
    pub details: String,
}

impl CniError {
    /// Whether msg or details names `what`.
    pub fn mentions(&self, what: &str) -> bool {
        self.msg.contains(what) || self.details.contains(what)
    }
}

/// Runs `cmd` with `stdin`, collecting stdout/stderr; kills it after
/// `timeout`. If a descendant keeps stdout/stderr open after the command
/// exited (the "inherited pipes" trap), that is reported in stderr and the
/// status is None.
pub fn run_command(cmd: Command, what: String, stdin: Option<&[u8]>, timeout: Duration) -> Out {
    let failed = |e: String| Out {
        what: what.clone(),
        status: None,
        stdout: String::new(),
        stderr: e,
    };
    let mut spawned = match Spawned::start(cmd, stdin) {
        Ok(s) => s,
        Err(e) => return failed(format!("[lab] cannot spawn: {e}")),
    };
    let poll = Duration::from_millis(10);
    match spawned.wait_exit(timeout, poll, "[lab]", |child| {
        let _ = child.kill();
    }) {
        Ok((status, note)) => spawned.collect(what, status, note, "[lab]"),
        Err(e) => failed(format!("[lab] wait: {e}")),
    }
}

/// A command started with piped stdout/stderr, each read to its end by a
/// thread: shared by `run_command` and the tests that watch their calls.
pub struct Spawned {
    pub child: Child,
    output: mpsc::Receiver<(bool, Vec<u8>)>,
}

impl Spawned {
    /// Spawns `cmd`; `stdin` (if any) is written, then closed, by a thread.
    pub fn start(mut cmd: Command, stdin: Option<&[u8]>) -> std::io::Result<Spawned> {
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        if let (Some(mut pipe), Some(input)) = (child.stdin.take(), stdin) {
            let input = input.to_vec();
            thread::spawn(move || {
                let _ = pipe.write_all(&input);
            });
        }
        let (tx, rx) = mpsc::channel::<(bool, Vec<u8>)>();
        let readers: Vec<(bool, Box<dyn Read + Send>)> = [
            child
                .stdout
                .take()
                .map(|p| (true, Box::new(p) as Box<dyn Read + Send>)),
            child
                .stderr
                .take()
                .map(|p| (false, Box::new(p) as Box<dyn Read + Send>)),
        ]
        .into_iter()
        .flatten()
        .collect();
        for (is_stdout, mut pipe) in readers {
            let tx = tx.clone();
            thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = pipe.read_to_end(&mut buf);
                let _ = tx.send((is_stdout, buf));
            });
        }
        Ok(Spawned { child, output: rx })
    }

    /// Polls every `poll` for the exit; at `timeout`, `kill`s the child and
    /// reaps it. The exit code (None if killed) and a note (`tag`-prefixed)
    /// for stderr.
    pub fn wait_exit(
        &mut self,
        timeout: Duration,
        poll: Duration,
        tag: &str,
        kill: impl FnOnce(&mut Child),
    ) -> std::io::Result<(Option<i32>, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait()? {
                Some(st) => return Ok((st.code(), String::new())),
                None if Instant::now() >= deadline => {
                    kill(&mut self.child);
                    let _ = self.child.wait();
                    let note = format!("\n{tag} killed after {}s\n", timeout.as_secs());
                    return Ok((None, note));
                }
                None => thread::sleep(poll),
            }
        }
    }

    /// After the exit: waits for stdout and stderr to close (a descendant
    /// holding them `PIPE_GRACE` longer makes the status None) into an Out.
    pub fn collect(self, what: String, status: Option<i32>, note: String, tag: &str) -> Out {
        let (mut status, mut note) = (status, note);
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        for _ in 0..2 {
            match self.output.recv_timeout(PIPE_GRACE) {
                Ok((true, b)) => stdout = b,
                Ok((false, b)) => stderr = b,
                Err(_) => {
                    note.push_str(&format!(
                        "\n{tag} exited ({status:?}) but stdout/stderr are still held open \
                         by a descendant {}s later\n",
                        PIPE_GRACE.as_secs()
                    ));
                    status = None;
                    break;
                }
            }
        }
        let mut stderr = String::from_utf8_lossy(&stderr).into_owned();
        stderr.push_str(&note);
        Out {
            what,
            status,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr,
        }
    }
}

// ---------------------------------------------------------------------------
// Prerequisites

pub fn find_in_path(name: &str) -> Option<PathBuf> {
    LAB_PATH
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// cnitool: `$CNITOOL`, else `<manifest>/.tools/bin/cnitool`.
pub fn cnitool_path() -> PathBuf {
    match std::env::var_os("CNITOOL").filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/cnitool"),
    }
}

/// What the lab needs and this machine lacks.
fn missing_prerequisites() -> Vec<String> {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root (the lab creates users' namespaces and device nodes)".to_string());
    }
    let cnitool = cnitool_path();
    if !is_executable(&cnitool) {
        missing.push(format!(
            "cnitool at {} (run scripts/build-cnitool or set CNITOOL)",
            cnitool.display()
        ));
    }
    if find_in_path("slirp4netns").is_none() {
        missing.push("slirp4netns".to_string());
    }
    for p in REFERENCE_PLUGINS {
        if !is_executable(&Path::new("/usr/lib/cni").join(p)) {
            missing.push(format!("/usr/lib/cni/{p} (containernetworking-plugins)"));
        }
    }
    for t in LAB_TOOLS {
        if find_in_path(t).is_none() {
            missing.push(t.to_string());
        }
    }
    missing
}

// ---------------------------------------------------------------------------
// Configs

/// conf-examples/rootless.conflist.
pub fn example_conflist() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf-examples/rootless.conflist");
    let text =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// The rootless-cni plugin entry of a conflist, mutable.
pub fn outer(conflist: &mut Value) -> &mut serde_json::Map<String, Value> {
    conflist["plugins"][0]
        .as_object_mut()
        .expect("conflist has plugins[0] as an object")
}

/// What a runtime feeds the first plugin of `conflist` on stdin: its entry
/// with `cniVersion` and `name` of the list.
pub fn plugin_stdin(conflist: &Value) -> Value {
    let mut conf = conflist["plugins"][0].clone();
    conf["cniVersion"] = conflist["cniVersion"].clone();
    conf["name"] = conflist["name"].clone();
    conf
}

/// The first IPv4 address (without prefix) of a CNI result.
pub fn result_ipv4(result: &Value) -> Option<String> {
    result["ips"].as_array()?.iter().find_map(|ip| {
        let a = ip["address"].as_str()?;
        let addr = a.split('/').next()?;
        addr.contains('.').then(|| addr.to_string())
    })
}

/// A server process inside a container; killed (by pid) on drop.
pub struct Server {
    pub pid: u32,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

// ---------------------------------------------------------------------------
// A TCP server on the host's loopback

/// Answers every HTTP request with `BODY`, counting connections.
pub struct HostServer {
    pub port: u16,
    connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl HostServer {
    pub const BODY: &'static str = "hello from the host loopback\n";

    /// Listens on `ip`, port chosen by the kernel.
    pub fn start(ip: &str) -> HostServer {
        let listener = TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("binding {ip}:0: {e}"));
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let port = listener.local_addr().expect("local addr").port();
        let connections = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (connections.clone(), stop.clone());
        let thread = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        c.fetch_add(1, Ordering::Relaxed);
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut req = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                            match conn.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => req.extend_from_slice(&buf[..n]),
                            }
                        }
                        let _ = write!(
                            conn,
                            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                            Self::BODY.len(),
                            Self::BODY
                        );
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        HostServer {
            port,
            connections,
            stop,
            thread: Some(thread),
        }
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }
}

impl Drop for HostServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A global IPv4 address of the host (not loopback), if it has one.
pub fn host_global_ipv4() -> Option<String> {
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show", "scope", "global"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<&str> = text.split_whitespace().collect();
    let i = fields.iter().position(|f| *f == "inet")?;
    Some(fields.get(i + 1)?.split('/').next()?.to_string())
}

// ---------------------------------------------------------------------------
// Processes

/// Where mount(8) keeps its utab for the commands the tests run as root:
/// by default real root's mount(8) makes /run/mount on the machine, even in
/// a private mount namespace (every root command the harness builds gets
/// `LIBMOUNT_UTAB` pointing here).
pub fn utab() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("utab")
}

/// The real uid of a process, None if it is gone.
fn real_uid(pid: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn proc_state(pid: u32) -> Option<String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("State:"))?;
    Some(line["State:".len()..].trim().to_string())
}

/// A process's command line, its arguments joined by spaces ("" once it is
/// gone).
fn proc_cmdline(pid: u32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .split('\0')
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

fn describe_process(pid: u32) -> String {
    let cmdline = proc_cmdline(pid);
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    format!(
        "pid {pid} ({}) [{}] {cmdline}",
        comm.trim(),
        proc_state(pid).unwrap_or_else(|| "gone".into())
    )
}

/// Whether an attachment record (its JSON) is one a failed ADD kept for
/// the runtime's DEL: `"failed": true` beside `"state": "ready"`, so that
/// an older release, which knows no other state, keeps it for its DEL too.
pub fn is_failed_record(r: &Value) -> bool {
    r["failed"] == true
}

/// Whether this is a CI run, where a missing prerequisite must fail the
/// test, never skip it: `CI` set to anything but empty, `0`, `false`, `no`
/// or `off` (CI services set `true`, `1`, or their own name).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| {
        !matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "" | "0" | "false" | "no" | "off"
        )
    })
}

/// A TCP port nobody listens on right now, on 127.0.0.1 or 0.0.0.0, for a
/// test to publish a moment later. Not one the kernel hands out (port 0 is
/// from the ephemeral range, where any outgoing connection made meanwhile
/// can take it): one below that range, never handed out twice by this
/// Runs `f` until it succeeds or `within` has passed; the last output.
pub fn retry(within: Duration, mut f: impl FnMut() -> Out) -> Out {
    let deadline = Instant::now() + within;
    loop {
        let out = f();
        if out.ok() || Instant::now() >= deadline {
            return out;
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// process, starting from a place that differs between processes.
pub fn free_tcp_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_from: u32 = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let (base, span) = (10_000, ephemeral_from.saturating_sub(10_000).max(1000));
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (base + (start + n * 37) % span) as u16;
        let free = TcpListener::bind(("0.0.0.0", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", port)).is_ok();
        if free {
            return port;
        }
    }
    panic!("no free TCP port in {base}..{}", base + span);
}

/// How often a ping or a fetch is tried before it counts as failed: a lost
/// packet or a stalled machine is not a broken network, and a test that
/// expects no answer gets none from any attempt.
const NET_ATTEMPTS: usize = 3;

fn retried(mut attempt: impl FnMut() -> Out) -> Out {
    let mut out = attempt();
    for _ in 1..NET_ATTEMPTS {
        if out.ok() {
            break;
        }
        thread::sleep(Duration::from_millis(300));
        out = attempt();
    }
    out
}

/// Pids of all processes whose real uid is `uid`.
pub fn pids_of_uid(uid: u32) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| real_uid(pid) == Some(uid))
        .collect()
}

fn sigkill(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// A uid nobody uses: not in /etc/passwd, no process.
fn fresh_uid() -> u32 {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let taken: Vec<u32> = passwd
        .lines()
        .filter_map(|l| l.split(':').nth(2)?.parse().ok())
        .collect();
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let uid = 1_600_000_000 + (std::process::id() % 100_000) * 1000 + n % 1000;
        if !taken.contains(&uid) && pids_of_uid(uid).is_empty() {
            return uid;
        }
    }
}

/// Writes the user namespace maps of the session holder `pid` (see
/// `LabOptions::subgids`): uid 0 is the lab uid; gid 0 the lab uid's gid and
/// 1..SUBGID_COUNT a subordinate range; then tells the holder to go on.
fn map_subgids(pid: u32, uid: u32, dir: &Path) -> Result<(), String> {
    let ours = fs::read_link("/proc/self/ns/user").ok();
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs::read_link(format!("/proc/{pid}/ns/user")).ok() == ours {
        if Instant::now() > deadline {
            return Err(format!("the session holder {pid} made no user namespace"));
        }
        thread::sleep(Duration::from_millis(5));
    }
    let write = |file: &str, map: String| {
        fs::write(format!("/proc/{pid}/{file}"), &map)
            .map_err(|e| format!("writing {map:?} to /proc/{pid}/{file}: {e}"))
    };
    write("uid_map", format!("0 {uid} 1\n"))?;
    write(
        "gid_map",
        format!("0 {uid} 1\n1 {SUBGID_BASE} {SUBGID_COUNT}\n"),
    )?;
    fs::write(dir.join("mapped"), "").map_err(|e| format!("{}/mapped: {e}", dir.display()))
}

// ---------------------------------------------------------------------------
// The lab

/// A container: a process holding a network namespace inside the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Container {
    pub pid: u32,
}

impl Container {
    /// The netns path a runtime would pass (`/proc/PID/ns/net`).
    pub fn netns(&self) -> String {
        format!("/proc/{}/ns/net", self.pid)
    }
}

pub struct Lab {
    pub uid: u32,
    /// The lab dir: the user's HOME; XDG_RUNTIME_DIR is `run/` in it.
    pub dir: PathBuf,
    /// The session holder: a process in the session's user + mount namespace.
    pub holder: u32,
    /// Holder and containers, killed and reaped on drop.
    children: RefCell<Vec<Child>>,
    /// The root process holding the lab's host mount namespace
    /// (tests/common/hosts.rs), when the options need one; killed on drop.
    host_holder: Option<Child>,
    options: LabOptions,
    /// The session's mounts once the lab was ready (and after the test's
    /// own binds): what the no-leak checker does not count.
    session_mounts: RefCell<Vec<String>>,
}

/// How a lab's session differs from the default one.
#[derive(Debug, Clone, Copy)]
pub struct LabOptions {
    /// The session overlays /var/lib and binds a lab dir on /var/lib/cni
    /// (libcni's result cache, so cnitool works). Without it the session
    /// sees the host's /var/lib as it is: a host that never ran rootful CNI
    /// has no /var/lib/cni, and only our binary in plugin mode can be used.
    pub var_lib_cni: bool,
    /// The machine as the lab sees it: as it is, or as a rootful CNI
    /// runtime leaves it (see tests/common/hosts.rs).
    pub host: Host,
    /// Where XDG_RUNTIME_DIR is.
    pub runtime_dir: RuntimeDir,
    /// The session's user namespace maps a range of subordinate group ids
    /// besides root and allows `setgroups`, as the one rootless podman or
    /// RootlessKit makes with newgidmap (the default maps root alone and
    /// denies `setgroups`, as `unshare --map-root-user` does). A daemon
    /// that drops to a group, such as dnsmasq to `dip`, needs it.
    pub subgids: bool,
}

/// Where the lab's subordinate gids start on the host (`subgids`): far above
/// any real user's range; the lab's processes all run as its uid.
const SUBGID_BASE: u32 = 3_500_000_000;
const SUBGID_COUNT: u32 = 65536;

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            var_lib_cni: true,
            host: Host::Pristine,
            runtime_dir: RuntimeDir::LabDir,
            subgids: false,
        }
    }
}

impl Lab {
    /// A new lab, or None (after saying why) when this machine cannot run it
    /// and CI is not set. With `CI=true` missing prerequisites fail the test.
    pub fn new(name: &str) -> Option<Lab> {
        Lab::new_with(name, LabOptions::default())
    }

    /// `new`, with conf-examples/rootless.conflist written as network NET:
    /// how most tests begin.
    pub fn with_example_net(name: &str) -> Option<Lab> {
        let lab = Lab::new(name)?;
        lab.write_netconf(NET, &example_conflist());
        Some(lab)
    }

    /// `new` with a session other than the default one.
    pub fn new_with(name: &str, options: LabOptions) -> Option<Lab> {
        let missing = missing_prerequisites();
        if !missing.is_empty() {
            let list = missing.join(", ");
            if in_ci() {
                panic!("the rootless lab cannot run here (CI is set), missing: {list}");
            }
            eprintln!("skipping {name}: the rootless lab needs: {list}");
            return None;
        }
        match Lab::build(name, options) {
            Ok(lab) => Some(lab),
            Err(e) => panic!("setting up the rootless lab for {name}: {e}"),
        }
    }

    fn build(name: &str, options: LabOptions) -> Result<Lab, String> {
        let uid = fresh_uid();
        let dir = PathBuf::from(format!("/tmp/rootless-cni-lab.{name}.{uid}"));
        if dir.exists() {
            fs::remove_dir_all(&dir)
                .map_err(|e| format!("removing stale {}: {e}", dir.display()))?;
        }
        let mut lab = Lab {
            uid,
            dir: dir.clone(),
            holder: 0,
            children: RefCell::new(Vec::new()),
            host_holder: None,
            options,
            session_mounts: RefCell::new(Vec::new()),
        };
        // From here on, Drop cleans up whatever was made.
        let sh = |args: &[&str]| -> Result<(), String> {
            let out = Command::new(args[0])
                .args(&args[1..])
                .output()
                .map_err(|e| format!("{args:?}: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "{args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        };
        let mkdir = |rel: &str, mode: u32, owned: bool| -> Result<PathBuf, String> {
            let p = dir.join(rel);
            fs::create_dir_all(&p).map_err(|e| format!("mkdir {}: {e}", p.display()))?;
            fs::set_permissions(&p, fs::Permissions::from_mode(mode))
                .map_err(|e| format!("chmod {}: {e}", p.display()))?;
            if owned {
                std::os::unix::fs::chown(&p, Some(uid), Some(uid))
                    .map_err(|e| format!("chown {}: {e}", p.display()))?;
            }
            Ok(p)
        };
        mkdir("", 0o755, true)?;
        mkdir("run", 0o700, true)?;
        mkdir("bin", 0o755, false)?;
        mkdir("tools", 0o755, false)?;
        mkdir("net.d", 0o755, false)?;
        mkdir("cni", 0o755, true)?; // bound onto /var/lib/cni in the session
        mkdir("varlib/upper", 0o755, true)?;
        mkdir("varlib/work", 0o755, true)?;

        let copy = |from: &Path, to: PathBuf| -> Result<(), String> {
            fs::copy(from, &to)
                .map_err(|e| format!("copy {} to {}: {e}", from.display(), to.display()))?;
            fs::set_permissions(&to, fs::Permissions::from_mode(0o755))
                .map_err(|e| format!("chmod {}: {e}", to.display()))
        };
        copy(
            Path::new(env!("CARGO_BIN_EXE_rootless-cni")),
            lab.bin().join("rootless-cni"),
        )?;
        copy(&cnitool_path(), lab.dir.join("tools/cnitool"))?;

        let tun = dir.join("tun");
        sh(&[
            "mknod",
            "-m",
            "0666",
            &tun.to_string_lossy(),
            "c",
            "10",
            "200",
        ])?;

        let d = dir.to_string_lossy();
        let var_lib_cni = if options.var_lib_cni {
            format!(
                "mount -t overlay overlay -o 'lowerdir=/var/lib,upperdir={d}/varlib/upper,workdir={d}/varlib/work' /var/lib
                 mkdir -p /var/lib/cni
                 mount --bind '{d}/cni' /var/lib/cni"
            )
        } else {
            String::new()
        };
        let setup = format!(
            "set -e
             mount --bind '{d}/tun' /dev/net/tun
             {var_lib_cni}
             touch '{d}/ready'
             exec sleep infinity"
        );
        if options.host != Host::Pristine || options.runtime_dir != RuntimeDir::LabDir {
            lab.host_holder = Some(hosts::start_host_ns(
                &dir,
                uid,
                options.host,
                options.runtime_dir,
            )?);
        }
        let stderr =
            fs::File::create(dir.join("holder.err")).map_err(|e| format!("holder.err: {e}"))?;
        let u = uid.to_string();
        let mount_ns = ["unshare", "--mount", "--propagation", "private"];
        let mut holder = lab.host_command("/usr/bin/setpriv");
        holder.args(["--reuid", &u, "--regid", &u, "--clear-groups"]);
        if options.subgids {
            // The maps are written by us (root) once the user namespace
            // exists; the mount namespace is made after that, with the
            // capabilities root in the mapped namespace has.
            let wait = format!(
                "while [ ! -e '{d}/mapped' ]; do sleep 0.01; done; exec {} sh -c \"$0\"",
                mount_ns.join(" ")
            );
            holder.args(["unshare", "--user", "sh", "-c", &wait, &setup]);
        } else {
            holder
                .args(["unshare", "--user", "--map-root-user"])
                .args(&mount_ns[1..])
                .args(["sh", "-c", &setup]);
        }
        let child = holder
            .env_clear()
            .env("PATH", LAB_PATH)
            .env("LIBMOUNT_UTAB", crate::common::utab())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("starting the session holder: {e}"))?;
        lab.holder = child.id();
        lab.children.borrow_mut().push(child);
        if options.subgids {
            map_subgids(lab.holder, uid, &dir)?;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !dir.join("ready").exists() {
            let exited = lab.children.borrow_mut()[0].try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                let err = fs::read_to_string(dir.join("holder.err")).unwrap_or_default();
                return Err(format!(
                    "the session holder did not come up ({exited:?}): {err}"
                ));
            }
            thread::sleep(Duration::from_millis(10));
        }
        lab.session_mounts.replace(lab.session_mounts());
        Ok(lab)
    }

    // --- paths -------------------------------------------------------------

    /// XDG_RUNTIME_DIR, as the test (root, in the machine's mount
    /// namespace) reaches it: with a logind-style runtime dir, through the
    /// lab host holder's root.
    pub fn run_dir(&self) -> PathBuf {
        match (&self.host_holder, self.options.runtime_dir) {
            (Some(h), RuntimeDir::Logind) => PathBuf::from(format!("/proc/{}/root", h.id())).join(
                self.xdg_runtime_dir()
                    .strip_prefix("/")
                    .unwrap_or(Path::new("")),
            ),
            _ => self.dir.join("run"),
        }
    }
    /// XDG_RUNTIME_DIR as the lab user sees it.
    pub fn xdg_runtime_dir(&self) -> PathBuf {
        match self.options.runtime_dir {
            RuntimeDir::LabDir => self.dir.join("run"),
            RuntimeDir::Logind => hosts::logind_runtime_dir(self.uid),
        }
    }
    /// The root of the lab's host as the test reaches it: `/` of the
    /// machine, or the lab host holder's root.
    pub fn host_root(&self) -> PathBuf {
        match &self.host_holder {
            Some(h) => PathBuf::from(format!("/proc/{}/root", h.id())),
            None => PathBuf::from("/"),
        }
    }
    /// The pid of the lab host's holder, when the lab has its own host.
    pub fn host_holder_pid(&self) -> Option<u32> {
        self.host_holder.as_ref().map(Child::id)
    }
    /// A command that runs `program` in the lab's host mount namespace
    /// (the machine's own when the lab has none), as the caller (root).
    pub fn host_command(&self, program: &str) -> Command {
        match &self.host_holder {
            Some(h) => {
                let mut cmd = Command::new("/usr/bin/nsenter");
                cmd.arg(format!("--mount=/proc/{}/ns/mnt", h.id()))
                    .args(["--", program]);
                cmd
            }
            None => Command::new(program),
        }
    }
    /// The plugin's default state dir.
    pub fn state_dir(&self) -> PathBuf {
        self.run_dir().join(rootless_cni::state::DEFAULT_DIR_NAME)
    }
    /// NETCONFPATH for cnitool.
    pub fn netconf_dir(&self) -> PathBuf {
        self.dir.join("net.d")
    }
    /// The lab's CNI dir (our binary); CNI_PATH is this, then /usr/lib/cni.
    pub fn bin(&self) -> PathBuf {
        self.dir.join("bin")
    }
    pub fn cni_path(&self) -> String {
        format!("{}:/usr/lib/cni", self.bin().display())
    }
    /// What the session sees as /var/lib/cni (libcni's result cache).
    pub fn var_lib_cni(&self) -> PathBuf {
        self.dir.join("cni")
    }
    /// host-local's leases for an inner network, in the default state dir.
    pub fn lease_dir(&self, network: &str) -> PathBuf {
        self.state_dir().join("var-lib-cni/networks").join(network)
    }

    // --- files ---------------------------------------------------------------

    /// Writes `<lab>/net.d/<name>.conflist`.
    pub fn write_netconf(&self, name: &str, conf: &Value) {
        self.write_file(&format!("net.d/{name}.conflist"), &conf.to_string());
    }

    /// Writes a file (dirs created, readable by the lab user).
    pub fn write_file(&self, rel: &str, contents: &str) {
        let p = self.dir.join(rel);
        let parent = p.parent().expect("a file path has a parent");
        fs::create_dir_all(parent).unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
        fs::write(&p, contents).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
    }

    /// Makes the session see `contents` as /etc/resolv.conf: a lab file bound
    /// over it in the session's mount namespace (the host's file untouched).
    /// slirp4netns, started there by the infra, forwards what reaches
    /// 10.0.2.3 to its first nameserver; call this before the first ADD.
    pub fn bind_resolv_conf(&self, contents: &str) {
        self.write_file("resolv.conf", contents);
        let file = self.dir.join("resolv.conf").display().to_string();
        let out = self.exec(&[], None, &["mount", "--bind", &file, "/etc/resolv.conf"]);
        assert!(out.ok(), "binding {file} on /etc/resolv.conf: {out}");
        // The test's own mount, not a leak.
        self.session_mounts.replace(self.session_mounts());
    }

    /// Names of the entries of a dir, sorted; empty if it does not exist.
    pub fn list(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// The attachment records in the default state dir.
    pub fn attachment_files(&self) -> Vec<String> {
        Lab::list(&self.state_dir().join("attachments"))
    }

    /// host-local's lease files (named by IP) for an inner network.
    pub fn lease_files(&self, network: &str) -> Vec<String> {
        Lab::list(&self.lease_dir(network))
            .into_iter()
            .filter(|n| !n.starts_with("last_reserved_ip") && n != "lock")
            .collect()
    }

    // --- commands in the session --------------------------------------------

    /// Runs `argv` inside the session as the lab user, with only PATH, HOME,
    /// XDG_RUNTIME_DIR and `env` set.
    pub fn exec(&self, env: &[(&str, &str)], stdin: Option<&[u8]>, argv: &[&str]) -> Out {
        let (cmd, what) = self.command(env, argv);
        run_command(cmd, what, stdin, COMMAND_TIMEOUT)
    }

    /// Runs `argv` as the lab user OUTSIDE the session (setpriv only: the
    /// initial user and mount namespaces), with the same clean environment
    /// as `exec`.
    pub fn exec_outside(&self, env: &[(&str, &str)], stdin: Option<&[u8]>, argv: &[&str]) -> Out {
        let cmd = self.user_command(false, env, argv);
        let what = format!("[outside the session] {}", argv.join(" "));
        run_command(cmd, what, stdin, COMMAND_TIMEOUT)
    }

    /// The command `exec` runs, and how to name it in messages.
    pub fn command(&self, env: &[(&str, &str)], argv: &[&str]) -> (Command, String) {
        let cmd = self.user_command(true, env, argv);
        let what = env
            .iter()
            .map(|(k, v)| format!("{k}={v} "))
            .collect::<String>()
            + &argv.join(" ");
        (cmd, what)
    }

    /// setpriv to the lab user (then nsenter into the session if
    /// `in_session`) and `env -i` with the clean environment: the one way
    /// `exec` and `exec_outside` build their commands.
    fn user_command(&self, in_session: bool, env: &[(&str, &str)], argv: &[&str]) -> Command {
        self.user_command_in(in_session.then_some(self.holder), env, argv)
    }

    /// `user_command` that enters the user and mount namespaces of `target`
    /// (the session's holder, or a process that holds a mount namespace of
    /// its own inside the session), or none.
    fn user_command_in(&self, target: Option<u32>, env: &[(&str, &str)], argv: &[&str]) -> Command {
        let u = self.uid.to_string();
        let mut cmd = if target.is_some() {
            Command::new("/usr/bin/setpriv")
        } else {
            self.host_command("/usr/bin/setpriv")
        };
        cmd.args(["--reuid", &u, "--regid", &u, "--clear-groups"]);
        if let Some(target) = target {
            cmd.args(["nsenter", "--preserve-credentials", "--user", "--mount"])
                .arg(format!("--target={target}"));
        }
        cmd.args(["--", "env", "-i"])
            .arg(format!("PATH={LAB_PATH}"))
            .arg(format!("HOME={}", self.dir.display()))
            .arg(format!(
                "XDG_RUNTIME_DIR={}",
                self.xdg_runtime_dir().display()
            ));
        for (k, v) in env {
            cmd.arg(format!("{k}={v}"));
        }
        cmd.args(argv)
            .env_clear()
            .env("PATH", LAB_PATH)
            .env("LIBMOUNT_UTAB", crate::common::utab());
        cmd
    }

    /// `argv` as `run` runs it, but in the mount namespace that `holder` (a
    /// process inside the session) made for itself.
    pub fn command_in_mounts_of(&self, holder: u32, argv: &[&str]) -> Command {
        let netconf = self.netconf_dir().display().to_string();
        let cni_path = self.cni_path();
        self.user_command_in(
            Some(holder),
            &[("NETCONFPATH", &netconf), ("CNI_PATH", &cni_path)],
            argv,
        )
    }

    /// Runs `argv` in the session with the lab's NETCONFPATH and CNI_PATH.
    pub fn run(&self, argv: &[&str]) -> Out {
        let netconf = self.netconf_dir().display().to_string();
        let cni_path = self.cni_path();
        self.exec(
            &[("NETCONFPATH", &netconf), ("CNI_PATH", &cni_path)],
            None,
            argv,
        )
    }

    /// `cnitool CMD NET NETNS` (add, check, del) with the lab's config dir.
    pub fn cnitool(&self, cmd: &str, net: &str, netns: &str) -> Out {
        self.cnitool_env(&[], cmd, net, netns)
    }

    /// `cnitool CMD NET NETNS` for every netns at once: one process each,
    /// all started together (after a barrier), then all waited for. The
    /// outputs are in the order of `netns`.
    pub fn cnitool_parallel(&self, cmd: &str, net: &str, netns: &[String]) -> Vec<Out> {
        let netconf = self.netconf_dir().display().to_string();
        let cni_path = self.cni_path();
        let cnitool = self.dir.join("tools/cnitool").display().to_string();
        let env = [("NETCONFPATH", netconf.as_str()), ("CNI_PATH", &cni_path)];
        let barrier = Arc::new(Barrier::new(netns.len()));
        let threads: Vec<thread::JoinHandle<Out>> = netns
            .iter()
            .map(|ns| {
                let (command, what) = self.command(&env, &[&cnitool, cmd, net, ns]);
                let barrier = barrier.clone();
                thread::spawn(move || {
                    barrier.wait();
                    run_command(command, what, None, COMMAND_TIMEOUT)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("a cnitool thread panicked"))
            .collect()
    }

    /// `cnitool` with extra environment (CNI_IFNAME, CAP_ARGS, CNI_PATH, ...).
    pub fn cnitool_env(&self, extra: &[(&str, &str)], cmd: &str, net: &str, netns: &str) -> Out {
        let netconf = self.netconf_dir().display().to_string();
        let cni_path = self.cni_path();
        let mut env: Vec<(&str, &str)> = vec![("NETCONFPATH", &netconf), ("CNI_PATH", &cni_path)];
        for (k, v) in extra {
            env.retain(|(key, _)| key != k);
            env.push((k, v));
        }
        let cnitool = self.dir.join("tools/cnitool").display().to_string();
        self.exec(&env, None, &[&cnitool, cmd, net, netns])
    }

    /// Our binary in plugin mode: `env` is the whole CNI environment (plus
    /// PATH, HOME, XDG_RUNTIME_DIR), `stdin` the network config.
    pub fn plugin<K: AsRef<str>, V: AsRef<str>>(&self, env: &[(K, V)], stdin: &str) -> Out {
        let bin = self.bin().join("rootless-cni").display().to_string();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_ref(), v.as_ref())).collect();
        self.exec(&env, Some(stdin.as_bytes()), &[&bin])
    }

    /// The usual environment of a plugin call on `netns`, to adjust in tests.
    pub fn plugin_env(
        &self,
        command: &str,
        container_id: &str,
        netns: &str,
    ) -> Vec<(String, String)> {
        vec![
            ("CNI_COMMAND".into(), command.into()),
            ("CNI_CONTAINERID".into(), container_id.into()),
            ("CNI_NETNS".into(), netns.into()),
            ("CNI_IFNAME".into(), "eth0".into()),
            ("CNI_PATH".into(), self.cni_path()),
        ]
    }

    /// Our binary in CLI mode.
    pub fn cli(&self, args: &[&str]) -> Out {
        let bin = self.bin().join("rootless-cni").display().to_string();
        let mut argv = vec![bin.as_str()];
        argv.extend_from_slice(args);
        self.exec(&[], None, &argv)
    }

    /// `rootless-cni status --json`, parsed.
    pub fn status(&self) -> Value {
        let out = self.cli(&["status", "--json"]);
        assert!(out.ok(), "status --json failed: {out}");
        out.json()
            .unwrap_or_else(|| panic!("status --json is not JSON: {out}"))
    }

    /// The sandbox pid of the running infra: `infra.sandbox.pid` of
    /// `status --json`, else `sandbox.pid` of `<state>/infra.json`.
    pub fn sandbox_pid(&self) -> Option<u32> {
        let from_status = self.status()["infra"]["sandbox"]["pid"].as_u64();
        let from_file = || {
            let text = fs::read_to_string(self.state_dir().join("infra.json")).ok()?;
            let v: Value = serde_json::from_str(&text).ok()?;
            v["sandbox"]["pid"].as_u64()
        };
        from_status.or_else(from_file).map(|p| p as u32)
    }

    // --- containers ----------------------------------------------------------

    /// `cnitool add` of `c` to the example network, which must succeed: the
    /// IPv4 address it got (the ADD most tests start with).
    pub fn attach(&self, c: &Container) -> String {
        let add = self.cnitool("add", NET, &c.netns());
        add.added_ipv4(&format!("ADD {}", c.netns()))
    }

    /// `cnitool del` of `c` from the example network, which must succeed.
    pub fn detach(&self, c: &Container) {
        let del = self.cnitool("del", NET, &c.netns());
        assert!(del.ok(), "DEL {}: {del}", c.netns());
    }

    /// Asserts that `ip`, from an ADD result, is in the example network and
    /// is what `c`'s eth0 really has.
    pub fn assert_attached(&self, c: &Container, ip: &str) {
        assert!(
            ip.starts_with("10.89.0."),
            "address {ip} not in 10.89.0.0/24"
        );
        assert_eq!(self.ipv4(c, "eth0").as_deref(), Some(ip), "eth0 of {c:?}");
    }

    /// Asserts that one ping from `c` to `ip` is answered (`what` names it).
    pub fn assert_ping(&self, c: &Container, ip: &str, what: &str) {
        let ping = self.ping(c, ip);
        assert!(ping.ok(), "{what}: {ping}");
    }

    /// `argv` as the lab user inside the session, with a clean environment
    /// and no stdio: for a process that outlives the call (more arguments
    /// may be added before it is spawned).
    pub fn session_daemon(&self, argv: &[&str]) -> Command {
        let u = self.uid.to_string();
        let mut cmd = Command::new("/usr/bin/setpriv");
        cmd.args(["--reuid", &u, "--regid", &u, "--clear-groups"])
            .args(["nsenter", "--preserve-credentials", "--user", "--mount"])
            .arg(format!("--target={}", self.holder))
            .arg("--")
            .args(argv)
            .env_clear()
            .env("PATH", LAB_PATH)
            .env("LIBMOUNT_UTAB", crate::common::utab())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    }

    /// Starts a container (a netns held by `sleep`) inside the session.
    pub fn container(&self) -> Container {
        self.container_with(&["--net"])
    }

    /// Starts a container inside the session whose `sleep` is in the new
    /// namespaces `unshare_flags` ask for (a netns among them).
    pub fn container_with(&self, unshare_flags: &[&str]) -> Container {
        let child = self
            .session_daemon(&["unshare"])
            .args(unshare_flags)
            .args(["sleep", "infinity"])
            .spawn()
            .unwrap_or_else(|e| panic!("lab: starting a container: {e}"));
        let pid = child.id();
        self.children.borrow_mut().push(child);
        // setpriv, nsenter and unshare exec: the pid ends up as `sleep`, in
        // a netns of its own (before that it is in the host's).
        let host_net = fs::read_link("/proc/self/ns/net").ok();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let net = fs::read_link(format!("/proc/{pid}/ns/net")).ok();
            if comm.trim() == "sleep" && net.is_some() && net != host_net {
                return Container { pid };
            }
            assert!(
                Instant::now() < deadline,
                "lab: container {pid} did not come up"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills a container's holder and reaps it: its netns is gone after.
    pub fn kill_container(&self, c: &Container) {
        let mut children = self.children.borrow_mut();
        if let Some(i) = children.iter().position(|ch| ch.id() == c.pid) {
            let mut child = children.remove(i);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Runs `argv` in a container's netns (inside the session).
    pub fn in_netns(&self, c: &Container, argv: &[&str]) -> Out {
        let net = format!("--net={}", c.netns());
        let mut full = vec!["nsenter", net.as_str(), "--"];
        full.extend_from_slice(argv);
        self.exec(&[], None, &full)
    }

    /// A ping from a container: one echo, tried up to NET_ATTEMPTS times
    /// until one is answered.
    pub fn ping(&self, c: &Container, ip: &str) -> Out {
        retried(|| self.in_netns(c, &["busybox", "ping", "-c1", "-W2", ip]))
    }

    /// curl from a container, tried up to NET_ATTEMPTS times until one
    /// succeeds (what it fetched is for the caller to judge).
    pub fn curl(&self, c: &Container, url: &str) -> Out {
        retried(|| self.in_netns(c, &["curl", "-sS", "--max-time", "3", url]))
    }

    /// The IPv4 address of `ifname` in a container, if any.
    pub fn ipv4(&self, c: &Container, ifname: &str) -> Option<String> {
        let out = self.in_netns(c, &["ip", "-o", "-4", "addr", "show", "dev", ifname]);
        let fields: Vec<&str> = out.stdout.split_whitespace().collect();
        let i = fields.iter().position(|f| *f == "inet")?;
        Some(fields.get(i + 1)?.split('/').next()?.to_string())
    }

    /// The interface names in a container (`ip -o link`).
    pub fn links(&self, c: &Container) -> Vec<String> {
        let out = self.in_netns(c, &["ip", "-o", "link", "show"]);
        out.stdout
            .lines()
            .filter_map(|l| {
                let name = l.split(':').nth(1)?.trim();
                Some(name.split('@').next()?.to_string())
            })
            .collect()
    }

    /// The attachment records (`*.json`, not the hidden temporary files of
    /// an atomic write) in the default state dir, parsed. A record removed
    /// between listing and reading is skipped; one that does not parse
    /// panics (records are written atomically).
    pub fn attachment_records(&self) -> Vec<Value> {
        let dir = self.state_dir().join("attachments");
        self.attachment_files()
            .iter()
            .filter(|name| name.ends_with(".json") && !name.starts_with('.'))
            .filter_map(|name| {
                let p = dir.join(name);
                let text = match fs::read_to_string(&p) {
                    Ok(t) => t,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
                    Err(e) => panic!("reading {}: {e}", p.display()),
                };
                Some(
                    serde_json::from_str(&text)
                        .unwrap_or_else(|e| panic!("parsing {}: {e}: {text}", p.display())),
                )
            })
            .collect()
    }

    // --- processes -------------------------------------------------------------

    /// Live (not zombie) processes of the lab uid with `arg` as one of their
    /// argv elements (e.g. "__supervise"), described.
    pub fn processes_with_arg(&self, arg: &str) -> Vec<String> {
        pids_of_uid(self.uid)
            .into_iter()
            .filter(|&p| !proc_state(p).unwrap_or_default().starts_with('Z'))
            .filter(|&p| {
                fs::read(format!("/proc/{p}/cmdline"))
                    .map(|b| b.split(|&c| c == 0).any(|a| a == arg.as_bytes()))
                    .unwrap_or(false)
            })
            .map(describe_process)
            .collect()
    }

    /// Whether `pid` is a live (not zombie) process of the lab uid.
    pub fn is_running(&self, pid: u32) -> bool {
        real_uid(pid) == Some(self.uid) && !proc_state(pid).unwrap_or_default().starts_with('Z')
    }

    /// `pid` described (command line and state), for messages.
    pub fn describe(pid: u32) -> String {
        describe_process(pid)
    }

    // --- leaks -----------------------------------------------------------------

    /// Processes of the lab uid other than the lab's own (session holder and
    /// containers), described.
    pub fn leftovers(&self) -> Vec<String> {
        let own = self.own_pids();
        pids_of_uid(self.uid)
            .into_iter()
            .filter(|p| !own.contains(p))
            .map(describe_process)
            .collect()
    }

    /// `leftovers()`, after giving them up to `grace` to go away.
    pub fn leftovers_after(&self, grace: Duration) -> Vec<String> {
        let deadline = Instant::now() + grace;
        loop {
            let left = self.leftovers();
            if left.is_empty() || Instant::now() >= deadline {
                return left;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every mount of the session's mount namespace (the caller's, where
    /// the plugin runs), as `TARGET FSTYPE SOURCE`: a bind's source names
    /// the bound dir, so a leaked bind over `/run` differs from `/run`.
    fn session_mounts(&self) -> Vec<String> {
        let out = self.exec(&[], None, &["findmnt", "-rn", "-o", "TARGET,FSTYPE,SOURCE"]);
        assert!(out.ok(), "findmnt in the session: {out}");
        out.stdout.lines().map(str::to_string).collect()
    }

    /// Mounts in the session's mount namespace that were not there when the
    /// lab was ready, and those gone since: anywhere (a `/var/lib` overlay or a `/run` bind left
    /// in the caller's namespace as much as a bound netns), counted, so a
    /// second mount on the same target shows too.
    pub fn session_mount_leftovers(&self) -> Vec<String> {
        let mut before = self.session_mounts.borrow().clone();
        let mut left = Vec::new();
        for m in self.session_mounts() {
            match before.iter().position(|b| *b == m) {
                Some(i) => {
                    before.swap_remove(i);
                }
                None => left.push(m),
            }
        }
        // A lab mount taken away (a slirp4netns sandbox once unmounted the
        // caller's netns mounts) is as much a change.
        left.extend(before.into_iter().map(|m| format!("unmounted: {m}")));
        left
    }

    /// Asserts that nothing of an infra is left: status says no infra, and
    /// the no-leak checker finds nothing the lab did not hold when it was
    /// built (no process, namespace, mount, lease, record or infra file).
    pub fn assert_no_infra(&self, when: &str) {
        let status = self.status();
        assert!(
            status["infra"].is_null(),
            "{when}: infra still running: {status}"
        );
        self.assert_no_leaks(&Snapshot::default(), when);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for mut child in self.children.borrow_mut().drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Everything else of the uid (infra, strays): kill until none is
        // left; re-parented zombies are reaped by init.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pids: Vec<u32> = pids_of_uid(self.uid)
                .into_iter()
                .filter(|&p| !proc_state(p).unwrap_or_default().starts_with('Z'))
                .collect();
            let all = pids_of_uid(self.uid);
            if all.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                let left: Vec<String> = all.into_iter().map(describe_process).collect();
                eprintln!(
                    "lab {}: processes of uid {} survive: {left:?}",
                    self.dir.display(),
                    self.uid
                );
                break;
            }
            for p in pids {
                sigkill(p);
            }
            thread::sleep(Duration::from_millis(20));
        }
        // The lab host's mounts go with its holder (nothing else of the
        // lab's uid is left in its namespace).
        if let Some(mut h) = self.host_holder.take() {
            let _ = h.kill();
            let _ = h.wait();
        }
        if std::env::var_os("LAB_KEEP").is_some() {
            eprintln!("LAB_KEEP: leaving {}", self.dir.display());
            return;
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("lab: removing {}: {e}", self.dir.display());
        }
    }
}
