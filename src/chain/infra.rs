//! The executor the plugin uses: each inner plugin spawned inside the
//! running infra.

use super::{Exec, RuntimeConf};
use crate::cni::env::Verb;
use crate::error::Result;
use crate::exec::{self, InfraNs, Invocation, PluginBinary};
use crate::infra::InfraInfo;

pub struct InfraExec {
    ns: InfraNs,
}

impl InfraExec {
    /// The infra `info` describes, its namespaces held open.
    pub fn open(info: &InfraInfo) -> Result<Self> {
        Ok(InfraExec {
            ns: InfraNs::open(info)?,
        })
    }
}

impl Exec for InfraExec {
    type Plugin = PluginBinary;

    fn find(plugin_type: &str, cni_path: &[std::path::PathBuf]) -> Result<PluginBinary> {
        exec::find_plugin(plugin_type, cni_path)
    }

    fn exec(
        &self,
        plugin: &PluginBinary,
        verb: Verb,
        rt: &RuntimeConf,
        stdin: &[u8],
    ) -> Result<Vec<u8>> {
        let inv = Invocation {
            verb,
            container_id: &rt.container_id,
            ifname: &rt.ifname,
            args: &rt.args,
            cni_path: &rt.cni_path,
            timeout: rt.timeout,
        };
        exec::run_plugin(&self.ns, plugin, &inv, &rt.netns, stdin)
    }
}
