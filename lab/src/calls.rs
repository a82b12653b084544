//! Calls in the session that a test starts, watches and kills itself
//! (each in a process group of its own), and many calls at once: what the
//! reliability and security tests do to our binary.

use crate::{Lab, Out, Spawned};
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

/// Live `__supervise` processes of the lab uid: the number of infras. A
/// child the supervisor forked (the sandbox, the way out, a setup command)
/// carries its command line until its exec, and is not another infra; nor
/// is one that is gone by the time its parent is read (such a child can
/// exec, run and be reaped between the two looks at /proc).
pub fn supervisors(lab: &Lab) -> Vec<String> {
    let found = lab.pids_with_arg(SUPERVISE);
    found
        .iter()
        .filter(|&&p| crate::process::parent_of(p).is_some_and(|pp| !found.contains(&pp)))
        .map(|&p| crate::process::describe_process(p))
        .collect()
}

/// Whether the output shows a panic of ours (Rust's exit code 101 or its
/// message on stderr).
pub fn panicked(out: &Out) -> bool {
    out.status == Some(101) || out.stderr.contains("panicked")
}
