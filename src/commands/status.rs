//! STATUS (spec 1.1.0): success when an ADD would work now; otherwise code
//! 50 saying what is missing.

use crate::chain;
use crate::cni::config::NetConf;
use crate::cni::env::CniEnv;
use crate::error::{Error, Kind, Result};
use crate::infra;
use std::os::unix::process::CommandExt;

pub fn status(env: &CniEnv, conf: &NetConf) -> Result<()> {
    let unavailable = |e: Error| e.with_kind(Kind::PluginNotAvailable);
    let list = conf.inner_list().map_err(unavailable)?;
    // Without CNI_PATH the inner plugins can be neither found nor asked.
    let binaries = match env.path.is_empty() {
        true => None,
        false => Some(chain::find_binaries(list, &env.path).map_err(unavailable)?),
    };
    // A question changes nothing: no state dir is made for it.
    let state = super::state_dir(conf, false).map_err(unavailable)?;
    let running = match &state {
        Some(state) => infra::running(state, &state.lock()?)?,
        None => None,
    };
    if let Some(why) = running.as_ref().and_then(infra::outbound::outbound_down) {
        return Err(Error::new(Kind::LimitedConnectivity, why));
    }
    match (running, binaries) {
        (Some(info), Some(plugins)) => {
            super::network_verb(plugins, &info, env, conf, |chain| chain.status())
        }
        (Some(_), None) => Ok(()),
        (None, _) => {
            can_start_infra(conf.outbound).map_err(|msg| Error::new(Kind::PluginNotAvailable, msg))
        }
    }
}

/// What starting the infra needs, checked without starting it.
pub fn can_start_infra(engine: crate::infra::outbound::Engine) -> std::result::Result<(), String> {
    engine_in_path(engine)?;
    let name = engine.name();
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| format!("cannot open /dev/net/tun ({e}); {name} needs it"))?;
    let mut probe = std::process::Command::new("/bin/true");
    // SAFETY: runs between fork and exec; unshare is async-signal-safe.
    unsafe {
        probe.pre_exec(|| {
            nix::sched::unshare(
                nix::sched::CloneFlags::CLONE_NEWNET | nix::sched::CloneFlags::CLONE_NEWNS,
            )
            .map_err(std::io::Error::from)
        });
    }
    match probe.status() {
        Ok(s) if s.success() => Ok(()),
        Ok(_) | Err(_) => Err(
            "cannot create network and mount namespaces here: run the runtime inside a user namespace (rootless podman, rootlesskit, unshare -Ur)"
                .into(),
        ),
    }
}

/// The way out `engine` is in PATH, or what to install.
pub fn engine_in_path(engine: crate::infra::outbound::Engine) -> std::result::Result<(), String> {
    let (name, package) = match engine {
        crate::infra::outbound::Engine::Slirp4netns => ("slirp4netns", "slirp4netns"),
        crate::infra::outbound::Engine::Pasta => ("pasta", "passt"),
    };
    find_in_path(name).map(drop).ok_or(format!(
        "{name} is not in PATH (Debian/Ubuntu: apt-get install {package})"
    ))
}

pub fn find_in_path(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|f| f.is_file())
        })
        .unwrap_or(None)
}
