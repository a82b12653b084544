//! ADD: validate, make sure the infra runs, record a pending attachment,
//! run the inner chain without the lock, then record the result.

use super::attachment_key;
use crate::chain::{self, Chain};
use crate::cni::config::NetConf;
use crate::cni::env::CniEnv;
use crate::cni::version;
use crate::error::{code, Error, Result};
use crate::exec::{self, ContainerNetns};
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
        let existing = state.read_attachment(&key, &lock).unwrap_or(None);
        let (info, started) = infra::ensure_running(&state, &lock, &Settings::from_conf(conf))?;
        // A killed call on this attachment: its inner plugins may still run.
        let orphaned = existing.as_ref().is_some_and(|old| {
            old.infra == info.sandbox && old.owner.is_some_and(|o| !o.is_alive())
        });
        if let Some(old) = existing.filter(|old| still_attached(old, &info)) {
            return Err(Error::new(
                code::ALREADY_ATTACHED,
                format!(
                    "container {} is already attached to network {} as {} (state {:?}); DEL it first",
                    old.container_id, old.network, old.ifname, old.state
                ),
            ));
        }
        record.infra = info.sandbox;
        state.write_attachment(&record, &lock)?;
        (info, started, orphaned)
    };
    if orphaned {
        exec::settle_orphans(&info, &key.container_id, &key.ifname, conf.plugin_timeout);
    }

    let warm = state.warm_marker(&list.name, &conf.runtime_config);
    let first_chain = match warm.exists() {
        true => None,
        // The first ADD we waited for may have warmed the network: then
        // the chains exist and the waiters need not run one by one.
        false => Some(state.first_chain_lock()?).filter(|_| !warm.exists()),
    };
    let record_progress = |partial: &serde_json::Value| {
        let mut step = record.clone();
        let mut partial = partial.clone();
        chain::rewrite_sandbox(&mut partial, &netns.inner_path(), &netns.runtime_str());
        step.result = Some(partial);
        // Only this call writes its pending record, and the rename is
        // atomic: no lock needed, which keeps the chain's steps cheap.
        if let Err(e) = state.write_progress(&step) {
            log::warn!("recording the progress of the ADD: {e}");
        }
    };
    let inner_version = list.cni_version.clone();
    let outcome = publish_ports(&state, &key, &mappings).and_then(|()| {
        let result = run_chain(&info, list, binaries, &netns, env, conf, record_progress);
        if result.is_err() {
            unpublish_ports(&state, &key, &mappings);
        }
        result
    });
    if first_chain.is_some() && outcome.is_ok() {
        if let Err(e) = std::fs::write(&warm, b"") {
            log::warn!("marking {} warm: {e}", warm.display());
        }
    }
    drop(first_chain);

    let lock = state.lock()?;
    match outcome {
        Ok(result) => {
            record.state = AttachmentState::Ready;
            record.owner = None;
            // The record keeps the inner version: inner DEL and CHECK get it.
            let reply = if inner_version == conf.cni_version {
                result.raw
            } else {
                let converted =
                    version::convert_result(&result.value, &inner_version, &conf.cni_version)?;
                serde_json::to_vec(&converted)
                    .map_err(|e| crate::error::Error::internal(e.to_string()))?
            };
            record.result = Some(result.value);
            state.write_attachment(&record, &lock)?;
            Ok(reply)
        }
        Err(e) => {
            // The chain rolled itself back; forget the attachment and do not
            // leave an infra this call started for nothing.
            if let Err(cleanup) = state
                .remove_attachment(&key, &lock)
                .and_then(|_| infra::stop_if_idle(&state, &lock, started))
            {
                log::warn!("cleaning up after the failed ADD: {cleanup}");
            }
            Err(e)
        }
    }
}

fn run_chain(
    info: &InfraInfo,
    list: crate::cni::config::InnerList,
    binaries: Vec<std::path::PathBuf>,
    netns: &ContainerNetns,
    env: &CniEnv,
    conf: &NetConf,
    progress: impl FnMut(&serde_json::Value),
) -> Result<chain::AddResult> {
    let chain = Chain::new(
        list,
        binaries,
        info,
        netns,
        env,
        &conf.runtime_config,
        conf.plugin_timeout,
    )?;
    let mut result = chain.add(progress)?;
    let (inner, runtime) = (netns.inner_path(), netns.runtime_str());
    chain::rewrite_sandbox(&mut result.value, &inner, &runtime);
    result.raw = chain::rewrite_sandbox_raw(&result.raw, &inner, &runtime);
    Ok(result)
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
    if mappings.is_empty() {
        return;
    }
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
            AttachmentState::Ready => true,
            AttachmentState::Pending => old.owner.is_some_and(|o| o.is_alive()),
        }
}
