//! Podman in the lab: rootless podman run by the lab's uid in a private
//! mount namespace of root's, the busybox-static image the podman tests
//! import (no registry here), and the tools their checks share.

use crate::host_tools::{busybox_static, skip_without, write_user_files};
use crate::hosts::await_holder;
use crate::{run_command, Lab, Out, LAB_PATH};
use serde_json::Value;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

/// A command run as root, with a clean environment. mount(8) keeps its
/// utab (and makes /run/mount for it) under the machine's /run unless told
/// otherwise: it goes to the target dir.
pub fn root_command(argv: &[&str]) -> Command {
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .env("PATH", LAB_PATH)
        .env("LIBMOUNT_UTAB", crate::utab());
    cmd
}

pub fn run_root(argv: &[&str], timeout: Duration) -> Out {
    run_command(root_command(argv), argv.join(" "), None, timeout)
}

/// `podman run` arguments of the test's web server: container `name` on
/// our network, publishing `publish` when given, httpd of `image` serving
/// the test page.
pub fn web_container_args<'a>(
    name: &'a str,
    publish: Option<&'a str>,
    image: &'a str,
) -> Vec<&'a str> {
    let mut args = vec!["run", "-d", "--name", name, "--network", PODMAN_NET];
    if let Some(publish) = publish {
        args.extend(["-p", publish]);
    }
    args.extend(ULIMITS);
    args.extend([image, "httpd", "-f", "-p", "80", "-h", "/www"]);
    args
}

/// The test page, fetched with curl on the host's 127.0.0.1:`port`
/// (retried while the published port comes up).
pub fn assert_page_on_host(port: u16) {
    let url = format!("http://127.0.0.1:{port}/");
    let got = retry(Duration::from_secs(5), || {
        run_root(
            &["curl", "-sS", "--max-time", "3", &url],
            Duration::from_secs(10),
        )
    });
    assert!(got.ok(), "curl {url} on the host: {got}");
    assert_eq!(got.stdout, PAGE, "{got}");
}

/// A root process in a private mount namespace where `setup` (shell) has
/// run, holding it until killed. It reports on `<dir>/<name>.err`; a setup
/// that fails or hangs is a panic, with the holder killed first.
pub fn private_mount_ns_holder(dir: &Path, name: &str, setup: &str) -> std::process::Child {
    let ready = dir.join(format!("{name}-ready"));
    let err = dir.join(format!("{name}.err"));
    let script = format!(
        "set -e\n{setup}\ntouch '{}'\nexec sleep infinity",
        ready.display()
    );
    let mut child = root_command(&["unshare", "--mount", "--propagation", "private"])
        .args(["sh", "-c", &script])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(
            fs::File::create(&err)
                .map(std::process::Stdio::from)
                .unwrap_or_else(|e| panic!("{}: {e}", err.display())),
        )
        .spawn()
        .expect("starting the mount namespace holder");
    await_holder(&mut child, &ready, &err, "the private mount namespace")
        .unwrap_or_else(|e| panic!("{e}"));
    child
}

/// What a podman test needs on the host: podman, its OCI runtime, conmon
/// and slirp4netns, curl for the page, and tar, apt-get and dpkg-deb for
/// the busybox image (busybox_rootfs_tar).
pub const PODMAN_TOOLS: [&str; 8] = [
    "podman",
    "runc",
    "conmon",
    "slirp4netns",
    "curl",
    "tar",
    "apt-get",
    "dpkg-deb",
];

/// Whether to skip `test`, a rootless podman test, for lack of PODMAN_TOOLS,
/// the uid map helpers or the test's own `more` (with CI=true: a failure).
pub fn skip_without_rootless_podman(test: &str, more: &[&str]) -> bool {
    skip_without(
        test,
        &[&PODMAN_TOOLS[..], &["newuidmap", "newgidmap"], more].concat(),
    )
}

/// The network podman's containers join here.
pub const PODMAN_NET: &str = "rootless";
pub const PAGE: &str = "hello from a podman container on rootless-cni\n";

/// The image the podman tests import (no registry here).
pub const IMAGE: &str = "localhost/rcni-busybox:test";

