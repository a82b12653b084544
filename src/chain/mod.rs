//! The inner chain with libcni's semantics: plugins in order with the
//! previous result threaded through, runtimeConfig only for declared
//! capabilities, DEL in reverse with the cached result, CHECK with it too,
//! GC and STATUS for plugins whose version knows them, and the ADD result
//! converted to the runtime's version.
//!
//! The chain reaches plugins only through an `Exec` (libcni's
//! invoke.Exec): `InfraExec` runs them inside the infra; the unit tests
//! run the chain with a fake.

mod infra;
mod runtime;
mod sandbox;
#[cfg(test)]
mod tests;

pub use infra::InfraExec;
pub use runtime::RuntimeConf;
pub use sandbox::{rewrite_sandbox, rewrite_sandbox_raw};

use crate::cni::config::InnerList;
use crate::cni::env::Verb;
use crate::cni::gojson;
use crate::cni::version::{self, CniVersion};
use crate::error::{Error, ErrorList, Kind, Result};
use crate::exec::PluginBinary;
use crate::state::Attachment;
use serde_json::{json, Map, Value};
use std::path::PathBuf;

/// Runs one inner plugin: the chain's only way out.
pub trait Exec {
    /// A plugin as found in CNI_PATH.
    type Plugin;

    /// libcni's FindInPath: the plugin for `plugin_type`, first match in
    /// `cni_path`. Called before anything runs (and before the executor
    /// exists: an ADD finds its plugins before it starts the infra).
    fn find(plugin_type: &str, cni_path: &[PathBuf]) -> Result<Self::Plugin>;

    /// libcni's ExecPlugin: `plugin` run for `verb`, `stdin` its config.
    /// Ok(what it printed); an inner error object is passed through.
    fn exec(
        &self,
        plugin: &Self::Plugin,
        verb: Verb,
        rt: &RuntimeConf,
        stdin: &[u8],
    ) -> Result<Vec<u8>>;
}

/// The inner list with every plugin of it found.
pub struct Plugins<P> {
    list: InnerList,
    found: Vec<P>,
}

impl<P> Plugins<P> {
    /// Every plugin of `list`, found before anything runs.
    pub fn find<E: Exec<Plugin = P>>(list: InnerList, cni_path: &[PathBuf]) -> Result<Self> {
        let found = list
            .plugins
            .iter()
            .map(|p| E::find(InnerList::plugin_type(p), cni_path))
            .collect::<Result<_>>()?;
        Ok(Plugins { list, found })
    }

    pub fn list(&self) -> &InnerList {
        &self.list
    }
}

/// The plugins of `list` as the infra runs them.
pub fn find_binaries(list: InnerList, cni_path: &[PathBuf]) -> Result<Plugins<PluginBinary>> {
    Plugins::find::<InfraExec>(list, cni_path)
}

/// The last plugin's result, parsed and as printed, with the container
/// netns named as the inner plugins know it.
pub struct AddResult {
    value: Value,
    raw: Vec<u8>,
}

/// A failed ADD of the chain: the error, and whether the rollback (DEL of
/// every plugin) undid what ran.
pub struct AddFailure {
    pub error: Error,
    pub undone: bool,
}

pub struct Chain<'a, E: Exec> {
    list: InnerList,
    plugins: Vec<E::Plugin>,
    exec: E,
    rt: &'a RuntimeConf,
    /// What the inner plugins may see of the runtime's capability args.
    capability_args: Map<String, Value>,
}

/// CHECK needs an inner chain that knows it: code 1 naming both versions
/// otherwise (`runtime` is the version the runtime asked in).
pub fn check_knows_check(inner: &CniVersion, runtime: &CniVersion) -> Result<()> {
    let needs = Verb::Check.min_version();
    if *inner >= needs {
        return Ok(());
    }
    Err(Error::new(
        Kind::IncompatibleVersion,
        format!(
            "CHECK needs cniVersion {needs} or later: the inner chain is at {inner} (the runtime asked at {runtime})"
        ),
    ))
}

impl<'a, E: Exec> Chain<'a, E> {
    pub fn new(plugins: Plugins<E::Plugin>, rt: &'a RuntimeConf, exec: E) -> Self {
        Chain {
            list: plugins.list,
            plugins: plugins.found,
            exec,
            rt,
            capability_args: crate::ports::inner_capability_args(&rt.capability_args),
        }
    }

    /// The chain an attachment was made with: its recorded config, its
    /// plugins found again; `exec` makes the executor once they are.
    pub fn recorded(
        rec: &Attachment,
        rt: &'a RuntimeConf,
        exec: impl FnOnce() -> Result<E>,
    ) -> Result<Self> {
        let list = InnerList::from_value(&rec.config, None, &rec.network)
            .map_err(|e| e.context(format!("record of {}", rec.container_id)))?;
        let plugins = Plugins::find::<E>(list, &rt.cni_path)?;
        Ok(Self::new(plugins, rt, exec()?))
    }

