//! The command line, for people: status, stop, gc, exec, doctor, help. Also
//! the hidden entries the infra's own processes run. clap parses it; a
//! usage error is clap's (stderr, exit status 2), a failing command ours
//! (`rootless-cni: MESSAGE`, exit status 1).

mod doctor;
mod exec;
mod gc;
mod status;
mod stop;

use crate::error::Result;
use crate::infra::{sandbox, supervisor};
use crate::state::StateDir;
use clap::{CommandFactory, Parser, Subcommand};
use std::ffi::OsString;
use std::path::PathBuf;

/// Where the reference plugins usually live, for commands run by people.
pub const DEFAULT_CNI_PATH: &str = "/usr/local/lib/cni:/usr/lib/cni:/opt/cni/bin";

const ABOUT: &str = "rootless bridge networking for any CNI runtime";

const LONG_ABOUT: &str = "\
rootless bridge networking for any CNI runtime

As a CNI plugin (CNI_COMMAND set) it runs the network's inner plugins
(bridge, host-local, portmap, ...) inside a per-user infra namespace that
slirp4netns (or pasta) connects to the outside. List it in a network config:

  { \"type\": \"rootless-cni\", \"delegate\": { <an inner conflist> } }

Without CNI_COMMAND it is the command line below, for people.";

/// The top-level `--help` serves without the README: the config keys
/// (tests/cli.rs checks every one of `OWN_KEYS` is here), the environment
/// and the exit status.
const AFTER_LONG_HELP: &str = "\
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

Environment:
  ROOTLESS_CNI_LOG  log level on stderr: error, warn (default), info, debug
  CNI_PATH          plugin dirs for gc (default /usr/local/lib/cni:/usr/lib/cni:/opt/cni/bin)

Exit status: 0 on success, 1 when the command fails (doctor: when a check
fails; exec: the command's own status), 2 on a usage error.";

const AFTER_HELP: &str =
    "The network config keys, the environment and the exit status: rootless-cni --help";

#[derive(Debug, Parser)]
#[command(
    name = "rootless-cni",
    version,
    override_usage = "rootless-cni [OPTIONS] <COMMAND>",
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = AFTER_HELP,
    after_long_help = AFTER_LONG_HELP,
)]
struct Cli {
    /// State dir [default: as for the config's stateDir]
    #[arg(long, global = true, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The infra (PIDs, uptime, settings) and every attachment
    ///
    /// Each attachment with its container, ifname, network, addresses and
    /// published ports.
    #[command(visible_alias = "ls", args_override_self = true, verbatim_doc_comment)]
    Status {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Stop the infra; refuses while attachments exist unless --force
    #[command(args_override_self = true)]
    Stop {
        /// Stop it all the same: its attachments are then reported lost
        #[arg(long)]
        force: bool,
    },
    /// Forget attachments that are gone, running their inner DEL
    ///
    /// The CNI GC verb by hand. Without --valid: those whose infra died, or
    /// whose container netns exists nowhere (not at its path from here, no
    /// process in it, no mount of it in any mount namespace we can see); one
    /// whose netns is not at its path from here but still exists (rootless
    /// podman's netns files are mounts inside its own mount namespace) is
    /// kept, and said why. With --valid: every attachment not listed.
    #[command(args_override_self = true, verbatim_doc_comment)]
    Gc {
        /// An attachment to keep (IFNAME: eth0 when left out); repeatable
        #[arg(long = "valid", value_name = "ID/IFNAME")]
        valid: Vec<String>,
        /// Inner plugin dirs, colon-separated [default: $CNI_PATH]
        ///
        /// Without CNI_PATH: /usr/local/lib/cni:/usr/lib/cni:/opt/cni/bin.
        #[arg(long, value_name = "DIRS", verbatim_doc_comment)]
        cni_path: Option<String>,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Run a command inside the infra (ip addr, iptables -S, ...)
    ///
    /// In the infra's network and mount namespaces, for debugging. The exit
    /// status is the command's.
    #[command(
        override_usage = "rootless-cni exec [--state-dir DIR] -- CMD [ARGS]...",
        verbatim_doc_comment
    )]
    Exec {
        /// The command and its arguments, passed on untouched
        #[arg(
            value_name = "CMD",
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true
        )]
        command: Vec<OsString>,
    },
    /// Check every prerequisite and print the fix for each failure
    ///
    /// Exit status 1 when a check fails. From your own shell (outside any
    /// user namespace) it checks that a user namespace can be made and
    /// namespaces made in it, as a rootless runtime will; `podman unshare
    /// rootless-cni doctor` checks inside podman's.
    #[command(args_override_self = true, verbatim_doc_comment)]
    Doctor {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// The infra's supervisor, started by the first ADD.
    #[command(name = supervisor::ENTRY, hide = true)]
    Supervise(supervisor::Args),
    /// The infra's sandbox, started by the supervisor.
    #[command(name = sandbox::ENTRY, hide = true)]
    Sandbox(sandbox::Args),
}

