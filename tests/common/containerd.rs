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

use super::host_tools::write_user_files;
use super::{describe_process, proc_state, run_command, sigkill, Lab, Out, LAB_PATH};
use serde_json::{json, Value};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The CRI sandbox ("pause") image: its entrypoint sleeps forever.
pub const PAUSE_IMAGE: &str = "localhost/rcni-pause:test";
/// busybox (httpd, ping, sh, ...) with `PAGE` at /www/index.html.
pub const BUSYBOX_IMAGE: &str = "localhost/rcni-busybox:test";
/// The page of BUSYBOX_IMAGE (scripts/build-cri-images writes it).
pub const PAGE: &str = "hello from a CRI pod\n";
/// The network config the CRI plugin runs, as shipped.
const CONFLIST: &str = "conf-examples/kubernetes/10-rootless.conflist";
/// How long one CRI call or ctr command may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(150);
/// How long containerd may take to answer on its socket after the start.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Our CRI client: `$CRI_CLIENT`, else `<manifest>/.tools/bin/cri-client`.
pub fn cri_client_path() -> PathBuf {
    match std::env::var_os("CRI_CLIENT").filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/cri-client"),
    }
}

/// The OCI archives of scripts/build-cri-images.
pub fn cri_images_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/cri-images")
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
        if super::find_in_path(t).is_none() {
            missing.push(t.to_string());
        }
    }
    let client = cri_client_path();
    if !super::is_executable(&client) {
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
    if super::in_ci() {
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
fn write_containerd_dir(d: &Path, rootless: bool) {
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
    fs::copy(env!("CARGO_BIN_EXE_rootless-cni"), &ours).expect("copying rootless-cni");
    fs::set_permissions(&ours, fs::Permissions::from_mode(0o755)).expect("chmod rootless-cni");
    let conflist = Path::new(env!("CARGO_MANIFEST_DIR")).join(CONFLIST);
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
            .env("LIBMOUNT_UTAB", crate::common::utab());
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
                .env("LIBMOUNT_UTAB", crate::common::utab());
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
            .env("LIBMOUNT_UTAB", crate::common::utab());
        let out = run_command(cmd, format!("curl {url}"), None, Duration::from_secs(10));
        if out.ok() || Instant::now() > deadline {
            return out;
        }
        thread::sleep(Duration::from_millis(200));
    }
}

// ---------------------------------------------------------------------------
// Rootful

/// containerd as root in its own PID and mount namespace (see the module
/// doc). Dropping it kills that namespace and removes the cgroups runc made
/// under `cgroup_parent` and the test dir.
pub struct RootfulContainerd {
    pub dir: PathBuf,
    pub cri: Cri,
    /// `unshare --pid --fork --kill-child ...`: the guard's handle.
    holder: Option<Child>,
    /// The cgroup parent the pods get (`/rcni-cri-<name>-<pid>`).
    pub cgroup_parent: String,
}

impl RootfulContainerd {
    /// Starts containerd and imports the test images.
    pub fn start(name: &str) -> RootfulContainerd {
        let dir = PathBuf::from(format!(
            "/tmp/rootless-cni-cri.{name}.{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        for sub in [
            "ovl/run/upper",
            "ovl/run/work",
            "ovl/var-lib/upper",
            "ovl/var-lib/work",
        ] {
            fs::create_dir_all(dir.join(sub)).expect("mkdir");
        }
        // XDG_RUNTIME_DIR of containerd, inherited by the CNI plugins it
        // runs: where rootless-cni keeps its state.
        fs::create_dir_all(dir.join("xdg")).expect("mkdir xdg");
        fs::set_permissions(dir.join("xdg"), fs::Permissions::from_mode(0o700)).expect("chmod");
        write_containerd_dir(&dir, false);
        let cri = Cri {
            socket: dir.join("containerd.sock"),
            logs: dir.join("logs"),
        };
        let mut c = RootfulContainerd {
            cgroup_parent: format!("/rcni-cri-{name}-{}", std::process::id()),
            dir,
            cri,
            holder: None,
        };
        let d = c.dir.display().to_string();
        // The namespace's first process is a shell that waits for
        // containerd and so reaps what is re-parented to it (shims).
        let script = format!(
            "set -e
             mount -t overlay overlay -o lowerdir=/run,upperdir={d}/ovl/run/upper,workdir={d}/ovl/run/work /run
             mount -t overlay overlay -o lowerdir=/var/lib,upperdir={d}/ovl/var-lib/upper,workdir={d}/ovl/var-lib/work /var/lib
             containerd --config {d}/config.toml &
             echo $! > {d}/containerd.pid
             wait $!"
        );
        let log = fs::File::create(c.dir.join("containerd.log")).expect("containerd.log");
        let child = Command::new("unshare")
            .args(["--pid", "--fork", "--kill-child", "--mount-proc"])
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .env_clear()
            .env("PATH", LAB_PATH)
            .env("LIBMOUNT_UTAB", crate::common::utab())
            .env("XDG_RUNTIME_DIR", c.dir.join("xdg"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("starting containerd");
        let pid = child.id();
        c.holder = Some(child);
        c.cri.wait_ready(
            || proc_state(pid).is_some_and(|s| !s.starts_with('Z')),
            &c.dir.join("containerd.log"),
        );
        c.cri.import_images();
        c
    }

    fn holder_pid(&self) -> u32 {
        self.holder.as_ref().map(Child::id).unwrap_or(0)
    }

    /// containerd's pid as the host sees it.
    pub fn containerd_pid(&self) -> u32 {
        // containerd.pid holds the pid inside the namespace: find the
        // process by its parent, the namespace's shell.
        let shell = self.children_of(self.holder_pid());
        shell
            .iter()
            .flat_map(|&p| self.children_of(p))
            .find(|&p| {
                fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|c| c.trim() == "containerd")
            })
            .unwrap_or_else(|| panic!("containerd is not running; log:\n{}", self.log()))
    }

    /// containerd's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    fn children_of(&self, pid: u32) -> Vec<u32> {
        Lab::list(Path::new("/proc"))
            .into_iter()
            .filter_map(|n| n.parse::<u32>().ok())
            .filter(|&p| parent_of(p) == Some(pid))
            .collect()
    }

    /// Live (not zombie) processes under containerd other than containerd
    /// itself, described: shims, pods, our infra, plugins.
    pub fn processes(&self) -> Vec<String> {
        let mut found = Vec::new();
        let mut todo = self.children_of(self.holder_pid());
        let containerd = self.containerd_pid();
        while let Some(p) = todo.pop() {
            todo.extend(self.children_of(p));
            let zombie = proc_state(p).unwrap_or_default().starts_with('Z');
            let shell = parent_of(p) == Some(self.holder_pid());
            if p != containerd && !zombie && !shell {
                found.push(describe_process(p));
            }
        }
        found
    }

    /// `argv` as root in containerd's mount and PID namespaces (what
    /// `rootless-cni status` needs to judge the infra's pids).
    pub fn run_inside(&self, argv: &[&str]) -> Out {
        let target = format!("--target={}", self.containerd_pid());
        let mut cmd = Command::new("nsenter");
        cmd.args([target.as_str(), "--mount", "--pid", "--"])
            .args(argv)
            .env_clear()
            .env("PATH", LAB_PATH)
            .env("LIBMOUNT_UTAB", crate::common::utab());
        run_command(cmd, argv.join(" "), None, CALL_TIMEOUT)
    }

    /// rootless-cni's state dir under containerd's XDG_RUNTIME_DIR.
    pub fn state_dir(&self) -> PathBuf {
        self.dir
            .join("xdg")
            .join(rootless_cni::state::DEFAULT_DIR_NAME)
    }

    /// `rootless-cni status --json` on that state dir, inside.
    pub fn status(&self) -> Value {
        let bin = self.dir.join("cni-bin/rootless-cni").display().to_string();
        let state = self.state_dir().display().to_string();
        let out = self.run_inside(&[&bin, "--state-dir", &state, "status", "--json"]);
        assert!(out.ok(), "{out}");
        out.json().unwrap_or_else(|| panic!("status --json: {out}"))
    }

    /// What is left of pods and of our infra after every pod was removed:
    /// pods containerd knows, processes under containerd, and in the state
    /// dir the infra's files, attachment records, host-local leases; in
    /// containerd's namespace the netns mounts and libcni's cached
    /// results. Empty when nothing is left.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        for pod in self.cri.pods() {
            left.push(format!("pod: {pod}"));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut processes = self.processes();
        while !processes.is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(100));
            processes = self.processes();
        }
        left.extend(processes.into_iter().map(|p| format!("process: {p}")));
        let status = self.status();
        if !status["infra"].is_null() {
            left.push(format!("infra: {}", status["infra"]));
        }
        for a in status["attachments"].as_array().into_iter().flatten() {
            left.push(format!("attachment: {a}"));
        }
        let state = self.state_dir();
        for f in ["infra.json", "control.sock", "slirp.sock"] {
            if state.join(f).exists() {
                left.push(format!("infra file: {f}"));
            }
        }
        for r in Lab::list(&state.join("attachments")) {
            left.push(format!("record: {r}"));
        }
        for l in Lab::list(&state.join("var-lib-cni/networks/rootless")) {
            if !l.starts_with("last_reserved_ip") && l != "lock" {
                left.push(format!("lease: {l}"));
            }
        }
        let netns = self.run_inside(&["sh", "-c", "ls /run/netns 2>/dev/null || true"]);
        for n in netns.stdout.split_whitespace() {
            left.push(format!("netns: /run/netns/{n}"));
        }
        let results = self.dir.join("ovl/var-lib/upper/cni/results");
        for r in Lab::list(&results) {
            left.push(format!("libcni cache: {r}"));
        }
        left
    }

    /// Kills the namespace (everything containerd started dies with its
    /// first process; the mounts go with the last), removes the pods'
    /// cgroups. Idempotent; the Drop guard calls it too.
    pub fn stop(&mut self) {
        let Some(mut holder) = self.holder.take() else {
            return;
        };
        let pid = holder.id();
        let tree = self.descendants(pid);
        // --kill-child: the namespace's first process gets SIGKILL when
        // unshare dies, and the kernel then kills the rest.
        let _ = holder.kill();
        let _ = holder.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        while tree.iter().any(|&p| is_alive(p)) && Instant::now() < deadline {
            for &p in &tree {
                if is_alive(p) {
                    sigkill(p);
                }
            }
            thread::sleep(Duration::from_millis(50));
        }
        remove_cgroups(&self.cgroup_parent);
    }

    fn descendants(&self, pid: u32) -> Vec<u32> {
        let mut all = Vec::new();
        let mut todo = vec![pid];
        while let Some(p) = todo.pop() {
            let kids = self.children_of(p);
            all.extend(&kids);
            todo.extend(kids);
        }
        all
    }
}

