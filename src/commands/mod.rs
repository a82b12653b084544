//! The CNI verbs, one a file, and what they share.

pub mod add;
pub mod check;
pub mod del;
pub mod gc;
pub mod status;
pub mod version;

use crate::cni::config::NetConf;
use crate::cni::env::CniEnv;
use crate::error::Result;
use crate::state::{AttachmentKey, StateDir};

/// The state dir the config names, created when `create`, else None when
/// there is none yet; with the config's lock timeout.
fn state_dir(conf: &NetConf, create: bool) -> Result<Option<StateDir>> {
    let path = StateDir::resolve(conf.state_dir.as_deref())?;
    let dir = if create {
        Some(StateDir::create(path)?)
    } else {
        StateDir::open_existing(path)?
    };
    Ok(dir.map(|d| StateDir {
        lock_timeout: conf.lock_timeout,
        ..d
    }))
}

/// The state dir for DEL and GC, which only undo: None when there is none,
/// and also when none can be named (no `stateDir`, no XDG_RUNTIME_DIR and
/// no default for this user), since no ADD could have attached anything
/// then. The spec wants DEL of what is unknown to succeed.
fn state_dir_to_undo(conf: &NetConf) -> Result<Option<StateDir>> {
    if conf.state_dir.is_none() {
        if let Err(e) = StateDir::resolve(None) {
            log::info!("{}: nothing can be attached, nothing to undo", e.msg);
            return Ok(None);
        }
    }
    state_dir(conf, false)
}

/// GC or STATUS through the inner chain, in the running infra.
fn network_verb(
    list: crate::cni::config::InnerList,
    binaries: Vec<std::path::PathBuf>,
    info: &crate::infra::InfraInfo,
    env: &CniEnv,
    conf: &NetConf,
    verb: crate::cni::env::Command,
    extra: Option<(&str, serde_json::Value)>,
) -> Result<()> {
    let netns = crate::exec::ContainerNetns::open_if_present(None);
    let chain = crate::chain::Chain::new(
        list,
        binaries,
        info,
        &netns,
        env,
        &conf.runtime_config,
        conf.plugin_timeout,
    )?;
    chain.network_verb(verb, extra)
}

fn attachment_key(env: &CniEnv, conf: &NetConf) -> AttachmentKey {
    AttachmentKey {
        network: conf.name.clone(),
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    }
}
