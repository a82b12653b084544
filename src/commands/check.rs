//! CHECK: the attachment must exist in the running infra; then the inner
//! plugins check it against the recorded result.

use super::attachment_key;
use crate::chain::{Chain, InfraExec, RuntimeConf};
use crate::cni::config::NetConf;
use crate::cni::env::CniEnv;
use crate::error::{Error, Kind, Result};
use crate::exec::ContainerNetns;
use crate::infra;
use crate::state::AttachmentState;

pub fn check(env: &CniEnv, conf: &NetConf) -> Result<()> {
    let key = attachment_key(env, conf);
    let unknown = || {
        Error::new(
            Kind::AttachmentLost,
            format!(
                "container {} has no attachment {} on network {}",
                key.container_id, key.ifname, key.network
            ),
        )
    };
    // As libcni: an inner chain too old to know CHECK is the runtime's
    // config error, answered before anything is looked at.
    let list = conf.inner_list()?;
    crate::chain::check_knows_check(&list.cni_version, &conf.cni_version)?;
    let state = super::state_dir(conf, false)?.ok_or_else(unknown)?;
    let (record, info) = {
        let lock = state.lock()?;
        (
            state.read_attachment(&key, &lock)?,
            infra::reap_and_join(&state, &lock)?,
        )
    };
    let record = record.ok_or_else(unknown)?;
    let Some(info) = info.filter(|i| i.sandbox == record.infra) else {
        return Err(Error::new(
            Kind::AttachmentLost,
            format!(
                "attachment of container {} ({} on network {}) was lost: the infra it lived in (sandbox pid {}) is gone; DEL it and ADD it again",
                key.container_id, key.ifname, key.network, record.infra.pid
            ),
        ));
    };
    if record.state == AttachmentState::Failed {
        return Err(Error::new(
            Kind::AttachmentLost,
            format!(
                "the ADD of {} failed and left what its rollback could not undo; DEL it",
                key.container_id
            ),
        ));
    }
    // A killed ADD never finishes: what it left is for the DEL (or an ADD
    // again) to remove.
    if record.state == AttachmentState::Pending && record.owner.is_some_and(|o| !o.is_alive()) {
        return Err(Error::new(
            Kind::AttachmentLost,
            format!(
                "the ADD of {} was killed before it finished; DEL it or ADD it again",
                key.container_id
            ),
        ));
    }
    if record.state == AttachmentState::Pending {
        return Err(Error::new(
            Kind::TryAgainLater,
            format!(
                "the ADD of {} is still running; try again later",
                key.container_id
            ),
        ));
    }
    // The attachment is in place, but the container cannot reach anything
    // beyond the infra: not a working network.
    if let Some(why) = infra::outbound::outbound_down(&info) {
        return Err(Error::new(Kind::OutboundDown, why));
    }
    let netns = ContainerNetns::open(env.netns())?;
    netns.join_owner_userns()?;
    let rt = RuntimeConf::of_call(env, conf, netns).with_recorded_args(&record);
    let chain = Chain::recorded(&record, &rt, || InfraExec::open(&info))?;
    // The chain the attachment was made with may be older than today's.
    crate::chain::check_knows_check(chain.cni_version(), &conf.cni_version)?;
    if chain.disable_check() {
        return Ok(());
    }
    let cached = chain.cached_result(&record).ok_or_else(unknown)?;
    chain.check(&cached)
}
