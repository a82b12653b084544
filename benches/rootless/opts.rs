//! The bench's command line (`Opts`) and how many of everything each mode runs (`Plan`).

use crate::ports;
use crate::Res;
use std::path::{Path, PathBuf};

pub(crate) struct Opts {
    pub(crate) quick: bool,
    /// Only these phases (`Opts::PHASES`); None: all.
    pub(crate) only: Option<Vec<String>>,
    pub(crate) out: PathBuf,
    pub(crate) command: String,
}

impl Opts {
    pub(crate) const USAGE: &'static str =
        "usage: rootless [--quick] [--only PHASE,...] [--out FILE] [--command TEXT]\n\
         phases: warm, cold, scale, parallel, dataplane, outbound, ports";
    pub(crate) const PHASES: [&'static str; 7] = [
        "warm",
        "cold",
        "scale",
        "parallel",
        "dataplane",
        "outbound",
        "ports",
    ];

    pub(crate) fn parse(args: &[String]) -> Res<Opts> {
        let (mut quick, mut out, mut command, mut only) = (false, None, None, None);
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--bench" => {} // what `cargo bench` passes
                "--quick" => quick = true,
                "--only" => {
                    let list: Vec<String> = it
                        .next()
                        .ok_or("--only needs a list of phases")?
                        .split(',')
                        .map(|p| p.trim().to_string())
                        .collect();
                    if let Some(bad) = list.iter().find(|p| !Opts::PHASES.contains(&p.as_str())) {
                        return Err(format!("unknown phase {bad:?}"));
                    }
                    only = Some(list);
                }
                "--out" => out = Some(PathBuf::from(it.next().ok_or("--out needs a file")?)),
                "--command" => command = Some(it.next().ok_or("--command needs a value")?.clone()),
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        // A partial run never overwrites the report of a full one.
        let out = out.unwrap_or_else(|| match (&only, quick) {
            (Some(list), _) => manifest.join(format!(
                "target/BENCHMARKS-{}{}.md",
                list.join("-"),
                if quick { "-quick" } else { "" }
            )),
            (None, true) => manifest.join("target/BENCHMARKS-quick.md"),
            (None, false) => manifest.join("BENCHMARKS.md"),
        });
        let command = command.unwrap_or_else(|| {
            format!(
                "cargo bench --bench rootless --{}",
                if quick { " --quick" } else { "" }
            )
        });
        Ok(Opts {
            quick,
            only,
            out,
            command,
        })
    }

    /// Whether phase `name` runs.
    pub(crate) fn runs(&self, name: &str) -> bool {
        self.only
            .as_ref()
            .map_or(true, |o| o.iter().any(|p| p == name))
    }
}

/// How many of everything.
pub(crate) struct Plan {
    /// Container → host connections held at once, per outbound engine.
    pub(crate) outbound_held: usize,
    pub(crate) warm_iters: usize,
    pub(crate) cold_iters: usize,
    pub(crate) scale_levels: Vec<usize>,
    pub(crate) scale_iters: usize,
    pub(crate) scale_concurrency: usize,
    pub(crate) par_n: usize,
    pub(crate) par_rounds: usize,
    pub(crate) iperf_secs: u32,
    pub(crate) iperf_rounds: usize,
    pub(crate) ports: ports::Plan,
}

impl Plan {
    pub(crate) fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                outbound_held: 100,
                warm_iters: 3,
                cold_iters: 2,
                scale_levels: vec![1, 5, 10],
                scale_iters: 2,
                scale_concurrency: 4,
                par_n: 32,
                par_rounds: 1,
                iperf_secs: 1,
                iperf_rounds: 1,
                ports: ports::Plan::new(true),
            }
        } else {
            Plan {
                outbound_held: 1000,
                warm_iters: 30,
                cold_iters: 15,
                scale_levels: vec![1, 100, 500],
                scale_iters: 15,
                scale_concurrency: 4,
                par_n: 32,
                par_rounds: 5,
                iperf_secs: 3,
                iperf_rounds: 5,
                ports: ports::Plan::new(false),
            }
        }
    }
}