/// Whether `pid` still runs (not a zombie).
fn is_alive(pid: u32) -> bool {
    proc_state(pid).is_some_and(|s| !s.starts_with('Z'))
}

impl Drop for RootfulContainerd {
    fn drop(&mut self) {
        self.stop();
        if std::env::var_os("LAB_KEEP").is_some() {
            eprintln!("LAB_KEEP: leaving {}", self.dir.display());
            return;
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("removing {}: {e}", self.dir.display());
        }
    }
}

/// The parent pid of `pid`.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Removes the cgroup dir `parent` (and the empty dirs under it) in every
/// hierarchy under /sys/fs/cgroup: runc removes each container's, not the
/// parent a pod names.
fn remove_cgroups(parent: &str) {
    let root = Path::new("/sys/fs/cgroup");
    let rel = parent.trim_start_matches('/');
    let mut hierarchies = vec![root.to_path_buf()];
    hierarchies.extend(Lab::list(root).into_iter().map(|n| root.join(n)));
    for h in hierarchies {
        let dir = h.join(rel);
        if dir.is_dir() {
            remove_empty_dirs(&dir);
        }
    }
}

/// rmdir of `dir` and every dir under it, deepest first (cgroup dirs hold
/// only pseudo files, which rmdir takes with them).
fn remove_empty_dirs(dir: &Path) {
    for name in Lab::list(dir) {
        let p = dir.join(name);
        if p.is_dir() && !p.is_symlink() {
            remove_empty_dirs(&p);
        }
    }
    let _ = fs::remove_dir(dir);
}

