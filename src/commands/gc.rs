//! GC (spec 1.1.0): forget every attachment of this network that the
//! runtime no longer lists, running the inner DEL with what was recorded at
//! ADD; then pass GC on to inner plugins that know it.

use super::publish;
use crate::chain::{self, Chain, InfraExec, RuntimeConf};
use crate::cni::config::NetConf;
use crate::cni::env::CniEnv;
use crate::error::{Error, ErrorList, Kind, Result};
use crate::infra::{self, InfraInfo};
use crate::procfs::ProcessId;
use crate::state::{Attachment, AttachmentState, StateDir};
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

pub fn gc(env: &CniEnv, conf: &NetConf) -> Result<()> {
    let valid = conf.valid_attachments.as_ref().ok_or_else(|| {
        Error::config("GC needs \"cni.dev/valid-attachments\" (the attachments to keep)")
    })?;
    let Some(state) = super::state_dir_to_undo(conf)? else {
        return Ok(());
    };
    let keep: HashSet<(&str, &str)> = valid
        .iter()
        .map(|(c, i)| (c.as_str(), i.as_str()))
        .collect();
    let stale: Vec<Attachment> = state
        .list_attachments()?
        .into_iter()
        .filter(|a| {
            a.network == conf.name && !keep.contains(&(a.container_id.as_str(), a.ifname.as_str()))
        })
        .collect();
    // The spec: GC carries on past a failure and reports them all; a stale
    // attachment that cannot be deleted must not keep the inner plugins
    // from collecting what they hold.
    let mut errors = ErrorList::default();
    errors.push_if_err(collect(&state, &env.path, conf.plugin_timeout, &stale));
    errors.push_if_err(inner_gc(&state, env, conf, valid));
    errors.push_if_err(
        state
            .lock()
            .and_then(|lock| infra::stop_if_idle(&state, &lock, false)),
    );
    errors.into_result()
}

/// GC through the inner plugins that know it, in the running infra.
fn inner_gc(
    state: &StateDir,
    env: &CniEnv,
    conf: &NetConf,
    valid: &[(String, String)],
) -> Result<()> {
    let Some(info) = infra::reap_and_join(state, &state.lock()?)? else {
        return Ok(());
    };
    let list = conf.inner_list()?;
    if list.disable_gc {
        return Ok(());
    }
    let plugins = chain::find_binaries(list, &env.path)?;
    super::network_verb(plugins, &info, env, conf, |chain| chain.gc(valid))
}

/// Runs the inner DEL of each stale attachment and forgets it. Used by the
/// GC verb and by `rootless-cni gc`. `stale` was read without the lock, so
/// the runtime may have deleted and re-added any of them since: each is
/// read again and claimed under the lock, and left alone unless it is still
/// the same attachment and nobody else is working on it.
pub fn collect(
    state: &StateDir,
    cni_path: &[PathBuf],
    timeout: Duration,
    stale: &[Attachment],
) -> Result<()> {
    let mut errors = ErrorList::default();
    for seen in stale {
        let claimed = match claim_stale(state, seen) {
            Ok(Some(claimed)) => claimed,
            Ok(None) => continue,
            Err(e) => {
                errors.push_if_err::<()>(Err(e.context(format!("GC of {}", seen.container_id))));
                continue;
            }
        };
        let (rec, info, killed_owner) = claimed;
        log::info!(
            "GC: removing {} {} from network {}",
            rec.container_id,
            rec.ifname,
            rec.network
        );
        let deleted = match &info {
            Some(info) => delete_recorded(state, info, cni_path, timeout, &rec, killed_owner),
            // Gone with its infra: nothing to undo but its leases (below).
            None => Ok(()),
        };
        match (deleted, rec.state) {
            (Ok(()), _) => {}
            // As DEL does: an ADD that was killed half-way, or failed and
            // could not roll back, leaves what the plugins' DEL may trip
            // over; what could be undone was, and keeping the record would
            // keep the infra forever.
            (Err(e), AttachmentState::Pending | AttachmentState::Failed) => {
                log::warn!("GC of the interrupted ADD of {}: {e}", rec.container_id)
            }
            (Err(e), AttachmentState::Ready) => {
                errors.push_if_err::<()>(Err(e.context(format!("GC of {}", rec.container_id))));
                continue;
            }
        }
        errors.push_if_err(forget_claimed(state, &rec, info.is_none()));
    }
    errors.into_result()
}

/// Under the lock: the record `seen` named, if it is still that attachment
/// and no live call owns it, now owned by this GC; with its infra when that
/// runs, and whether a killed call owned it.
fn claim_stale(
    state: &StateDir,
    seen: &Attachment,
) -> Result<Option<(Attachment, Option<InfraInfo>, bool)>> {
    let key = seen.key();
    let lock = state.lock()?;
    let rec = match state.read_attachment(&key, &lock)? {
        Some(rec) if rec.is_same_as(seen) => rec,
        _ => {
            log::info!(
                "GC: {} {} was deleted or added again meanwhile; left alone",
                key.container_id,
                key.ifname
            );
            return Ok(None);
        }
    };
    let killed_owner = match super::claim(state, &rec, &key) {
        Ok(killed) => killed,
        Err(e) if e.kind == Kind::TryAgainLater => {
            log::info!("GC: {}: {}; kept", key.container_id, e.msg);
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let info = infra::reap_and_join(state, &lock)?.filter(|i| i.sandbox == rec.infra);
    Ok(Some((rec, info, killed_owner)))
}

/// Removes the record this GC claimed, if it still owns it; with its infra
/// dead, releases its leases too.
fn forget_claimed(state: &StateDir, rec: &Attachment, infra_dead: bool) -> Result<()> {
    let key = rec.key();
    let lock = state.lock()?;
    let me = ProcessId::of(std::process::id() as i32);
    match state.read_attachment(&key, &lock)? {
        Some(now) if now.is_same_as(rec) && now.owner == me => {}
        _ => {
            log::info!("GC: {} changed hands meanwhile; left", key.container_id);
            return Ok(());
        }
    }
    if infra_dead {
        state.release_dead_leases(&rec.container_id, &rec.ifname, &lock);
    }
    state.remove_attachment(&key, &lock)
}

/// The inner DEL of `rec`, its forwards closed first; `killed_owner`: a
/// killed call's inner plugins are waited for first.
pub(super) fn delete_recorded(
    state: &StateDir,
    info: &InfraInfo,
    cni_path: &[PathBuf],
    timeout: Duration,
    rec: &Attachment,
    killed_owner: bool,
) -> Result<()> {
    publish::unpublish_recorded(state, rec);
    let rt = RuntimeConf::of_record(rec, cni_path, timeout);
    if killed_owner {
        // An ADD or DEL of it was killed: its inner plugins may still run.
        crate::exec::settle_orphans(info, &rec.container_id, &rec.ifname, timeout);
    }
    let chain = Chain::recorded(rec, &rt, || InfraExec::open(info))?;
    chain.del(chain.cached_result(rec).as_ref())
}
