//! The binary's own entry points: --help, --version, and the CNI VERSION
//! command. These need no lab.

use std::io::Write;
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_rootless-cni");

fn run(args: &[&str], env: &[(&str, &str)], stdin: &str) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning rootless-cni");
    if let Some(mut pipe) = child.stdin.take() {
        let _ = pipe.write_all(stdin.as_bytes());
    }
    child.wait_with_output().expect("waiting for rootless-cni")
}

fn show(o: &Output) -> String {
    format!(
        "{}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `--help`, and `COMMAND --help`, print the whole help: every command and
/// every key of the network config, so it serves without the README.
#[test]
fn help_works() {
    for args in [
        &["--help"][..],
        &["help"],
        &["status", "--help"],
        &["gc", "-h"],
        &["exec", "--help", "--", "ip"],
    ] {
        let o = run(args, &[], "");
        assert!(o.status.success(), "{args:?}: {}", show(&o));
        let text = String::from_utf8_lossy(&o.stdout);
        let commands = ["status", "ls", "stop", "gc", "exec", "doctor"];
        for word in rootless_cni::cni::config::OWN_KEYS.iter().chain(&commands) {
            assert!(
                text.contains(word),
                "{args:?} does not mention {word}: {}",
                show(&o)
            );
        }
    }
}

#[test]
fn version_works() {
    let o = run(&["--version"], &[], "");
    assert!(o.status.success(), "--version: {}", show(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains(env!("CARGO_PKG_VERSION")),
        "--version does not print {}: {}",
        env!("CARGO_PKG_VERSION"),
        show(&o)
    );
}

#[test]
fn cni_version_command_lists_supported_versions() {
    let o = run(
        &[],
        &[("CNI_COMMAND", "VERSION")],
        r#"{"cniVersion":"1.0.0"}"#,
    );
    assert!(o.status.success(), "VERSION: {}", show(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("VERSION output is not JSON ({e}): {}", show(&o)));
    let supported: Vec<&str> = v["supportedVersions"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s.as_str()).collect())
        .unwrap_or_default();
    assert!(
        supported.contains(&"1.0.0"),
        "supportedVersions lacks 1.0.0: {v}"
    );
    assert!(
        v["cniVersion"].is_string(),
        "VERSION answer has no cniVersion: {v}"
    );
}