/// A busybox-static rootfs with httpd, ping and a page at /www, as
/// `dir/rootfs.tar` for `podman import` (readable by all: a rootless podman
/// reads it too); its path.
pub fn busybox_rootfs_tar(dir: &Path) -> String {
    let busybox = busybox_static();
    let rootfs = dir.join("rootfs");
    for sub in ["bin", "www", "etc", "proc", "sys", "dev", "tmp", "root"] {
        fs::create_dir_all(rootfs.join(sub)).expect("mkdir in rootfs");
    }
    fs::copy(&busybox, rootfs.join("bin/busybox")).expect("copying busybox");
    for applet in ["sh", "httpd", "ip", "ping", "sleep", "cat"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))
            .expect("applet symlink");
    }
    fs::write(rootfs.join("www/index.html"), PAGE).expect("index.html");
    let tar = dir.join("rootfs.tar").display().to_string();
    let out = run_root(
        &["tar", "-C", &rootfs.display().to_string(), "-cf", &tar, "."],
        Duration::from_secs(30),
    );
    assert!(out.ok(), "{out}");
    fs::set_permissions(&tar, fs::Permissions::from_mode(0o644)).expect("chmod rootfs.tar");
    tar
}

/// The attachment a `rootless-cni status --json` report lists, which must
/// be its only one.
pub fn only_attachment(status: &Value) -> Value {
    let attachments = status["attachments"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(attachments.len(), 1, "{status}");
    attachments[0].clone()
}

pub use crate::retry;

pub const ULIMITS: [&str; 4] = [
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
];

/// Rootless podman 4.3 with the CNI backend, run by the lab's uid as a user
/// with a home (the lab dir) and a subordinate id range.
///
/// Every podman call runs in one private mount namespace of root's, held by
/// a `sleep`, where the lab's 0666 tun node, the lab's copies of
/// /etc/passwd, group, subuid and subgid (the uid as a user with a
/// subordinate range, for newuidmap) and a copy of /etc/containers are
/// bound over the machine's; there root drops to the uid with setpriv.
/// podman then makes its own user namespace (its pause process holds it)
/// and, for CNI, its own rootless-netns: nothing of it is in the machine's
/// namespaces.
///
/// The copy of /etc/containers holds what this machine needs of any podman,
/// as a system's containers.conf and storage.conf, so the user's
/// own files are only what a user would write: runc (crun refuses the
/// hybrid cgroup layout), cgroupfs and no events (no systemd user session),
/// ulimits podman can set in a user namespace here, and the vfs driver
/// (overlay needs what a user namespace may not have here).
///
/// Dropping it removes the containers, kills podman's pause process (by the
/// pid in its pause.pid, when that is a process of the uid) and the mount
/// namespace's holder, and removes podman's storage; the lab's drop then
/// kills whatever of the uid is left and removes the lab dir.
pub struct RootlessPodman {
    pub lab: Lab,
    holder: Option<std::process::Child>,
    done: bool,
}

/// The machine's needs (see RootlessPodman), as a system containers.conf.
const SYSTEM_CONTAINERS_CONF: &str = "[containers]
default_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]
[engine]
runtime = \"runc\"
cgroup_manager = \"cgroupfs\"
events_logger = \"none\"
";

impl RootlessPodman {
    /// The mount namespace and the user, no podman config of the user's:
    /// what a new user of a machine with podman has. `setup` (shell, as
    /// root) runs in the mount namespace first (e.g. overlays for a test
    /// that installs a package).
    pub fn start(lab: Lab, setup: &str) -> RootlessPodman {
        write_user_files(&lab, "rcnipodman");
        let etc = lab.dir.join("etc-containers");
        let out = run_root(
            &["cp", "-a", "/etc/containers", &etc.display().to_string()],
            Duration::from_secs(10),
        );
        assert!(out.ok(), "copying /etc/containers: {out}");
        fs::write(etc.join("containers.conf"), SYSTEM_CONTAINERS_CONF)
            .expect("writing the lab's system containers.conf");
        fs::write(etc.join("storage.conf"), "[storage]\ndriver = \"vfs\"\n")
            .expect("writing the lab's system storage.conf");
        fs::create_dir_all(lab.dir.join("tmp")).expect("mkdir tmp");
        chown_to(&lab, &lab.dir.join("tmp"));

        let d = lab.dir.display().to_string();
        let setup = format!(
            "{setup}
             for f in passwd group subuid subgid; do mount --bind {d}/etc-$f /etc/$f; done
             mount --bind {d}/etc-containers /etc/containers
             mount --bind {d}/tun /dev/net/tun"
        );
        let child = private_mount_ns_holder(&lab.dir, "podman-ns", &setup);
        RootlessPodman {
            lab,
            holder: Some(child),
            done: false,
        }
    }

