//! The inner chain with libcni's semantics: plugins in order with the
//! previous result threaded through, runtimeConfig only for declared
//! capabilities, DEL in reverse with the cached result, CHECK with it too.

use crate::cni::config::InnerList;
use crate::cni::env::{CniEnv, Verb};
use crate::cni::gojson;
use crate::cni::version;
use crate::error::{code, Error, Result};
use crate::exec::{self, ContainerNetns, InfraNs, Invocation};
use crate::infra::InfraInfo;
use crate::state::Attachment;
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::time::Duration;

/// The last plugin's result, parsed and as printed.
pub struct AddResult {
    pub value: Value,
    pub raw: Vec<u8>,
}

/// A failed ADD of the chain: the error, and whether the rollback (DEL of
/// every plugin) undid what ran.
pub struct AddFailure {
    pub error: Error,
    pub undone: bool,
}

pub struct Chain<'a> {
    list: InnerList,
    binaries: Vec<exec::PluginBinary>,
    infra: InfraNs,
    netns: &'a ContainerNetns,
    env: &'a CniEnv,
    /// What the inner plugins may see of the runtime's capability args.
    capability_args: Map<String, Value>,
    timeout: Duration,
}

/// CHECK needs an inner chain at 0.4.0 or later: code 1 naming both
/// versions otherwise (`runtime` is the version the runtime asked in).
pub fn check_knows_check(inner: &str, runtime: &str) -> Result<()> {
    if version::at_least(inner, "0.4.0") {
        return Ok(());
    }
    Err(Error::new(
        code::INCOMPATIBLE_VERSION,
        format!(
            "CHECK needs cniVersion 0.4.0 or later: the inner chain is at {inner} (the runtime asked at {runtime})"
        ),
    ))
}

/// Every plugin of the list, found in CNI_PATH before anything runs.
pub fn find_binaries(list: &InnerList, cni_path: &[PathBuf]) -> Result<Vec<exec::PluginBinary>> {
    list.plugins
        .iter()
        .map(|p| exec::find_plugin(InnerList::plugin_type(p), cni_path))
        .collect()
}

impl<'a> Chain<'a> {
    /// `binaries` are the list's plugins, found by `find_binaries`.
    pub fn new(
        list: InnerList,
        binaries: Vec<exec::PluginBinary>,
        info: &InfraInfo,
        netns: &'a ContainerNetns,
        env: &'a CniEnv,
        capability_args: &'a Map<String, Value>,
        timeout: Duration,
    ) -> Result<Self> {
        Ok(Chain {
            infra: InfraNs::open(info)?,
            list,
            binaries,
            netns,
            env,
            capability_args: crate::ports::inner_capability_args(capability_args),
            timeout,
        })
    }

    /// The chain an attachment was made with: its recorded config and
    /// capability args.
    pub fn recorded(
        rec: &'a Attachment,
        info: &InfraInfo,
        netns: &'a ContainerNetns,
        env: &'a CniEnv,
        timeout: Duration,
    ) -> Result<Self> {
        let list = InnerList::from_value(&rec.config, "", &rec.network)
            .map_err(|e| e.context(format!("record of {}", rec.container_id)))?;
        let binaries = find_binaries(&list, &env.path)?;
        Self::new(
            list,
            binaries,
            info,
            netns,
            env,
            &rec.capability_args,
            timeout,
        )
    }

    pub fn cni_version(&self) -> &str {
        &self.list.cni_version
    }

    pub fn disable_check(&self) -> bool {
        self.list.disable_check
    }

    /// The recorded result as the inner plugins must see it now: with the
    /// container netns under the name this call gives it.
    pub fn cached_result(&self, rec: &Attachment) -> Option<Value> {
        let mut result = rec.result.clone()?;
        if let Some(runtime) = &rec.netns {
            rewrite_sandbox(&mut result, runtime, &self.netns.inner_path());
        }
        Some(result)
    }

