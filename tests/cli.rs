//! The binary's own entry points: --help, --version, usage errors, and the
//! CNI VERSION command. These need no lab.

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

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The top-level help (`--help`, `help`) serves without the README: every
/// command and every key of the network config.
#[test]
fn help_works() {
    for args in [&["--help"][..], &["help"]] {
        let o = run(args, &[], "");
        assert!(o.status.success(), "{args:?}: {}", show(&o));
        let text = stdout(&o);
        let commands = ["status", "ls", "stop", "gc", "exec", "doctor", "help"];
        let notes = ["ROOTLESS_CNI_LOG", "CNI_PATH", "Exit status"];
        for word in rootless_cni::cni::config::OWN_KEYS
            .iter()
            .chain(&commands)
            .chain(&notes)
        {
            assert!(
                text.contains(word),
                "{args:?} does not mention {word}: {}",
                show(&o)
            );
        }
    }
}

/// `COMMAND --help` (or `-h`, or `help COMMAND`) is that command's help: its
/// usage and its own options.
#[test]
fn command_help_shows_its_own_options() {
    for (args, usage, options) in [
        (
            &["status", "--help"][..],
            "rootless-cni status",
            &["--json"][..],
        ),
        (&["ls", "-h"], "rootless-cni status", &["--json"]),
        (&["stop", "--help"], "rootless-cni stop", &["--force"]),
        (
            &["gc", "-h"],
            "rootless-cni gc",
            &["--valid", "--cni-path", "--json"],
        ),
        (
            &["help", "gc"],
            "rootless-cni gc",
            &["--valid", "--cni-path"],
        ),
        (
            &["exec", "--help", "--", "ip"],
            "rootless-cni exec",
            &["CMD"],
        ),
        (&["doctor", "--help"], "rootless-cni doctor", &["--json"]),
    ] {
        let o = run(args, &[], "");
        assert!(o.status.success(), "{args:?}: {}", show(&o));
        let text = stdout(&o);
        for word in options.iter().chain(&["--state-dir", usage]) {
            assert!(
                text.contains(word),
                "{args:?} does not mention {word}: {}",
                show(&o)
            );
        }
        // The config keys are the top-level help's, not a command's.
        assert!(
            !text.contains("maxUdpFlowsPerPort"),
            "{args:?} is not the command's own help: {}",
            show(&o)
        );
    }
}

/// A usage error is reported the command-line way, on stderr with exit
/// status 2, not as a CNI error object.
fn assert_usage_error(args: &[&str], says: &[&str]) {
    let o = run(args, &[], "");
    assert_eq!(o.status.code(), Some(2), "{args:?}: {}", show(&o));
    assert!(
        o.stdout.is_empty(),
        "{args:?} printed on stdout: {}",
        show(&o)
    );
    let err = stderr(&o);
    for word in says {
        assert!(
            err.contains(word),
            "{args:?}: stderr lacks {word:?}: {}",
            show(&o)
        );
    }
    assert!(
        !err.contains("\"code\""),
        "{args:?} answered with a CNI error: {}",
        show(&o)
    );
}

#[test]
fn unknown_command_is_a_usage_error() {
    assert_usage_error(&["frobnicate"], &["frobnicate"]);
    assert_usage_error(&["--frobnicate"], &["--frobnicate"]);
}

#[test]
fn unknown_option_is_a_usage_error() {
    assert_usage_error(&["status", "--yaml"], &["--yaml"]);
}

#[test]
fn option_without_value_is_a_usage_error() {
    assert_usage_error(&["gc", "--valid"], &["--valid"]);
    assert_usage_error(&["--state-dir"], &["--state-dir"]);
}

#[test]
fn exec_without_a_command_is_a_usage_error() {
    assert_usage_error(&["exec"], &["CMD", "rootless-cni exec"]);
    assert_usage_error(&["exec", "--"], &["CMD", "rootless-cni exec"]);
}

/// Without a command and without CNI_COMMAND there is nothing to do.
#[test]
fn no_command_is_a_usage_error() {
    assert_usage_error(&[], &["CNI_COMMAND"]);
    assert_usage_error(&["--state-dir", "/nonexistent"], &["CNI_COMMAND"]);
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
