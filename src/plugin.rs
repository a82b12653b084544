//! Plugin mode: one CNI call, from stdin and the CNI_* variables to the
//! result or error object on stdout.

use crate::cni;
use crate::cni::config::NetConf;
use crate::cni::env::{CniEnv, Verb};
use crate::cni::version::CniVersion;
use crate::commands;
use crate::error::{Error, Kind, Result};
use std::io::{Read, Write};

/// More config than any real network needs; bounds what a caller can make
/// us buffer.
pub const MAX_STDIN: u64 = 1 << 20;

/// A runtime sets CNI_COMMAND. Called with no arguments and other CNI_*
/// variables but no CNI_COMMAND, it is a runtime's mistake, answered with an
/// error object that names the missing variable.
pub fn is_plugin_call(args: &[std::ffi::OsString]) -> bool {
    std::env::var_os("CNI_COMMAND").is_some()
        || (args.is_empty()
            && std::env::vars_os().any(|(k, _)| k.to_string_lossy().starts_with("CNI_")))
}

/// Runs the call this process was started for; returns the exit status.
pub fn main() -> i32 {
    let mut stdin = Vec::new();
    let read = std::io::stdin().take(MAX_STDIN + 1).read_to_end(&mut stdin);
    let version = answer_version(&stdin);
    let outcome = match read {
        Err(e) => Err(Error::new(
            Kind::Decode,
            format!("reading the network config on stdin: {e}"),
        )),
        Ok(_) => parse_call(|k| std::env::var(k).ok(), &stdin).and_then(|call| run(call, &version)),
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

/// The version to answer in, even when the rest of the config is bad.
pub fn answer_version(stdin: &[u8]) -> CniVersion {
    serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(|v| v.as_str())
                .map(CniVersion::new)
        })
        .unwrap_or(cni::ANSWER_DEFAULT_VERSION)
}

/// A call that passed validation: what `run` acts on.
pub struct Call {
    pub env: CniEnv,
    /// None for VERSION, which needs no valid config.
    pub conf: Option<NetConf>,
}

/// Everything a call is checked for before anything is touched: the
/// environment, the size and shape of the config, and whether its
/// cniVersion knows the verb. `get` looks up an environment variable.
pub fn parse_call(get: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Result<Call> {
    if stdin.len() as u64 > MAX_STDIN {
        return Err(Error::new(
            Kind::Decode,
            format!("network config on stdin is larger than {MAX_STDIN} bytes"),
        ));
    }
    let env = CniEnv::from_lookup(get)?;
    if env.command == Verb::Version {
        return Ok(Call { env, conf: None });
    }
    let conf = NetConf::parse(stdin)?;
    cni::version::check_supported(&conf.cni_version)?;
    let needs = env.command.min_version();
    if conf.cni_version < needs {
        return Err(Error::new(
            Kind::IncompatibleVersion,
            format!(
                "cniVersion {} does not know {}; it needs {needs} or later",
                conf.cni_version,
                env.command.as_str()
            ),
        ));
    }
    Ok(Call {
        env,
        conf: Some(conf),
    })
}

fn run(call: Call, version: &CniVersion) -> Result<Vec<u8>> {
    let Call { env, conf } = call;
    let Some(conf) = conf else {
        return Ok(commands::version::version(version).into_bytes());
    };
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
        Verb::Add => commands::add::add(&env, &conf),
        Verb::Del => commands::del::del(&env, &conf).map(|_| Vec::new()),
        Verb::Check => commands::check::check(&env, &conf).map(|_| Vec::new()),
        Verb::Gc => commands::gc::gc(&env, &conf).map(|_| Vec::new()),
        Verb::Status => commands::status::status(&env, &conf).map(|_| Vec::new()),
        Verb::Version => Ok(commands::version::version(version).into_bytes()),
    }
}
