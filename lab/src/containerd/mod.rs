//! containerd 1.6 (Debian) with its CRI plugin, started by a test and
//! driven through the CRI by our own client (tools/cri-client, built by
//! scripts/build-cri-client), as kubelet drives it.
//!
//! - `RootfulContainerd`: containerd as root, with its own `--root`,
//!   `--state` and socket under a test dir, in a PID namespace and a private
//!   mount namespace of its own (an overlay on `/run` and on `/var/lib`, so
//!   the `/run/netns` and `/var/lib/cni` it makes stay in the test dir).
//!   Killing the namespace's first process kills everything containerd
//!   started (shims, pods, our infra), and its mounts go with the mount
//!   namespace: that is the guard, and it holds when a test fails.
//! - `RootlessContainerd`: containerd as a lab's unprivileged uid inside
//!   `rootlesskit --net=host --copy-up=/etc --copy-up=/run --copy-up=/var/lib`,
//!   what `containerd-rootless.sh` does with
//!   `CONTAINERD_ROOTLESS_ROOTLESSKIT_NET=host`; the lab's drop kills it.
//!
//! Both have the CRI plugin's `cni` dirs hold our binary with the reference
//! plugins and conf-examples/kubernetes/10-rootless.conflist as shipped,
//! `restrict_oom_score_adj = true` (root here lacks CAP_SYS_RESOURCE), runc
//! and the overlayfs snapshotter, and the images of scripts/build-cri-images
//! imported with `ctr` (no registry), the sandbox image among them.

mod rootful;
mod rootless;

pub use rootful::{cgroups_left, RootfulContainerd};
pub use rootless::{Host, RootlessContainerd};

use crate::{run_command, Lab, Out, LAB_PATH};
use serde_json::{json, Value};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

/// The CRI sandbox ("pause") image: its entrypoint sleeps forever.
const PAUSE_IMAGE: &str = "localhost/rcni-pause:test";
/// busybox (httpd, ping, sh, ...) with `PAGE` at /www/index.html.
const BUSYBOX_IMAGE: &str = "localhost/rcni-busybox:test";
/// The page of BUSYBOX_IMAGE (scripts/build-cri-images writes it).
pub const PAGE: &str = "hello from a CRI pod\n";
/// The network config the CRI plugin runs, as shipped.
const CONFLIST: &str = "conf-examples/kubernetes/10-rootless.conflist";
/// How long one CRI call or ctr command may take.
pub(super) const CALL_TIMEOUT: Duration = Duration::from_secs(150);
/// How long containerd may take to answer on its socket after the start.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Our CRI client: `$CRI_CLIENT`, else `<manifest>/.tools/bin/cri-client`.
fn cri_client_path() -> PathBuf {
    match std::env::var_os("CRI_CLIENT").filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => crate::repo().join(".tools/bin/cri-client"),
    }
}

/// The OCI archives of scripts/build-cri-images.
fn cri_images_dir() -> PathBuf {
    crate::repo().join(".tools/cri-images")
}

/// Whether a CRI test can run here; with CI=true a missing prerequisite
/// fails the test, otherwise it is skipped with a message.
pub fn cri_prerequisites(test: &str, rootless: bool) -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root".to_string());
    }
    let mut tools = vec![
        "containerd",
        "containerd-shim-runc-v2",
        "ctr",
        "runc",
        "curl",
    ];
    if rootless {
        tools.extend(["rootlesskit", "newuidmap", "newgidmap"]);
    }
    for t in tools {
        if crate::find_in_path(t).is_none() {
            missing.push(t.to_string());
        }
    }
    let client = cri_client_path();
    if !crate::prereq::is_executable(&client) {
        missing.push(format!("{} (scripts/build-cri-client)", client.display()));
    }
    for image in ["pause.oci.tar", "busybox.oci.tar"] {
        let p = cri_images_dir().join(image);
        if !p.is_file() {
            missing.push(format!("{} (scripts/build-cri-images)", p.display()));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let list = missing.join(", ");
    if crate::in_ci() {
        panic!("{test}: missing {list} (CI=true); scripts/deps and scripts/test provide them");
    }
    eprintln!("skipping {test}: missing {list} (scripts/deps and scripts/test provide them)");
    false
}

/// containerd's config.toml for a test dir `d`: root, state, socket, runc
/// state, opt and CNI dirs all under `d`.
fn config_toml(d: &Path, rootless: bool) -> String {
    let d = d.display();
    // What rootless containerd without systemd needs: no cgroups, no
    // AppArmor (containerd-rootless.sh's documented settings).
    let rootless_cri = if rootless {
        "disable_cgroup = true\n  disable_apparmor = true\n"
    } else {
        ""
    };
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
[grpc]
  address = "{d}/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  {rootless_cri}
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{d}/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni-bin"
    conf_dir = "{d}/net.d"
    max_conf_num = 1
"#
    )
}

