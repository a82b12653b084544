//! What /proc says about a process: enough to tell "our process, still
//! running" from a zombie or a reused PID.

use serde::{Deserialize, Serialize};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A process as we recorded it: a PID alone is not an identity once the
/// machine has rebooted or the PID was reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    pub pid: i32,
    /// Field 22 of /proc/PID/stat, in clock ticks since boot.
    pub start_time: u64,
}

impl ProcessId {
    pub fn of(pid: i32) -> Option<Self> {
        let (_, start_time) = stat(pid)?;
        Some(ProcessId { pid, start_time })
    }

    /// Exists, is not a zombie, and is the very process we recorded.
    pub fn is_alive(&self) -> bool {
        matches!(stat(self.pid), Some((state, start)) if start == self.start_time && state != 'Z' && state != 'X')
    }

    /// Sends `sig` only if the PID still belongs to the recorded process
    /// and it runs what we expect (`marker` is one of its arguments, or the
    /// end of its program name): a record that names another process,
    /// however it came about, never gets it killed.
    /// True when it was signalled.
    pub fn signal(&self, sig: nix::sys::signal::Signal, marker: &str) -> bool {
        self.signal_if(sig, |p| p.runs(marker))
    }

    /// Sends `sig` if the PID is still the recorded process and `check`
    /// holds for it. Every signal we send to a process goes through here:
    /// the process is pinned by a pidfd *before* the checks, so a PID freed
    /// and reused between check and signal is never signalled. True when
    /// it was signalled.
    pub fn signal_if(
        &self,
        sig: nix::sys::signal::Signal,
        check: impl FnOnce(&ProcessId) -> bool,
    ) -> bool {
        let pidfd = crate::sys::pidfd_open(self.pid);
        if !self.is_alive() || !check(self) {
            return false;
        }
        match pidfd {
            Some(fd) => crate::sys::pidfd_send_signal(&fd, sig),
            // A kernel without pidfds (before 5.3): checked, then signalled.
            None => nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), sig).is_ok(),
        }
    }

    /// SIGKILL to the process group this process leads, if it is still the
    /// recorded process, leads its group and `check` holds: what it started
    /// (an inner plugin's iptables) dies with it. The leader is pinned
    /// while checked, then its group is killed, then the leader through its
    /// pidfd; a group outlives its leader only while a member lives, so the
    /// group id cannot name strangers then. True when signalled.
    pub fn kill_group_if(&self, check: impl FnOnce(&ProcessId) -> bool) -> bool {
        use nix::sys::signal::Signal::SIGKILL;
        let pid = nix::unistd::Pid::from_raw(self.pid);
        let pidfd = crate::sys::pidfd_open(self.pid);
        if !self.is_alive() || !check(self) {
            return false;
        }
        let group = nix::unistd::getpgid(Some(pid)) == Ok(pid)
            && nix::sys::signal::killpg(pid, SIGKILL).is_ok();
        let leader = match pidfd {
            Some(fd) => crate::sys::pidfd_send_signal(&fd, SIGKILL),
            None => nix::sys::signal::kill(pid, SIGKILL).is_ok(),
        };
        group || leader
    }

    /// `marker` is one of its arguments, or the end of its program name.
    pub fn runs(&self, marker: &str) -> bool {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", self.pid)).unwrap_or_default();
        cmdline
            .split(|b| *b == 0)
            .map(String::from_utf8_lossy)
            .any(|arg| arg == marker || arg.ends_with(&format!("/{marker}")))
    }
}

/// (state, start time) from /proc/PID/stat. The command name may hold
/// spaces and parentheses, so fields are counted after the last ')'.
pub fn stat(pid: i32) -> Option<(char, u64)> {
    if pid <= 0 {
        return None;
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &text[text.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // After the state come fields 4..; the start time is field 22.
    let start = fields.nth(22 - 4)?.parse().ok()?;
    Some((state, start))
}

/// Inode of a namespace file such as /proc/PID/ns/net: equal inodes mean the
/// same namespace.
pub fn ns_inode(path: impl AsRef<Path>) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.ino())
}

pub fn self_ns_inode(kind: &str) -> Option<u64> {
    ns_inode(format!("/proc/self/ns/{kind}"))
}

/// The processes in the network namespace of inode `netns`, the caller
/// aside: what runs in an infra, found by the namespace itself rather than
/// by names or parents (a daemon an inner plugin started has neither).
pub fn in_netns(netns: u64) -> Vec<ProcessId> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me && ns_inode(format!("/proc/{pid}/ns/net")) == Some(netns))
        .filter_map(ProcessId::of)
        .collect()
}

/// SIGKILL to `p` if it is still the process recorded and still in the
/// network namespace `netns` (pinned by a pidfd before the check, see
/// `ProcessId::signal_if`). True when killed.
pub fn kill_in_netns(p: &ProcessId, netns: u64) -> bool {
    p.signal_if(nix::sys::signal::Signal::SIGKILL, |p| {
        ns_inode(format!("/proc/{}/ns/net", p.pid)) == Some(netns)
    })
}

/// Seconds since boot, to turn a start time into an uptime.
pub fn uptime_seconds(p: &ProcessId) -> Option<u64> {
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    if ticks <= 0 {
        return None;
    }
    let started = p.start_time as f64 / ticks as f64;
    Some((uptime - started).max(0.0) as u64)
}

/// How many threads this process runs (the entries of /proc/self/task);
/// 0 when that cannot be read.
pub fn own_thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_is_alive_and_a_fake_start_time_is_not() {
        let me = ProcessId::of(std::process::id() as i32).unwrap();
        assert!(me.is_alive());
        let other = ProcessId {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!other.is_alive());
        assert!(!ProcessId {
            pid: 0,
            start_time: 0
        }
        .is_alive());
    }

    #[test]
    fn in_netns_finds_a_child_and_leaves_out_the_caller() {
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        let child_id = ProcessId::of(child.id() as i32).unwrap();
        let here = in_netns(self_ns_inode("net").unwrap());
        let _ = child.kill();
        let _ = child.wait();
        assert!(here.contains(&child_id), "{here:?} lacks {child_id:?}");
        assert!(here.iter().all(|p| p.pid != std::process::id() as i32));
        assert!(in_netns(0).is_empty());
    }
}
