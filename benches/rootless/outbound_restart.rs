//! Phase 6 of the benchmark: how long containers are cut off from the
//! outside when the infra's slirp4netns dies. The supervisor restarts it;
//! timed from the SIGKILL to the first new TCP connection from a container
//! to a server on the host (what a user feels), and to `status` showing the
//! way out up again with a new slirp4netns.

use super::driver::{self, Attached, Cx};
use super::{conflist, median, ms, stdin_conf, Chain, NetOpts, Res};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Each connection attempt gives up this soon: a SYN sent while slirp4netns
/// is down is lost, and waiting for the kernel's retransmission (1 s) would
/// hide the restart.
const ATTEMPT: Duration = Duration::from_millis(10);
/// A restart that takes longer than this is an error, not a figure.
const GIVE_UP: Duration = Duration::from_secs(20);

pub fn phase(cx: &mut Cx, section: &'static str) -> Res<()> {
    let rounds = cx.plan.iperf_rounds.max(2);
    let (mut reach, mut up) = (Vec::new(), Vec::new());
    {
        let cx: &Cx = cx;
        let state_dir = driver::state_dir_path(cx, "bench-restart");
        let opts = NetOpts {
            state_dir: Some(state_dir.clone()),
            ..NetOpts::default()
        };
        let a = Attached::add(
            cx,
            "bench-restart",
            stdin_conf(&conflist(Chain::Full, &opts), None),
        )?;
        // Accepts and drops: only the handshake is timed.
        let server = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("host server: {e}"))?;
        let port = server
            .local_addr()
            .map_err(|e| format!("host server: {e}"))?
            .port();
        let target = SocketAddr::from(([10, 0, 2, 2], port));
        let netns = std::fs::File::open(a.c.netns())
            .map_err(|e| format!("the container's netns {}: {e}", a.c.netns()))?;
        let done = AtomicBool::new(false);
        thread::scope(|s| -> Res<()> {
            s.spawn(|| {
                for conn in server.incoming() {
                    if conn.is_err() || done.load(Ordering::Relaxed) {
                        break;
                    }
                }
            });
            let measured = (|| -> Res<()> {
                for round in 0..rounds {
                    let before = driver::status(cx, Some(&state_dir))?;
                    let old = driver::infra_pid(&before, "slirp4netns")?;
                    // A prober in the container's netns, ready before the kill.
                    let (go, started) = mpsc::channel::<Instant>();
                    let prober = s.spawn(|| probe(&netns, target, started));
                    kill_slirp4netns(cx, old)?;
                    let killed = Instant::now();
                    let _ = go.send(killed);
                    let reached = prober
                        .join()
                        .map_err(|_| "the prober panicked".to_string())??;
                    reach.push(reached.duration_since(killed).as_secs_f64() * 1e3);
                    let back = loop {
                        let st = driver::status(cx, Some(&state_dir))?;
                        let new = driver::infra_pid(&st, "slirp4netns").ok();
                        if st["infra"]["outbound"]["up"] == true && new.is_some_and(|p| p != old) {
                            break Instant::now();
                        }
                        if killed.elapsed() > GIVE_UP {
                            return Err(format!("slirp4netns not back after {GIVE_UP:?}: {st}"));
                        }
                        thread::sleep(Duration::from_millis(5));
                    };
                    up.push(back.duration_since(killed).as_secs_f64() * 1e3);
                    progress!(
                        "restart {}/{rounds}: host reached after {:.1} ms",
                        round + 1,
                        reach[round]
                    );
                }
                Ok(())
            })();
            // Unblocks the accept loop, which then ends, whatever happened.
            done.store(true, Ordering::Relaxed);
            let _ = TcpStream::connect(("127.0.0.1", port));
            measured
        })?;
        drop(a);
    }
    cx.report.fig(
        section,
        "slirp4netns SIGKILLed → first new container → host connection (median)",
        ms(median(&reach)),
    );
    cx.report.fig(
        section,
        "slirp4netns SIGKILLed → `status` shows the way out up, new slirp4netns (median; includes the status call)",
        ms(median(&up)),
    );
    Ok(())
}

/// Waits for the kill, then connects to `target` from `netns` until one
/// handshake completes; the instant it did.
fn probe(
    netns: &std::fs::File,
    target: SocketAddr,
    started: mpsc::Receiver<Instant>,
) -> Res<Instant> {
    nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("joining the container's netns: {e}"))?;
    let killed = started.recv().map_err(|_| "no kill happened".to_string())?;
    while killed.elapsed() < GIVE_UP {
        match TcpStream::connect_timeout(&target, ATTEMPT) {
            Ok(_) => return Ok(Instant::now()),
            // Unreachable while the tap is gone: do not spin a core.
            Err(_) => thread::sleep(Duration::from_millis(1)),
        }
    }
    Err(format!(
        "no connection to {target} within {GIVE_UP:?} of the kill"
    ))
}

/// SIGKILLs the infra's slirp4netns, after making sure `pid` is one of the
/// lab uid's slirp4netns processes.
fn kill_slirp4netns(cx: &Cx, pid: u64) -> Res<()> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() != "slirp4netns" || !cx.lab.is_running(pid as u32) {
        return Err(format!("pid {pid} is not the lab's slirp4netns ({comm:?})"));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .map_err(|e| format!("killing slirp4netns {pid}: {e}"))
}
