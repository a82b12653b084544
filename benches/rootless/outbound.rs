//! Phase 6 of the benchmark: the infra's two ways out, slirp4netns and
//! pasta, side by side in one run, A and B alternating: what a user feels
//! of each (cold start of the infra, container → host throughput at MTU
//! 1500 and 65520, short connections per second, the outbound process's
//! memory) and how long containers are cut off when it dies (the
//! supervisor's restart, timed from the SIGKILL to the first new TCP
//! connection from a container to the host, and to `status` showing the
//! way out up again).

use crate::driver::{self, Attached, Cx};
use crate::footprint::vm_rss_kib;
use crate::iperf::{self, IPERF_PORT};
use crate::netconf::{conflist, stdin_conf, Chain, NetOpts};
use crate::rounds;
use crate::stats::{self, median, mib, ms, ratio};
use crate::Res;
use lab::Container;
use serde_json::{json, Value};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

const ENGINES: [&str; 2] = ["slirp4netns", "pasta"];
/// Each connection attempt after a kill gives up this soon: a SYN sent
/// while the engine is down is lost, and waiting for the kernel's
/// retransmission (1 s) would hide the restart.
const ATTEMPT: Duration = Duration::from_millis(10);
/// A restart that takes longer than this is an error, not a figure.
const GIVE_UP: Duration = Duration::from_secs(20);

fn opts(cx: &Cx, engine: &'static str, name: &str, mtu: Option<u32>) -> NetOpts {
    NetOpts {
        mtu,
        state_dir: Some(driver::state_dir_path(
            cx,
            &format!("bench-{engine}-{name}"),
        )),
        outbound: Some(engine),
        ..NetOpts::default()
    }
}

fn conf(o: &NetOpts) -> Value {
    stdin_conf(&conflist(Chain::Full, o), None)
}

