//! An attachment record: its key (and the file name it gets), its state,
//! and what it keeps for the DEL, CHECK and GC that come after its ADD.

use crate::procfs::ProcessId;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An attachment's identity, as the spec defines it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentKey {
    pub network: String,
    pub container_id: String,
    pub ifname: String,
}

impl AttachmentKey {
    /// Each part escaped, so no input can become a path or collide.
    /// A name too long for the file system (a legal 128-character id of
    /// dots escapes to 382) is cut, and made unique again by a hash of the
    /// whole: the record itself holds the key.
    pub fn file_name(&self) -> String {
        let name = format!(
            "{}+{}+{}",
            escape(&self.network),
            escape(&self.container_id),
            escape(&self.ifname)
        );
        // NAME_MAX is 255; the temporary file adds ".", ".json" and ".tmp".
        if name.len() <= MAX_KEY_NAME {
            return format!("{name}.json");
        }
        let prefix = &name[..KEPT_PREFIX];
        format!("{prefix}~{:032x}.json", fnv1a_128(name.as_bytes()))
    }
}

/// The longest escaped key used as it is in a file name: NAME_MAX (255)
/// less ".", ".json" and ".tmp" of the temporary file. Any key up to this
/// has the name 151877a gave it (it failed on longer ones), so a record
/// is found by either.
const MAX_KEY_NAME: usize = 245;

/// What a longer one keeps, before its hash (escaped names are ASCII).
const KEPT_PREFIX: usize = 100;

/// FNV-1a, 128 bits: stable across releases and builds (unlike std's
/// hasher), which a file name must be.
fn fnv1a_128(bytes: &[u8]) -> u128 {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013B;
    bytes.iter().fold(OFFSET, |hash, b| {
        (hash ^ u128::from(*b)).wrapping_mul(PRIME)
    })
}

/// Percent-encodes everything but letters, digits, '-' and '_'.
pub(super) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachmentState {
    /// An ADD is running the inner plugins; `owner` is that call.
    Pending,
    /// Attached. `owner`, when set, is a DEL that is running or was killed.
    Ready,
    /// An ADD failed and its rollback could not undo everything: `result`
    /// is what it knew; the DEL the runtime sends next finishes the job.
    Failed,
}

/// What the successor of podman's `attached/` and `attached-args/` keeps.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    pub state: AttachmentState,
    pub network: String,
    pub container_id: String,
    pub ifname: String,
    pub netns: Option<String>,
    /// Inode of the container netns at ADD: a path reused for another
    /// netns is not ours.
    #[serde(default)]
    pub netns_inode: Option<u64>,
    /// The sandbox of the infra the attachment lives in.
    pub infra: ProcessId,
    pub owner: Option<ProcessId>,
    pub config: Value,
    pub cni_args: String,
    pub capability_args: Map<String, Value>,
    pub result: Option<Value>,
    /// Seconds since the epoch.
    pub created: u64,
    /// The sub-second part of the creation time: with `created`, the
    /// netns inode and the infra, what tells this attachment from a later
    /// one under the same key (the runtime deleted and re-added it).
    #[serde(default)]
    pub created_nanos: u32,
}

impl Attachment {
    /// Whether the attachment is in place in the infra whose sandbox is
    /// `infra`, or being made there by a live call: what holds its ports
    /// open there. Not a failed ADD (it closed its own ports; only its
    /// leftovers are there, for its DEL), nor a killed one (the next ADD of
    /// its key takes it over).
    pub fn is_live_in(&self, infra: &ProcessId) -> bool {
        self.infra == *infra
            && match self.state {
                AttachmentState::Ready => true,
                AttachmentState::Pending => self.owner.is_some_and(|o| o.is_alive()),
                AttachmentState::Failed => false,
            }
    }

    /// Whether `other` is this very attachment, read again: not one the
    /// runtime made under the same key since.
    pub fn is_same_as(&self, other: &Attachment) -> bool {
        self.key() == other.key()
            && self.created == other.created
            && self.created_nanos == other.created_nanos
            && self.infra == other.infra
            && self.netns_inode == other.netns_inode
    }

    pub fn key(&self) -> AttachmentKey {
        AttachmentKey {
            network: self.network.clone(),
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
        }
    }

    /// Published ports, for `status`.
    pub fn ports(&self) -> Vec<String> {
        crate::ports::from_runtime_config(&self.capability_args)
            .unwrap_or_default()
            .iter()
            .map(|m| m.describe())
            .collect()
    }

    /// IP addresses from the result, for `status`.
    pub fn addresses(&self) -> Vec<String> {
        self.result
            .as_ref()
            .and_then(|r| r.get("ips"))
            .and_then(Value::as_array)
            .map(|ips| {
                ips.iter()
                    .filter_map(|ip| ip.get("address").and_then(Value::as_str).map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_keys_fit_in_a_file_name() {
        let dots = format!("a{}", ".".repeat(127));
        let key = |id: &str, ifname: &str| AttachmentKey {
            network: "n".repeat(64),
            container_id: id.to_string(),
            ifname: ifname.to_string(),
        };
        let a = key(&dots, "eth0").file_name();
        assert!(format!(".{a}.tmp").len() <= 255, "{a}");
        assert_ne!(a, key(&dots, "eth1").file_name());
        assert_eq!(a, key(&dots, "eth0").file_name());
        assert_eq!(fnv1a_128(b""), 0x6c62272e07bb014262b821756295c58d);
    }

    #[test]
    fn key_file_names_cannot_escape() {
        let k = AttachmentKey {
            network: "net.a".into(),
            container_id: "../../etc".into(),
            ifname: "eth0".into(),
        };
        let name = k.file_name();
        assert!(!name.contains('/'));
        assert_eq!(name, "net%2Ea+%2E%2E%2F%2E%2E%2Fetc+eth0.json");
    }
}
