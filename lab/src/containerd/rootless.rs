//! containerd as the lab's uid inside rootlesskit, as
//! containerd-rootless.sh runs it.

use super::{write_containerd_dir, Cri, CALL_TIMEOUT};
use crate::host_tools::write_user_files;
use crate::process::proc_state;
use crate::{run_command, Lab, LAB_PATH};
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

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
        write_containerd_dir(&dir, lab.built_binary(), true);
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
            .env("LIBMOUNT_UTAB", crate::utab())
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
            .env("LIBMOUNT_UTAB", crate::utab());
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
