//! An ADD's record from the moment it is written `pending` until it is
//! marked ready or undone: the three times an ADD takes the lock.
//! `begin` writes it (the infra started if need be, the key and the ports
//! free), `commit` marks it ready with the result, `abort` undoes what
//! the ADD did. Between them the lock is let go: the inner chain runs
//! without it.

use super::publish;
use crate::chain::RuntimeConf;
use crate::error::{Error, Kind, Result};
use crate::infra::{self, InfraInfo, Settings};
use crate::ports::PortMapping;
use crate::procfs::ProcessId;
use crate::state::{self, Attachment, AttachmentState, StateDir, StateLock};
use serde_json::Value;

pub(super) struct PendingAttachment<'s> {
    state: &'s StateDir,
    record: Attachment,
    pub info: InfraInfo,
    /// The infra was started by this ADD.
    started: bool,
    /// The record of a killed call on this attachment that `begin`
    /// replaced: its inner plugins may still run, and what it made is this
    /// call's to remove.
    pub orphaned: Option<Attachment>,
    /// What `publish` opened.
    published: Vec<PortMapping>,
    /// The last partial result of the chain, for the DEL of a failed ADD.
    progress: Option<Value>,
}

/// Why an ADD failed after its pending record was written.
pub(super) struct Failure {
    pub error: Error,
    /// The chain ran and could not be undone completely: what it made may
    /// be left in the infra or the container.
    pub left: bool,
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Failure { error, left: false }
    }
}

/// The record an ADD writes before anything runs: pending, owned by this
/// call, with what a DEL of it will need (its netns, config, args).
pub(super) fn new_record(rt: &RuntimeConf, network: &str, config: Value) -> Attachment {
    let created = state::since_epoch();
    Attachment {
        state: AttachmentState::Pending,
        network: network.to_string(),
        container_id: rt.container_id.clone(),
        ifname: rt.ifname.clone(),
        netns: Some(rt.netns.runtime_str()),
        netns_inode: rt.netns.inode(),
        infra: ProcessId {
            pid: 0,
            start_time: 0,
        },
        owner: ProcessId::of(std::process::id() as i32),
        config,
        cni_args: rt.args.clone(),
        capability_args: rt.capability_args.clone(),
        result: None,
        created: created.as_secs(),
        created_nanos: created.subsec_nanos(),
    }
}

impl<'s> PendingAttachment<'s> {
    /// Under the lock: the infra running (started with `settings` when
    /// none is), no attachment under the record's key, none of `mappings`
    /// another attachment's, and then the pending record written.
    pub fn begin(
        state: &'s StateDir,
        mut record: Attachment,
        settings: &Settings,
        mappings: &[PortMapping],
    ) -> Result<Self> {
        let key = record.key();
        let lock = state.lock()?;
        let existing = match state.read_attachment(&key, &lock) {
            // Another release's record: not to be written over.
            Err(e) if e.kind == Kind::NewerState => return Err(e),
            read => read.unwrap_or(None),
        };
        let (info, started) = infra::ensure_running(state, &lock, settings)?;
        let orphaned = existing
            .clone()
            .filter(|old| old.infra == info.sandbox && old.owner.is_some_and(|o| !o.is_alive()));
        record.infra = info.sandbox;
        // A failed ADD's leftovers are for its DEL to remove.
        let attached = existing.filter(|old| {
            old.is_live_in(&info.sandbox)
                || (old.infra == info.sandbox && old.state == AttachmentState::Failed)
        });
        let written = match attached {
            Some(old) => Err(Error::new(
                Kind::AlreadyAttached,
                format!(
                    "container {} is already attached to network {} as {} (state {:?}); DEL it first",
                    old.container_id, old.network, old.ifname, old.state
                ),
            )),
            None => publish::refuse_shared_ports(state, &lock, &key, &info, mappings)
                .and_then(|()| state.write_attachment(&record, &lock)),
        };
        if let Err(e) = written {
            // No record of ours: an infra this call started under this very
            // lock holds nothing, and goes (whatever the state dir says).
            if started {
                if let Err(stop) = infra::stop(state, &lock, &info) {
                    log::warn!("stopping the infra started for the refused ADD: {stop}");
                }
            }
            return Err(e);
        }
        Ok(PendingAttachment {
            state,
            record,
            info,
            started,
            orphaned,
            published: Vec::new(),
            progress: None,
        })
    }