/// Cgroup dirs named `parent` that still exist (for the host check).
pub fn cgroups_left(parent: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let rel = parent.trim_start_matches('/');
    let mut hierarchies = vec![root.to_path_buf()];
    hierarchies.extend(Lab::list(root).into_iter().map(|n| root.join(n)));
    hierarchies
        .into_iter()
        .map(|h| h.join(rel))
        .filter(|d| d.is_dir())
        .collect()
}

// ---------------------------------------------------------------------------
// Rootless

/// What rootlesskit runs: the links copy-up made to the host's root-owned
/// dirs removed (as containerd-rootless.sh does: the user's own are made
/// in the copy-up tmpfs instead), the lab's tun node over /dev/net/tun,
/// then containerd.
const ROOTLESS_CHILD: &str = r#"set -e
for p in /run/containerd /run/netns /run/xtables.lock /var/lib/containerd /var/lib/cni /etc/containerd; do
    if [ -L "$p" ]; then rm -f "$p"; fi
done
mount --bind "$LAB/tun" /dev/net/tun
exec containerd --config "$CD/config.toml"
"#;

/// The host a rootless containerd starts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// As this machine is: no rootful CNI runtime ever ran.
    Clean,
    /// Where a rootful CNI runtime ran: root-owned `/run/netns`,
    /// `/var/lib/cni` (0700), `/run/containerd`, `/var/lib/containerd`,
    /// which RootlessKit's copy-up turns into links the user cannot write
    /// through.
    RootfulCniRan,
}