/// Runs the command line `args` (without the program name); returns the
/// exit status.
pub fn main(args: Vec<OsString>) -> i32 {
    let argv = std::iter::once(OsString::from("rootless-cni")).chain(args);
    let cli = match Cli::try_parse_from(argv) {
        Ok(cli) => cli,
        // Help and version are "errors" too, of status 0, on stdout.
        Err(e) => return print_clap(&e),
    };
    let Some(command) = cli.command else {
        let e = Cli::command().error(
            clap::error::ErrorKind::MissingSubcommand,
            "no command given (and CNI_COMMAND is not set)",
        );
        return print_clap(&e);
    };
    match run(cli.state_dir, command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rootless-cni: {e}");
            1
        }
    }
}

fn print_clap(e: &clap::Error) -> i32 {
    let _ = e.print();
    e.exit_code()
}

fn run(state_dir: Option<PathBuf>, command: Command) -> Result<i32> {
    match command {
        Command::Status { json } => status::status(state_dir, json).map(|_| 0),
        Command::Stop { force } => stop::stop(state_dir, force).map(|_| 0),
        Command::Gc {
            valid,
            cni_path,
            json,
        } => gc::gc(state_dir, &valid, cni_path, json).map(|_| 0),
        Command::Exec { command } => exec::exec(state_dir, &command),
        Command::Doctor { json } => Ok(doctor::doctor(state_dir, json)),
        Command::Supervise(args) => {
            if let Ok(level) = args.settings.log_level.parse::<log::LevelFilter>() {
                log::set_max_level(level);
            }
            Ok(supervisor::main(args))
        }
        Command::Sandbox(args) => Ok(sandbox::main(&args)),
    }
}

fn open_state_path(state_dir: Option<PathBuf>) -> Result<PathBuf> {
    StateDir::resolve(state_dir.as_deref())
}

fn open_state(state_dir: Option<PathBuf>) -> Result<Option<StateDir>> {
    StateDir::open_existing(open_state_path(state_dir)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::config::Engine;
    use crate::infra::Settings;

    fn parse(args: &[&str]) -> std::result::Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("rootless-cni").chain(args.iter().copied()))
    }

    fn parse_own(entry: &str, args: Vec<OsString>) -> Command {
        let argv = ["rootless-cni".into(), entry.into()]
            .into_iter()
            .chain(args);
        Cli::try_parse_from(argv)
            .unwrap_or_else(|e| panic!("{entry}: {e}"))
            .command
            .unwrap_or_else(|| panic!("{entry}: no command"))
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    fn settings() -> Settings {
        Settings {
            mtu: 1500,
            allow_host_loopback: true,
            ipv6: true,
            port_driver: crate::infra::PortDriver::Builtin,
            outbound: Engine::Pasta,
            idle_timeout_secs: Some(300),
            log_level: "debug".into(),
            forward_limits: Default::default(),
        }
    }

    /// `start` builds the supervisor's command line, the supervisor the
    /// sandbox's: each must parse back into what it was made of.
    #[test]
    fn hidden_command_lines_parse_back() {
        let settings = settings();
        let sup = supervisor::Args {
            state_dir: "/run/user/1000/rootless-cni-plugin".into(),
            ready_fd: 7,
            settings: settings.clone(),
        };
        match parse_own(supervisor::ENTRY, sup.to_args()) {
            Command::Supervise(back) => {
                assert_eq!(back.state_dir, sup.state_dir);
                assert_eq!(back.ready_fd, sup.ready_fd);
                assert_eq!(back.settings, sup.settings);
            }
            other => panic!("{other:?}"),
        }
        for (outbound, ipv6, allow_host_loopback) in [
            (Engine::Pasta, true, false),
            (Engine::Slirp4netns, false, true),
        ] {
            let sandbox = sandbox::Args {
                state_dir: "/tmp/state dir".into(),
                ready_fd: 3,
                outbound,
                ipv6,
                allow_host_loopback,
            };
            match parse_own(sandbox::ENTRY, sandbox.to_args()) {
                Command::Sandbox(back) => assert_eq!(back, sandbox),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn exec_passes_the_command_on_untouched() {
        for (args, want) in [
            (
                &["exec", "--", "ip", "-br", "addr"][..],
                &["ip", "-br", "addr"][..],
            ),
            (&["exec", "ip", "--help"], &["ip", "--help"]),
            (
                &["exec", "--", "sh", "-c", "exit 3"],
                &["sh", "-c", "exit 3"],
            ),
            (
                &["exec", "--state-dir", "/s", "--", "ip", "--state-dir", "x"],
                &["ip", "--state-dir", "x"],
            ),
        ] {
            match parse(args).map(|c| c.command) {
                Ok(Some(Command::Exec { command })) => assert_eq!(command, want, "{args:?}"),
                other => panic!("{args:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn gc_takes_repeated_options() {
        let cli = parse(&[
            "--state-dir",
            "/s",
            "gc",
            "--valid",
            "a",
            "--valid",
            "b/eth1",
            "--json",
        ])
        .expect("parses");
        assert_eq!(cli.state_dir, Some(PathBuf::from("/s")));
        match cli.command {
            Some(Command::Gc {
                valid,
                cni_path,
                json,
            }) => {
                assert_eq!(valid, ["a", "b/eth1"]);
                assert_eq!(cni_path, None);
                assert!(json);
            }
            other => panic!("{other:?}"),
        }
    }
}
