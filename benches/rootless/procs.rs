//! Processes of the driver: commands in the lab's session, children that die
//! with us, and small facts about the machine.

use crate::cleanup;
use crate::Res;
use lab::Lab;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

/// A command inside the lab's session as the lab user (what `Lab::exec`
/// runs, without its timeout and output collection).
pub(crate) fn session(lab: &Lab, env: &[(&str, &str)], argv: &[&str]) -> Command {
    lab.command(env, argv).0
}

/// A background process, killed and reaped on drop.
pub(crate) struct Background {
    pub(crate) child: Child,
    pub(crate) what: String,
}

impl Background {
    pub(crate) fn spawn(mut cmd: Command, what: &str) -> Res<Background> {
        cmd.stdin(Stdio::null());
        let child = cmd.spawn().map_err(|e| format!("starting {what}: {e}"))?;
        cleanup::with(|l| l.pids.push(child.id()));
        Ok(Background {
            child,
            what: what.to_string(),
        })
    }

    /// Waits until a line of stdout contains `needle` (stdout must be piped).
    pub(crate) fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> Res<()> {
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

pub(crate) fn first_line(cmd: &str, args: &[&str]) -> String {
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
pub(crate) fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(String::from))
        .unwrap_or_else(|| "?".into())
}

/// `p` relative to the repository, when it is inside.
pub(crate) fn relative(p: &Path) -> String {
    p.strip_prefix(env!("CARGO_MANIFEST_DIR"))
        .unwrap_or(p)
        .display()
        .to_string()
}
