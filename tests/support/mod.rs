//! What the reliability and security tests add to the lab: calls
//! in the session that the test starts, watches and kills itself (each in a
//! process group of its own), many calls at once, process start times for
//! forged records, and a tiny deterministic PRNG.
//!
//! Used beside `common` (`mod common; mod support;`), so the shared harness
//! stays as it is.
#![allow(dead_code)] // each test file uses a different part

use crate::common::{example_conflist, outer, plugin_stdin, Lab, Out, Spawned};
use std::fs;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

/// The supervisor's hidden entry: one such process is one infra.
pub const SUPERVISE: &str = "__supervise";

/// One call in the lab session: environment (on top of PATH, HOME,
/// XDG_RUNTIME_DIR), stdin and argv.
#[derive(Debug, Clone)]
pub struct Call {
    pub env: Vec<(String, String)>,
    pub stdin: Option<Vec<u8>>,
    pub argv: Vec<String>,
}

impl Call {
    /// Our binary in plugin mode.
    pub fn plugin(lab: &Lab, env: &[(String, String)], stdin: &str) -> Call {
        Call {
            env: env.to_vec(),
            stdin: Some(stdin.as_bytes().to_vec()),
            argv: vec![lab.bin().join("rootless-cni").display().to_string()],
        }
    }

    /// `cnitool CMD NET NETNS` with the lab's config dir and CNI_PATH.
    pub fn cnitool(lab: &Lab, cmd: &str, net: &str, netns: &str) -> Call {
        Call {
            env: vec![
                (
                    "NETCONFPATH".into(),
                    lab.netconf_dir().display().to_string(),
                ),
                ("CNI_PATH".into(), lab.cni_path()),
            ],
            stdin: None,
            argv: vec![
                lab.dir.join("tools/cnitool").display().to_string(),
                cmd.into(),
                net.into(),
                netns.into(),
            ],
        }
    }

    /// Any command in the session.
    pub fn argv(argv: &[&str]) -> Call {
        Call {
            env: Vec::new(),
            stdin: None,
            argv: argv.iter().map(|a| a.to_string()).collect(),
        }
    }

    /// For messages.
    pub fn what(&self) -> String {
        let env: String = self
            .env
            .iter()
            .filter(|(k, _)| k.starts_with("CNI_COMMAND") || k.starts_with("CNI_CONTAINERID"))
            .map(|(k, v)| format!("{k}={v} "))
            .collect();
        env + &self.argv.join(" ")
    }

    /// The lab's own session command (setpriv + nsenter, a clean
    /// environment), in a process group of its own (so the whole call can
    /// be killed at once).
    fn command(&self, lab: &Lab) -> Command {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let argv: Vec<&str> = self.argv.iter().map(String::as_str).collect();
        let (mut cmd, _) = lab.command(&env, &argv);
        cmd.process_group(0);
        cmd
    }
}

/// A call started in the session, not yet waited for. setpriv, nsenter and
/// env exec, so `pid` ends up as the called program and leads its group.
pub struct Running {
    pub what: String,
    pub pid: u32,
    spawned: Spawned,
}

/// Starts `call`; its stdin is written (then closed) by a thread.
pub fn spawn(lab: &Lab, call: &Call) -> Running {
    let spawned = Spawned::start(call.command(lab), call.stdin.as_deref())
        .unwrap_or_else(|e| panic!("spawning {}: {e}", call.what()));
    Running {
        what: call.what(),
        pid: spawned.child.id(),
        spawned,
    }
}

impl Running {
    /// SIGKILL to the call's whole process group (the program and every
    /// child that did not leave the group: inner plugins, not the infra).
    pub fn kill_group(&self) {
        killpg(self.pid);
    }

    /// Whether it has exited (then `wait` returns at once).
    pub fn exited(&mut self) -> bool {
        !matches!(self.spawned.child.try_wait(), Ok(None))
    }

    /// Waits for the exit (the group is killed after `timeout`), then for
    /// stdout and stderr to close.
    pub fn wait(mut self, timeout: Duration) -> Out {
        let pid = self.pid;
        let poll = Duration::from_millis(5);
        let (status, note) = self
            .spawned
            .wait_exit(timeout, poll, "[test]", |_| killpg(pid))
            .unwrap_or_else(|e| panic!("waiting for {}: {e}", self.what));
        self.spawned.collect(self.what, status, note, "[test]")
    }
}

/// A call that must not outlive the test, pass or fail: its process group
/// is SIGKILLed (by its pid) and reaped when the guard goes.
pub struct KillOnDrop(Option<Running>);

