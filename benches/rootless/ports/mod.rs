//! Phase 7 of `scripts/bench`, published ports at scale
//! (`scripts/bench --only ports` runs it alone):
//!
//! (a) N (10,000) concurrent connections held through one port published
//!     by the builtin driver, each echoing: the time to establish them all
//!     against the same client on a server on the host's loopback directly;
//!     the supervisor's threads, memory, fds and pipe sizes at the peak, and
//!     one iperf3 stream beside them;
//! (b) iperf3, 1 and 8 parallel streams, host → a server behind a published
//!     port: our builtin driver, our slirp4netns driver, rootlesskit's own
//!     builtin port driver and pasta's port forwarding, rounds alternating;
//! (c) short connections per second (connect, one 16-byte echo, close):
//!     builtin, slirp4netns, a server on the host's loopback directly;
//! (d) the slirp4netns driver with 500 connections opened at once.
//!
//! The echo server (the worker task `echo_server`, in a container or on the
//! host) and the client (in the driver, as root on the host) are ours, on
//! mio: one thread each for any number of connections. Every message is a
//! 16-byte frame whose first byte says what the server does with it: `e`
//! echo, `o` echo then close, `q` close. The server always closes first, so
//! TIME_WAIT stays with its accepted sockets and never takes the ephemeral
//! ports of the client or of the forwarder's side in the infra.

mod client;
mod held;
mod measure;
mod peers;
mod rates;
mod server;

pub(crate) use server::echo_server;

use crate::driver::{infra_pid, state_dir_path, status, Attached, Cx};
use crate::iperf::{container_server, IPERF_PORT};
use crate::netconf::{conflist, stdin_conf, Chain, NetOpts};
use crate::Res;
use held::{held_many, slirp_many};
use lab::free_tcp_port;
use measure::{backlog, read_sysctl};
use peers::echo_server_in;
use rates::{per_second, throughput};
use serde_json::{json, Value};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

/// The port the echo server listens on in containers.
const ECHO_PORT: u16 = 7;
/// What the echo server prints once it listens.
const SERVER_READY: &str = "bench echo server listening";
/// Fds the forwarder leaves to the rest of the supervisor (64), keeps free
/// for pipes (64) and holds per listening port (1), and fds per idle TCP
/// connection (src/ports/forwarder.rs): what the supervisor's fd limit
/// allows.
const FD_RESERVE: u64 = 64 + 64 + 1;
const CONN_FDS: u64 = 2;

/// How much of everything.
#[derive(Clone, Copy)]
pub struct Plan {
    /// (a) connections held at once.
    conns: usize,
    /// (a) rounds, each the direct server and the builtin driver.
    conn_rounds: usize,
    /// Connections the client has connecting (and echoing) at once.
    window: usize,
    /// (b) seconds per iperf3 run, and rounds.
    iperf_secs: u32,
    iperf_rounds: usize,
    /// (c) seconds per run, and rounds.
    cps_secs: f64,
    cps_rounds: usize,
    /// (d) connections opened at once through slirp4netns, and how long
    /// they get.
    slirp_conns: usize,
    slirp_bound: Duration,
}