    /// `start`, with the documented files in the user's ~/.config:
    /// conf-examples/podman/containers.conf (its plugin dirs made the
    /// lab's) as a drop-in in ~/.config/containers/containers.conf.d/,
    /// conf-examples/podman/rootless.conflist as it is in
    /// ~/.config/cni/net.d/ (podman's rootless default); the plugin's
    /// default state dir $XDG_RUNTIME_DIR/rootless-cni-plugin.
    pub fn new(lab: Lab) -> RootlessPodman {
        let pm = RootlessPodman::start(lab, "");
        let examples = crate::repo().join("conf-examples/podman");
        let conf = fs::read_to_string(examples.join("containers.conf"))
            .expect("reading conf-examples/podman/containers.conf");
        let dirs_line = format!(
            "cni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]",
            pm.lab.bin().display()
        );
        let mut replaced = false;
        let mut text = String::new();
        for line in conf.lines() {
            if line.starts_with("cni_plugin_dirs") {
                text.push_str(&dirs_line);
                replaced = true;
            } else {
                text.push_str(line);
            }
            text.push('\n');
        }
        assert!(replaced, "no cni_plugin_dirs line in the example: {conf}");
        pm.lab.write_file(
            ".config/containers/containers.conf.d/50-rootless-cni.conf",
            &text,
        );
        let conflist = fs::read_to_string(examples.join("rootless.conflist"))
            .expect("reading conf-examples/podman/rootless.conflist");
        pm.lab.write_file(
            &format!(".config/cni/net.d/{PODMAN_NET}.conflist"),
            &conflist,
        );
        pm.chown_tree(".config");
        pm
    }

    /// chown -R of `rel` (under the lab dir) to the lab uid.
    pub fn chown_tree(&self, rel: &str) {
        let out = run_root(
            &[
                "chown",
                "-R",
                &format!("{0}:{0}", self.lab.uid),
                &self.lab.dir.join(rel).display().to_string(),
            ],
            Duration::from_secs(10),
        );
        assert!(out.ok(), "{out}");
    }

    /// `argv` as root in the holder's mount namespace.
    pub fn root_run(&self, argv: &[&str]) -> Out {
        let pid = self.holder.as_ref().map(|c| c.id()).unwrap_or(0);
        let mut cmd = root_command(&["nsenter", &format!("--target={pid}"), "--mount", "--"]);
        cmd.args(argv);
        run_command(cmd, argv.join(" "), None, Duration::from_secs(120))
    }

    /// `argv` as the lab uid in the holder's mount namespace, with a clean
    /// environment: HOME the lab dir, XDG_RUNTIME_DIR the lab's, TMPDIR the
    /// lab's (podman import stages the image there, not in /var/tmp).
    pub fn user_run(&self, argv: &[&str]) -> Out {
        self.user_run_in(&self.lab.dir, LAB_PATH, argv)
    }

    /// `user_run` in the dir `cwd` with `path` as PATH.
    pub fn user_run_in(&self, cwd: &Path, path: &str, argv: &[&str]) -> Out {
        let pid = self.holder.as_ref().map(|c| c.id()).unwrap_or(0);
        let u = self.lab.uid.to_string();
        let mut cmd = root_command(&["nsenter", &format!("--target={pid}"), "--mount", "--"]);
        cmd.args([
            "setpriv",
            "--reuid",
            &u,
            "--regid",
            &u,
            "--clear-groups",
            "--",
        ])
        // setns into a mount namespace resets the cwd: env -C sets it after.
        .args(["env", "-i", "-C", &cwd.display().to_string()])
        .arg(format!("PATH={path}"))
        .arg(format!("HOME={}", self.lab.dir.display()))
        .arg("USER=rcnipodman")
        .arg(format!("XDG_RUNTIME_DIR={}", self.lab.run_dir().display()))
        .arg(format!("TMPDIR={}", self.lab.dir.join("tmp").display()))
        .args(argv);
        run_command(cmd, argv.join(" "), None, Duration::from_secs(180))
    }

    pub fn podman(&self, args: &[&str]) -> Out {
        self.user_run(&[&["podman"][..], args].concat())
    }

    /// The test image, imported by the user from a busybox-static rootfs.
    pub fn import_image(&self) {
        let tar = busybox_rootfs_tar(&self.lab.dir);
        let import = self.podman(&["import", &tar, IMAGE]);
        assert!(import.ok(), "podman import: {import}");
    }

    /// `rootless-cni status --json` of the default state dir, as the uid.
    pub fn status(&self) -> Value {
        let bin = self.lab.bin().join("rootless-cni").display().to_string();
        let out = self.user_run(&[&bin, "status", "--json"]);
        assert!(out.ok(), "status: {out}");
        out.json().unwrap_or_else(|| panic!("status --json: {out}"))
    }

