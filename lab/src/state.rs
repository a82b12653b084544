//! What rootless-cni keeps in the lab's state dir and says in `status`:
//! attachment records, host-local's leases, the lab's files.

use crate::{Lab, Out};
use serde_json::Value;
use std::fs;
use std::path::Path;

/// Whether an attachment record (its JSON) is one a failed ADD kept for
/// the runtime's DEL: `"failed": true` beside `"state": "ready"`, so that
/// an older release, which knows no other state, keeps it for its DEL too.
pub fn is_failed_record(r: &Value) -> bool {
    r["failed"] == true
}

impl Lab {
    // --- files ---------------------------------------------------------------

    /// Writes `<lab>/net.d/<name>.conflist`.
    pub fn write_netconf(&self, name: &str, conf: &Value) {
        self.write_file(&format!("net.d/{name}.conflist"), &conf.to_string());
    }

    /// Writes a file (dirs created, readable by the lab user).
    pub fn write_file(&self, rel: &str, contents: &str) {
        let p = self.dir.join(rel);
        let parent = p.parent().expect("a file path has a parent");
        fs::create_dir_all(parent).unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
        fs::write(&p, contents).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
    }

    /// Makes the session see `contents` as /etc/resolv.conf: a lab file bound
    /// over it in the session's mount namespace (the host's file untouched).
    /// slirp4netns, started there by the infra, forwards what reaches
    /// 10.0.2.3 to its first nameserver; call this before the first ADD.
    pub fn bind_resolv_conf(&self, contents: &str) {
        self.write_file("resolv.conf", contents);
        let file = self.dir.join("resolv.conf").display().to_string();
        let out = self.exec(&[], None, &["mount", "--bind", &file, "/etc/resolv.conf"]);
        assert!(out.ok(), "binding {file} on /etc/resolv.conf: {out}");
        // The test's own mount, not a leak.
        self.session_mounts.replace(self.session_mounts());
    }

    /// Names of the entries of a dir, sorted; empty if it does not exist.
    pub fn list(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// The attachment records in the default state dir.
    pub fn attachment_files(&self) -> Vec<String> {
        Lab::list(&self.state_dir().join("attachments"))
    }

    /// host-local's lease files (named by IP) for an inner network.
    pub fn lease_files(&self, network: &str) -> Vec<String> {
        Lab::list(&self.lease_dir(network))
            .into_iter()
            .filter(|n| !n.starts_with("last_reserved_ip") && n != "lock")
            .collect()
    }

    pub fn cli(&self, args: &[&str]) -> Out {
        let bin = self.bin().join("rootless-cni").display().to_string();
        let mut argv = vec![bin.as_str()];
        argv.extend_from_slice(args);
        self.exec(&[], None, &argv)
    }

    /// `rootless-cni status --json`, parsed.
    pub fn status(&self) -> Value {
        let out = self.cli(&["status", "--json"]);
        assert!(out.ok(), "status --json failed: {out}");
        out.json()
            .unwrap_or_else(|| panic!("status --json is not JSON: {out}"))
    }

    /// The sandbox pid of the running infra: `infra.sandbox.pid` of
    /// `status --json`, else `sandbox.pid` of `<state>/infra.json`.
    pub fn sandbox_pid(&self) -> Option<u32> {
        let from_status = self.status()["infra"]["sandbox"]["pid"].as_u64();
        let from_file = || {
            let text = fs::read_to_string(self.state_dir().join("infra.json")).ok()?;
            let v: Value = serde_json::from_str(&text).ok()?;
            v["sandbox"]["pid"].as_u64()
        };
        from_status.or_else(from_file).map(|p| p as u32)
    }

    /// The attachment records (`*.json`, not the hidden temporary files of
    /// an atomic write) in the default state dir, parsed. A record removed
    /// between listing and reading is skipped; one that does not parse
    /// panics (records are written atomically).
    pub fn attachment_records(&self) -> Vec<Value> {
        let dir = self.state_dir().join("attachments");
        self.attachment_files()
            .iter()
            .filter(|name| name.ends_with(".json") && !name.starts_with('.'))
            .filter_map(|name| {
                let p = dir.join(name);
                let text = match fs::read_to_string(&p) {
                    Ok(t) => t,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
                    Err(e) => panic!("reading {}: {e}", p.display()),
                };
                Some(
                    serde_json::from_str(&text)
                        .unwrap_or_else(|e| panic!("parsing {}: {e}: {text}", p.display())),
                )
            })
            .collect()
    }
}

/// The files of the state dir's attachments/ that are not a JSON record
/// (a leftover temporary file), and the *.json ones that do not parse.
pub fn bad_records(lab: &Lab) -> Vec<String> {
    let dir = lab.state_dir().join("attachments");
    let mut bad = Vec::new();
    for name in Lab::list(&dir) {
        if !name.ends_with(".json") || name.starts_with('.') {
            bad.push(format!("{name}: not a record"));
            continue;
        }
        let path = dir.join(&name);
        let text = fs::read(&path).unwrap_or_default();
        if let Err(e) = serde_json::from_slice::<serde_json::Value>(&text) {
            bad.push(format!("{name}: {e}: {:?}", String::from_utf8_lossy(&text)));
        }
    }
    bad
}
