//! The README's rootless podman steps, run as written by a new user, so
//! that the README cannot drift from what works.
//!
//! The fenced block after `<!-- readme-test: rootless podman -->` in
//! README.md runs under `bash -e` as a fresh unprivileged uid (a user with
//! a home and a subordinate id range, nothing of podman's or ours in it:
//! `lab::podman`), in a clone of the repository
//! (`user_clone`). The only changes to the block, each for the lab, not
//! for the steps, and each asserted to match so that a changed README
//! fails here instead of silently running something else:
//! - `cargo build --release` is not run: the clone already holds the
//!   test's own build at target/release/rootless-cni (the lab user has no
//!   Rust toolchain, and the build is the one under test).
//! - `docker.io/library/busybox` is the busybox-static image the user
//!   imported beforehand (no registry is reachable here).
//! - port 8080 is a free port (tests run in parallel).
//!
//! The user's PATH is the lab's, without ~/.local/bin: a new user's login
//! shell has it only once that dir exists, and scripts/install makes it;
//! the block must put it on PATH itself. What this machine needs of any
//! podman (runc, cgroupfs, ulimits, vfs) is the lab's system
//! containers.conf and storage.conf, never the user's files.

use lab::host_tools::skip_without;
use lab::podman::{skip_without_rootless_podman, user_clone, RootlessPodman, IMAGE};
use lab::{free_tcp_port, Lab, LAB_PATH};
use std::fs;
use std::path::Path;
use std::time::Instant;

const MARKER: &str = "<!-- readme-test: rootless podman -->";

/// The ```sh block right after MARKER in README.md.
fn readme_block() -> String {
    let readme = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("reading README.md");
    let after = readme
        .split_once(MARKER)
        .unwrap_or_else(|| panic!("README.md has no {MARKER}"))
        .1;
    let body = after
        .trim_start()
        .strip_prefix("```sh\n")
        .unwrap_or_else(|| panic!("no ```sh block right after {MARKER}"));
    let end = body.find("\n```").expect("the block is not closed");
    body[..end].to_string()
}

/// `text` with `from` replaced by `to`, which must occur.
fn substitute(text: &str, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "the README's podman block no longer has {from:?}; update tests/readme_podman.rs:\n{text}"
    );
    text.replace(from, to)
}

#[test]
fn readme_rootless_podman_steps_work_as_written() {
    let test = "readme_rootless_podman";
    if skip_without_rootless_podman(test, &["bash", "sed"]) {
        return;
    }
    let Some(lab) = Lab::new(lab::binary!(), test) else {
        return;
    };
    let started = Instant::now();
    let block = readme_block();
    let port = free_tcp_port().to_string();
    let script = substitute(&block, "cargo build --release\n", "");
    let script = substitute(&script, "docker.io/library/busybox", IMAGE);
    let script = substitute(&script, "127.0.0.1:8080", &format!("127.0.0.1:{port}"));

    let mut pm = RootlessPodman::start(lab, "");
    let clone = user_clone(&pm.lab);
    pm.import_image();
    let out = pm.user_run_in(&clone, LAB_PATH, &["bash", "-e", "-x", "-c", &script]);
    assert!(
        out.ok(),
        "the README's podman steps failed:\n{script}\n{out}"
    );

    let stdout = &out.stdout;
    assert!(
        stdout.contains("hello from web\n"),
        "no page from the host's 127.0.0.1:{port}: {out}"
    );
    assert!(
        stdout.contains("1 packets transmitted, 1 packets received"),
        "the peer's ping: {out}"
    );
    let statuses: Vec<&str> = stdout.split("state dir:").skip(1).collect();
    let [running, after] = statuses[..] else {
        panic!("two `rootless-cni status` outputs expected: {out}");
    };
    assert!(running.contains("attachments: 2"), "status: {running}");
    assert!(
        running.contains(&format!("127.0.0.1:{port}/tcp -> container port 80")),
        "status lists no published port: {running}"
    );
    assert!(
        after.contains("infra:       not running") && after.contains("attachments: 0"),
        "status after podman rm: {after}"
    );
    assert!(
        pm.lab
            .dir
            .join(".config/containers/containers.conf.d/50-rootless-cni.conf")
            .is_file(),
        "no drop-in"
    );

    pm.assert_nothing_left("after the README's podman rm");
    pm.finish();
    pm.lab.assert_no_infra("after the README's steps");
    eprintln!("the README's podman steps took {:?}", started.elapsed());
}

/// `doctor` as the README has the podman user run it: from the user's own
/// shell (the initial user namespace) the two namespace checks pass,
/// saying what they checked instead (a user namespace can be made, and
/// namespaces in it) and how to check inside podman's; under `podman
/// unshare` they pass as themselves.
#[test]
fn doctor_from_the_users_shell_explains_the_namespace_checks() {
    let test = "doctor_from_the_users_shell";
    if skip_without(test, &["podman", "newuidmap", "newgidmap"]) {
        return;
    }
    let Some(lab) = Lab::new(lab::binary!(), test) else {
        return;
    };
    let pm = RootlessPodman::start(lab, "");
    let bin = pm.lab.bin().join("rootless-cni").display().to_string();
    let check = |out: &lab::Out, name: &str| -> serde_json::Value {
        let report = out.json().unwrap_or_else(|| panic!("doctor --json: {out}"));
        report["checks"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["check"] == name).cloned())
            .unwrap_or_else(|| panic!("no check {name:?}: {out}"))
    };

    let shell = pm.user_run(&[&bin, "doctor", "--json"]);
    for name in ["in a user namespace", "namespaces"] {
        let c = check(&shell, name);
        assert_eq!(c["ok"], true, "from the user's shell: {c}");
        let detail = c["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains("podman unshare rootless-cni doctor"),
            "{name}: does not say how to check inside podman's namespace: {c}"
        );
    }
    assert!(shell.ok(), "doctor from the user's shell: {shell}");

    let inside = pm.podman(&["unshare", &bin, "doctor", "--json"]);
    for name in ["in a user namespace", "namespaces"] {
        let c = check(&inside, name);
        assert_eq!(c["ok"], true, "under podman unshare: {c}");
        let detail = c["detail"].as_str().unwrap_or_default();
        assert!(!detail.contains("from your shell"), "{c}");
    }
}
