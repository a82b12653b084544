//! `gc`: the GC verb from the command line.

use super::{open_state, DEFAULT_CNI_PATH};
use crate::cni::config::DEFAULT_PLUGIN_TIMEOUT;
use crate::error::{Error, Result};
use crate::infra::{self, InfraInfo};
use crate::state::Attachment;
use serde_json::json;
use std::path::PathBuf;

/// `valid`: the attachments to keep ("ID/IFNAME"); none: keep the live.
pub fn gc(
    state_dir: Option<PathBuf>,
    valid: &[String],
    cni_path: Option<String>,
    as_json: bool,
) -> Result<()> {
    let Some(state) = open_state(state_dir)? else {
        report(as_json, &[], &[]);
        return Ok(());
    };
    let cni_path: Vec<PathBuf> = cni_path
        .or_else(|| std::env::var("CNI_PATH").ok())
        .unwrap_or_else(|| DEFAULT_CNI_PATH.to_string())
        .split(':')
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .collect();
    let valid = valid
        .iter()
        .map(|v| parse_valid(v))
        .collect::<Result<Vec<_>>>()?;
    let info = infra::reap_and_join(&state, &state.lock()?)?;
    let mut stale = Vec::new();
    let mut kept = Vec::new();
    for a in state.list_attachments()? {
        if !valid.is_empty() {
            if !valid
                .iter()
                .any(|(id, ifname)| *id == a.container_id && *ifname == a.ifname)
            {
                stale.push(a);
            }
            continue;
        }
        match verdict(&a, info.as_ref()) {
            Verdict::Gone => stale.push(a),
            Verdict::Alive => {}
            Verdict::CannotTell(why) => kept.push((a, why)),
        }
    }
    // An attachment that could not be collected must not keep an infra
    // the others left idle: both are tried, then both reported.
    let collected = crate::commands::gc::collect(&state, &cni_path, DEFAULT_PLUGIN_TIMEOUT, &stale);
    let stopped = state
        .lock()
        .and_then(|lock| infra::stop_if_idle(&state, &lock, false));
    collected?;
    stopped?;
    report(as_json, &stale, &kept);
    Ok(())
}

/// What `gc` without `--valid` knows of an attachment.
enum Verdict {
    /// Its infra died, or its netns is gone: to collect.
    Gone,
    Alive,
    /// Its netns is not at the recorded path from here, yet still exists
    /// (the runtime sees the path in another mount namespace, as rootless
    /// podman does): kept, and the user told why.
    CannotTell(String),
}

/// "ID/IFNAME", or just "ID" for eth0.
fn parse_valid(v: &str) -> Result<(String, String)> {
    let (id, ifname) = v.split_once('/').unwrap_or((v, "eth0"));
    crate::cni::env::validate_container_id(id)
        .and_then(|_| crate::cni::env::validate_ifname(ifname))
        .map_err(|e| Error::internal(format!("--valid {v:?}: {}", e.msg)))?;
    Ok((id.to_string(), ifname.to_string()))
}

/// Gone only on proof: lost with its infra, or its netns exists nowhere we
/// can see. A path is seen from our own mount namespace, and the runtime's
/// may differ (rootless podman's netns files are mounts only inside its
/// rootless-netns; from the user's shell they are empty files): a netns
/// that is not at its path from here but still has a process in it or a
/// mount of it is alive to someone, so it is kept.
fn verdict(a: &Attachment, info: Option<&InfraInfo>) -> Verdict {
    let Some(info) = info.filter(|i| i.sandbox == a.infra) else {
        return Verdict::Gone;
    };
    match (&a.netns, a.netns_inode) {
        (Some(path), Some(ino)) => {
            if crate::procfs::ns_inode(path) == Some(ino) {
                return Verdict::Alive;
            }
            match netns_still_held(ino, &infra_mount_namespaces(info)) {
                None => Verdict::Gone,
                Some(holder) => Verdict::CannotTell(format!(
                    "{path} is not its netns (net:[{ino}]) from here, but that netns still exists ({holder}); run gc where the runtime sees its netns files (podman: `podman unshare rootless-cni gc`), or name the attachments to keep with --valid"
                )),
            }
        }
        (Some(path), None) if std::path::Path::new(path).exists() => Verdict::Alive,
        (Some(_), None) => Verdict::Gone,
        (None, _) => Verdict::Alive,
    }
}

/// The mount namespaces of the infra's sandbox and its way out: copies of
/// the caller's, made when the infra started, so they hold copies of the
/// netns mounts the runtime had then; those are no sign of life.
fn infra_mount_namespaces(info: &InfraInfo) -> std::collections::HashSet<u64> {
    let mut set: std::collections::HashSet<u64> = [info.mntns].into_iter().collect();
    if let Some(p) = info.outbound_process().filter(|p| p.is_alive()) {
        set.extend(crate::procfs::ns_inode(format!("/proc/{}/ns/mnt", p.pid)));
    }
    set
}

/// Who still holds the network namespace of inode `ino`, as far as /proc
/// shows us: a process in it, or an nsfs mount of it in any mount
/// namespace a visible process is in (our own included, the infra's own
/// `ignored`).
fn netns_still_held(ino: u64, ignored: &std::collections::HashSet<u64>) -> Option<String> {
    if let Some(p) = crate::procfs::in_netns(ino).first() {
        return Some(format!("process {} is in it", p.pid));
    }
    let root = format!("net:[{ino}]");
    let mounted_in = |mountinfo: &str| -> Option<String> {
        std::fs::read_to_string(mountinfo)
            .ok()?
            .lines()
            .map(|l| l.split(' ').collect::<Vec<_>>())
            .find(|f| f.len() > 4 && f[3] == root)
            .map(|f| f[4].to_string())
    };
    if let Some(at) = mounted_in("/proc/self/mountinfo") {
        return Some(format!("mounted at {at} here"));
    }
    let mut seen = ignored.clone();
    let pids = std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok());
    for pid in pids {
        let Some(mntns) = crate::procfs::ns_inode(format!("/proc/{pid}/ns/mnt")) else {
            continue;
        };
        if !seen.insert(mntns) {
            continue;
        }
        if let Some(at) = mounted_in(&format!("/proc/{pid}/mountinfo")) {
            return Some(format!(
                "mounted at {at} in the mount namespace of process {pid}"
            ));
        }
    }
    None
}

fn report(as_json: bool, removed: &[Attachment], kept: &[(Attachment, String)]) {
    if as_json {
        let list: Vec<_> = removed
            .iter()
            .map(|a| json!({"containerId": a.container_id, "ifname": a.ifname, "network": a.network}))
            .collect();
        let kept: Vec<_> = kept
            .iter()
            .map(|(a, why)| json!({"containerId": a.container_id, "ifname": a.ifname, "network": a.network, "reason": why}))
            .collect();
        println!("{}", json!({ "removed": list, "kept": kept }));
        return;
    }
    for (a, why) in kept {
        println!(
            "kept {} {} (network {}): cannot tell whether it is gone: {why}",
            a.container_id, a.ifname, a.network
        );
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