    /// ADD through the whole list. On failure, what ran is undone (DEL of
    /// every plugin, in reverse) before the error is returned. The result
    /// carries the inner CNI_NETNS; see `rewrite_sandbox`.
    /// `progress` gets each result but the last, so a caller killed
    /// mid-chain leaves what a later DEL needs as its prevResult.
    pub fn add(
        &self,
        mut progress: impl FnMut(&Value),
    ) -> std::result::Result<AddResult, AddFailure> {
        let mut last: Option<AddResult> = None;
        for i in 0..self.list.plugins.len() {
            if let Some(done) = &last {
                progress(&done.value);
            }
            let prev = last.as_ref().map(|r| &r.value);
            let step = self.run(Verb::Add, i, prev).and_then(|raw| {
                let value = serde_json::from_slice(&raw).map_err(|e| {
                    Error::new(
                        code::INNER_PLUGIN,
                        format!(
                            "inner plugin {} printed a result that is not JSON: {e}",
                            self.name(i)
                        ),
                    )
                })?;
                Ok(AddResult { value, raw })
            });
            match step {
                Ok(r) => last = Some(r),
                Err(e) => return Err(self.rolled_back(e, prev)),
            }
        }
        last.ok_or_else(|| AddFailure {
            error: Error::internal("empty inner chain"),
            undone: true,
        })
    }

    fn rolled_back(&self, error: Error, prev: Option<&Value>) -> AddFailure {
        log::info!("ADD failed ({error}); rolling back");
        let undone = match self.del(prev) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("rollback of the failed ADD: {e}");
                false
            }
        };
        AddFailure { error, undone }
    }

    /// DEL through every plugin in reverse. Every plugin is tried; the first
    /// failure is returned.
    pub fn del(&self, cached: Option<&Value>) -> Result<()> {
        // libcni hands the cached result to DEL from 0.4.0 on.
        let prev = if version::at_least(&self.list.cni_version, "0.4.0") {
            cached
        } else {
            None
        };
        let mut errors = crate::error::ErrorList::default();
        for i in (0..self.list.plugins.len()).rev() {
            errors.push_if_err(self.run(Verb::Del, i, prev).map(|_| ()));
        }
        errors.into_result()
    }

    pub fn check(&self, cached: &Value) -> Result<()> {
        for i in 0..self.list.plugins.len() {
            self.run(Verb::Check, i, Some(cached))?;
        }
        Ok(())
    }

    fn name(&self, i: usize) -> &str {
        InnerList::plugin_type(&self.list.plugins[i])
    }

    /// GC and STATUS for the plugins whose version knows them (1.1.0 on);
    /// `extra` is added to each config (GC's valid attachments).
    pub fn network_verb(&self, verb: Verb, extra: Option<(&str, Value)>) -> Result<()> {
        if !version::at_least(&self.list.cni_version, "1.1.0") {
            log::debug!(
                "inner chain at {} knows no {}",
                self.list.cni_version,
                verb.as_str()
            );
            return Ok(());
        }
        // GC goes through every plugin and reports every failure (libcni
        // does the same); STATUS stops at the first plugin not available.
        let mut errors = crate::error::ErrorList::default();
        for i in 0..self.list.plugins.len() {
            let mut config = self.plugin_config(i, None);
            if let (Some((key, value)), Some(obj)) = (&extra, config.as_object_mut()) {
                obj.insert(key.to_string(), value.clone());
            }
            match self.invoke(verb, i, &config) {
                Err(e) if verb != Verb::Gc => return Err(e),
                outcome => errors.push_if_err(outcome),
            }
        }
        errors.into_result()
    }

    fn run(&self, verb: Verb, i: usize, prev: Option<&Value>) -> Result<Vec<u8>> {
        self.invoke(verb, i, &self.plugin_config(i, prev))
    }

    fn invoke(&self, verb: Verb, i: usize, config: &Value) -> Result<Vec<u8>> {
        let stdin = serde_json::to_vec(config).map_err(|e| Error::internal(e.to_string()))?;
        log::debug!("{} {} in the infra", verb.as_str(), self.name(i));
        exec::run_plugin(
            &self.infra,
            &self.binaries[i],
            &Invocation {
                verb,
                container_id: &self.env.container_id,
                ifname: &self.env.ifname,
                args: &self.env.args,
                cni_path: &self.env.path,
                timeout: self.timeout,
            },
            self.netns,
            &stdin,
        )
    }

    /// libcni's buildOneConfig: name and cniVersion from the list, the
    /// previous result, and the runtime's capability args the plugin declares.
    fn plugin_config(&self, i: usize, prev: Option<&Value>) -> Value {
        let mut conf = self.list.plugins[i].clone();
        conf.insert("name".into(), Value::String(self.list.name.clone()));
        conf.insert(
            "cniVersion".into(),
            Value::String(self.list.cni_version.clone()),
        );
        if let Some(prev) = prev {
            conf.insert("prevResult".into(), prev.clone());
        }
        let declared = conf.get("capabilities").and_then(Value::as_object).cloned();
        let runtime_config: Map<String, Value> = declared
            .iter()
            .flatten()
            .filter(|(_, on)| on.as_bool() == Some(true))
            .filter_map(|(cap, _)| {
                // The runtime's runtimeConfig is read as a Go plugin reads
                // it; the inner plugin gets the capability's own name.
                gojson::field(&self.capability_args, cap).map(|v| (cap.clone(), v.clone()))
            })
            .collect();
        if !runtime_config.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(runtime_config));
        }
        Value::Object(conf)
    }
}

