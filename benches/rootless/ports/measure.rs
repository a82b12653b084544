//! What the ports phase reads off the supervisor and the host (/proc, ss),
//! and how it writes it.

use super::client::Outcome;
use crate::footprint::proc_kib;
use std::collections::BTreeMap;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::process::Command;
use std::time::Duration;

/// The supervisor at the peak of (a).
pub(super) struct Peak {
    pub(super) threads: u64,
    pub(super) rss_kib: u64,
    pub(super) hwm_kib: u64,
    pub(super) fds: usize,
    /// Pipe capacity in bytes → how many pipes.
    pub(super) pipes: BTreeMap<usize, usize>,
}

pub(super) fn peak(sup: u64) -> Peak {
    let status = |k: &str| proc_kib(sup, "status", k).unwrap_or(0);
    let mut fds = 0;
    let mut seen = std::collections::HashSet::new();
    let mut pipes = BTreeMap::new();
    let dir = format!("/proc/{sup}/fd");
    for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
        fds += 1;
        let Ok(link) = fs::read_link(e.path()) else {
            continue;
        };
        let link = link.display().to_string();
        if !link.starts_with("pipe:") || !seen.insert(link) {
            continue;
        }
        // Opened anew through /proc (as a FIFO, without blocking): the
        // capacity is the pipe's, whichever end this fd is.
        let opened = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(e.path());
        if let Ok(f) = opened {
            if let Ok(size) = nix::fcntl::fcntl(f.as_raw_fd(), nix::fcntl::FcntlArg::F_GETPIPE_SZ) {
                *pipes.entry(size as usize).or_default() += 1;
            }
        }
    }
    Peak {
        threads: status("Threads:"),
        rss_kib: status("VmRSS:"),
        hwm_kib: status("VmHWM:"),
        fds,
        pipes,
    }
}

/// "Max open files" of a process: (soft, hard).
pub(super) fn nofile(pid: u64) -> Option<(u64, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let mut f = line["Max open files".len()..].split_whitespace();
    Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
}

/// Open fds of a process.
pub(super) fn fd_count(pid: u64) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The listen backlog of the TCP socket listening on 127.0.0.1:`port`, as
/// ss shows it (Send-Q of a listener).
pub(super) fn backlog(port: u16) -> String {
    let out = Command::new("ss")
        .args(["-Hltn", &format!("sport = :{port}")])
        .output();
    out.ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.lines()
                .next()?
                .split_whitespace()
                .nth(2)
                .map(String::from)
        })
        .unwrap_or_else(|| "?".into())
}

/// "256 × 256 KiB, 6388 × 8 KiB".
pub(super) fn pipe_sizes(p: &Peak) -> String {
    p.pipes
        .iter()
        .rev()
        .map(|(size, count)| format!("{count} × {}", kib(*size)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// TcpExt ListenOverflows of the host's network namespace (all of it:
/// other work on the machine counts too): SYNs dropped because a
/// listener's accept queue was full.
pub(super) fn listen_overflows() -> u64 {
    let text = fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

pub(super) fn read_sysctl(name: &str) -> String {
    fs::read_to_string(format!("/proc/sys/{}", name.replace('.', "/")))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

pub(super) fn kib(bytes: usize) -> String {
    if bytes >= 1024 * 1024 {
        format!("{} MiB", bytes / 1024 / 1024)
    } else {
        format!("{} KiB", bytes / 1024)
    }
}

pub(super) fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// The time by which `share` of `n` had succeeded, if they had.
pub(super) fn time_to(out: &Outcome, n: usize, share: f64) -> Option<Duration> {
    let k = ((n as f64) * share).ceil() as usize;
    out.ok_at.get(k.max(1) - 1).copied()
}