pub fn phase(cx: &mut Cx, section: &'static str) -> Res<()> {
    let mut rows: Vec<(String, String)> = Vec::new();
    {
        let cx: &Cx = cx;
        let rounds = cx.plan.iperf_rounds.max(2);
        let secs = cx.plan.iperf_secs;

        // Cold start: the first ADD starts the infra, the DEL stops it.
        progress!("outbound: cold ADD (infra start), slirp4netns vs pasta");
        let cold = |engine: &'static str| -> Res<f64> {
            let o = opts(cx, engine, "cold", None);
            let started = Instant::now();
            let a = Attached::add(cx, &format!("bench-cold-{engine}"), conf(&o))?;
            let took = started.elapsed().as_secs_f64() * 1e3;
            drop(a);
            Ok(took)
        };
        let (cold_s, cold_p) = rounds::alternate(rounds, || cold("slirp4netns"), || cold("pasta"))?;
        rows.push((
            "cold ADD (infra started), slirp4netns".into(),
            ms(median(&cold_s)),
        ));
        rows.push((
            "cold ADD (infra started), pasta".into(),
            ms(median(&cold_p)),
        ));
        rows.push((
            "ratio pasta / slirp4netns, cold ADD".into(),
            ratio(median(&cold_p) / median(&cold_s)),
        ));

        // Container → host's loopback, both MTUs.
        let port = lab::free_tcp_port();
        let mut host_srv = std::process::Command::new("iperf3");
        host_srv.args([
            "-s",
            "-B",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--forceflush",
        ]);
        let _srv = iperf::iperf_server(host_srv, "iperf3 server on the host's 127.0.0.1")?;
        let mut attached = Vec::new();
        for mtu in [1500, 65520] {
            let [s, p] = ENGINES.map(|e| {
                Attached::add(
                    cx,
                    &format!("bench-{e}-{mtu}"),
                    conf(&opts(cx, e, &mtu.to_string(), Some(mtu))),
                )
            });
            let (s, p) = (s?, p?);
            progress!("outbound: container → host, MTU {mtu}, slirp4netns vs pasta");
            let client = |a: &Attached, what: &str| {
                iperf::iperf_client(
                    iperf::in_container(cx, &a.c, &iperf::client_args("10.0.2.2", port, secs)),
                    what,
                )
            };
            let (bs, bp) = rounds::alternate(
                rounds,
                || client(&s, "slirp4netns client"),
                || client(&p, "pasta client"),
            )?;
            rows.push((
                format!("container → host (10.0.2.2), MTU {mtu}, slirp4netns"),
                stats::gbits_runs(&bs),
            ));
            rows.push((
                format!("container → host (10.0.2.2), MTU {mtu}, pasta"),
                stats::gbits_runs(&bp),
            ));
            rows.push((
                format!("ratio pasta / slirp4netns, MTU {mtu}"),
                stats::ratio_runs(&bp, &bs).1,
            ));
            attached.push((s, p));
        }

        // Host → container through a published port: the builtin driver,
        // the same forwarder with either engine (shown, not assumed).
        let (ps, pp) = (lab::free_tcp_port(), lab::free_tcp_port());
        let published = |engine: &'static str, hp: u16| {
            let mapping = json!({ "portMappings": [{ "hostPort": hp, "containerPort": IPERF_PORT, "protocol": "tcp", "hostIP": "127.0.0.1" }] });
            let o = opts(cx, engine, "published", None);
            Attached::add(
                cx,
                &format!("bench-{engine}-published"),
                stdin_conf(&conflist(Chain::Full, &o), Some(mapping)),
            )
        };
        let (pub_s, pub_p) = (published("slirp4netns", ps)?, published("pasta", pp)?);
        let _srv_s = iperf::container_server(cx, &pub_s.c, "iperf3 server, slirp4netns infra")?;
        let _srv_p = iperf::container_server(cx, &pub_p.c, "iperf3 server, pasta infra")?;
        progress!(
            "outbound: host → container through a published port, slirp4netns vs pasta infra"
        );
        let host_client = |hp: u16, what: &str| {
            let mut c = std::process::Command::new("iperf3");
            c.args(&iperf::client_args("127.0.0.1", hp, secs)[1..]);
            iperf::iperf_client(c, what)
        };
        let (bs, bp) = rounds::alternate(
            rounds,
            || host_client(ps, "published port client, slirp4netns infra"),
            || host_client(pp, "published port client, pasta infra"),
        )?;
        rows.push((
            "host → container through a published port (builtin), slirp4netns infra".into(),
            stats::gbits_runs(&bs),
        ));
        rows.push((
            "host → container through a published port (builtin), pasta infra".into(),
            stats::gbits_runs(&bp),
        ));
        drop((_srv_s, _srv_p, pub_s, pub_p));

        // The outbound process after the throughput runs.
        for engine in ENGINES {
            let state_dir = opts(cx, engine, "65520", None)
                .state_dir
                .unwrap_or_default();
            let pid = driver::infra_pid(&driver::status(cx, Some(&state_dir))?, engine)?;
            let kib = vm_rss_kib(pid).ok_or_else(|| format!("no VmRSS for {engine} {pid}"))?;
            rows.push((
                format!("{engine} VmRSS after the throughput runs"),
                mib(kib),
            ));
        }
        let (s, p) = &attached[1];

        // Short connections: connect and close, for `secs` seconds.
        progress!("outbound: container → host connections per second, slirp4netns vs pasta");
        let span = Duration::from_secs(secs.into());
        let (lost_s, lost_p) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let (cs, cp) = with_host_listener(|target| {
            rounds::alternate(
                rounds,
                || connections_per_second(&s.c, target, span, &lost_s),
                || connections_per_second(&p.c, target, span, &lost_p),
            )
        })?;
        for (engine, v, lost) in [("slirp4netns", &cs, &lost_s), ("pasta", &cp, &lost_p)] {
            rows.push((
                format!("container → host TCP connections per second, {engine}"),
                format!(
                    "{:.0}/s ({} failed or not made within 2 s)",
                    median(v),
                    lost.load(Ordering::Relaxed)
                ),
            ));
        }
        rows.push((
            "ratio pasta / slirp4netns, connections per second".into(),
            stats::ratio_runs(&cp, &cs).1,
        ));

        // Connections held at once, opened one after another.
        let want = cx.plan.outbound_held;
        // The held sockets are this process's fds.
        crate::ports::raise_nofile();
        progress!(
            "outbound: {want} container → host connections held at once, slirp4netns vs pasta"
        );
        for (engine, a) in [("slirp4netns", s), ("pasta", p)] {
            let (held, took) = with_host_listener(|target| held_at_once(&a.c, target, want))?;
            rows.push((
                format!("container → host connections held at once, {engine}"),
                format!("{held} of {want} in {}", ms(took)),
            ));
        }

        // The way out killed: until a container reaches the host again.
        for (engine, a) in [("slirp4netns", s), ("pasta", p)] {
            progress!("outbound: {engine} SIGKILLed and restarted");
            let state_dir = opts(cx, engine, "65520", None)
                .state_dir
                .unwrap_or_default();
            let (reach, up) = restarts(cx, engine, &state_dir, &a.c, rounds)?;
            rows.push((
                format!("{engine} SIGKILLed → first new container → host connection"),
                ms(median(&reach)),
            ));
            rows.push((
                format!(
                    "{engine} SIGKILLed → `status` shows it up again (includes the status call)"
                ),
                ms(median(&up)),
            ));
        }
        drop(attached);
    }
    for (measure, result) in rows {
        cx.report.fig(section, measure, result);
    }
    Ok(())
}

