//! ADD: validate, make sure the infra runs, record a pending attachment,
//! run the inner chain without the lock, then record the result.

use super::attachment_key;
use crate::chain::{self, Chain};
use crate::cni::config::NetConf;
use crate::cni::env::CniEnv;
use crate::cni::version;
use crate::error::{code, Error, Result};
use crate::exec::ContainerNetns;
use crate::infra::control::{self, Request};
use crate::infra::{self, InfraInfo, Settings};
use crate::ports::{self, PortMapping};
use crate::procfs::ProcessId;
use crate::state::{self, Attachment, AttachmentKey, AttachmentState, StateDir};

/// The result for the runtime, as the last inner plugin printed it.
pub fn add(env: &CniEnv, conf: &NetConf) -> Result<Vec<u8>> {
    // Everything that can be checked is checked before anything changes.
    let list = conf.inner_list()?;
    version::check_convertible(&list.cni_version, &conf.cni_version)?;
    let binaries = chain::find_binaries(&list, &env.path)?;
    let mappings = ports::from_runtime_config(&conf.runtime_config)?;
    let netns = ContainerNetns::open(env.netns())?;
    let state = super::state_dir(conf, true)?.ok_or_else(|| Error::internal("no state dir"))?;
    let key = attachment_key(env, conf);
    let me = ProcessId::of(std::process::id() as i32);
    let created = state::since_epoch();

    let mut record = Attachment {
        state: AttachmentState::Pending,
        network: key.network.clone(),
        container_id: key.container_id.clone(),
        ifname: key.ifname.clone(),
        netns: Some(netns.runtime_str()),
        netns_inode: netns.inode(),
        infra: ProcessId {
            pid: 0,
            start_time: 0,
        },
        owner: me,
        config: list.to_value(),
        cni_args: env.args.clone(),
        capability_args: conf.runtime_config.clone(),
        result: None,
        created: created.as_secs(),
        created_nanos: created.subsec_nanos(),
    };
    let (info, started, orphaned) = {
        let lock = state.lock()?;
        let existing = match state.read_attachment(&key, &lock) {
            // Another release's record: not to be written over.
            Err(e) if e.code == code::NEWER_STATE => return Err(e),
            read => read.unwrap_or(None),
        };
        let (info, started) = infra::ensure_running(&state, &lock, &Settings::from_conf(conf))?;
        // A killed call on this attachment: its inner plugins may still run,
        // and what it made is this call's to remove.
        let orphaned = existing
            .clone()
            .filter(|old| old.infra == info.sandbox && old.owner.is_some_and(|o| !o.is_alive()));
        record.infra = info.sandbox;
        let pending = match existing.filter(|old| still_attached(old, &info)) {
            Some(old) => Err(Error::new(
                code::ALREADY_ATTACHED,
                format!(
                    "container {} is already attached to network {} as {} (state {:?}); DEL it first",
                    old.container_id, old.network, old.ifname, old.state
                ),
            )),
            None => refuse_shared_ports(&state, &lock, &key, &info, &mappings)
                .and_then(|()| state.write_attachment(&record, &lock)),
        };
        if let Err(e) = pending {
            // No record of ours: an infra this call started under this very
            // lock holds nothing, and goes (whatever the state dir says).
            if started {
                if let Err(stop) = infra::stop(&state, &lock, &info) {
                    log::warn!("stopping the infra started for the refused ADD: {stop}");
                }
            }
            return Err(e);
        }
        (info, started, orphaned)
    };
    if let Some(old) = &orphaned {
        take_over(&state, &info, env, conf, old);
    }

    // From here on the pending record exists: every way out that is not
    // success goes through `abort`, which undoes what this call did.
    let mut progress: Option<serde_json::Value> = None;
    let mut published = false;
    let outcome = attach(
        &state,
        &info,
        &netns,
        env,
        conf,
        (list, binaries),
        &mappings,
        &record,
        &mut progress,
        &mut published,
    );
    match outcome {
        Ok(reply) => Ok(reply),
        Err(failure) => {
            record.result = progress;
            let ports = if published { &mappings[..] } else { &[] };
            Err(abort(&state, record, ports, failure, started))
        }
    }
}

