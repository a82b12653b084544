//! One call as the inner plugins get it, built once per call (libcni's
//! RuntimeConf): the container, the CNI_ARGS and CNI_PATH, the container
//! netns, the runtime's capability args and how long a plugin may take.

use crate::cni::config::NetConf;
use crate::cni::env::CniEnv;
use crate::exec::ContainerNetns;
use crate::state::Attachment;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub struct RuntimeConf {
    pub container_id: String,
    pub ifname: String,
    /// CNI_ARGS, as the runtime gave them.
    pub args: String,
    pub cni_path: Vec<PathBuf>,
    pub netns: ContainerNetns,
    /// The runtime's capability args (`runtimeConfig`), as it gave them;
    /// the chain hands each plugin those it declares.
    pub capability_args: Map<String, Value>,
    /// pluginTimeout: a plugin still running after this is killed.
    pub timeout: Duration,
}

impl RuntimeConf {
    /// The runtime's own call, with the container netns the verb opened.
    pub fn of_call(env: &CniEnv, conf: &NetConf, netns: ContainerNetns) -> Self {
        RuntimeConf {
            container_id: env.container_id.clone(),
            ifname: env.ifname.clone(),
            args: env.args.clone(),
            cni_path: env.path.clone(),
            netns,
            capability_args: conf.runtime_config.clone(),
            timeout: conf.plugin_timeout,
        }
    }

    /// With the capability args `rec` was made with: a DEL or CHECK of an
    /// attachment hands its plugins what its ADD did.
    pub fn with_recorded_args(mut self, rec: &Attachment) -> Self {
        self.capability_args = rec.capability_args.clone();
        self
    }

    /// The DEL of a recorded attachment that no runtime call names (GC):
    /// everything as recorded, its netns if it is still the attachment's.
    pub fn of_record(rec: &Attachment, cni_path: &[PathBuf], timeout: Duration) -> Self {
        let netns_path = rec.netns.as_deref().map(Path::new);
        RuntimeConf {
            container_id: rec.container_id.clone(),
            ifname: rec.ifname.clone(),
            args: rec.cni_args.clone(),
            cni_path: cni_path.to_vec(),
            netns: ContainerNetns::open_if_present(netns_path, rec.netns_inode),
            capability_args: rec.capability_args.clone(),
            timeout,
        }
    }
}
