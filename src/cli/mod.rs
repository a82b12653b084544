//! The command line, for people: status, stop, gc, exec, doctor, help. Also
//! the hidden entries the infra's own processes run.

mod doctor;
mod exec;
mod gc;
mod status;
mod stop;

use crate::error::{Error, Result};
use crate::infra::{sandbox, supervisor};
use crate::state::StateDir;
use std::path::PathBuf;

const HELP: &str = "\
rootless-cni - rootless bridge networking for any CNI runtime

As a CNI plugin (CNI_COMMAND set) it runs the network's inner plugins
(bridge, host-local, portmap, ...) inside a per-user infra namespace that
slirp4netns (or pasta) connects to the outside. List it in a network config:

  { \"type\": \"rootless-cni\", \"delegate\": { <an inner conflist> } }

Network config keys (of the rootless-cni plugin entry):
  delegate           the inner chain: an inline conflist or one plugin config
  network            instead of delegate: a conflist's name, found in confDir
  confDir            where network is looked up
                     (default $XDG_CONFIG_HOME/cni/net.d or ~/.config/cni/net.d)
  stateDir           default $XDG_RUNTIME_DIR/rootless-cni-plugin (0700);
                     without XDG_RUNTIME_DIR: /run/user/UID/rootless-cni-plugin
                     when that dir is yours, /run/rootless-cni-plugin for
                     real root
  outbound           what connects the infra to the outside: slirp4netns
                     (default) or pasta; same addresses either way
  mtu                tap0's MTU (slirp4netns or pasta), 576-65520
                     (default 65520)
  allowHostLoopback  containers reach the host's 127.0.0.1 as 10.0.2.2
                     (default false)
  ipv6               IPv6 on tap0, fd00::/64 (default false)
  portDriver         builtin (default) or slirp4netns (needs outbound
                     slirp4netns), for portMappings
  idleTimeout        keep the infra after the last DEL: 30, \"30s\", \"5m\"
  pluginTimeout      kill an inner plugin after this (default 60s)
  lockTimeout        wait this long for the state lock, then code 11
                     (default 30s)
  logLevel           error, warn (default), info, debug, trace
  maxConnections     builtin portDriver: TCP connections forwarded at once,
                     all ports (default 32768); more are reset at once
  maxConnectionsPerPort
                     the same for one published port (default 16384)
  maxUdpFlows        UDP flows (client address and port) at once, all
                     ports (default 4096); datagrams of more are dropped
  maxUdpFlowsPerPort the same for one published port (default 1024)
  tcpIdleTimeout     close a forwarded TCP connection silent this long
                     (default \"2h\"; 0: never)
  udpIdleTimeout     forget a UDP flow silent this long (default \"60s\")
An unknown key is an error (code 7) naming it. The runtime's capability
args (portMappings, ips, mac, ...) reach the inner plugins that declare
them, as under libcni.

Usage: rootless-cni [--state-dir DIR] COMMAND [ARGS]

Commands:
  status [--json]        the infra (PIDs, uptime, settings) and every
                         attachment (container, ifname, network, addresses,
                         ports); `ls` is the same
  stop [--force]         stop the infra; refuses while attachments exist
                         unless --force (they are then reported lost)
  gc [--valid ID/IFNAME]... [--cni-path DIRS] [--json]
                         forget attachments that are gone, running their
                         inner DEL: without --valid, those whose container
                         netns no longer exists or whose infra died; with
                         --valid, every attachment not listed (the GC verb)
  exec -- CMD [ARGS]     run CMD inside the infra's network and mount
                         namespaces (ip addr, iptables -L, ...), for debugging
  doctor [--json]        check every prerequisite and print the fix for
                         each failure
  help                   this text; COMMAND --help shows it too

Options:
  --state-dir DIR   state dir (default: as for stateDir above)
  -h, --help        this text
  -V, --version     print the version

Environment:
  ROOTLESS_CNI_LOG  log level on stderr: error, warn (default), info, debug
  CNI_PATH          plugin dirs for gc (default /usr/local/lib/cni:/usr/lib/cni:/opt/cni/bin)

Exit status: 0 on success, 1 on failure (doctor: 1 when a check fails).
";

/// Where the reference plugins usually live, for commands run by people.
pub const DEFAULT_CNI_PATH: &str = "/usr/local/lib/cni:/usr/lib/cni:/opt/cni/bin";

pub fn main(args: Vec<String>) -> i32 {
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rootless-cni: {e}");
            1
        }
    }
}

fn run(args: Vec<String>) -> Result<i32> {
    let mut state_dir: Option<PathBuf> = None;
    let mut rest = args.into_iter();
    while let Some(arg) = rest.next() {
        let args: Vec<String> = match arg.as_str() {
            "--state-dir" => {
                let dir = rest
                    .next()
                    .ok_or_else(|| usage("--state-dir needs a value"))?;
                state_dir = Some(PathBuf::from(dir));
                continue;
            }
            _ => rest.by_ref().collect(),
        };
        // `COMMAND --help` (before any `--` of exec) is a request for help,
        // not an unknown option.
        let asks_help = args
            .iter()
            .take_while(|a| *a != "--")
            .any(|a| a == "-h" || a == "--help");
        if asks_help && !arg.starts_with("__") {
            print!("{HELP}");
            return Ok(0);
        }
        return match arg.as_str() {
            "-h" | "--help" | "help" => {
                print!("{HELP}");
                Ok(0)
            }
            "-V" | "--version" => {
                println!("rootless-cni {}", env!("CARGO_PKG_VERSION"));
                Ok(0)
            }
            "status" | "ls" => {
                let json = Flags::parse(&args, &["--json"], &[])?.has("--json");
                status::status(state_dir, json).map(|_| 0)
            }
            "stop" => {
                let force = Flags::parse(&args, &["--force"], &[])?.has("--force");
                stop::stop(state_dir, force).map(|_| 0)
            }
            "gc" => gc::gc(
                state_dir,
                &Flags::parse(&args, &["--json"], &["--valid", "--cni-path"])?,
            )
            .map(|_| 0),
            "exec" => exec::exec(state_dir, &args),
            "doctor" => {
                let json = Flags::parse(&args, &["--json"], &[])?.has("--json");
                Ok(doctor::doctor(state_dir, json))
            }
            supervisor::ENTRY => {
                let args = supervisor::Args::parse(&args)?;
                if let Ok(level) = args.settings.log_level.parse::<log::LevelFilter>() {
                    log::set_max_level(level);
                }
                Ok(supervisor::main(args))
            }
            sandbox::ENTRY => {
                let args = supervisor::Args::parse(&args)?;
                Ok(sandbox::main(
                    &args.state_dir,
                    args.ready_fd,
                    &args.settings,
                ))
            }
            other => Err(usage(&format!("unknown command or option {other:?}"))),
        };
    }
    Err(usage("no command given (and CNI_COMMAND is not set)"))
}

fn usage(msg: &str) -> Error {
    Error::internal(format!("{msg}; see rootless-cni --help"))
}

/// A command's flags: switches, and options that take a value (repeatable).
struct Flags {
    switches: Vec<String>,
    values: Vec<(String, String)>,
}

impl Flags {
    fn parse(args: &[String], switches: &[&str], options: &[&str]) -> Result<Self> {
        let mut flags = Flags {
            switches: Vec::new(),
            values: Vec::new(),
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if switches.contains(&a.as_str()) {
                flags.switches.push(a.clone());
            } else if options.contains(&a.as_str()) {
                let v = it
                    .next()
                    .ok_or_else(|| usage(&format!("{a} needs a value")))?;
                flags.values.push((a.clone(), v.clone()));
            } else {
                return Err(usage(&format!("unknown option {a:?}")));
            }
        }
        Ok(flags)
    }

    fn has(&self, switch: &str) -> bool {
        self.switches.iter().any(|s| s == switch)
    }

    fn values<'a>(&'a self, option: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.values
            .iter()
            .filter(move |(k, _)| k == option)
            .map(|(_, v)| v.as_str())
    }
}

fn open_state_path(state_dir: Option<PathBuf>) -> Result<PathBuf> {
    StateDir::resolve(state_dir.as_deref())
}

fn open_state(state_dir: Option<PathBuf>) -> Result<Option<StateDir>> {
    StateDir::open_existing(open_state_path(state_dir)?)
}
