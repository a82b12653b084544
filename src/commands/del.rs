//! DEL: tolerant of everything already gone, as the spec asks. Runs the
//! inner DEL with the recorded config and result, forgets the attachment,
//! and stops the infra when it was the last one.

use super::attachment_key;
use super::publish;
use crate::chain::{Chain, InfraExec, RuntimeConf};
use crate::cni::config::NetConf;
use crate::cni::env::CniEnv;
use crate::error::{Kind, Result};
use crate::exec::{self, ContainerNetns};
use crate::infra;
use crate::state::AttachmentState;

pub fn del(env: &CniEnv, conf: &NetConf) -> Result<()> {
    let Some(state) = super::state_dir_to_undo(conf)? else {
        return Ok(());
    };
    let key = attachment_key(env, conf);
    let (record, info, killed_owner) = {
        let lock = state.lock()?;
        let record = match state.read_attachment(&key, &lock) {
            Ok(r) => r,
            // Another release's record: neither ours to read nor to drop.
            Err(e) if e.kind == Kind::NewerState => return Err(e),
            Err(e) => {
                log::warn!("forgetting unreadable record: {e}");
                state.remove_attachment(&key, &lock)?;
                None
            }
        };
        let info = infra::reap_and_join(&state, &lock)?;
        let killed_owner = match (&record, &info) {
            (Some(rec), Some(info)) if rec.infra == info.sandbox => {
                super::claim(&state, rec, &key)?
            }
            _ => false,
        };
        (record, info, killed_owner)
    };
    let Some(record) = record else {
        log::info!(
            "nothing attached for {}/{}; nothing to do",
            key.container_id,
            key.ifname
        );
        let lock = state.lock()?;
        // The lock was let go since the record was read: an ADD of this key
        // that began meanwhile has a record again (or another release's is
        // there), and keeps it with its forwards.
        if matches!(state.read_attachment(&key, &lock), Ok(None)) {
            // Forwards under this key whose record is gone (a killed ADD's,
            // its record removed) are closed.
            if info.is_some() {
                publish::close_forwards(&state, &key);
            }
            // An ADD killed while writing its first record leaves only the
            // temporary file, which this takes away.
            state.remove_attachment(&key, &lock)?;
        }
        // An idle infra left by a crashed call still goes.
        return infra::stop_if_idle(&state, &lock, false);
    };

    let live_infra = info.filter(|i| i.sandbox == record.infra);
    match &live_infra {
        None => log::info!("{} died with its infra; forgetting it", key.container_id),
        Some(info) => {
            if killed_owner {
                exec::settle_orphans(info, &key.container_id, &key.ifname, conf.plugin_timeout);
            }
            publish::unpublish_recorded(&state, &record);
            let netns = ContainerNetns::open_if_present(env.netns.as_deref(), record.netns_inode);
            let rt = RuntimeConf::of_call(env, conf, netns).with_recorded_args(&record);
            let chain = Chain::recorded(&record, &rt, || InfraExec::open(info))?;
            let deleted = chain.del(chain.cached_result(&record).as_ref());
            match (deleted, record.state) {
                (Ok(()), _) => {}
                // An ADD killed half-way leaves state the plugins' DEL may
                // trip over (a chain never made); what could be undone was,
                // and keeping the record would keep the infra forever.
                // A failed ADD whose rollback failed: this DEL tried again.
                (Err(e), AttachmentState::Pending | AttachmentState::Failed) => {
                    log::warn!("DEL of the interrupted ADD of {}: {e}", key.container_id)
                }
                (Err(e), AttachmentState::Ready) => return Err(e),
            }
        }
    }

    let lock = state.lock()?;
    // The lock was let go meanwhile: an ADD of this key that found the
    // record's infra dead (nothing claimed a record of a dead infra, and an
    // infra may die under the chain) has its own record and leases now,
    // which are not this DEL's to drop.
    match state.read_attachment(&key, &lock) {
        Ok(Some(now)) if !now.is_same_as(&record) => {
            log::info!(
                "{} was added again while this DEL ran; its new attachment is left",
                key.container_id
            );
            return Ok(());
        }
        Err(e) if e.kind == Kind::NewerState => return Err(e),
        _ => {}
    }
    if live_infra.is_none() {
        state.release_dead_leases(&key.container_id, &key.ifname, &lock);
    }
    state.remove_attachment(&key, &lock)?;
    infra::stop_if_idle(&state, &lock, false)
}
