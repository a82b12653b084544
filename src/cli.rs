//! The command line, for people: status, stop, help. Also the hidden
//! entries the infra's own processes run.

use crate::error::{Error, Result};
use crate::infra::{self, sandbox, supervisor, InfraInfo};
use crate::procfs;
use crate::state::{Attachment, StateDir};
use serde_json::{json, Value};
use std::path::PathBuf;

const HELP: &str = "\
rootless-cni - rootless bridge networking for any CNI runtime

As a CNI plugin (CNI_COMMAND set) it runs the network's inner plugins
(bridge, host-local, portmap, ...) inside a per-user infra namespace that
slirp4netns connects to the outside. List it in a network config:

  { \"type\": \"rootless-cni\", \"delegate\": { <an inner conflist> } }

Usage: rootless-cni [--state-dir DIR] COMMAND

Commands:
  status [--json]   show the infra (PIDs, uptime) and every attachment
  stop [--force]    stop the infra; refuses while attachments exist
                    unless --force (they are then reported lost)
  help              this text

Options:
  --state-dir DIR   state dir (default: $XDG_RUNTIME_DIR/rootless-cni)
  -h, --help        this text
  -V, --version     print the version

Environment:
  ROOTLESS_CNI_LOG  log level on stderr: error, warn (default), info, debug
";

pub fn main(args: Vec<String>) -> i32 {
    match run(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("rootless-cni: {e}");
            1
        }
    }
}

fn run(args: Vec<String>) -> Result<()> {
    let mut state_dir: Option<PathBuf> = None;
    let mut rest = args.into_iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "-h" | "--help" | "help" => {
                print!("{HELP}");
                return Ok(());
            }
            "-V" | "--version" => {
                println!("rootless-cni {}", env!("CARGO_PKG_VERSION"));
                return Ok(());
            }
            "--state-dir" => {
                state_dir = Some(PathBuf::from(
                    rest.next()
                        .ok_or_else(|| usage("--state-dir needs a value"))?,
                ))
            }
            "status" => {
                return status(
                    state_dir,
                    parse_flags(rest, &["--json"])?.contains(&"--json"),
                )
            }
            "stop" => {
                return stop(
                    state_dir,
                    parse_flags(rest, &["--force"])?.contains(&"--force"),
                )
            }
            supervisor::ENTRY => {
                let args = supervisor::Args::parse(&rest.collect::<Vec<_>>())?;
                if let Ok(level) = args.settings.log_level.parse::<log::LevelFilter>() {
                    log::set_max_level(level);
                }
                std::process::exit(supervisor::main(args));
            }
            sandbox::ENTRY => {
                let args = supervisor::Args::parse(&rest.collect::<Vec<_>>())?;
                std::process::exit(sandbox::main(
                    &args.state_dir,
                    args.ready_fd,
                    &args.settings,
                ));
            }
            other => return Err(usage(&format!("unknown command or option {other:?}"))),
        }
    }
    Err(usage("no command given (and CNI_COMMAND is not set)"))
}

fn usage(msg: &str) -> Error {
    Error::internal(format!("{msg}; see rootless-cni --help"))
}

fn parse_flags(
    args: impl Iterator<Item = String>,
    known: &[&'static str],
) -> Result<Vec<&'static str>> {
    args.map(|a| {
        known
            .iter()
            .find(|k| **k == a)
            .copied()
            .ok_or_else(|| usage(&format!("unknown option {a:?}")))
    })
    .collect()
}

fn open_state(state_dir: Option<PathBuf>) -> Result<Option<StateDir>> {
    StateDir::open_existing(StateDir::resolve(state_dir.as_deref())?)
}

fn status(state_dir: Option<PathBuf>, as_json: bool) -> Result<()> {
    let path = StateDir::resolve(state_dir.as_deref())?;
    let (info, attachments) = match StateDir::open_existing(path.clone())? {
        None => (None, Vec::new()),
        Some(state) => {
            let lock = state.lock()?;
            (infra::running(&state, &lock)?, state.list_attachments()?)
        }
    };
    if as_json {
        let report = json!({
            "stateDir": path,
            "infra": info.as_ref().map(infra_json),
            "attachments": attachments.iter().map(|a| attachment_json(a, info.as_ref())).collect::<Vec<_>>(),
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
        return Ok(());
    }
    println!("state dir:   {}", path.display());
    match &info {
        None => println!("infra:       not running"),
        Some(i) => println!(
            "infra:       running for {}s: supervisor {}, sandbox {}, slirp4netns {}; mtu {}, host loopback {}",
            procfs::uptime_seconds(&i.supervisor).unwrap_or(0),
            i.supervisor.pid,
            i.sandbox.pid,
            i.slirp4netns.map_or("-".to_string(), |p| p.pid.to_string()),
            i.settings.mtu,
            if i.settings.allow_host_loopback { "allowed" } else { "blocked" },
        ),
    }
    println!("attachments: {}", attachments.len());
    if !attachments.is_empty() {
        println!(
            "\n{:<20} {:<8} {:<16} {:<8} {:<18} PORTS",
            "CONTAINER", "IFNAME", "NETWORK", "STATE", "ADDRESSES"
        );
        for a in &attachments {
            let id: String = a.container_id.chars().take(20).collect();
            println!(
                "{:<20} {:<8} {:<16} {:<8} {:<18} {}",
                id,
                a.ifname,
                a.network,
                attachment_state(a, info.as_ref()),
                a.addresses().join(", "),
                a.ports().join(", ")
            );
        }
    }
    Ok(())
}

fn infra_json(i: &InfraInfo) -> Value {
    json!({
        "supervisor": i.supervisor,
        "sandbox": i.sandbox,
        "slirp4netns": i.slirp4netns,
        "uptimeSeconds": procfs::uptime_seconds(&i.supervisor),
        "mtu": i.settings.mtu,
        "allowHostLoopback": i.settings.allow_host_loopback,
        "idleTimeoutSeconds": i.settings.idle_timeout_secs,
    })
}

fn attachment_state(a: &Attachment, info: Option<&InfraInfo>) -> &'static str {
    match (a.state, info) {
        (_, Some(i)) if i.sandbox != a.infra => "lost",
        (_, None) => "lost",
        (crate::state::AttachmentState::Pending, _) => "pending",
        (crate::state::AttachmentState::Ready, _) => "ready",
    }
}

fn attachment_json(a: &Attachment, info: Option<&InfraInfo>) -> Value {
    json!({
        "containerId": a.container_id,
        "ifname": a.ifname,
        "network": a.network,
        "netns": a.netns,
        "addresses": a.addresses(),
        "ports": a.ports(),
        "state": attachment_state(a, info),
        "created": a.created,
    })
}

fn stop(state_dir: Option<PathBuf>, force: bool) -> Result<()> {
    let Some(state) = open_state(state_dir)? else {
        println!("no infra running");
        return Ok(());
    };
    let lock = state.lock()?;
    let Some(info) = infra::running(&state, &lock)? else {
        println!("no infra running");
        return Ok(());
    };
    let count = state.list_attachments()?.len();
    if count > 0 && !force {
        return Err(Error::internal(format!(
            "{count} attachment(s) still use the infra; DEL them first, or stop --force (they are then lost)"
        )));
    }
    infra::stop(&state, &lock, &info)?;
    println!("stopped the infra (supervisor {})", info.supervisor.pid);
    Ok(())
}
