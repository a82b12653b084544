//! DEL: tolerant of everything already gone, as the spec asks. Runs the
//! inner DEL with the recorded config and result, forgets the attachment,
//! and stops the infra when it was the last one.

use super::attachment_key;
use crate::chain::Chain;
use crate::cni::config::NetConf;
use crate::cni::env::CniEnv;
use crate::error::{code, Error, Result};
use crate::exec::ContainerNetns;
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
        // An idle infra left by a crashed call still goes.
        return infra::stop_if_idle(&state, &state.lock()?, false);
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
            let netns = ContainerNetns::open_if_present(env.netns.as_deref());
            let chain = Chain::recorded(&record, &info, &netns, env, conf.plugin_timeout)?;
            let deleted = chain.del(chain.cached_result(&record).as_ref());
            match (deleted, record.state) {
                (Ok(()), _) => {}
                // An ADD killed half-way leaves state the plugins' DEL may
                // trip over (a chain never made); what could be undone was,
                // and keeping the record would keep the infra forever.
                (Err(e), AttachmentState::Pending) => {
                    log::warn!("DEL of the interrupted ADD of {}: {e}", key.container_id)
                }
                (Err(e), AttachmentState::Ready) => return Err(e),
            }
        }
    }

    let lock = state.lock()?;
    state.remove_attachment(&key, &lock)?;
    infra::stop_if_idle(&state, &lock, false)
}
