//! Processes: running a command with a timeout and collecting its output
//! (`Out`), and what /proc says about the processes of a uid.

use serde_json::Value;
use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// How long a command's stdout/stderr may stay open after it exited.
const PIPE_GRACE: Duration = Duration::from_secs(5);

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

/// Pids of all processes whose real uid is `uid`.
pub fn pids_of_uid(uid: u32) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|&pid| real_uid(pid) == Some(uid))
        .collect()
}

pub fn sigkill(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// SIGKILLs every process of `uid` until none is left or `within` has
/// passed (re-parented zombies are reaped by init); the pids that are
/// still there.
pub fn kill_processes_of(uid: u32, within: Duration) -> Vec<u32> {
    let deadline = Instant::now() + within;
    loop {
        let all = pids_of_uid(uid);
        if all.is_empty() || Instant::now() > deadline {
            return all;
        }
        for p in all {
            if !proc_state(p).unwrap_or_default().starts_with('Z') {
                sigkill(p);
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The real uid of a process, None if it is gone.
pub(crate) fn real_uid(pid: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub(crate) fn proc_state(pid: u32) -> Option<String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("State:"))?;
    Some(line["State:".len()..].trim().to_string())
}

/// A process's command line, its arguments joined by spaces ("" once it is
/// gone).
pub(crate) fn proc_cmdline(pid: u32) -> String {
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

pub(crate) fn describe_process(pid: u32) -> String {
    let cmdline = proc_cmdline(pid);
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    format!(
        "pid {pid} ({}) [{}] {cmdline}",
        comm.trim(),
        proc_state(pid).unwrap_or_else(|| "gone".into())
    )
}

/// Field 22 of /proc/PID/stat: the start time, in clock ticks since boot.
pub fn start_time(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &text[text.rfind(')')? + 1..];
    after.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// The parent pid of `pid`, None once it is gone.
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The processes whose parent is `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|&p| parent_of(p) == Some(pid))
        .collect()
}

/// Pids below `pid` (not `pid` itself), by parent pid, from one pass over
/// /proc.
pub fn descendants(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = all_pids()
        .into_iter()
        .filter_map(|p| Some((p, parent_of(p)?)))
        .collect();
    let mut found = vec![pid];
    let mut at = 0;
    while at < found.len() {
        let parent = found[at];
        found.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        at += 1;
    }
    found.remove(0);
    found
}

/// Every pid in /proc.
pub(crate) fn all_pids() -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .collect()
}