/// Runs `f` with a server on the host's loopback that accepts and drops
/// connections, given its address as a container reaches it.
fn with_host_listener<T>(f: impl FnOnce(SocketAddr) -> Res<T>) -> Res<T> {
    let server = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("host server: {e}"))?;
    // A burst of connections must not meet std's backlog of 128.
    nix::sys::socket::listen(&server, nix::sys::socket::Backlog::MAXALLOWABLE)
        .map_err(|e| format!("host server: {e}"))?;
    let port = server
        .local_addr()
        .map_err(|e| format!("host server: {e}"))?
        .port();
    let done = AtomicBool::new(false);
    thread::scope(|s| {
        s.spawn(|| {
            for conn in server.incoming() {
                if conn.is_err() || done.load(Ordering::Relaxed) {
                    break;
                }
            }
        });
        let out = f(SocketAddr::from(([10, 0, 2, 2], port)));
        // Unblocks the accept loop, which then ends, whatever happened.
        done.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", port));
        out
    })
}

/// A thread in the container's network namespace runs `f`.
fn in_netns<T: Send>(c: &Container, f: impl FnOnce() -> Res<T> + Send) -> Res<T> {
    let netns = std::fs::File::open(c.netns())
        .map_err(|e| format!("the container's netns {}: {e}", c.netns()))?;
    thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("joining the container's netns: {e}"))?;
            f()
        })
        .join()
        .map_err(|_| "a thread in the container's netns panicked".to_string())?
    })
}

/// Connections opened and closed one after another from container `c` to
/// `target` for `span`, per second; a connection refused or not made
/// within 2 s is counted in `lost`, not in the rate.
fn connections_per_second(
    c: &Container,
    target: SocketAddr,
    span: Duration,
    lost: &AtomicUsize,
) -> Res<f64> {
    in_netns(c, || {
        let started = Instant::now();
        let mut n = 0u64;
        while started.elapsed() < span {
            match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
                Ok(_) => n += 1,
                Err(_) => {
                    lost.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(n as f64 / started.elapsed().as_secs_f64())
    })
}

/// Opens up to `want` connections from container `c` to `target` and holds
/// them all: how many opened before the first failure, and how long (ms).
fn held_at_once(c: &Container, target: SocketAddr, want: usize) -> Res<(usize, f64)> {
    in_netns(c, || {
        let started = Instant::now();
        let mut held = Vec::with_capacity(want);
        while held.len() < want {
            match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
                Ok(conn) => held.push(conn),
                Err(_) => break,
            }
        }
        Ok((held.len(), started.elapsed().as_secs_f64() * 1e3))
    })
}

/// Kills the infra's `engine` `rounds` times; each time how long (ms) until
/// a new connection from `c` to the host works, and until `status` shows a
/// new engine process up.
fn restarts(
    cx: &Cx,
    engine: &str,
    state_dir: &str,
    c: &Container,
    rounds: usize,
) -> Res<(Vec<f64>, Vec<f64>)> {
    let (mut reach, mut up) = (Vec::new(), Vec::new());
    let netns = std::fs::File::open(c.netns())
        .map_err(|e| format!("the container's netns {}: {e}", c.netns()))?;
    with_host_listener(|target| {
        thread::scope(|s| -> Res<()> {
            for round in 0..rounds {
                let old = driver::infra_pid(&driver::status(cx, Some(state_dir))?, engine)?;
                // A prober in the container's netns, ready before the kill.
                let (go, started) = mpsc::channel::<Instant>();
                let prober = s.spawn(|| probe(&netns, target, started));
                kill_engine(cx, engine, old)?;
                let killed = Instant::now();
                let _ = go.send(killed);
                let reached = prober
                    .join()
                    .map_err(|_| "the prober panicked".to_string())??;
                reach.push(reached.duration_since(killed).as_secs_f64() * 1e3);
                let back = loop {
                    let st = driver::status(cx, Some(state_dir))?;
                    let new = driver::infra_pid(&st, engine).ok();
                    if st["infra"]["outbound"]["up"] == true && new.is_some_and(|p| p != old) {
                        break Instant::now();
                    }
                    if killed.elapsed() > GIVE_UP {
                        return Err(format!("{engine} not back after {GIVE_UP:?}: {st}"));
                    }
                    thread::sleep(Duration::from_millis(5));
                };
                up.push(back.duration_since(killed).as_secs_f64() * 1e3);
                progress!(
                    "{engine} restart {}/{rounds}: host reached after {:.1} ms",
                    round + 1,
                    reach[round]
                );
            }
            Ok(())
        })
    })?;
    Ok((reach, up))
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

/// SIGKILLs the infra's `engine` process, after making sure `pid` is one of
/// the lab uid's processes running that program.
fn kill_engine(cx: &Cx, engine: &str, pid: u64) -> Res<()> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    // pasta re-executes itself as passt (or passt.avx2).
    let names: &[&str] = match engine {
        "pasta" => &["pasta", "passt", "passt.avx2"],
        _ => &[engine],
    };
    if !names.contains(&comm.trim()) || !cx.lab.is_running(pid as u32) {
        return Err(format!("pid {pid} is not the lab's {engine} ({comm:?})"));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .map_err(|e| format!("killing {engine} {pid}: {e}"))
}
