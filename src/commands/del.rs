//! DEL: tolerant of everything already gone, as the spec asks. Runs the
//! inner DEL with the recorded config and result, forgets the attachment,
//! and stops the infra when it was the last one.

use super::{attachment_key, cached_result_for, recorded_list};
use crate::chain::{self, Chain};
use crate::cni::config::NetConf;
use crate::cni::env::CniEnv;
use crate::error::{code, Error, Result};
use crate::exec::{ContainerNetns, InfraNs};
use crate::infra;
use crate::state::AttachmentState;

pub fn del(env: &CniEnv, conf: &NetConf) -> Result<()> {
    let Some(state) = super::state_dir(conf, false)? else {
        return Ok(());
    };
    let key = attachment_key(env, conf);
    let (record, info) = {
        let lock = state.lock()?;
        let record = match state.read_attachment(&key, &lock) {
            Ok(r) => r,
            Err(e) => {
                log::warn!("forgetting unreadable record: {e}");
                state.remove_attachment(&key, &lock)?;
                None
            }
        };
        (record, infra::running(&state, &lock)?)
    };
    let Some(record) = record else {
        log::info!(
            "nothing attached for {}/{}; nothing to do",
            key.container_id,
            key.ifname
        );
        return Ok(());
    };

    match info.filter(|i| i.sandbox == record.infra) {
        None => log::info!("{} died with its infra; forgetting it", key.container_id),
        Some(info) => {
            let me = std::process::id() as i32;
            if record.state == AttachmentState::Pending
                && record.owner.is_some_and(|o| o.pid != me && o.is_alive())
            {
                return Err(Error::new(
                    code::TRY_AGAIN_LATER,
                    format!(
                        "an ADD of {} on {} is still running; try again later",
                        key.container_id, key.ifname
                    ),
                ));
            }
            // A broken record must not block the DEL: no ports then.
            let mappings =
                crate::ports::from_runtime_config(&record.capability_args).unwrap_or_default();
            super::add::unpublish_ports(&state, &key, &mappings);
            let list = recorded_list(&record)?;
            let binaries = chain::find_binaries(&list, &env.path)?;
            let netns = ContainerNetns::open_if_present(env.netns.as_deref());
            let infra_ns = InfraNs::open(&info)?;
            let cached = cached_result_for(&record, &netns.inner_path());
            Chain {
                list: &list,
                binaries,
                infra: &infra_ns,
                netns: &netns,
                env,
                capability_args: &record.capability_args,
                timeout: conf.plugin_timeout,
            }
            .del(cached.as_ref())?;
        }
    }

    let lock = state.lock()?;
    state.remove_attachment(&key, &lock)?;
    infra::stop_if_idle(&state, &lock, false)
}