impl KillOnDrop {
    pub fn new(running: Running) -> KillOnDrop {
        KillOnDrop(Some(running))
    }

    /// Kills it now, and waits for it.
    pub fn kill(&mut self) {
        if let Some(running) = self.0.take() {
            running.kill_group();
            let _ = running.wait(Duration::from_secs(5));
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill();
    }
}

/// SIGKILL to the process group led by `pid`.
fn killpg(pid: u32) {
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Starts every call at once, then waits for all; `tick` runs on this
/// thread every few ms meanwhile (to sample the processes of the uid).
/// Outputs are in the order of `calls`.
pub fn run_all(lab: &Lab, calls: &[Call], timeout: Duration, mut tick: impl FnMut()) -> Vec<Out> {
    let mut running: Vec<Running> = calls.iter().map(|c| spawn(lab, c)).collect();
    let deadline = Instant::now() + timeout;
    loop {
        tick();
        if running.iter_mut().all(Running::exited) || Instant::now() >= deadline {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    running
        .into_iter()
        .map(|r| r.wait(Duration::ZERO))
        .collect()
}

/// Runs one call to its end.
pub fn run(lab: &Lab, call: &Call, timeout: Duration) -> Out {
    spawn(lab, call).wait(timeout)
}

/// Live `__supervise` processes of the lab uid: the number of infras.
pub fn supervisors(lab: &Lab) -> Vec<String> {
    lab.processes_with_arg(SUPERVISE)
}

/// Field 22 of /proc/PID/stat (start time in clock ticks since boot).
pub fn start_time(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &text[text.rfind(')')? + 1..];
    after.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Whether the output shows a panic of ours (Rust's exit code 101 or its
/// message on stderr).
pub fn panicked(out: &Out) -> bool {
    out.status == Some(101) || out.stderr.contains("panicked")
}

/// Writes `contents` to `path` as the lab user would have (owner uid, 0600).
pub fn write_as_user(lab: &Lab, path: &std::path::Path, contents: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
    }
    fs::write(path, contents).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    std::os::unix::fs::chown(path, Some(lab.uid), Some(lab.uid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// The files of the state dir's attachments/ that are not a JSON record
/// (a leftover temporary file), and the *.json ones that do not parse.
pub fn bad_records(lab: &Lab) -> Vec<String> {
    let dir = lab.state_dir().join("attachments");
    let mut bad = Vec::new();
    for name in Lab::list(&dir) {
        if !name.ends_with(".json") || name.starts_with('.') {
            bad.push(format!("{name}: not a record"));
            continue;
        }
        let path = dir.join(&name);
        let text = fs::read(&path).unwrap_or_default();
        if let Err(e) = serde_json::from_slice::<serde_json::Value>(&text) {
            bad.push(format!("{name}: {e}: {:?}", String::from_utf8_lossy(&text)));
        }
    }
    bad
}

/// splitmix64: small, deterministic, good enough to pick test inputs.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// The seed for a test: `$TEST_SEED` if set, else `default`. Printed, so a
/// failure can be replayed.
pub fn seed(name: &str, default: u64) -> u64 {
    let seed = std::env::var("TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    eprintln!("{name}: seed {seed} (TEST_SEED to replay)");
    seed
}

/// Writes an inner plugin of the test's own (a whole script, shebang
/// included) into the lab's CNI dir, executable, owned by the lab user.
pub fn install_plugin(lab: &Lab, name: &str, script: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = lab.bin().join(name);
    write_as_user(lab, &path, script.as_bytes());
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// A plugin (python3) that marks that its ADD started (`DIR/started`, DIR
/// replaced by the caller), sleeps 2 s through it and passes the result on:
/// a kill or a lock timeout lands while it runs.
pub const SLOWADD: &str = r#"#!/usr/bin/python3
import json, os, sys, time
conf = json.load(sys.stdin)
if os.environ.get("CNI_COMMAND") == "ADD":
    open("DIR/started", "w").close()
    time.sleep(2)
print(json.dumps(conf.get("prevResult") or {"cniVersion": conf["cniVersion"]}))
"#;

/// The plugin's stdin for the example config whose delegated chain is the
/// one plugin `plugin_type` (installed by the test), in a network "slow".
pub fn one_plugin_delegate_stdin(plugin_type: &str) -> serde_json::Value {
    let mut conf = example_conflist();
    outer(&mut conf).insert(
        "delegate".into(),
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "slow",
            "plugins": [{ "type": plugin_type }]
        }),
    );
    plugin_stdin(&conf)
}