/// Removes what a killed ADD of this attachment left, as its DEL would:
/// its forwards hold the ports this call publishes, and its interface and
/// lease would trip the new chain. The record it left is already replaced
/// by ours, so nothing else will. Best effort, as for the DEL of an ADD
/// killed half-way: the plugins' DEL may trip over a step never made.
fn take_over(state: &StateDir, info: &InfraInfo, env: &CniEnv, conf: &NetConf, old: &Attachment) {
    log::info!(
        "the last ADD of {} was killed; removing what it left",
        old.container_id
    );
    let undone = super::gc::delete_recorded(state, info, &env.path, conf.plugin_timeout, old, true);
    if let Err(e) = undone {
        log::warn!("undoing the killed ADD of {}: {e}", old.container_id);
    }
}

/// What ADD does once its pending record is written: publish the ports,
/// run the chain, record the result. A failure says what is left to undo.
#[allow(clippy::too_many_arguments)]
fn attach(
    state: &StateDir,
    info: &InfraInfo,
    netns: &ContainerNetns,
    env: &CniEnv,
    conf: &NetConf,
    (list, binaries): (
        crate::cni::config::InnerList,
        Vec<crate::exec::PluginBinary>,
    ),
    mappings: &[PortMapping],
    record: &Attachment,
    progress: &mut Option<serde_json::Value>,
    published: &mut bool,
) -> std::result::Result<Vec<u8>, Failure> {
    let warm = state.warm_marker(&list.name, &conf.runtime_config);
    let first_chain = match state.is_warm(&warm) {
        true => None,
        // The first ADD we waited for may have warmed the network: then
        // the chains exist and the waiters need not run one by one.
        false => Some(state.first_chain_lock()?).filter(|_| !state.is_warm(&warm)),
    };
    publish_ports(state, &record.key(), mappings)?;
    *published = true;
    let inner_version = list.cni_version.clone();
    let chain = Chain::new(
        list,
        binaries,
        info,
        netns,
        env,
        &conf.runtime_config,
        conf.plugin_timeout,
    )?;
    let (inner, runtime) = (netns.inner_path(), netns.runtime_str());
    let record_progress = |partial: &serde_json::Value| {
        let mut step = record.clone();
        let mut partial = partial.clone();
        chain::rewrite_sandbox(&mut partial, &inner, &runtime);
        step.result = Some(partial.clone());
        *progress = Some(partial);
        // Only this call writes its pending record, and the rename is
        // atomic: no lock needed, which keeps the chain's steps cheap.
        if let Err(e) = state.write_progress(&step) {
            log::warn!("recording the progress of the ADD: {e}");
        }
    };
    let result = chain.add(record_progress).map_err(|f| Failure {
        error: f.error,
        left: !f.undone,
    })?;
    if first_chain.is_some() {
        if let Err(e) = state.mark_warm(&warm) {
            log::warn!("{e}");
        }
    }
    drop(first_chain);

    let mut value = result.value.clone();
    chain::rewrite_sandbox(&mut value, &inner, &runtime);
    // A failure from here on leaves the container configured: undo it.
    let undo = |error: Error| {
        let undone = chain.del(Some(&result.value));
        if let Err(e) = &undone {
            log::warn!("undoing the ADD of {}: {e}", record.container_id);
        }
        Failure {
            error,
            left: undone.is_err(),
        }
    };
    // Chained after other plugins, we append ours to their result (the
    // spec: a plugin handles prevResult, it does not drop it). The record
    // keeps ours alone: it is what the inner DEL and CHECK get.
    let reply = match &conf.prev_result {
        None if inner_version == conf.cni_version => {
            chain::rewrite_sandbox_raw(&result.raw, &inner, &runtime)
        }
        prev => version::convert_result(&value, &inner_version, &conf.cni_version)
            .map(|ours| match prev {
                Some(prev) => crate::cni::merge_results(prev, &ours),
                None => ours,
            })
            .and_then(|v| serde_json::to_vec(&v).map_err(|e| Error::internal(e.to_string())))
            .map_err(undo)?,
    };
    let lock = state.lock().map_err(undo)?;
    if !is_still_ours(state, record, &lock) {
        // Another ADD of this key took it over (ours was in an infra that
        // died, or its caller was killed): the container netns is that
        // call's now, so nothing of ours may be undone there.
        return Err(Failure::from(Error::new(
            code::ALREADY_ATTACHED,
            format!(
                "another ADD of container {} took over its attachment while this one ran",
                record.container_id
            ),
        )));
    }
    let mut ready = record.clone();
    ready.state = AttachmentState::Ready;
    ready.owner = None;
    // The record keeps the inner version: inner DEL and CHECK get it.
    ready.result = Some(value);
    state.write_attachment(&ready, &lock).map_err(undo)?;
    Ok(reply)
}