/// Fills test dir `d` with what containerd reads: config.toml, the CNI bin
/// dir (our binary, links to every reference plugin: the CRI plugin takes
/// one `bin_dir`, and also runs `loopback` from it) and the conf dir.
fn write_containerd_dir(d: &Path, binary: &Path, rootless: bool) {
    let mkdir =
        |p: &Path| fs::create_dir_all(p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
    let bin = d.join("cni-bin");
    mkdir(&bin);
    mkdir(&d.join("net.d"));
    mkdir(&d.join("logs"));
    for plugin in Lab::list(Path::new("/usr/lib/cni")) {
        std::os::unix::fs::symlink(Path::new("/usr/lib/cni").join(&plugin), bin.join(&plugin))
            .unwrap_or_else(|e| panic!("linking {plugin}: {e}"));
    }
    let ours = bin.join("rootless-cni");
    fs::copy(binary, &ours).expect("copying rootless-cni");
    fs::set_permissions(&ours, fs::Permissions::from_mode(0o755)).expect("chmod rootless-cni");
    let conflist = crate::repo().join(CONFLIST);
    fs::copy(&conflist, d.join("net.d/10-rootless.conflist"))
        .unwrap_or_else(|e| panic!("copying {}: {e}", conflist.display()));
    fs::write(d.join("config.toml"), config_toml(d, rootless)).expect("writing config.toml");
}

// ---------------------------------------------------------------------------
// The CRI client

/// A pod made by RunPodSandbox: its id and the config it was made with
/// (CreateContainer wants it again).
#[derive(Debug, Clone)]
pub struct Pod {
    pub id: String,
    pub config: Value,
}

/// Our CRI client on one containerd socket.
#[derive(Debug, Clone)]
pub struct Cri {
    pub socket: PathBuf,
    /// Where pods' container logs go (`log_directory`).
    logs: PathBuf,
}

impl Cri {
    /// One CRI call: `request` as JSON on the client's stdin.
    pub fn call(&self, method: &str, request: &Value) -> Out {
        let client = cri_client_path();
        let socket = self.socket.display().to_string();
        let mut cmd = Command::new(&client);
        cmd.args([&socket, method])
            .env_clear()
            .env("PATH", LAB_PATH)
            .env("LIBMOUNT_UTAB", crate::utab());
        let body = request.to_string();
        run_command(
            cmd,
            format!("cri-client {method} {body}"),
            Some(body.as_bytes()),
            CALL_TIMEOUT,
        )
    }

    /// A CRI call that must succeed: its response.
    pub fn ok(&self, method: &str, request: &Value) -> Value {
        let out = self.call(method, request);
        assert!(out.ok(), "{out}");
        out.json()
            .unwrap_or_else(|| panic!("the response is not JSON: {out}"))
    }

    /// The config of a pod `name`: hostname, labels, and a TCP hostPort
    /// on 127.0.0.1 for each `(host port, container port)`.
    pub fn pod_config(&self, name: &str, ports: &[(u16, u16)], cgroup_parent: &str) -> Value {
        let port_mappings: Vec<Value> = ports
            .iter()
            .map(|(host, container)| {
                json!({ "protocol": 0, "container_port": container, "host_port": host,
                        "host_ip": "127.0.0.1" })
            })
            .collect();
        let mut config = json!({
            "metadata": { "name": name, "uid": format!("uid-{name}"), "namespace": "default" },
            "hostname": name,
            "log_directory": self.logs.join(name).display().to_string(),
            "labels": { "app": name, "test": "rootless-cni" },
            "port_mappings": port_mappings,
        });
        if !cgroup_parent.is_empty() {
            config["linux"] = json!({ "cgroup_parent": cgroup_parent });
        }
        config
    }

    /// RunPodSandbox with `config`.
    pub fn run_pod(&self, config: Value) -> Pod {
        let resp = self.ok("RunPodSandbox", &json!({ "config": config }));
        let id = resp["pod_sandbox_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no pod_sandbox_id: {resp}"))
            .to_string();
        Pod { id, config }
    }

    /// CreateContainer + StartContainer of `name` in `pod` running
    /// `command` of BUSYBOX_IMAGE: its id.
    pub fn start_container(&self, pod: &Pod, name: &str, command: &[&str]) -> String {
        let created = self.ok(
            "CreateContainer",
            &json!({
                "pod_sandbox_id": pod.id,
                "config": {
                    "metadata": { "name": name },
                    "image": { "image": BUSYBOX_IMAGE },
                    "command": command,
                    "log_path": format!("{name}.log"),
                },
                "sandbox_config": pod.config,
            }),
        );
        let id = created["container_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no container_id: {created}"))
            .to_string();
        self.ok("StartContainer", &json!({ "container_id": id }));
        id
    }

    /// ExecSync of `cmd` in a container: `{stdout, stderr, exit_code}`.
    pub fn exec(&self, container: &str, cmd: &[&str]) -> Value {
        self.ok(
            "ExecSync",
            &json!({ "container_id": container, "cmd": cmd, "timeout": 20 }),
        )
    }

    /// The pod's IP as PodSandboxStatus reports it.
    pub fn pod_ip(&self, pod: &Pod) -> String {
        let status = self.ok("PodSandboxStatus", &json!({ "pod_sandbox_id": pod.id }));
        status["status"]["network"]["ip"]
            .as_str()
            .unwrap_or_else(|| panic!("no pod IP: {status}"))
            .to_string()
    }

    /// StopPodSandbox then RemovePodSandbox (the CNI DEL runs in the stop).
    pub fn stop_and_remove(&self, pod: &Pod) {
        let req = json!({ "pod_sandbox_id": pod.id });
        self.ok("StopPodSandbox", &req);
        self.ok("RemovePodSandbox", &req);
    }

    /// The pods containerd knows (ListPodSandbox).
    pub fn pods(&self) -> Vec<Value> {
        let resp = self.ok("ListPodSandbox", &json!({}));
        resp["items"].as_array().cloned().unwrap_or_default()
    }

    /// Waits for containerd to answer Version (after its start); `alive`
    /// says whether it still runs, `log` is its log for the message.
    fn wait_ready(&self, mut alive: impl FnMut() -> bool, log: &Path) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.socket.exists() && self.call("Version", &json!({})).ok() {
                return;
            }
            let log = || fs::read_to_string(log).unwrap_or_default();
            assert!(alive(), "containerd exited:\n{}", log());
            assert!(
                Instant::now() < deadline,
                "containerd did not answer on {} within {START_TIMEOUT:?}:\n{}",
                self.socket.display(),
                log()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// `ctr -n k8s.io images import` of the test images (the unpack is
    /// done by containerd, so ctr runs on the host, as root).
    fn import_images(&self) {
        for image in ["pause.oci.tar", "busybox.oci.tar"] {
            let archive = cri_images_dir().join(image).display().to_string();
            let socket = self.socket.display().to_string();
            let argv = [
                "ctr",
                "--address",
                &socket,
                "-n",
                "k8s.io",
                "images",
                "import",
                &archive,
            ];
            let mut cmd = Command::new(argv[0]);
            cmd.args(&argv[1..])
                .env_clear()
                .env("PATH", LAB_PATH)
                .env("LIBMOUNT_UTAB", crate::utab());
            let out = run_command(cmd, argv.join(" "), None, CALL_TIMEOUT);
            assert!(out.ok(), "{out}");
        }
    }
}

/// GET http://127.0.0.1:`port`/ with curl on the host, retried for a few
/// seconds while the server in the pod comes up.
pub fn page_on_host(port: u16) -> Out {
    let url = format!("http://127.0.0.1:{port}/");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "3", &url])
            .env_clear()
            .env("PATH", LAB_PATH)
            .env("LIBMOUNT_UTAB", crate::utab());
        let out = run_command(cmd, format!("curl {url}"), None, Duration::from_secs(10));
        if out.ok() || Instant::now() > deadline {
            return out;
        }
        thread::sleep(Duration::from_millis(200));
    }
}
