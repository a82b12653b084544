//! `gc`: the GC verb from the command line.

use super::{open_state, Flags, DEFAULT_CNI_PATH};
use crate::cni::config::DEFAULT_PLUGIN_TIMEOUT;
use crate::error::{Error, Result};
use crate::infra::{self, InfraInfo};
use crate::state::Attachment;
use serde_json::json;
use std::path::PathBuf;

pub fn gc(state_dir: Option<PathBuf>, flags: &Flags) -> Result<()> {
    let as_json = flags.has("--json");
    let Some(state) = open_state(state_dir)? else {
        report(as_json, &[]);
        return Ok(());
    };
    let cni_path: Vec<PathBuf> = flags
        .values("--cni-path")
        .last()
        .map(String::from)
        .or_else(|| std::env::var("CNI_PATH").ok())
        .unwrap_or_else(|| DEFAULT_CNI_PATH.to_string())
        .split(':')
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .collect();
    let valid = flags
        .values("--valid")
        .map(parse_valid)
        .collect::<Result<Vec<_>>>()?;
    let info = infra::running(&state, &state.lock()?)?;
    let stale: Vec<Attachment> = state
        .list_attachments()?
        .into_iter()
        .filter(|a| {
            if valid.is_empty() {
                is_gone(a, info.as_ref())
            } else {
                !valid
                    .iter()
                    .any(|(id, ifname)| *id == a.container_id && *ifname == a.ifname)
            }
        })
        .collect();
    // An attachment that could not be collected must not keep an infra
    // the others left idle: both are tried, then both reported.
    let collected = crate::commands::gc::collect(&state, &cni_path, DEFAULT_PLUGIN_TIMEOUT, &stale);
    let stopped = state
        .lock()
        .and_then(|lock| infra::stop_if_idle(&state, &lock, false));
    collected?;
    stopped?;
    report(as_json, &stale);
    Ok(())
}

/// "ID/IFNAME", or just "ID" for eth0.
fn parse_valid(v: &str) -> Result<(String, String)> {
    let (id, ifname) = v.split_once('/').unwrap_or((v, "eth0"));
    crate::cni::env::validate_container_id(id)
        .and_then(|_| crate::cni::env::validate_ifname(ifname))
        .map_err(|e| Error::internal(format!("--valid {v:?}: {}", e.msg)))?;
    Ok((id.to_string(), ifname.to_string()))
}

/// Lost with its infra, or its container netns is no longer the one it was
/// attached to.
fn is_gone(a: &Attachment, info: Option<&InfraInfo>) -> bool {
    if !info.is_some_and(|i| i.sandbox == a.infra) {
        return true;
    }
    match (&a.netns, a.netns_inode) {
        (Some(path), Some(ino)) => crate::procfs::ns_inode(path) != Some(ino),
        (Some(path), None) => !std::path::Path::new(path).exists(),
        (None, _) => false,
    }
}

fn report(as_json: bool, removed: &[Attachment]) {
    if as_json {
        let list: Vec<_> = removed
            .iter()
            .map(|a| json!({"containerId": a.container_id, "ifname": a.ifname, "network": a.network}))
            .collect();
        println!("{}", json!({ "removed": list }));
        return;
    }
    if removed.is_empty() {
        println!("nothing to collect");
    }
    for a in removed {
        println!(
            "removed {} {} (network {})",
            a.container_id, a.ifname, a.network
        );
    }
}
