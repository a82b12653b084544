//! (a) and (d) of the ports phase: many connections held open at once through
//! the builtin driver, and opened at once through the slirp4netns driver.

use super::client::{self, Held};
use super::measure::{
    fd_count, listen_overflows, nofile, peak, pipe_sizes, read_sysctl, secs, time_to, Peak,
};
use super::{Line, Plan, CONN_FDS, FD_RESERVE};
use crate::footprint::proc_kib;
use crate::iperf::{client_args, iperf_client};
use crate::stats::{gbits_runs, median, mib, ms, ratio};
use crate::Res;
use std::net::SocketAddr;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

/// (a): rounds of N held connections, the direct server and the builtin
/// driver alternating (ABBA); the supervisor measured at the peak of each
/// builtin round, and one iperf3 stream through the driver beside the held
/// connections and after they closed.
pub(super) fn held_many(
    p: &Plan,
    sup: u64,
    builtin: SocketAddr,
    direct: SocketAddr,
    iperf_port: u16,
    own_hard: u64,
) -> Res<(Vec<Line>, String)> {
    let n = p.conns;
    let each = Duration::from_secs(10);
    let bound = Duration::from_secs(120);
    let (soft, hard) = nofile(sup).ok_or("no fd limit of the supervisor")?;
    let base_fds = fd_count(sup) as u64;
    // What the forwarder can hold: its fd budget (the soft limit, raised to
    // the hard one at start, less the reserve) over the fds per connection.
    let capacity = (soft.saturating_sub(FD_RESERVE) / CONN_FDS) as usize;
    if own_hard < n as u64 + 64 {
        return Err(format!(
            "the bench's own fd hard limit ({own_hard}) cannot hold {n} client sockets: \
             raise it (ulimit -Hn) as root with CAP_SYS_RESOURCE"
        ));
    }
    let expect = n.min(capacity);
    let iperf = |what: &str| {
        let mut c = Command::new("iperf3");
        c.args(&client_args("127.0.0.1", iperf_port, p.iperf_secs)[1..]);
        iperf_client(c, what)
    };
    let (mut t_direct, mut t_builtin) = (Vec::new(), Vec::new());
    let (mut bw_held, mut bw_free) = (Vec::new(), Vec::new());
    let mut served_min = usize::MAX;
    let mut reset_max = 0;
    // (connections held, VmRSS before, the supervisor at the peak), per
    // builtin round
    let mut peaks: Vec<(usize, u64, Peak)> = Vec::new();
    let mut again_ms = Vec::new();
    let mut overflows = (0, 0);
    let mut close_ms = Vec::new();
    for r in 0..p.conn_rounds {
        let order = if r % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for through in order {
            let (addr, what) = if through {
                (builtin, "builtin driver")
            } else {
                (direct, "host loopback directly")
            };
            let before = listen_overflows();
            let rss_before = proc_kib(sup, "status", "VmRSS:").unwrap_or(0);
            let (mut held, opened) = Held::open(addr, n, p.window, each, bound)
                .map_err(|e| format!("{what}: client: {e}"))?;
            let dropped = listen_overflows().saturating_sub(before);
            if through {
                overflows.0 += dropped;
            } else {
                overflows.1 += dropped;
            }
            progress!(
                "published ports: (a) {what}: {} of {n} echoing in {} (failed: {})",
                opened.ok,
                secs(opened.wall),
                opened.failed_text()
            );
            if !through {
                if opened.ok < n {
                    return Err(format!(
                        "{what}: {} of {n} connections failed; first: {}",
                        opened.failures(),
                        opened.first_failure.unwrap_or_default()
                    ));
                }
                t_direct.push(opened.wall.as_secs_f64() * 1e3);
            } else {
                let hung = opened.failed.get(&client::Fail::Timeout).copied();
                if opened.ok + 10 < expect || hung.is_some() {
                    return Err(format!(
                        "{what}: {} of {n} connections echo, {expect} expected (fd budget \
                         {capacity}); failed: {}; first: {}",
                        opened.ok,
                        opened.failed_text(),
                        opened.first_failure.unwrap_or_default()
                    ));
                }
                served_min = served_min.min(opened.ok);
                reset_max = reset_max.max(opened.failures());
                t_builtin.push(opened.wall.as_secs_f64() * 1e3);
                peaks.push((opened.ok, rss_before, peak(sup)));
            }
            let again = held
                .echo_again(p.window, each)
                .map_err(|e| format!("{what}: client: {e}"))?;
            if again.failures() > 0 {
                return Err(format!(
                    "{what}: {} of {} held connections did not echo again: {}",
                    again.failures(),
                    held.ready(),
                    again.failed_text()
                ));
            }
            again_ms.push((through, again.wall.as_secs_f64() * 1e3));
            if through {
                // At the fd bound, room for iperf3's two connections.
                if opened.ok < n {
                    let fds = fd_count(sup);
                    held.close_some(4, each)
                        .map_err(|e| format!("{what}: client: {e}"))?;
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while fd_count(sup) + 2 * CONN_FDS as usize > fds && Instant::now() < deadline {
                        thread::sleep(Duration::from_millis(20));
                    }
                }
                bw_held.push(iperf("iperf3 beside the held connections")?);
            }
            let closed = held
                .close(p.window, each)
                .map_err(|e| format!("{what}: client: {e}"))?;
            close_ms.push((through, closed.wall.as_secs_f64() * 1e3));
            if through {
                // The forwarder lets go of its side once both are closed.
                let deadline = Instant::now() + Duration::from_secs(10);
                while fd_count(sup) as u64 > base_fds + 8 && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(50));
                }
                bw_free.push(iperf("iperf3 with no connection held")?);
            }
        }
    }
    let mut rows: Vec<Line> = Vec::new();
    let all = served_min >= n;
    rows.push((
        format!("(a) {n} concurrent echoing connections through one port, builtin driver: served (fewest of {} rounds)", p.conn_rounds),
        if all {
            format!("{served_min} of {n}")
        } else {
            format!(
                "{served_min} of {n}; {reset_max} reset at once: the supervisor's fd limit \
                 {soft} (hard {hard}) holds {capacity} at {CONN_FDS} fds each"
            )
        },
        Some((format!("all {n}"), all)),
    ));
    let (td, tb) = (median(&t_direct), median(&t_builtin));
    rows.push((
        format!("(a) time to establish them all (connect + first echo, {} at a time): builtin / host loopback directly", p.window),
        format!("{} / {}", ms(tb), ms(td)),
        None,
    ));
    rows.push((
        "(a) SYNs dropped for a full accept queue while establishing (host-wide ListenOverflows, all rounds): builtin / direct".into(),
        format!("{} / {}", overflows.0, overflows.1),
        None,
    ));
    rows.push((
        "(a) ratio of those times builtin / direct".into(),
        if all {
            ratio(tb / td)
        } else {
            format!(
                "{} (builtin served {served_min}, direct {n})",
                ratio(tb / td)
            )
        },
        None,
    ));
    let threads = peaks.iter().map(|p| p.2.threads).max().unwrap_or(0);
    rows.push((
        "(a) supervisor threads at the peak".into(),
        threads.to_string(),
        Some(("≤ 8".into(), threads <= 8)),
    ));
    let rss = peaks.iter().map(|p| p.2.rss_kib).max().unwrap_or(0);
    let hwm = peaks.iter().map(|p| p.2.hwm_kib).max().unwrap_or(0);
    // What a held connection adds (KiB), the most of any round.
    let per_conn = peaks
        .iter()
        .map(|(held, before, pk)| pk.rss_kib.saturating_sub(*before) as f64 / (*held).max(1) as f64)
        .fold(0.0, f64::max);
    let base = peaks.iter().map(|p| p.1).max().unwrap_or(0);
    // With fewer held than N, the target is judged on N at the same cost
    // per connection.
    let projected = base as f64 + per_conn * n as f64;
    let rss_ok = if all {
        rss <= 64 * 1024
    } else {
        projected <= 64.0 * 1024.0
    };
    rows.push((
        "(a) supervisor VmRSS at the peak (VmHWM)".into(),
        if all {
            format!(
                "{} ({}): {} before, {per_conn:.2} KiB more per connection",
                mib(rss),
                mib(hwm),
                mib(base)
            )
        } else {
            format!(
                "{} ({}) with {served_min} held: {} before, {per_conn:.2} KiB more per \
                 connection, ≈ {} for {n}",
                mib(rss),
                mib(hwm),
                mib(base),
                mib(projected as u64)
            )
        },
        Some(("≤ 64 MiB".into(), rss_ok)),
    ));
    let fds = peaks.iter().map(|p| p.2.fds).max().unwrap_or(0);
    rows.push((
        "(a) supervisor fds at the peak; its RLIMIT_NOFILE soft / hard".into(),
        format!("{fds}; {soft} / {hard}"),
        None,
    ));
    let again_b: Vec<f64> = again_ms.iter().filter(|a| a.0).map(|a| a.1).collect();
    let again_d: Vec<f64> = again_ms.iter().filter(|a| !a.0).map(|a| a.1).collect();
    let close_b: Vec<f64> = close_ms.iter().filter(|a| a.0).map(|a| a.1).collect();
    let close_d: Vec<f64> = close_ms.iter().filter(|a| !a.0).map(|a| a.1).collect();
    rows.push((
        "(a) every held connection echoes again: builtin / direct; closing them all".into(),
        format!(
            "{} / {}; {} / {}",
            ms(median(&again_b)),
            ms(median(&again_d)),
            ms(median(&close_b)),
            ms(median(&close_d))
        ),
        None,
    ));
    let pipe_text = peaks.last().map(|p| pipe_sizes(&p.2)).unwrap_or_default();
    rows.push((
        format!(
            "(a) the supervisor's pipes at the peak (fs.pipe-user-pages-soft = {} pages)",
            read_sysctl("fs.pipe-user-pages-soft")
        ),
        pipe_text.clone(),
        None,
    ));
    rows.push((
        "(a) one iperf3 stream through the builtin driver beside the held connections / none held"
            .into(),
        format!("{} / {}", gbits_runs(&bw_held), gbits_runs(&bw_free)),
        None,
    ));
    let md = format!(
        "### 7. Published ports: the supervisor at the peak of (a)\n\n\
         | round | held | threads | VmRSS | VmHWM | fds | pipes |\n|---|---|---|---|---|---|---|\n{}\n\n\
         An unprivileged user's pipes may hold `fs.pipe-user-pages-soft` pages in all ({}); \
         over it, a new pipe gets 2 pages (8 KiB) and cannot be grown. The forwarder asks \
         256 KiB (64 pages) per pipe, and only a direction moving bytes, or the idle pool \
         of 32, holds one: held connections cost no pipe (the pipes column; the iperf3 \
         row). Pipe buffers and socket buffers are kernel memory, not in \
         VmRSS. The bench's own fd hard limit: {own_hard}.\n",
        peaks
            .iter()
            .enumerate()
            .map(|(i, (held, _, pk))| format!(
                "| {} | {held} | {} | {} | {} | {} | {} |",
                i + 1,
                pk.threads,
                mib(pk.rss_kib),
                mib(pk.hwm_kib),
                pk.fds,
                pipe_sizes(pk)
            ))
            .collect::<Vec<_>>()
            .join("\n"),
        read_sysctl("fs.pipe-user-pages-soft"),
    );
    Ok((rows, md))
}