/// Why an ADD failed after its pending record was written.
struct Failure {
    error: Error,
    /// The chain ran and could not be undone completely: what it made may
    /// be left in the infra or the container.
    left: bool,
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Failure { error, left: false }
    }
}

/// The one way out of a failed ADD: its ports closed, and its record
/// removed (stopping an infra it started for nothing), or, when the
/// rollback could not undo everything, kept as `failed` with what is known,
/// so the DEL the runtime sends after a failed ADD finishes the job.
fn abort(
    state: &StateDir,
    mut record: Attachment,
    published: &[PortMapping],
    failure: Failure,
    started: bool,
) -> Error {
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
            unpublish_ports(state, &key, published);
            return failure.error;
        }
    };
    if !is_still_ours(state, &record, &lock) {
        log::warn!(
            "after the failed ADD of {}: another call owns its record now; left to it",
            key.container_id
        );
        return failure.error;
    }
    unpublish_ports(state, &key, published);
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

/// Inside the infra every forward lands on the same address (tap0's), and
/// the inner portmap matches only protocol and port: two forwards of one
/// (protocol, port) from different host addresses would both reach
/// whichever container's rule comes first. Such a mapping is refused (code
/// 107, naming who has the port); `ports::from_runtime_config` refuses
/// the same among one ADD's own mappings.
fn refuse_shared_ports(
    state: &StateDir,
    lock: &state::StateLock,
    key: &AttachmentKey,
    info: &InfraInfo,
    mappings: &[PortMapping],
) -> Result<()> {
    if mappings.is_empty() {
        return Ok(());
    }
    // Ports are open for a ready attachment and for an ADD under way; a
    // failed one closed its own.
    let holds_ports = |r: &Attachment| {
        r.key() != *key
            && r.infra == info.sandbox
            && match r.state {
                AttachmentState::Ready => true,
                AttachmentState::Pending => r.owner.is_some_and(|o| o.is_alive()),
                AttachmentState::Failed => false,
            }
    };
    let others = state.list_attachments_locked(lock)?;
    for rec in others.iter().filter(|r| holds_ports(r)) {
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

/// Whether the record under `record`'s key is still the one this ADD wrote.
fn is_still_ours(state: &StateDir, record: &Attachment, lock: &state::StateLock) -> bool {
    matches!(state.read_attachment(&record.key(), lock), Ok(Some(now)) if now.is_same_as(record))
}

/// Opens the host side of the published ports through the supervisor: a
/// port that cannot be had fails the ADD before the network is touched.
fn publish_ports(state: &StateDir, key: &AttachmentKey, mappings: &[PortMapping]) -> Result<()> {
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

/// A record blocks a new ADD only while its infra lives and it is either
/// done or still being made by a live call.
fn still_attached(old: &Attachment, info: &InfraInfo) -> bool {
    old.infra == info.sandbox
        && match old.state {
            // A failed ADD's leftovers are for its DEL to remove.
            AttachmentState::Ready | AttachmentState::Failed => true,
            AttachmentState::Pending => old.owner.is_some_and(|o| o.is_alive()),
        }
}