    pub fn state(&self) -> &'s StateDir {
        self.state
    }

    /// Opens the host side of `mappings`; `abort` closes them.
    pub fn publish(&mut self, mappings: &[PortMapping]) -> Result<()> {
        publish::publish_ports(self.state, &self.record.key(), mappings)?;
        self.published = mappings.to_vec();
        Ok(())
    }

    /// Records a partial result of the chain, so a DEL after this call is
    /// killed gets what ran as its prevResult.
    pub fn progress(&mut self, partial: Value) {
        let mut step = self.record.clone();
        step.result = Some(partial.clone());
        self.progress = Some(partial);
        // Only this call writes its pending record, and the rename is
        // atomic: no lock needed, which keeps the chain's steps cheap.
        if let Err(e) = self.state.write_progress(&step) {
            log::warn!("recording the progress of the ADD: {e}");
        }
    }

    /// Under the lock: the record ready with `result`, if it is still this
    /// ADD's. A failure to write it goes through `undo`, which undoes the
    /// chain; a record another ADD took over is left to that one.
    pub fn commit(
        &self,
        result: Value,
        undo: impl Fn(Error) -> Failure,
    ) -> std::result::Result<(), Failure> {
        let lock = self.state.lock().map_err(&undo)?;
        if !is_still(self.state, &self.record, &lock) {
            // Another ADD of this key took it over (ours was in an infra that
            // died, or its caller was killed): the container netns is that
            // call's now, so nothing of ours may be undone there.
            return Err(Failure::from(Error::new(
                Kind::AlreadyAttached,
                format!(
                    "another ADD of container {} took over its attachment while this one ran",
                    self.record.container_id
                ),
            )));
        }
        let mut ready = self.record.clone();
        ready.state = AttachmentState::Ready;
        ready.owner = None;
        ready.result = Some(result);
        self.state.write_attachment(&ready, &lock).map_err(undo)
    }

    /// The one way out of a failed ADD: its ports closed, and its record
    /// removed (stopping an infra it started for nothing), or, when the
    /// rollback could not undo everything, kept as `failed` with what is
    /// known, so the DEL the runtime sends after a failed ADD finishes the
    /// job.
    pub fn abort(self, failure: Failure) -> Error {
        let PendingAttachment {
            state,
            mut record,
            started,
            published,
            progress,
            ..
        } = self;
        record.result = progress;
        let key = record.key();
        // The runtime waits for our answer, but a record left pending by a
        // lock we could not have would outlive us: wait longer than a call.
        let lock = match state.lock_patiently() {
            Ok(lock) => lock,
            Err(e) => {
                log::warn!(
                    "after the failed ADD of {}: {e}; its record stays for the DEL",
                    key.container_id
                );
                publish::unpublish_ports(state, &key, &published);
                return failure.error;
            }
        };
        if !is_still(state, &record, &lock) {
            log::warn!(
                "after the failed ADD of {}: another call owns its record now; left to it",
                key.container_id
            );
            return failure.error;
        }
        publish::unpublish_ports(state, &key, &published);
        let cleaned = if failure.left {
            record.state = AttachmentState::Failed;
            record.owner = None;
            state.write_attachment(&record, &lock)
        } else {
            state
                .remove_attachment(&key, &lock)
                .and_then(|_| infra::stop_if_idle(state, &lock, started))
        };
        if let Err(e) = cleaned {
            log::warn!("cleaning up after the failed ADD: {e}");
        }
        failure.error
    }
}

/// Whether the record under `record`'s key is still the one this ADD wrote.
fn is_still(state: &StateDir, record: &Attachment, lock: &StateLock) -> bool {
    matches!(state.read_attachment(&record.key(), lock), Ok(Some(now)) if now.is_same_as(record))
}