/// Replaces `interfaces[].sandbox` equal to `from` by `to`: inner plugins
/// know the container netns as /proc/self/fd/N, the runtime by its own path.
pub fn rewrite_sandbox(result: &mut Value, from: &str, to: &str) {
    let Some(ifaces) = result.get_mut("interfaces").and_then(Value::as_array_mut) else {
        return;
    };
    for iface in ifaces {
        if let Some(sandbox) = iface.get_mut("sandbox") {
            if sandbox.as_str() == Some(from) {
                *sandbox = Value::String(to.to_string());
            }
        }
    }
}

/// The same replacement on the result as a plugin printed it, so the
/// runtime gets the inner result byte for byte but for the sandbox path.
/// The inner path is a JSON string token that only `sandbox` can hold.
pub fn rewrite_sandbox_raw(raw: &[u8], from: &str, to: &str) -> Vec<u8> {
    let (Ok(from), Ok(to)) = (serde_json::to_vec(from), serde_json::to_vec(to)) else {
        return raw.to_vec();
    };
    let mut out = Vec::with_capacity(raw.len() + to.len());
    let mut rest = raw;
    while let Some(pos) = rest.windows(from.len()).position(|w| w == from.as_slice()) {
        out.extend_from_slice(&rest[..pos]);
        out.extend_from_slice(&to);
        rest = &rest[pos + from.len()..];
    }
    out.extend_from_slice(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sandbox_is_rewritten_only_where_it_matches() {
        let mut r = json!({"interfaces":[
            {"name":"rcni0","mac":"aa"},
            {"name":"veth1","mac":"bb"},
            {"name":"eth0","mac":"cc","sandbox":"/proc/self/fd/5"}]});
        rewrite_sandbox(&mut r, "/proc/self/fd/5", "/run/netns/c1");
        assert_eq!(r["interfaces"][2]["sandbox"], "/run/netns/c1");
        assert!(r["interfaces"][0].get("sandbox").is_none());
    }

    #[test]
    fn raw_result_keeps_its_bytes() {
        let raw = b"{\n    \"interfaces\": [{\"sandbox\": \"/proc/self/fd/5\"}],\n    \"x\": \"/proc/self/fd/55\"\n}";
        let out = rewrite_sandbox_raw(raw, "/proc/self/fd/5", "/run/netns/a\"b");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\n    \"interfaces\": [{\"sandbox\": \"/run/netns/a\\\"b\"}],\n    \"x\": \"/proc/self/fd/55\"\n}"
        );
    }
}
