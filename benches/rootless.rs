//! The benchmark behind `scripts/bench` (issue #6). Not a test: it measures
//! rootless-cni in the rootless lab of the integration tests (the lab crate, lab/)
//! and writes a report.
//!
//! 1. warm overhead: ADD+DEL through rootless-cni vs. the same inner chain
//!    run directly inside the infra's mount+net namespaces;
//! 2. cold start: the first ADD (no infra) vs. a warm ADD, broken down with
//!    `perf` scheduler tracepoints (fork/exec/exit) when perf is there;
//! 3. scale: ADD latency with 1, 100 and 500 live attachments;
//! 4. parallelism: 32 concurrent ADDs vs. 32 sequential ones;
//! 5. data plane with iperf3 (loopback and namespaces of our own only);
//! 6. footprint: VmRSS of the infra's processes, binary size;
//! 7. published ports at scale: 10,000 held connections, throughput beside
//!    rootlesskit's and pasta's port forwarding, connections per second,
//!    the slirp4netns driver under 500 connections (benches/rootless/ports/).
//!
//! Every figure is a median; every comparison is a ratio of medians
//! measured in the same run with A and B alternating.
//!
//! Run as root (it builds the lab): `cargo bench --bench rootless --
//! [--quick] [--only PHASES] [--out FILE] [--command TEXT]`. The same binary, copied into the
//! lab, is the *worker*: run inside the lab's session as the lab user, it
//! spawns and times the plugin calls itself, so that getting into the
//! session (setpriv + nsenter) is not in the figures.
//!
//! One module a concern (options, cleanup, the perf trace, the worker, the
//! report, the driver) and one a phase; all of them are files under
//! benches/rootless/.

use std::sync::OnceLock;
use std::time::Instant;

/// argv[1] of the bench binary when it runs as the worker.
const WORKER_ARG: &str = "__bench_worker";
/// The reference plugins.
const PLUGIN_DIR: &str = "/usr/lib/cni";

static START: OnceLock<Instant> = OnceLock::new();

/// Progress on stderr, with the time since start.
macro_rules! progress {
    ($($arg:tt)*) => {
        eprintln!(
            "bench [{:6.1}s] {}",
            $crate::START.get_or_init(std::time::Instant::now).elapsed().as_secs_f64(),
            format!($($arg)*)
        )
    };
}

type Res<T> = Result<T, String>;

// Declared after `progress!`, which they use.
#[path = "rootless/cleanup.rs"]
mod cleanup;
#[path = "rootless/driver.rs"]
mod driver;
#[path = "rootless/footprint.rs"]
mod footprint;
#[path = "rootless/iperf.rs"]
mod iperf;
#[path = "rootless/netconf.rs"]
mod netconf;
#[path = "rootless/opts.rs"]
mod opts;
#[path = "rootless/procs.rs"]
mod procs;
#[path = "rootless/report.rs"]
mod report;
#[path = "rootless/rounds.rs"]
mod rounds;
#[path = "rootless/stats.rs"]
mod stats;
#[path = "rootless/trace.rs"]
mod trace;
#[path = "rootless/worker.rs"]
mod worker;

// The phases (driver.rs runs them in the order of Opts::PHASES).
#[path = "rootless/cold.rs"]
mod cold;
#[path = "rootless/dataplane.rs"]
mod dataplane;
#[path = "rootless/outbound.rs"]
mod outbound;
#[path = "rootless/parallel.rs"]
mod parallel;
#[path = "rootless/ports/mod.rs"]
mod ports;
#[path = "rootless/scale.rs"]
mod scale;
#[path = "rootless/warm.rs"]
mod warm;

use opts::Opts;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(WORKER_ARG) {
        std::process::exit(worker::main());
    }
    START.get_or_init(Instant::now);
    let opts = match Opts::parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench: {e}\n{}", Opts::USAGE);
            std::process::exit(2);
        }
    };
    cleanup::install();
    // Before the lab starts: every process of it, the infra's supervisor
    // among them, inherits the fd limit a user's session would give it.
    ports::raise_nofile();
    std::process::exit(driver::run(&opts));
}
