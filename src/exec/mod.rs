//! Running an inner plugin inside the infra: `setns` into the sandbox's
//! mount and network namespaces between fork and exec. The container netns
//! is opened here, in the caller's namespaces, and inherited as a fd, so no
//! path has to be visible inside the infra.
//!
//! One concern a file: the infra's namespace handles and its view of the
//! caller's files (`infra_ns`), the container netns and whose user
//! namespace owns it (`netns`), finding a plugin in CNI_PATH (`lookup`),
//! spawning it with a timeout (`spawn`), what a plugin prints when it fails
//! (`inner_error`), and the plugins a killed call left running
//! (`orphans`).

mod infra_ns;
mod inner_error;
mod lookup;
mod netns;
mod orphans;
mod spawn;

pub use infra_ns::{join_namespaces, InfraNs};
pub use lookup::{find_plugin, PluginBinary};
pub use netns::ContainerNetns;
pub use orphans::settle_orphans;
pub use spawn::{path_with_sbin, run_plugin, Invocation};
