//! An attachment's published ports on the host: opened through the
//! supervisor when an ADD starts its chain, closed when it fails and when
//! a DEL or GC removes the attachment; and the check that no two
//! attachments of an infra publish one (protocol, port).

use crate::error::Result;
use crate::infra::control::{self, Request};
use crate::infra::InfraInfo;
use crate::ports::{self, PortMapping};
use crate::state::{Attachment, AttachmentKey, StateDir, StateLock};

/// Opens the host side of the published ports through the supervisor: a
/// port that cannot be had fails the ADD before the network is touched.
pub fn publish_ports(
    state: &StateDir,
    key: &AttachmentKey,
    mappings: &[PortMapping],
) -> Result<()> {
    if mappings.is_empty() {
        return Ok(());
    }
    control::call(
        state,
        &Request::AddPorts {
            key: key.file_name(),
            mappings: mappings.to_vec(),
        },
    )
}

/// Best effort: the caller is already failing or tearing down.
pub fn unpublish_ports(state: &StateDir, key: &AttachmentKey, mappings: &[PortMapping]) {
    if !mappings.is_empty() {
        close_forwards(state, key);
    }
}

/// The ports `rec`'s ADD published, closed. A broken record must not
/// block the DEL or GC that removes it: none then.
pub fn unpublish_recorded(state: &StateDir, rec: &Attachment) {
    let mappings = ports::from_runtime_config(&rec.capability_args).unwrap_or_default();
    unpublish_ports(state, &rec.key(), &mappings);
}

/// Closes whatever the supervisor forwards under `key`, known or not.
/// Best effort too.
pub fn close_forwards(state: &StateDir, key: &AttachmentKey) {
    let req = Request::RemovePorts {
        key: key.file_name(),
    };
    if let Err(e) = control::call(state, &req) {
        log::warn!("closing the published ports of {}: {e}", key.container_id);
    }
}

/// Inside the infra every forward lands on the same address (tap0's), and
/// the inner portmap matches only protocol and port: two forwards of one
/// (protocol, port) from different host addresses would both reach
/// whichever container's rule comes first. Such a mapping is refused (code
/// 107, naming who has the port); `ports::from_runtime_config` refuses
/// the same among one ADD's own mappings.
pub fn refuse_shared_ports(
    state: &StateDir,
    _lock: &StateLock,
    key: &AttachmentKey,
    info: &InfraInfo,
    mappings: &[PortMapping],
) -> Result<()> {
    if mappings.is_empty() {
        return Ok(());
    }
    let others = state.list_attachments()?;
    let holders = others
        .iter()
        .filter(|r| r.key() != *key && r.is_live_in(&info.sandbox));
    for rec in holders {
        let theirs = ports::from_runtime_config(&rec.capability_args).unwrap_or_default();
        for m in mappings {
            if let Some(t) = theirs.iter().find(|t| t.shares_infra_port(m)) {
                return Err(ports::shared_port(
                    m,
                    &format!("container {} ({})", rec.container_id, t.describe()),
                ));
            }
        }
    }
    Ok(())
}
