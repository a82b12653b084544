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

fn attachment_key(env: &CniEnv, conf: &NetConf) -> AttachmentKey {
    AttachmentKey {
        network: conf.name.clone(),
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    }
}
