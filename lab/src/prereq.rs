//! Prerequisites: what the lab needs on this machine, and whether a
//! missing one skips the test or (under CI) fails it.

use crate::LAB_PATH;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The plugins the example network uses.
const REFERENCE_PLUGINS: &[&str] = &["bridge", "host-local", "portmap", "firewall", "tuning"];
/// Host tools the lab itself needs.
const LAB_TOOLS: &[&str] = &[
    "setpriv", "nsenter", "unshare", "mknod", "sh", "sleep", "env", "ip", "busybox", "curl",
    "findmnt",
];

/// Whether /usr/bin/python3 is there for `needed_for` (a small server the
/// test runs inside a container); with CI=true it must be, else the test
/// (or that part of it) is skipped.
pub fn have_python3(needed_for: &str) -> bool {
    let found = Path::new("/usr/bin/python3").exists();
    assert!(
        found || !in_ci(),
        "python3 (/usr/bin/python3) is needed for {needed_for} (CI=true)"
    );
    if !found {
        eprintln!("no /usr/bin/python3: {needed_for} skipped");
    }
    found
}

pub fn find_in_path(name: &str) -> Option<PathBuf> {
    LAB_PATH
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| is_executable(p))
}

pub(crate) fn is_executable(p: &Path) -> bool {
    fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// cnitool: `$CNITOOL`, else `<manifest>/.tools/bin/cnitool`.
pub fn cnitool_path() -> PathBuf {
    match std::env::var_os("CNITOOL").filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => crate::repo().join(".tools/bin/cnitool"),
    }
}

/// What the lab needs and this machine lacks.
pub(crate) fn missing_prerequisites() -> Vec<String> {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root (the lab creates users' namespaces and device nodes)".to_string());
    }
    let cnitool = cnitool_path();
    if !is_executable(&cnitool) {
        missing.push(format!(
            "cnitool at {} (run scripts/build-cnitool or set CNITOOL)",
            cnitool.display()
        ));
    }
    if find_in_path("slirp4netns").is_none() {
        missing.push("slirp4netns".to_string());
    }
    for p in REFERENCE_PLUGINS {
        if !is_executable(&Path::new("/usr/lib/cni").join(p)) {
            missing.push(format!("/usr/lib/cni/{p} (containernetworking-plugins)"));
        }
    }
    for t in LAB_TOOLS {
        if find_in_path(t).is_none() {
            missing.push(t.to_string());
        }
    }
    missing
}

/// Whether this is a CI run, where a missing prerequisite must fail the
/// test, never skip it: `CI` set to anything but empty, `0`, `false`, `no`
/// or `off` (CI services set `true`, `1`, or their own name).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| {
        !matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "" | "0" | "false" | "no" | "off"
        )
    })
}
