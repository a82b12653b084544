//! CHECK: the attachment must exist in the running infra; then the inner
//! plugins check it against the recorded result.

use super::{attachment_key, cached_result_for, recorded_list};
use crate::chain::{self, Chain};
use crate::cni::config::NetConf;
use crate::cni::env::CniEnv;
use crate::error::{code, Error, Result};
use crate::exec::{ContainerNetns, InfraNs};
use crate::infra;
use crate::state::AttachmentState;

pub fn check(env: &CniEnv, conf: &NetConf) -> Result<()> {
    let key = attachment_key(env, conf);
    let unknown = || {
        Error::new(
            code::ATTACHMENT_LOST,
            format!(
                "container {} has no attachment {} on network {}",
                key.container_id, key.ifname, key.network
            ),
        )
    };
    let state = super::state_dir(conf, false)?.ok_or_else(unknown)?;
    let (record, info) = {
        let lock = state.lock()?;
        (
            state.read_attachment(&key, &lock)?,
            infra::running(&state, &lock)?,
        )
    };
    let record = record.ok_or_else(unknown)?;
    let Some(info) = info.filter(|i| i.sandbox == record.infra) else {
        return Err(Error::new(
            code::ATTACHMENT_LOST,
            format!(
                "attachment of container {} ({} on network {}) was lost: the infra it lived in (sandbox pid {}) is gone; DEL it and ADD it again",
                key.container_id, key.ifname, key.network, record.infra.pid
            ),
        ));
    };
    if record.state == AttachmentState::Pending {
        return Err(Error::new(
            code::TRY_AGAIN_LATER,
            format!(
                "the ADD of {} is still running; try again later",
                key.container_id
            ),
        ));
    }
    let list = recorded_list(&record)?;
    if list.disable_check {
        return Ok(());
    }
    let binaries = chain::find_binaries(&list, &env.path)?;
    let netns = ContainerNetns::open(env.netns())?;
    let infra_ns = InfraNs::open(&info)?;
    let cached = cached_result_for(&record, &netns.inner_path()).ok_or_else(unknown)?;
    Chain {
        list: &list,
        binaries,
        infra: &infra_ns,
        netns: &netns,
        env,
        capability_args: &record.capability_args,
        timeout: conf.plugin_timeout,
    }
    .check(&cached)
}
