//! Real root as a runtime: a box for a test that runs rootless-cni (or
//! rootful podman) as root on the machine itself. The box is a private dir
//! and mount namespace; what such a runtime changes on the host is recorded
//! before and put back after, and whatever still differs is reported.

use crate::host_tools::skip_without;
use crate::podman::{
    busybox_rootfs_tar, private_mount_ns_holder, root_command, IMAGE, PODMAN_NET, PODMAN_TOOLS,
};
use crate::process::{all_pids, proc_cmdline, proc_state};
use crate::{run_command, sigkill, Lab, Out, LAB_PATH};
use serde_json::{json, Value};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

/// These tests run as real root and share the host; one at a time.
pub static AS_ROOT: Mutex<()> = Mutex::new(());

/// What rootful podman (and a rootful infra) could change on the host. The
/// tests run in a private mount namespace (their mounts never reach the
/// host's) with an overlay on /var/lib (/var/lib/cni, /var/lib/containers
/// stay as they are). /run is left as the host has it, a mount point or
/// not, since slirp4netns's sandbox behaves differently on the two; what
/// podman makes there (/run/netns entries, /run/runc), ip_forward and its
/// cgroups are recorded before and put back after.
#[derive(Debug, Clone, PartialEq)]
pub struct HostState {
    pub ip_forward: String,
    pub var_lib_cni: bool,
    pub var_lib_containers: bool,
    pub run_netns: Option<Vec<String>>,
    pub run_runc: bool,
    /// cgroup hierarchies that have a libpod_parent.
    pub libpod_cgroups: Vec<PathBuf>,
    pub mounts: Vec<String>,
}

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

fn cgroup_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![PathBuf::from(CGROUP_ROOT)];
    dirs.extend(
        Lab::list(Path::new(CGROUP_ROOT))
            .into_iter()
            .map(|n| Path::new(CGROUP_ROOT).join(n))
            .filter(|p| p.is_dir()),
    );
    dirs
}