/// containerd as the lab's uid inside rootlesskit (see the module doc).
pub struct RootlessContainerd {
    pub cri: Cri,
    /// The containerd dir: `<lab>/cd`.
    pub dir: PathBuf,
    /// root's `unshare --mount` that becomes rootlesskit (setpriv, exec).
    holder: Option<Child>,
}

impl RootlessContainerd {
    /// Starts containerd in `lab` on a host of kind `host` and imports the
    /// test images.
    pub fn start(lab: &Lab, host: Host) -> RootlessContainerd {
        let dir = lab.dir.join("cd");
        write_containerd_dir(&dir, true);
        chown_tree(&dir, lab.uid);
        write_user_files(lab, "rcnicri");
        lab.write_file("rootless-child.sh", ROOTLESS_CHILD);
        let (d, cd, u) = (lab.dir.display(), dir.display(), lab.uid);
        // rootlesskit (newuidmap) wants the uid in /etc/passwd with a
        // subuid range: copies bound over the machine's files in root's
        // private mount namespace, which rootlesskit then inherits.
        let leftovers = match host {
            Host::Clean => String::new(),
            // Made in overlays of root's mount namespace: the machine's
            // own /run and /var/lib stay as they are.
            Host::RootfulCniRan => format!(
                "for p in run var-lib; do mkdir -p {d}/host-$p/upper {d}/host-$p/work; done
                 mount -t overlay overlay -o lowerdir=/run,upperdir={d}/host-run/upper,workdir={d}/host-run/work /run
                 mount -t overlay overlay -o lowerdir=/var/lib,upperdir={d}/host-var-lib/upper,workdir={d}/host-var-lib/work /var/lib
                 mkdir -p -m 0755 /run/netns /run/containerd /var/lib/containerd
                 mkdir -p -m 0700 /var/lib/cni/results /var/lib/cni/networks"
            ),
        };
        let inner = format!(
            "set -e
             {leftovers}
             for f in passwd group subuid subgid; do mount --bind {d}/etc-$f /etc/$f; done
             exec setpriv --reuid {u} --regid {u} --clear-groups -- env -i PATH={LAB_PATH} HOME={d} \
               XDG_RUNTIME_DIR={d}/run LAB={d} CD={cd} \
               rootlesskit --net=host --copy-up=/etc --copy-up=/run --copy-up=/var/lib \
                 --state-dir={d}/rootlesskit-state sh {d}/rootless-child.sh"
        );
        let log = fs::File::create(dir.join("containerd.log")).expect("containerd.log");
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &inner])
            .env_clear()
            .env("PATH", LAB_PATH)
            .env("LIBMOUNT_UTAB", crate::common::utab())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("starting rootlesskit");
        let pid = child.id();
        let c = RootlessContainerd {
            cri: Cri {
                socket: dir.join("containerd.sock"),
                logs: dir.join("logs"),
            },
            dir,
            holder: Some(child),
        };
        c.cri.wait_ready(
            || proc_state(pid).is_some_and(|s| !s.starts_with('Z')),
            &c.dir.join("containerd.log"),
        );
        c.cri.import_images();
        c
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// `rootless-cni status --json` as the user of a rootless containerd
    /// runs it: as the lab uid in rootlesskit's user and mount namespaces
    /// (`nsenter` to its child_pid, as `containerd-rootless-setuptool.sh
    /// nsenter` does), where the infra's namespaces are its own.
    pub fn status(&self, lab: &Lab) -> Value {
        let child_pid = fs::read_to_string(lab.dir.join("rootlesskit-state/child_pid"))
            .unwrap_or_else(|e| panic!("rootlesskit's child_pid: {e}"));
        let target = format!("--target={}", child_pid.trim());
        let bin = self.dir.join("cni-bin/rootless-cni").display().to_string();
        let u = lab.uid.to_string();
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid", &u, "--regid", &u, "--clear-groups", "--"])
            .args([
                "nsenter",
                "--user",
                "--mount",
                "--preserve-credentials",
                &target,
                "--",
            ])
            .args(["env", "-i", &format!("PATH={LAB_PATH}")])
            .arg(format!("XDG_RUNTIME_DIR={}", lab.run_dir().display()))
            .args([&bin, "status", "--json"])
            .env_clear()
            .env("PATH", LAB_PATH)
            .env("LIBMOUNT_UTAB", crate::common::utab());
        let out = run_command(
            cmd,
            "rootless-cni status --json (in rootlesskit)".into(),
            None,
            CALL_TIMEOUT,
        );
        assert!(out.ok(), "{out}");
        out.json().unwrap_or_else(|| panic!("status --json: {out}"))
    }
}

impl Drop for RootlessContainerd {
    fn drop(&mut self) {
        // rootlesskit and all it started run as the lab uid (pods as its
        // subordinate root, i.e. the same uid): the lab's drop kills them
        // all; the holder is reaped here.
        if let Some(mut holder) = self.holder.take() {
            let _ = holder.kill();
            let _ = holder.wait();
        }
    }
}

fn chown_tree(dir: &Path, uid: u32) {
    let _ = std::os::unix::fs::lchown(dir, Some(uid), Some(uid));
    for name in Lab::list(dir) {
        let p = dir.join(name);
        if p.is_dir() && !p.is_symlink() {
            chown_tree(&p, uid);
        } else {
            let _ = std::os::unix::fs::lchown(&p, Some(uid), Some(uid));
        }
    }
}