    pub fn cni_version(&self) -> &CniVersion {
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
            rewrite_sandbox(&mut result, runtime, &self.rt.netns.inner_path());
        }
        Some(result)
    }

    /// What a record keeps of an ADD's result: the inner version's, with
    /// the container netns as the runtime names it.
    pub fn to_record(&self, result: &AddResult) -> Value {
        self.runtime_view(&result.value)
    }

    /// An inner result with the container netns as the runtime names it.
    fn runtime_view(&self, result: &Value) -> Value {
        let mut value = result.clone();
        let netns = &self.rt.netns;
        rewrite_sandbox(&mut value, &netns.inner_path(), &netns.runtime_str());
        value
    }

    /// ADD through the whole list. On failure, what ran is undone (DEL of
    /// every plugin, in reverse) before the error is returned.
    /// `progress` gets each result but the last (as the runtime knows the
    /// netns), so a caller killed mid-chain leaves what a later DEL needs
    /// as its prevResult.
    pub fn add(
        &self,
        mut progress: impl FnMut(Value),
    ) -> std::result::Result<AddResult, AddFailure> {
        let mut last: Option<AddResult> = None;
        for i in 0..self.list.plugins.len() {
            if let Some(done) = &last {
                progress(self.runtime_view(&done.value));
            }
            let prev = last.as_ref().map(|r| &r.value);
            let step = self.run(Verb::Add, i, prev).and_then(|raw| {
                let value = serde_json::from_slice(&raw).map_err(|e| {
                    Error::new(
                        Kind::InnerPlugin,
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

    /// The DEL of a whole ADD that succeeded: `result` is its result.
    pub fn undo(&self, result: &AddResult) -> Result<()> {
        self.del(Some(&result.value))
    }

    /// The ADD result for the runtime: at the runtime's `version`, after
    /// `prev` (the result of the plugins before us in the runtime's own
    /// chain), with the container netns under the runtime's name. Same
    /// version and nothing before us: the last plugin's bytes as it
    /// printed them, but for that name.
    pub fn reply(
        &self,
        result: &AddResult,
        version: &CniVersion,
        prev: Option<&Value>,
    ) -> Result<Vec<u8>> {
        let netns = &self.rt.netns;
        let (inner, runtime) = (netns.inner_path(), netns.runtime_str());
        if prev.is_none() && self.list.cni_version == *version {
            return Ok(rewrite_sandbox_raw(&result.raw, &inner, &runtime));
        }
        // Chained after other plugins, we append ours to their result (the
        // spec: a plugin handles prevResult, it does not drop it).
        let ours = version::convert_result(
            &self.runtime_view(&result.value),
            self.cni_version(),
            version,
        )?;
        let reply = match prev {
            Some(prev) => crate::cni::merge_results(prev, &ours),
            None => ours,
        };
        serde_json::to_vec(&reply).map_err(|e| Error::internal(e.to_string()))
    }

    /// DEL through every plugin in reverse. Every plugin is tried; the first
    /// failure is returned.
    pub fn del(&self, cached: Option<&Value>) -> Result<()> {
        // libcni hands the cached result to DEL from 0.4.0 on.
        let prev = if self.list.cni_version >= CniVersion::V0_4_0 {
            cached
        } else {
            None
        };
        let mut errors = ErrorList::default();
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

    /// GC through the plugins whose version knows it, each told the
    /// attachments to keep, (container id, ifname).
    pub fn gc(&self, valid: &[(String, String)]) -> Result<()> {
        let attachments: Vec<_> = valid
            .iter()
            .map(|(c, i)| json!({"containerID": c, "ifname": i}))
            .collect();
        let extra = ("cni.dev/valid-attachments", json!(attachments));
        self.network_verb(Verb::Gc, Some(extra))
    }

    /// STATUS of the plugins whose version knows it.
    pub fn status(&self) -> Result<()> {
        self.network_verb(Verb::Status, None)
    }

    fn name(&self, i: usize) -> &str {
        InnerList::plugin_type(&self.list.plugins[i])
    }

    /// GC and STATUS for the plugins whose version knows them (1.1.0 on);
    /// `extra` is added to each config (GC's valid attachments).
    fn network_verb(&self, verb: Verb, extra: Option<(&str, Value)>) -> Result<()> {
        if self.list.cni_version < verb.min_version() {
            log::debug!(
                "inner chain at {} knows no {}",
                self.list.cni_version,
                verb.as_str()
            );
            return Ok(());
        }
        // GC goes through every plugin and reports every failure (libcni
        // does the same); STATUS stops at the first plugin not available.
        let mut errors = ErrorList::default();
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
        self.exec.exec(&self.plugins[i], verb, self.rt, &stdin)
    }

    /// libcni's buildOneConfig: name and cniVersion from the list, the
    /// previous result, and the runtime's capability args the plugin declares.
    fn plugin_config(&self, i: usize, prev: Option<&Value>) -> Value {
        let mut conf = self.list.plugins[i].clone();
        conf.insert("name".into(), Value::String(self.list.name.clone()));
        conf.insert(
            "cniVersion".into(),
            Value::String(self.list.cni_version.to_string()),
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