impl HostState {
    pub fn capture() -> HostState {
        let mounts = Command::new("findmnt")
            .args(["-rn", "-o", "TARGET,SOURCE,FSTYPE"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        HostState {
            ip_forward: fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
                .unwrap_or_default()
                .trim()
                .to_string(),
            var_lib_cni: Path::new("/var/lib/cni").exists(),
            var_lib_containers: Path::new("/var/lib/containers").exists(),
            run_netns: Path::new("/run/netns")
                .is_dir()
                .then(|| Lab::list(Path::new("/run/netns"))),
            run_runc: Path::new("/run/runc").exists(),
            libpod_cgroups: cgroup_dirs()
                .into_iter()
                .filter(|d| d.join("libpod_parent").is_dir())
                .collect(),
            mounts: mounts.lines().map(String::from).collect(),
        }
    }

    /// Puts back ip_forward, removes what podman (or `ip netns`) made in
    /// /run and the libpod cgroups; what still differs from `self` after
    /// (other processes' own netns under /run/netns are not counted).
    pub fn restore(&self) -> Vec<String> {
        let now = HostState::capture();
        if now.ip_forward != self.ip_forward {
            let _ = fs::write("/proc/sys/net/ipv4/ip_forward", &self.ip_forward);
        }
        let before_netns = self.run_netns.clone().unwrap_or_default();
        for n in now.run_netns.iter().flatten() {
            let ours = n.starts_with("netns-") || n.starts_with("rcni-probe");
            if ours && !before_netns.contains(n) {
                let _ = fs::remove_file(Path::new("/run/netns").join(n));
            }
        }
        if self.run_netns.is_none() {
            // Only when empty: another process may have come to use it.
            let _ = fs::remove_dir("/run/netns");
        }
        if !self.run_runc && now.run_runc {
            let _ = fs::remove_dir_all("/run/runc");
        }
        for dir in now
            .libpod_cgroups
            .iter()
            .filter(|d| !self.libpod_cgroups.contains(d))
        {
            remove_empty_dirs(&dir.join("libpod_parent"));
        }
        let after = HostState::capture();
        let mut diffs = Vec::new();
        if after.ip_forward != self.ip_forward {
            diffs.push(format!(
                "ip_forward {} (was {})",
                after.ip_forward, self.ip_forward
            ));
        }
        if after.var_lib_cni != self.var_lib_cni {
            diffs.push(format!("/var/lib/cni exists: {}", after.var_lib_cni));
        }
        if after.var_lib_containers != self.var_lib_containers {
            diffs.push(format!(
                "/var/lib/containers exists: {}",
                after.var_lib_containers
            ));
        }
        let podman_netns = |l: &Option<Vec<String>>| -> Vec<String> {
            l.iter()
                .flatten()
                .filter(|n| n.starts_with("netns-") || n.starts_with("rcni-probe"))
                .cloned()
                .collect()
        };
        if podman_netns(&after.run_netns) != podman_netns(&self.run_netns)
            || (self.run_netns.is_none() && after.run_netns.as_ref().is_some_and(|l| l.is_empty()))
        {
            diffs.push(format!(
                "/run/netns: {:?} (was {:?})",
                after.run_netns, self.run_netns
            ));
        }
        if after.run_runc != self.run_runc {
            diffs.push(format!("/run/runc exists: {}", after.run_runc));
        }
        if after.libpod_cgroups != self.libpod_cgroups {
            diffs.push(format!("libpod cgroups: {:?}", after.libpod_cgroups));
        }
        let ours =
            |m: &&String| !m.starts_with("/run/netns/") || m.starts_with("/run/netns/netns-");
        for m in after.mounts.iter().filter(ours) {
            if !self.mounts.contains(m) && !m.starts_with("/run/netns ") {
                diffs.push(format!("new mount: {m}"));
            }
        }
        for m in self.mounts.iter().filter(ours) {
            if !after.mounts.contains(m) {
                diffs.push(format!("mount gone: {m}"));
            }
        }
        diffs
    }
}

/// rmdir of `dir` and every dir under it, deepest first (cgroup dirs hold
/// only pseudo files, which rmdir takes with them).
pub(crate) fn remove_empty_dirs(dir: &Path) {
    for name in Lab::list(dir) {
        let p = dir.join(name);
        if p.is_dir() && !p.is_symlink() {
            remove_empty_dirs(&p);
        }
    }
    let _ = fs::remove_dir(dir);
}

/// A private dir for a root test, a mount namespace of its own (held by a
/// `sleep`) with an overlay on /var/lib whose upper dir is in the private
/// dir, and the host's state recorded. Commands run in that mount
/// namespace through nsenter. Dropping it kills what the test started
/// (processes whose command line names the private dir), the holder, puts
/// the host back and removes the dir.
pub struct RootBox {
    pub dir: PathBuf,
    pub holder: Option<std::process::Child>,
    pub before: HostState,
    pub done: bool,
}

impl RootBox {
    /// `binary` (`lab::binary!()`) is what the box runs as root.
    pub fn new(binary: &Path, name: &str) -> RootBox {
        let before = HostState::capture();
        let dir = PathBuf::from(format!(
            "/tmp/rootless-cni-root.{name}.{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        let mut b = RootBox {
            dir,
            holder: None,
            before,
            done: false,
        };
        for sub in ["ovl/var-lib/upper", "ovl/var-lib/work", "cni-bin"] {
            fs::create_dir_all(b.dir.join(sub)).expect("mkdir");
        }
        fs::create_dir_all(b.dir.join("state")).expect("mkdir state");
        fs::set_permissions(b.dir.join("state"), fs::Permissions::from_mode(0o700))
            .expect("chmod state");
        fs::copy(binary, b.dir.join("cni-bin/rootless-cni")).expect("copying rootless-cni");
        let d = b.dir.display();
        let setup = format!(
            "mount -t overlay overlay -o lowerdir=/var/lib,upperdir={d}/ovl/var-lib/upper,workdir={d}/ovl/var-lib/work /var/lib"
        );
        b.holder = Some(private_mount_ns_holder(&b.dir, "holder", &setup));
        b
    }

    pub fn path(&self, rel: &str) -> String {
        self.dir.join(rel).display().to_string()
    }

    pub fn state_dir(&self) -> String {
        self.path("state/rootless-cni-plugin")
    }

    /// `argv` as root in the box's mount namespace.
    pub fn command(&self, argv: &[&str]) -> Command {
        let pid = self.holder.as_ref().map(|c| c.id()).unwrap_or(0);
        let mut cmd = root_command(&["nsenter", &format!("--target={pid}"), "--mount", "--"]);
        cmd.args(argv);
        cmd
    }

    pub fn run(&self, argv: &[&str], stdin: Option<&[u8]>) -> Out {
        run_command(
            self.command(argv),
            argv.join(" "),
            stdin,
            Duration::from_secs(120),
        )
    }

    /// `rootless-cni --state-dir ... ARGS` as root in the box.
    pub fn rootless_cni(&self, args: &[&str]) -> Out {
        let (bin, state) = (self.path("cni-bin/rootless-cni"), self.state_dir());
        let mut argv = vec![bin.as_str(), "--state-dir", state.as_str()];
        argv.extend_from_slice(args);
        self.run(&argv, None)
    }

    pub fn status(&self) -> Value {
        let out = self.rootless_cni(&["status", "--json"]);
        assert!(out.ok(), "status: {out}");
        out.json().unwrap_or_else(|| panic!("status --json: {out}"))
    }

    /// Stops what the test started and puts the host back; what still
    /// differs from before.
    pub fn finish(&mut self) -> Vec<String> {
        if self.done {
            return Vec::new();
        }
        self.done = true;
        let _ = self.rootless_cni(&["stop", "--force"]);
        kill_processes_mentioning(&self.dir.display().to_string());
        if let Some(mut holder) = self.holder.take() {
            let _ = holder.kill();
            let _ = holder.wait();
        }
        let diffs = self.before.restore();
        let _ = fs::remove_dir_all(&self.dir);
        diffs
    }
}

impl Drop for RootBox {
    fn drop(&mut self) {
        let diffs = self.finish();
        if !diffs.is_empty() {
            eprintln!("the host is not as it was: {diffs:?}");
        }
    }
}

/// SIGKILL to every process whose command line mentions `text` (a test's
/// private dir: only what the test started), until none is left.
fn kill_processes_mentioning(text: &str) {
    let me = std::process::id();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids: Vec<u32> = all_pids()
            .into_iter()
            .filter(|&pid| pid != me)
            .filter(|&pid| {
                let zombie = proc_state(pid).unwrap_or_default().starts_with('Z');
                !zombie && proc_cmdline(pid).contains(text)
            })
            .collect();
        if pids.is_empty() || Instant::now() > deadline {
            return;
        }
        for pid in pids {
            sigkill(pid);
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// podman with everything private: root, runroot, tmpdir, network config
/// dir (conf-examples/podman/rootless.conflist with the box's state dir),
/// CNI plugin dirs (our binary, then /usr/lib/cni), in a RootBox.
pub struct RootfulPodman {
    pub b: RootBox,
}

impl RootfulPodman {
    pub fn new(binary: &Path, name: &str) -> RootfulPodman {
        let b = RootBox::new(binary, name);
        for sub in ["root", "runroot", "tmp", "net.d", "rootfs", "home"] {
            fs::create_dir_all(b.dir.join(sub)).expect("mkdir");
        }
        let conf = format!(
            "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]\nnetwork_config_dir = \"{}\"\n",
            b.path("cni-bin"),
            b.path("net.d")
        );
        fs::write(b.dir.join("containers.conf"), conf).expect("containers.conf");
        let mut conflist = crate::conf_example("podman/rootless.conflist");
        assert_eq!(conflist["name"], PODMAN_NET);
        conflist["plugins"][0]["stateDir"] = json!(b.state_dir());
        fs::write(
            b.dir.join(format!("net.d/{PODMAN_NET}.conflist")),
            conflist.to_string(),
        )
        .expect("writing the conflist");
        RootfulPodman { b }
    }

    pub fn podman(&self, args: &[&str]) -> Out {
        let p = |s: &str| self.b.path(s);
        let (root, runroot, tmp, netd) = (p("root"), p("runroot"), p("tmp"), p("net.d"));
        let (conf, home) = (
            format!("CONTAINERS_CONF={}", p("containers.conf")),
            p("home"),
        );
        let (home, tmpdir) = (format!("HOME={home}"), format!("TMPDIR={tmp}"));
        let path = format!("PATH={LAB_PATH}");
        let mut argv = vec!["env", "-i", &path, &conf, &home, &tmpdir, "podman"];
        argv.extend_from_slice(&["--root", &root, "--runroot", &runroot, "--tmpdir", &tmp]);
        argv.extend_from_slice(&["--network-config-dir", &netd, "--runtime", "runc"]);
        argv.extend_from_slice(&["--cgroup-manager", "cgroupfs", "--storage-driver", "vfs"]);
        argv.extend_from_slice(&["--events-backend", "none"]);
        argv.extend_from_slice(args);
        let mut out = self.b.run(&argv, None);
        out.what = format!("podman {}", args.join(" "));
        out
    }

    /// A busybox-static rootfs with httpd and a page, imported as an image.
    pub fn import_image(&self) -> String {
        let tar = busybox_rootfs_tar(&self.b.dir);
        let out = self.podman(&["import", &tar, IMAGE]);
        assert!(out.ok(), "podman import: {out}");
        IMAGE.to_string()
    }

    /// Removes the containers, then what RootBox::finish does.
    pub fn finish(&mut self) -> Vec<String> {
        if !self.b.done {
            let _ = self.podman(&["rm", "--all", "--force", "--time", "0"]);
        }
        self.b.finish()
    }
}

impl Drop for RootfulPodman {
    fn drop(&mut self) {
        if !self.b.done {
            let _ = self.podman(&["rm", "--all", "--force", "--time", "0"]);
        }
    }
}

/// Whether the rootful podman tests can run: as root, with podman's tools
/// (missing: a failure under CI, else skipped).
pub fn podman_prerequisites(test: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping {test}: podman runs as root here");
        return false;
    }
    !skip_without(test, &PODMAN_TOOLS)
}
