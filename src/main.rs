//! rootless-cni: a CNI plugin that runs the reference plugins inside a
//! per-user infra namespace, so an unprivileged user's containers get a
//! real bridge network.
//!
//! With CNI_COMMAND set it is a plugin; without, a small CLI.

mod chain;
mod cli;
mod cni;
mod commands;
mod error;
mod exec;
mod infra;
mod ports;
mod procfs;
mod state;
mod sys;
mod userns;

use cni::config::NetConf;
use cni::env::{CniEnv, Command};
use error::{code, Error};
use std::io::{Read, Write};

/// More config than any real network needs; bounds what a caller can make
/// us buffer.
const MAX_STDIN: u64 = 1 << 20;

fn main() {
    init_logging();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = if is_plugin_call(&args) {
        plugin_main()
    } else {
        cli::main(args)
    };
    std::process::exit(code);
}

/// A runtime sets CNI_COMMAND. Called with no arguments and other CNI_*
/// variables but no CNI_COMMAND, it is a runtime's mistake, answered with an
/// error object that names the missing variable.
fn is_plugin_call(args: &[String]) -> bool {
    std::env::var_os("CNI_COMMAND").is_some()
        || (args.is_empty()
            && std::env::vars_os().any(|(k, _)| k.to_string_lossy().starts_with("CNI_")))
}

/// Logs go to stderr only: stdout belongs to the CNI result. The level is
/// ROOTLESS_CNI_LOG (default warn), lowered or raised by the config's
/// logLevel.
fn init_logging() {
    let level = std::env::var("ROOTLESS_CNI_LOG")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(log::LevelFilter::Warn);
    env_logger::Builder::new()
        .filter_level(log::LevelFilter::Trace)
        .target(env_logger::Target::Stderr)
        .format_target(false)
        .init();
    log::set_max_level(level);
}

fn plugin_main() -> i32 {
    let mut stdin = Vec::new();
    let read = std::io::stdin().take(MAX_STDIN + 1).read_to_end(&mut stdin);
    // The version to answer in, even when the rest of the config is bad.
    let version = serde_json::from_slice::<serde_json::Value>(&stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(|v| v.as_str())
                .map(String::from)
        })
        .unwrap_or_else(|| cni::DEFAULT_VERSION.to_string());
    let outcome = match read {
        Err(e) => Err(Error::new(
            code::DECODE,
            format!("reading the network config on stdin: {e}"),
        )),
        Ok(_) if stdin.len() as u64 > MAX_STDIN => Err(Error::new(
            code::DECODE,
            format!("network config on stdin is larger than {MAX_STDIN} bytes"),
        )),
        Ok(_) => run_verb(&stdin, &version),
    };
    let mut out = std::io::stdout().lock();
    match outcome {
        Ok(reply) => {
            let _ = out.write_all(&reply);
            0
        }
        Err(e) => {
            log::error!("{e}");
            let _ = out.write_all(&cni::error_reply(&e, &version));
            1
        }
    }
}

fn run_verb(stdin: &[u8], version: &str) -> error::Result<Vec<u8>> {
    let env = CniEnv::from_env()?;
    if env.command == Command::Version {
        // VERSION needs no valid config, only its cniVersion.
        return Ok(commands::version::version(version).into_bytes());
    }
    let conf = NetConf::parse(stdin)?;
    cni::version::check_supported(&conf.cni_version)?;
    let needs = match env.command {
        Command::Check => "0.4.0",
        Command::Gc | Command::Status => "1.1.0",
        _ => "0.0.0",
    };
    if !cni::version::at_least(&conf.cni_version, needs) {
        return Err(Error::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "cniVersion {} does not know {}; it needs {needs} or later",
                conf.cni_version,
                env.command.as_str()
            ),
        ));
    }
    if let Some(level) = conf.log_level {
        log::set_max_level(level);
    }
    log::debug!(
        "{} {} {}",
        env.command.as_str(),
        env.container_id,
        env.ifname
    );
    match env.command {
        Command::Add => commands::add::add(&env, &conf),
        Command::Del => commands::del::del(&env, &conf).map(|_| Vec::new()),
        Command::Check => commands::check::check(&env, &conf).map(|_| Vec::new()),
        Command::Gc => commands::gc::gc(&env, &conf).map(|_| Vec::new()),
        Command::Status => commands::status::status(&env, &conf).map(|_| Vec::new()),
        Command::Version => Ok(commands::version::version(version).into_bytes()),
    }
}
