//! The rootless lab the integration tests and the benchmark run in.
//!
//! Every test builds its own lab, as root: an unused unprivileged uid, a lab
//! dir under /tmp that is that user's home and `XDG_RUNTIME_DIR` parent, and
//! a *session*: a process of that uid in its own user namespace (uid mapped
//! to root) and mount namespace, exactly what a rootless runtime has. Inside
//! the session `/dev/net/tun` is a usable node of the lab's own and
//! `/var/lib/cni` is writable (libcni's result cache; `LabOptions` can leave
//! it out, as on a host that never ran rootful CNI). Commands run inside
//! the session through `setpriv` + `nsenter`, with a clean environment.
//!
//! Containers are `unshare --net sleep infinity` processes started inside the
//! session, referenced as `/proc/PID/ns/net`.
//!
//! `LabOptions` can give the lab a host of its own (`hosts`): one where a
//! rootful CNI runtime ran (root-owned /var/lib/cni, /run/netns,
//! /etc/cni/net.d), or XDG_RUNTIME_DIR as logind makes it (a 0700 tmpfs at
//! /run/user/UID). A root process holds that mount namespace; the session
//! and the commands outside it start there, and `host_command` runs root's
//! commands there.
//!
//! Dropping the lab kills every process of its uid and removes its dir; all
//! mounts live in the session's mount namespace and die with it.
//!
//! Prerequisites missing (not root, no cnitool, no slirp4netns, no reference
//! plugins): with `CI=true` the test fails naming them, else it is skipped.
//!
//! The binary the lab runs is the caller's: `Lab::new(lab::binary!(), name)`.
//! Only the root package's tests and bench know where cargo put it (the
//! debug build for the tests, the release build for the bench).

pub mod calls;
pub mod client_address;
mod cni;
mod container;
pub mod containerd;
pub mod crash;
pub mod gocni;
pub mod host_tools;
pub mod hosts;
mod leaks;
pub mod net;
pub mod outbound;
pub mod plugins;
pub mod podman;
pub mod port_forwarder;
pub mod ports;
mod prereq;
mod process;
pub mod rng;
pub mod rootful;
mod session;
mod state;
pub mod testdata;

pub use calls::{panicked, run, run_all, spawn, supervisors, Call, KillOnDrop, Running, SUPERVISE};
pub use cni::{
    conf_example, example_conflist, outer, plugin_stdin, read_json, result_ipv4, CniError,
};
pub use container::Container;
pub use hosts::{Host, RuntimeDir, USED_HOST_DIRS};
pub use leaks::Snapshot;
pub use net::{free_tcp_port, host_global_ipv4, http_get, iperf3_gbits, HostServer, Server};
pub use plugins::{install_plugin, one_plugin_delegate_stdin, write_as_user, SLOWADD};
pub use prereq::{cnitool_path, find_in_path, have_python3, in_ci};
pub use process::{
    children_of, descendants, kill_processes_of, parent_of, pids_of_uid, retry, run_command,
    sigkill, start_time, Out, Spawned,
};
pub use rng::{seed, Rng};
pub use session::{Lab, LabOptions};
pub use state::{bad_records, is_failed_record};

use std::path::{Path, PathBuf};

/// The network of conf-examples/rootless.conflist (outer and inner name).
pub const NET: &str = "rootless";
/// The gateway of that network's bridge.
pub const GATEWAY: &str = "10.89.0.1";
/// The host's loopback as seen through slirp4netns.
pub const SLIRP_HOST: &str = "10.0.2.2";

/// The PATH everything inside the lab gets: no root-only dirs, since a
/// PATH entry the lab user cannot search breaks `nsenter … ping` for it;
/// /usr/sbin and /sbin for iptables and ip.
pub const LAB_PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin";

/// Our binary as cargo built it for the crate this is used in: the debug
/// build in the tests, the release build in the bench. `env!` expands in
/// the caller, the only place `CARGO_BIN_EXE_rootless-cni` is set (the root
/// package's integration tests and benches).
#[macro_export]
macro_rules! binary {
    () => {
        ::std::path::Path::new(env!("CARGO_BIN_EXE_rootless-cni"))
    };
}

/// The repository: conf-examples/, testdata/, .tools/ (the lab crate is
/// its `lab/` member).
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the lab crate is a member of the repository")
}

/// Where mount(8) keeps its utab for the commands the tests run as root:
/// by default real root's mount(8) makes /run/mount on the machine, even in
/// a private mount namespace (every root command the harness builds gets
/// `LIBMOUNT_UTAB` pointing here): the target dir's tmp/, which cargo
/// makes for the tests and benches.
pub fn utab() -> PathBuf {
    repo().join("target/tmp/utab")
}
