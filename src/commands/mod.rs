//! The CNI verbs, one a file, and what they share.

pub mod add;
pub mod check;
pub mod del;
pub mod gc;
mod pending;
mod publish;
pub mod status;
pub mod version;

use crate::chain::{Chain, InfraExec, Plugins, RuntimeConf};
use crate::cni::config::NetConf;
use crate::cni::env::CniEnv;
use crate::error::{Error, Kind, Result};
use crate::exec::{ContainerNetns, PluginBinary};
use crate::infra::InfraInfo;
use crate::procfs::ProcessId;
use crate::state::{Attachment, AttachmentKey, AttachmentState, StateDir};

/// The state dir the config names, created when `create`, else None when
/// there is none yet; with the config's lock timeout.
fn state_dir(conf: &NetConf, create: bool) -> Result<Option<StateDir>> {
    let path = StateDir::resolve(conf.state_dir.as_deref())?;
    let dir = if create {
        Some(StateDir::create(path)?)
    } else {
        StateDir::open_existing(path)?
    };
    Ok(dir.map(|d| d.with_lock_timeout(conf.lock_timeout)))
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

/// GC or STATUS (`verb`) through the inner chain, in the running infra:
/// verbs about the whole network, so no container and no netns.
fn network_verb(
    plugins: Plugins<PluginBinary>,
    info: &InfraInfo,
    env: &CniEnv,
    conf: &NetConf,
    verb: impl FnOnce(&Chain<InfraExec>) -> Result<()>,
) -> Result<()> {
    let rt = RuntimeConf::of_call(env, conf, ContainerNetns::open_if_present(None, None));
    verb(&Chain::new(plugins, &rt, InfraExec::open(info)?))
}

fn attachment_key(env: &CniEnv, conf: &NetConf) -> AttachmentKey {
    AttachmentKey {
        network: conf.name.clone(),
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    }
}

/// Makes this call (a DEL, or a GC dropping the attachment) the record's
/// owner, under the lock, so a second call on the attachment knows one
/// runs. Code 11 while another live call owns it; true when the owner was a
/// call that was killed: its inner plugins may still be running, and must
/// be waited for.
pub(crate) fn claim(state: &StateDir, record: &Attachment, key: &AttachmentKey) -> Result<bool> {
    let me = ProcessId::of(std::process::id() as i32);
    let previous = record.owner.filter(|o| Some(*o) != me);
    if previous.is_some_and(|o| o.is_alive()) {
        let what = match record.state {
            AttachmentState::Pending => "an ADD",
            AttachmentState::Ready | AttachmentState::Failed => "a DEL",
        };
        return Err(Error::new(
            Kind::TryAgainLater,
            format!(
                "{what} of {} on {} is still running; try again later",
                key.container_id, key.ifname
            ),
        ));
    }
    let mut mine = record.clone();
    mine.owner = me;
    // A marker, not a commitment: not worth an fsync (see write_progress).
    state.write_progress(&mine)?;
    Ok(previous.is_some())
}
