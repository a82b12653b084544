//! containerd as root, in a PID and mount namespace of its own: killing
//! the namespace's first process kills everything it started.

use super::{write_containerd_dir, Cri, CALL_TIMEOUT};
use crate::process::{
    children_of, descendants, describe_process, parent_of, proc_state, sigkill, start_time,
};
use crate::rootful::remove_empty_dirs;
use crate::{run_command, Lab, Out, LAB_PATH};
use serde_json::Value;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

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
    /// Starts containerd, its CNI dir holding `binary` (`lab::binary!()`),
    /// and imports the test images.
    pub fn start(binary: &Path, name: &str) -> RootfulContainerd {
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
        write_containerd_dir(&dir, binary, false);
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
            .env("LIBMOUNT_UTAB", crate::utab())
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
    fn containerd_pid(&self) -> u32 {
        // containerd.pid holds the pid inside the namespace: find the
        // process by its parent, the namespace's shell.
        let shell = children_of(self.holder_pid());
        shell
            .iter()
            .flat_map(|&p| children_of(p))
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

    /// Live (not zombie) processes under containerd other than containerd
    /// itself, described: shims, pods, our infra, plugins.
    pub fn processes(&self) -> Vec<String> {
        let mut found = Vec::new();
        let mut todo = children_of(self.holder_pid());
        let containerd = self.containerd_pid();
        while let Some(p) = todo.pop() {
            todo.extend(children_of(p));
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
    fn run_inside(&self, argv: &[&str]) -> Out {
        let target = format!("--target={}", self.containerd_pid());
        let mut cmd = Command::new("nsenter");
        cmd.args([target.as_str(), "--mount", "--pid", "--"])
            .args(argv)
            .env_clear()
            .env("PATH", LAB_PATH)
            .env("LIBMOUNT_UTAB", crate::utab());
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
        // Each with its start time: a pid that died is soon another
        // process's on a busy machine, and must not be killed then.
        let tree: Vec<(u32, Option<u64>)> = descendants(pid)
            .into_iter()
            .map(|p| (p, start_time(p)))
            .collect();
        let still_ours = |&(p, started): &(u32, Option<u64>)| {
            started.is_some() && start_time(p) == started && is_alive(p)
        };
        // --kill-child: the namespace's first process gets SIGKILL when
        // unshare dies, and the kernel then kills the rest.
        let _ = holder.kill();
        let _ = holder.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        while tree.iter().any(still_ours) && Instant::now() < deadline {
            for p in tree.iter().filter(|p| still_ours(p)) {
                sigkill(p.0);
            }
            thread::sleep(Duration::from_millis(50));
        }
        remove_cgroups(&self.cgroup_parent);
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
