//! ADD: validate, make sure the infra runs, record a pending attachment,
//! run the inner chain without the lock, then record the result.

use super::pending::{self, Failure, PendingAttachment};
use crate::chain::{self, Chain, InfraExec, Plugins, RuntimeConf};
use crate::cni::config::NetConf;
use crate::cni::env::CniEnv;
use crate::cni::version;
use crate::error::{Error, Result};
use crate::exec::{ContainerNetns, PluginBinary};
use crate::infra::{InfraInfo, Settings};
use crate::ports::{self, PortMapping};
use crate::state::{Attachment, StateDir};

/// The result for the runtime, as the last inner plugin printed it.
pub fn add(env: &CniEnv, conf: &NetConf) -> Result<Vec<u8>> {
    // Everything that can be checked is checked before anything changes.
    let list = conf.inner_list()?;
    version::check_convertible(&list.cni_version, &conf.cni_version)?;
    let plugins = chain::find_binaries(list, &env.path)?;
    let mappings = ports::from_runtime_config(&conf.runtime_config)?;
    let netns = ContainerNetns::open(env.netns())?;
    netns.join_owner_userns()?;
    let rt = RuntimeConf::of_call(env, conf, netns);
    let state = super::state_dir(conf, true)?.ok_or_else(|| Error::internal("no state dir"))?;

    let record = pending::new_record(&rt, &conf.name, plugins.list().to_value());
    let settings = Settings::from_conf(conf);
    let mut pending = PendingAttachment::begin(&state, record, &settings, &mappings)?;
    if let Some(old) = pending.orphaned.take() {
        take_over(&state, &pending.info, &rt, &old);
    }
    // From here on the pending record exists: every way out that is not
    // success goes through `abort`, which undoes what this call did.
    match attach(&mut pending, plugins, &rt, conf, &mappings) {
        Ok(reply) => Ok(reply),
        Err(failure) => Err(pending.abort(failure)),
    }
}

/// Removes what a killed ADD of this attachment left, as its DEL would:
/// its forwards hold the ports this call publishes, and its interface and
/// lease would trip the new chain. The record it left is already replaced
/// by ours, so nothing else will. Best effort, as for the DEL of an ADD
/// killed half-way: the plugins' DEL may trip over a step never made.
fn take_over(state: &StateDir, info: &InfraInfo, rt: &RuntimeConf, old: &Attachment) {
    log::info!(
        "the last ADD of {} was killed; removing what it left",
        old.container_id
    );
    let undone = super::gc::delete_recorded(state, info, &rt.cni_path, rt.timeout, old, true);
    if let Err(e) = undone {
        log::warn!("undoing the killed ADD of {}: {e}", old.container_id);
    }
}

/// What ADD does once its pending record is written: publish the ports,
/// run the chain, record the result. A failure says what is left to undo.
fn attach(
    pending: &mut PendingAttachment,
    plugins: Plugins<PluginBinary>,
    rt: &RuntimeConf,
    conf: &NetConf,
    mappings: &[PortMapping],
) -> std::result::Result<Vec<u8>, Failure> {
    let state = pending.state();
    let warm = state.warm_marker(&plugins.list().name, &conf.runtime_config);
    let first_chain = match state.is_warm(&warm) {
        true => None,
        // The first ADD we waited for may have warmed the network: then
        // the chains exist and the waiters need not run one by one.
        false => Some(state.first_chain_lock()?).filter(|_| !state.is_warm(&warm)),
    };
    pending.publish(mappings)?;
    let chain = Chain::new(plugins, rt, InfraExec::open(&pending.info)?);
    let result = chain
        .add(|partial| pending.progress(partial))
        .map_err(|f| Failure {
            error: f.error,
            left: !f.undone,
        })?;
    if first_chain.is_some() {
        if let Err(e) = state.mark_warm(&warm) {
            log::warn!("{e}");
        }
    }
    drop(first_chain);

    // A failure from here on leaves the container configured: undo it.
    let undo = |error: Error| {
        let undone = chain.undo(&result);
        if let Err(e) = &undone {
            log::warn!("undoing the ADD of {}: {e}", rt.container_id);
        }
        Failure {
            error,
            left: undone.is_err(),
        }
    };
    let reply = chain
        .reply(&result, &conf.cni_version, conf.prev_result.as_ref())
        .map_err(undo)?;
    // The record keeps ours alone, at the inner version: it is what the
    // inner DEL and CHECK get.
    pending.commit(chain.to_record(&result), undo)?;
    Ok(reply)
}