/// (d): the slirp4netns driver with `slirp_conns` connections opened at
/// once, for at most `slirp_bound`; the builtin driver the same way.
pub(super) fn slirp_many(p: &Plan, slirp: SocketAddr, builtin: SocketAddr) -> Res<Vec<Line>> {
    let n = p.slirp_conns;
    let mut rows = Vec::new();
    for (addr, what) in [(slirp, "slirp4netns"), (builtin, "builtin")] {
        let (held, out) = Held::open(addr, n, n, p.slirp_bound, p.slirp_bound)
            .map_err(|e| format!("{what}: client: {e}"))?;
        progress!(
            "published ports: (d) {what}: {} of {n} in {} (failed: {})",
            out.ok,
            secs(out.wall),
            out.failed_text()
        );
        if what == "builtin" && out.ok < n {
            return Err(format!(
                "builtin: {} of {n} opened at once failed: {}",
                out.failures(),
                out.failed_text()
            ));
        }
        let half = time_to(&out, n, 0.5).map_or("not reached".into(), secs);
        let last = out.ok_at.last().copied().map_or("none".into(), secs);
        rows.push((
            format!(
                "(d) {n} connections opened at once, {what} driver: echoing within {} (half by; the last at)",
                secs(p.slirp_bound)
            ),
            format!("{} of {n} (half: {half}; last: {last})", out.ok),
            None,
        ));
        let _ = held.close(n, Duration::from_secs(5));
    }
    Ok(rows)
}