    /// podman's pause process (it holds podman's user namespace), if alive.
    pub fn pause_pid(&self) -> Option<u32> {
        let file = self.lab.run_dir().join("libpod/tmp/pause.pid");
        let pid = fs::read_to_string(file).ok()?.trim().parse().ok()?;
        self.lab.is_running(pid).then_some(pid)
    }

    /// After `podman rm` of every container: no attachment in status, no
    /// record, lease, infra file or podman netns, and no process of the uid
    /// but podman's pause process.
    pub fn assert_nothing_left(&self, when: &str) {
        let status = self.status();
        assert!(status["infra"].is_null(), "{when}: infra: {status}");
        assert_eq!(
            status["attachments"].as_array().map(Vec::len),
            Some(0),
            "{when}: {status}"
        );
        let lab = &self.lab;
        assert_eq!(
            lab.attachment_files(),
            Vec::<String>::new(),
            "{when}: records"
        );
        assert_eq!(
            lab.lease_files(PODMAN_NET),
            Vec::<String>::new(),
            "{when}: leases"
        );
        assert!(
            !lab.state_dir().join("infra.json").exists(),
            "{when}: infra.json left"
        );
        let pause = self.pause_pid().unwrap_or(0);
        let left = leftovers_but(lab, pause, Duration::from_secs(3));
        assert!(
            left.is_empty(),
            "{when}: processes left besides podman's pause process:\n{}",
            left.join("\n")
        );
        let netns = Lab::list(&lab.run_dir().join("netns"));
        assert!(
            netns.is_empty(),
            "{when}: podman's netns files left: {netns:?}"
        );
    }

    /// Removes the containers, stops podman's pause process and the mount
    /// namespace, removes podman's storage.
    pub fn finish(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        let _ = self.podman(&["rm", "--all", "--force", "--time", "0"]);
        if let Some(pid) = self.pause_pid() {
            crate::sigkill(pid);
        }
        if let Some(mut holder) = self.holder.take() {
            let _ = holder.kill();
            let _ = holder.wait();
        }
        // Owned by the uid's subordinate ids: the lab's own removal would
        // get them too, but not with LAB_KEEP.
        let _ = fs::remove_dir_all(self.lab.dir.join(".local/share/containers"));
        let _ = fs::remove_dir_all(self.lab.run_dir().join("containers"));
    }
}

impl Drop for RootlessPodman {
    fn drop(&mut self) {
        self.finish();
    }
}

fn chown_to(lab: &Lab, path: &Path) {
    std::os::unix::fs::chown(path, Some(lab.uid), Some(lab.uid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}

/// The lab uid's processes but the lab's own and `except`, described, after
/// up to `grace` for them to go.
pub fn leftovers_but(lab: &Lab, except: u32, grace: Duration) -> Vec<String> {
    let deadline = Instant::now() + grace;
    let prefix = format!("pid {except} ");
    loop {
        let left: Vec<String> = lab
            .leftovers()
            .into_iter()
            .filter(|p| !p.starts_with(&prefix))
            .collect();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The namespace `kind` (net, user) of `pid`, as readlink shows it.
pub fn ns_of(pid: u32, kind: &str) -> String {
    fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| panic!("/proc/{pid}/ns/{kind}: {e}"))
}

/// A user's clone of this repository at `<lab>/rootless-cni`, owned by the
/// lab uid: scripts/, conf-examples/, README.md, and the test's own build of
/// the binary at target/release/rootless-cni, where `cargo build --release`
/// would put it (the lab user has no Rust toolchain). Its path.
pub fn user_clone(lab: &Lab) -> PathBuf {
    let repo = crate::repo();
    let clone = lab.dir.join("rootless-cni");
    fs::create_dir_all(clone.join("target/release")).expect("mkdir the clone");
    for item in ["scripts", "conf-examples", "README.md", "Cargo.toml"] {
        let out = run_root(
            &[
                "cp",
                "-r",
                &repo.join(item).display().to_string(),
                &clone.display().to_string(),
            ],
            Duration::from_secs(10),
        );
        assert!(out.ok(), "{out}");
    }
    fs::copy(
        lab.built_binary(),
        clone.join("target/release/rootless-cni"),
    )
    .expect("copying the binary into the clone");
    let out = run_root(
        &[
            "chown",
            "-R",
            &format!("{0}:{0}", lab.uid),
            &clone.display().to_string(),
        ],
        Duration::from_secs(10),
    );
    assert!(out.ok(), "{out}");
    clone
}
