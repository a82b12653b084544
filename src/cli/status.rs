//! `status` / `ls`: the infra and every attachment, for people or as JSON.

use super::open_state_path;
use crate::error::Result;
use crate::infra::{self, InfraInfo};
use crate::procfs;
use crate::state::{Attachment, StateDir};
use serde_json::{json, Value};
use std::path::PathBuf;

pub fn status(state_dir: Option<PathBuf>, as_json: bool) -> Result<()> {
    let path = open_state_path(state_dir)?;
    let (info, attachments) = match StateDir::open_existing(path.clone())? {
        None => (None, Vec::new()),
        Some(state) => {
            let lock = state.lock()?;
            (
                infra::reap_and_join(&state, &lock)?,
                state.list_attachments()?,
            )
        }
    };
    if as_json {
        let report = json!({
            "stateDir": path,
            "infra": info.as_ref().map(infra_json),
            "attachments": attachments.iter().map(|a| attachment_json(a, info.as_ref())).collect::<Vec<_>>(),
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
        return Ok(());
    }
    println!("state dir:   {}", path.display());
    match &info {
        None => println!("infra:       not running"),
        Some(i) => println!(
            "infra:       running for {}s: supervisor {}, sandbox {}, {} {}; mtu {}, host loopback {}",
            procfs::uptime_seconds(&i.supervisor).unwrap_or(0),
            i.supervisor.pid,
            i.sandbox.pid,
            i.settings.outbound.name(),
            i.outbound_process().map_or("-".to_string(), |p| p.pid.to_string()),
            i.settings.mtu,
            if i.settings.allow_host_loopback { "allowed" } else { "blocked" },
        ),
    }
    if let Some(i) = &info {
        match crate::infra::outbound::outbound_down(i) {
            None => println!(
                "outbound:    up ({} restarted {} time(s))",
                i.settings.outbound.name(),
                i.outbound.restarts
            ),
            Some(why) => println!("outbound:    DOWN: {why}"),
        }
        println!("clients:     {}", client_addresses(i));
    }
    println!("attachments: {}", attachments.len());
    if !attachments.is_empty() {
        println!(
            "\n{:<20} {:<8} {:<16} {:<8} {:<18} PORTS",
            "CONTAINER", "IFNAME", "NETWORK", "STATE", "ADDRESSES"
        );
        for a in &attachments {
            let id: String = a.container_id.chars().take(20).collect();
            println!(
                "{:<20} {:<8} {:<16} {:<8} {:<18} {}",
                id,
                a.ifname,
                a.network,
                attachment_state(a, info.as_ref()),
                a.addresses().join(", "),
                a.ports().join(", ")
            );
        }
    }
    Ok(())
}

fn infra_json(i: &InfraInfo) -> Value {
    json!({
        "supervisor": i.supervisor,
        "sandbox": i.sandbox,
        "slirp4netns": i.slirp4netns,
        "pasta": i.pasta,
        "uptimeSeconds": procfs::uptime_seconds(&i.supervisor),
        "mtu": i.settings.mtu,
        "allowHostLoopback": i.settings.allow_host_loopback,
        "idleTimeoutSeconds": i.settings.idle_timeout_secs,
        "outbound": outbound_json(i),
        "clientAddresses": client_addresses_json(i),
    })
}

/// What a container behind a published port sees of its client.
fn client_addresses(i: &InfraInfo) -> String {
    match (i.settings.port_driver, &i.client_addresses) {
        (infra::PortDriver::Slirp4netns, _) => {
            "seen by containers as themselves, loopback ones as 10.0.2.2 (slirp4netns port driver)"
                .into()
        }
        (_, Some(c)) => format!("addresses {}", c.describe(i.settings.ipv6)),
        (_, None) => "not recorded (a supervisor of an older release)".into(),
    }
}

fn client_addresses_json(i: &InfraInfo) -> Value {
    let kept = match (i.settings.port_driver, &i.client_addresses) {
        (infra::PortDriver::Slirp4netns, _) => Some(true),
        (_, Some(c)) => Some(c.complete(i.settings.ipv6)),
        (_, None) => None,
    };
    json!({
        "kept": kept,
        "ipv4": i.client_addresses.as_ref().map(|c| c.kept.ipv4),
        "ipv6": i.client_addresses.as_ref().map(|c| c.kept.ipv6),
        "error": i.client_addresses.as_ref().and_then(|c| c.error.clone()),
        "detail": client_addresses(i),
    })
}

/// Which way out the infra has, whether it works, and its restarts.
fn outbound_json(i: &InfraInfo) -> Value {
    let down = crate::infra::outbound::outbound_down(i);
    json!({
        "engine": i.settings.outbound.name(),
        "up": down.is_none(),
        "restarts": i.outbound.restarts,
        "failedRestarts": i.outbound.down.as_ref().map_or(0, |d| d.failed_restarts),
        "downSince": i.outbound.down.as_ref().map(|d| d.since),
        "error": down,
    })
}

fn attachment_state(a: &Attachment, info: Option<&InfraInfo>) -> &'static str {
    match (a.state, info) {
        (_, Some(i)) if i.sandbox != a.infra => "lost",
        (_, None) => "lost",
        (crate::state::AttachmentState::Pending, _) => "pending",
        (crate::state::AttachmentState::Ready, _) => "ready",
        (crate::state::AttachmentState::Failed, _) => "failed",
    }
}

fn attachment_json(a: &Attachment, info: Option<&InfraInfo>) -> Value {
    json!({
        "containerId": a.container_id,
        "ifname": a.ifname,
        "network": a.network,
        "netns": a.netns,
        "addresses": a.addresses(),
        "ports": a.ports(),
        "state": attachment_state(a, info),
        "created": a.created,
    })
}
