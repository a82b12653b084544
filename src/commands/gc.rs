//! GC (spec 1.1.0): forget every attachment of this network that the
//! runtime no longer lists, running the inner DEL with what was recorded at
//! ADD; then pass GC on to inner plugins that know it.

use crate::chain::{self, Chain};
use crate::cni::config::NetConf;
use crate::cni::env::{CniEnv, Command as Verb};
use crate::error::{Error, ErrorList, Result};
use crate::exec::ContainerNetns;
use crate::infra::{self, InfraInfo};
use crate::state::{Attachment, StateDir};
use serde_json::json;
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
    collect(&state, &env.path, conf.plugin_timeout, &stale)?;

    let info = infra::running(&state, &state.lock()?)?;
    if let Some(info) = info {
        let list = conf.inner_list()?;
        if !list.disable_gc {
            let attachments: Vec<_> = valid
                .iter()
                .map(|(c, i)| json!({"containerID": c, "ifname": i}))
                .collect();
            let binaries = chain::find_binaries(&list, &env.path)?;
            let extra = ("cni.dev/valid-attachments", json!(attachments));
            super::network_verb(list, binaries, &info, env, conf, Verb::Gc, Some(extra))?;
        }
    }
    infra::stop_if_idle(&state, &state.lock()?, false)
}

/// Runs the inner DEL of each stale attachment and forgets it. Used by the
/// GC verb and by `rootless-cni gc`.
pub fn collect(
    state: &StateDir,
    cni_path: &[PathBuf],
    timeout: Duration,
    stale: &[Attachment],
) -> Result<()> {
    let info = infra::running(state, &state.lock()?)?;
    let mut errors = ErrorList::default();
    for rec in stale {
        if rec.owner.is_some_and(|o| o.is_alive()) {
            log::info!(
                "GC: {} is being added or deleted right now; kept",
                rec.container_id
            );
            continue;
        }
        log::info!(
            "GC: removing {} {} from network {}",
            rec.container_id,
            rec.ifname,
            rec.network
        );
        let live_infra = info.as_ref().filter(|i| i.sandbox == rec.infra);
        let deleted = match live_infra {
            Some(info) => delete_recorded(state, info, cni_path, timeout, rec),
            // Gone with its infra: nothing to undo but its leases (below).
            None => Ok(()),
        };
        match deleted {
            Ok(()) => {
                let lock = state.lock()?;
                if live_infra.is_none() {
                    state.release_dead_leases(&rec.container_id, &rec.ifname, &lock);
                }
                errors.push_if_err(state.remove_attachment(&rec.key(), &lock));
            }
            Err(e) => {
                errors.push_if_err::<()>(Err(e.context(format!("GC of {}", rec.container_id))))
            }
        }
    }
    errors.into_result()
}

fn delete_recorded(
    state: &StateDir,
    info: &InfraInfo,
    cni_path: &[PathBuf],
    timeout: Duration,
    rec: &Attachment,
) -> Result<()> {
    let key = rec.key();
    let mappings = crate::ports::from_runtime_config(&rec.capability_args).unwrap_or_default();
    super::add::unpublish_ports(state, &key, &mappings);
    let netns_path = rec.netns.as_deref().map(std::path::Path::new);
    let netns = ContainerNetns::open_if_present(netns_path);
    let del_env = CniEnv {
        command: Verb::Del,
        container_id: rec.container_id.clone(),
        netns: netns_path.map(|p| p.to_path_buf()),
        ifname: rec.ifname.clone(),
        args: rec.cni_args.clone(),
        path: cni_path.to_vec(),
    };
    if rec.owner.is_some() {
        // An ADD or DEL of it was killed: its inner plugins may still run.
        crate::exec::settle_orphans(info, &rec.container_id, &rec.ifname, timeout);
    }
    let chain = Chain::recorded(rec, info, &netns, &del_env, timeout)?;
    chain.del(chain.cached_result(rec).as_ref())
}