impl Plan {
    pub fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                conns: 200,
                conn_rounds: 1,
                window: 256,
                iperf_secs: 1,
                iperf_rounds: 1,
                cps_secs: 0.5,
                cps_rounds: 1,
                slirp_conns: 20,
                slirp_bound: Duration::from_secs(3),
            }
        } else {
            Plan {
                conns: 10_000,
                conn_rounds: 2,
                window: 256,
                iperf_secs: 3,
                iperf_rounds: 4,
                cps_secs: 1.5,
                cps_rounds: 3,
                slirp_conns: 500,
                slirp_bound: Duration::from_secs(60),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Frames, and raising our own fd limit

const FRAME: usize = 16;

/// `kind`, then `i` in 14 digits, then a newline.
fn frame(kind: u8, i: usize) -> [u8; FRAME] {
    let mut f = [b'0'; FRAME];
    f[0] = kind;
    let digits = format!("{:014}", i % 100_000_000_000_000);
    f[1..15].copy_from_slice(digits.as_bytes());
    f[15] = b'\n';
    f
}

/// The hard RLIMIT_NOFILE that systemd (240 and later) gives services and
/// user sessions: what a user's runtime, and so its infra, usually has.
const SYSTEMD_NOFILE: u64 = 524_288;

/// The soft RLIMIT_NOFILE raised to the hard one; the hard one. As root
/// (CAP_SYS_RESOURCE) the hard one is first raised to systemd's default,
/// so the lab started after this (the infra among it) gets what a user's
/// session has, not what a CI shell happens to have.
pub(crate) fn raise_nofile() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    let nr_open = read_sysctl("fs.nr_open").parse().unwrap_or(hard);
    let wanted = hard.max(SYSTEMD_NOFILE.min(nr_open));
    if wanted > hard && setrlimit(Resource::RLIMIT_NOFILE, wanted, wanted).is_ok() {
        return wanted;
    }
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    hard
}

// ---------------------------------------------------------------------------
// The phase

/// (measure, result, (target, met)).
type Line = (String, String, Option<(String, bool)>);

pub fn phase(cx: &mut Cx, section: &'static str) -> Res<()> {
    let p = cx.plan.ports;
    // The client holds every connection of (a) in this process.
    let own_hard = raise_nofile();
    let mut rows: Vec<Line> = Vec::new();
    let mut details: Vec<String> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    {
        let cx: &Cx = cx;
        let (b_echo, b_iperf) = (free_tcp_port(), free_tcp_port());
        let (s_echo, s_iperf) = (free_tcp_port(), free_tcp_port());
        let d_echo = free_tcp_port();
        let mapping = |echo: u16, iperf: u16| {
            json!({ "portMappings": [
                { "hostPort": echo, "containerPort": ECHO_PORT, "protocol": "tcp", "hostIP": "127.0.0.1" },
                { "hostPort": iperf, "containerPort": IPERF_PORT, "protocol": "tcp", "hostIP": "127.0.0.1" },
            ] })
        };
        let builtin_conf = NetOpts::default();
        let slirp_conf = NetOpts {
            state_dir: Some(state_dir_path(cx, "bench-ports-slirp")),
            port_driver: Some("slirp4netns"),
            ..NetOpts::default()
        };
        let conf = |o: &NetOpts, rc: Value| stdin_conf(&conflist(Chain::Full, o), Some(rc));
        let pb = Attached::add(
            cx,
            "bench-ports-builtin",
            conf(&builtin_conf, mapping(b_echo, b_iperf)),
        )?;
        let ps = Attached::add(
            cx,
            "bench-ports-slirp",
            conf(&slirp_conf, mapping(s_echo, s_iperf)),
        )?;
        let _echo_b = echo_server_in(cx, Some(&pb.c), ECHO_PORT, "echo server (builtin)")?;
        let _echo_s = echo_server_in(cx, Some(&ps.c), ECHO_PORT, "echo server (slirp4netns)")?;
        let _echo_d = echo_server_in(cx, None, d_echo, "echo server on the host's loopback")?;
        let _iperf_b = container_server(cx, &pb.c, "iperf3 server (builtin)")?;
        let _iperf_s = container_server(cx, &ps.c, "iperf3 server (slirp4netns)")?;
        let sup = infra_pid(&status(cx, None)?, "supervisor")?;
        let local = |port: u16| SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
        rows.push((
            "listen backlog of the host port (ss): builtin / slirp4netns / the echo server on the host's loopback".into(),
            format!("{} / {} / {}", backlog(b_echo), backlog(s_echo), backlog(d_echo)),
            None,
        ));

        progress!("published ports: (a) {} connections held", p.conns);
        match held_many(&p, sup, local(b_echo), local(d_echo), b_iperf, own_hard) {
            Ok((r, d)) => {
                rows.extend(r);
                details.push(d);
            }
            Err(e) => errors.push(format!("(a): {e}")),
        }
        progress!(
            "published ports: (d) slirp4netns driver, {} connections at once",
            p.slirp_conns
        );
        match slirp_many(&p, local(s_echo), local(b_echo)) {
            Ok(r) => rows.extend(r),
            Err(e) => errors.push(format!("(d): {e}")),
        }
        progress!("published ports: (c) short connections per second");
        match per_second(&p, local(b_echo), local(s_echo), local(d_echo)) {
            Ok(r) => rows.extend(r),
            Err(e) => errors.push(format!("(c): {e}")),
        }
        progress!("published ports: (b) iperf3 through each driver, rootlesskit and pasta");
        match throughput(&p, b_iperf, s_iperf) {
            Ok((r, d)) => {
                rows.extend(r);
                details.push(d);
            }
            Err(e) => errors.push(format!("(b): {e}")),
        }
        drop((pb, ps));
    }
    for (measure, result, target) in rows {
        match target {
            Some((t, met)) => cx.report.target(section, measure, result, &t, met),
            None => cx.report.fig(section, measure, result),
        }
    }
    details.push(METHOD.to_string());
    cx.report.details.extend(details);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

const METHOD: &str = "### 7. Published ports: how it is measured\n\n\
The client is the bench itself (root, the host's loopback), on one epoll loop; the server is \
the bench's worker, an epoll echo server, in a container behind `127.0.0.1:hostPort` (an \
infra per port driver, by `stateDir`) or on the host's 127.0.0.1. Frames are 16 bytes; the \
server closes first. (a) N connections, 256 connecting at once, each echoing a frame: the \
time until all echoed (or failed), against the same client and server on the host's loopback \
directly, rounds alternating (ABBA); at the peak the supervisor's /proc status (threads, \
VmRSS, VmHWM), fds and pipe sizes (F_GETPIPE_SZ of each pipe, opened through /proc); every \
held connection then echoes again, one iperf3 stream runs through another port of the same \
driver beside them, and the server closes them. Connections over the forwarder's fd budget \
are reset by it at once (a refusal, not a failure). (b) iperf3 `-t` seconds, `-P 1` and \
`-P 8`, the four in rotating order each round: our builtin and slirp4netns drivers; \
rootlesskit 1.1 (`--net=slirp4netns --port-driver=builtin`, `rootlessctl add-ports \
127.0.0.1:P:P/tcp`) and pasta (`pasta --config-net -t 127.0.0.1/P -u none -T none -U none`), \
each running an iperf3 server in a namespace of its own, as the uid of a lab of its \
own (a user's pipe quota each: pasta keeps 32 pipes of 1 MiB). (c) connect, one \
frame echoed, the server closes; 1 or 8 such at a time for a fixed time, rotating order. \
(d) all connections started at once, given a fixed time.\n";
