//! The inner plugins a killed call left running in the infra, found by
//! what we gave them, and waited for (or killed) before the next call on
//! their attachment.

use crate::infra::InfraInfo;
use crate::procfs::{self, ProcessId};
use crate::sys;
use std::time::{Duration, Instant};

/// Waits for inner plugins that still run for `container_id`/`ifname` in
/// the infra after the call that started them was killed, so the next call
/// on that attachment does not race them; after `timeout` (pluginTimeout)
/// their groups are killed. They are found by what we gave them: the
/// infra's netns and CNI_CONTAINERID/CNI_IFNAME in their environment.
/// Only a call that finds a pending record of a dead caller looks.
pub fn settle_orphans(infra: &InfraInfo, container_id: &str, ifname: &str, timeout: Duration) {
    let orphans = orphans_of(infra, container_id, ifname);
    if orphans.is_empty() {
        return;
    }
    log::info!(
        "waiting for {} inner plugin process(es) of {container_id} left by a killed call",
        orphans.len()
    );
    let (id_var, ifname_var) = orphan_vars(container_id, ifname);
    let deadline = sys::deadline(timeout);
    while orphans.iter().any(ProcessId::is_alive) {
        if Instant::now() >= deadline {
            log::warn!("inner plugins of {container_id} still run after {timeout:?}; killing");
            for p in &orphans {
                // The plugin leads its group (process_group(0)); a child of
                // it that it started, e.g. iptables, is killed with it. The
                // PID is pinned and re-checked first: it may have exited and
                // been reused since the scan.
                p.kill_group_if(|p| is_orphan_of(p, infra.netns, &id_var, &ifname_var));
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn orphans_of(infra: &InfraInfo, container_id: &str, ifname: &str) -> Vec<ProcessId> {
    let (id_var, ifname_var) = orphan_vars(container_id, ifname);
    procfs::in_netns(infra.netns)
        .into_iter()
        .filter(|p| p.pid != infra.sandbox.pid)
        .filter(|p| has_vars(p, &id_var, &ifname_var))
        .collect()
}

fn orphan_vars(container_id: &str, ifname: &str) -> (String, String) {
    (
        format!("CNI_CONTAINERID={container_id}"),
        format!("CNI_IFNAME={ifname}"),
    )
}

/// Still in the infra's netns with the attachment's variables.
fn is_orphan_of(p: &ProcessId, netns: u64, id_var: &str, ifname_var: &str) -> bool {
    procfs::ns_inode(format!("/proc/{}/ns/net", p.pid)) == Some(netns)
        && has_vars(p, id_var, ifname_var)
}

fn has_vars(p: &ProcessId, id_var: &str, ifname_var: &str) -> bool {
    let environ = std::fs::read(format!("/proc/{}/environ", p.pid)).unwrap_or_default();
    let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
    vars.contains(&id_var.as_bytes()) && vars.contains(&ifname_var.as_bytes())
}
