//! Where the fuzzed binary runs: a private dir (XDG_RUNTIME_DIR, a state
//! dir, and odd things to point stateDir at) and, as root, an unused uid.

use lab::pids_of_uid;
use serde_json::{json, Value};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A private dir (XDG_RUNTIME_DIR, a state dir, and odd things to point
/// stateDir at), and the uid the binary runs as. Dropping it kills what is
/// left of that uid and removes what it made.
pub struct Place {
    pub dir: PathBuf,
    pub uid: Option<u32>,
}

impl Place {
    pub fn new() -> Place {
        let uid = nix::unistd::geteuid().is_root().then(unused_uid);
        let dir = PathBuf::from(format!("/tmp/rootless-cni-fuzz.{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let place = Place { dir, uid };
        for (rel, mode) in [
            ("", 0o755),
            ("run", 0o700),
            ("run/rootless-cni-plugin", 0o700),
            ("run/rootless-cni-plugin/attachments", 0o700),
            ("conf", 0o755),
            ("other-state", 0o700),
        ] {
            let p = place.dir.join(rel);
            fs::create_dir_all(&p).expect("mkdir");
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod");
            place.own(&p);
        }
        fs::write(place.dir.join("a-file"), "").expect("write");
        std::os::unix::fs::symlink(place.dir.join("other-state"), place.dir.join("a-link"))
            .expect("symlink");
        // A conflist for `network`, and a broken one.
        fs::write(
            place.dir.join("conf/inner.conflist"),
            json!({"cniVersion": "1.0.0", "name": "inner",
                   "plugins": [{"type": "bridge"}]})
            .to_string(),
        )
        .expect("write");
        fs::write(place.dir.join("conf/broken.conf"), "{\"name\": \"broken\"").expect("write");
        place
    }

    pub fn own(&self, p: &Path) {
        if let Some(uid) = self.uid {
            std::os::unix::fs::chown(p, Some(uid), Some(uid)).expect("chown");
        }
    }

    pub fn state(&self) -> PathBuf {
        self.dir.join("run/rootless-cni-plugin")
    }

    /// Values `stateDir` may take: never a path outside this place.
    pub fn state_dirs(&self) -> Vec<Value> {
        let p = |rel: &str| Value::String(self.dir.join(rel).display().to_string());
        vec![
            p("run/rootless-cni-plugin"),
            p("other-state"),
            p("absent-state"),
            p("a-file"),
            p("a-link"),
            json!("relative/state"),
            json!(""),
            json!(5),
            json!(null),
        ]
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Some(uid) = self.uid {
            // Nothing should run, but nothing may outlive the test either.
            for pid in pids_of_uid(uid) {
                lab::sigkill(pid);
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A uid no one uses: not in /etc/passwd, no process.
fn unused_uid() -> u32 {
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let taken: Vec<u32> = passwd
        .lines()
        .filter_map(|l| l.split(':').nth(2)?.parse().ok())
        .collect();
    (0..1000)
        .map(|n| 1_700_000_000 + (std::process::id() % 100_000) * 1000 + n)
        .find(|uid| !taken.contains(uid) && pids_of_uid(*uid).is_empty())
        .expect("an unused uid")
}
