//! Hosts as they are: the lab's own view of the machine ("the lab's
//! host"), for labs that need one that differs from the machine's.
//!
//! A root process in a private mount namespace holds it; the session and
//! every lab command start from there. Everything is mounted in that
//! namespace only (overlays over the machine's dirs, a tmpfs), so the
//! machine's own /run, /var/lib and /etc are never changed, and it all goes
//! when the lab kills the holder.
//!
//! - `Host::Used`: a host where a rootful CNI runtime once ran:
//!   `/var/lib/cni` (0700, with `results/`), `/run/netns` (0755) and
//!   `/etc/cni/net.d` (0755) exist and belong to root, as libcni, `ip netns`
//!   and the packages leave them.
//! - `RuntimeDir::Logind`: `XDG_RUNTIME_DIR` as logind makes it, a 0700
//!   tmpfs at `/run/user/UID` owned by the user.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The machine as the lab sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// The machine as it is (no lab host namespace unless another option
    /// needs one).
    Pristine,
    /// Root-owned `/var/lib/cni`, `/run/netns` and `/etc/cni/net.d`.
    Used,
}

/// Where the lab user's `XDG_RUNTIME_DIR` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeDir {
    /// `run/` in the lab dir (0700, the user's).
    LabDir,
    /// A 0700 tmpfs at `/run/user/UID`, the user's, as logind mounts it.
    Logind,
}

/// The dirs a rootful CNI runtime leaves behind, with their modes.
pub const USED_HOST_DIRS: &[(&str, u32)] = &[
    ("/var/lib/cni", 0o700),
    ("/var/lib/cni/results", 0o700),
    ("/run/netns", 0o755),
    ("/etc/cni", 0o755),
    ("/etc/cni/net.d", 0o755),
];

/// The logind-style runtime dir of `uid`.
pub fn logind_runtime_dir(uid: u32) -> PathBuf {
    PathBuf::from(format!("/run/user/{uid}"))
}

/// Starts the holder of the lab's host namespace for lab `dir` and user
/// `uid`; its upper dirs go under `dir/host`. The caller kills it.
pub fn start_host_ns(
    dir: &Path,
    uid: u32,
    host: Host,
    runtime_dir: RuntimeDir,
) -> Result<Child, String> {
    let d = dir.join("host");
    let mut script = String::from("set -e\n");
    // An overlay over each machine dir we add to: what is created lands in
    // the lab's upper dir, not on the machine.
    let mut overlay = |target: &str, name: &str| -> Result<(), String> {
        for sub in ["upper", "work"] {
            let p = d.join(name).join(sub);
            fs::create_dir_all(&p).map_err(|e| format!("mkdir {}: {e}", p.display()))?;
        }
        let (upper, work) = (d.join(name).join("upper"), d.join(name).join("work"));
        script.push_str(&format!(
            "mount -t overlay overlay -o 'lowerdir={target},upperdir={},workdir={}' {target}\n",
            upper.display(),
            work.display()
        ));
        Ok(())
    };
    overlay("/run", "run")?;
    if host == Host::Used {
        overlay("/var/lib", "var-lib")?;
        overlay("/etc", "etc")?;
        for (path, mode) in USED_HOST_DIRS {
            // A dir the machine already has stays as it is.
            script.push_str(&format!(
                "[ -e {path} ] || install -d -o root -g root -m {mode:o} {path}\n"
            ));
        }
    }
    if runtime_dir == RuntimeDir::Logind {
        let run = logind_runtime_dir(uid);
        let run = run.display();
        script.push_str(&format!(
            "[ -e /run/user ] || install -d -m 755 /run/user
             install -d -o {uid} -g {uid} -m 700 {run}
             mount -t tmpfs -o mode=0700,uid={uid},gid={uid},size=64m,nosuid,nodev tmpfs {run}\n"
        ));
    }
    let ready = d.join("ready");
    script.push_str(&format!(
        "touch '{}'\nexec sleep infinity\n",
        ready.display()
    ));
    fs::set_permissions(&d, fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("chmod {}: {e}", d.display()))?;
    let err_path = d.join("holder.err");
    let err = fs::File::create(&err_path).map_err(|e| format!("{}: {e}", err_path.display()))?;
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env_clear()
        .env("PATH", crate::LAB_PATH)
        // mount(8) keeps its utab under the machine's /run (creating
        // /run/mount): keep it in the lab.
        .env("LIBMOUNT_UTAB", d.join("utab"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .map_err(|e| format!("starting the lab host's holder: {e}"))?;
    await_holder(&mut child, &ready, &err_path, "the lab host's holder")?;
    Ok(child)
}

/// Waits (10 s at most) for a mount namespace holder `child` to touch
/// `ready`; one that exits or hangs first is killed and reaped, and the
/// error names `what` with what it wrote to `err_path`.
pub(crate) fn await_holder(
    child: &mut Child,
    ready: &Path,
    err_path: &Path,
    what: &str,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready.exists() {
        let exited = child.try_wait().ok().flatten();
        if exited.is_some() || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let err = fs::read_to_string(err_path).unwrap_or_default();
            return Err(format!("{what} did not come up ({exited:?}): {err}"));
        }
        thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}
