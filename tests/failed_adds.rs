//! A failed ADD leaves nothing behind, or, when its rollback could not undo
//! everything, a `failed` record that the DEL the runtime sends next uses to
//! finish the job. Whatever fails after the pending record is written (the
//! chain, the lock to record the result, the record itself) goes through
//! the same cleanup.

use lab::{example_conflist, free_tcp_port, outer, plugin_stdin, Lab};
use lab::{install_plugin, spawn, Call};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

/// Installs the inner plugin `name`, `script` with DIR standing for a dir
/// the lab user may write its marks into; that dir.
fn install_marking_plugin(lab: &Lab, name: &str, script: &str) -> std::path::PathBuf {
    let dir = lab.dir.join("plugin-marks");
    std::fs::create_dir_all(&dir).expect("mkdir plugin-marks");
    std::os::unix::fs::chown(&dir, Some(lab.uid), Some(lab.uid)).expect("chown plugin-marks");
    install_plugin(
        lab,
        name,
        &script.replace("DIR", &dir.display().to_string()),
    );
    dir
}

/// The example chain with `plugin` appended; `lockTimeout` when given.
fn conf_with(plugin: &str, lock_timeout: Option<u64>) -> Value {
    let mut conflist = example_conflist();
    let o = outer(&mut conflist);
    if let Some(t) = lock_timeout {
        o.insert("lockTimeout".into(), t.into());
    }
    o["delegate"]["plugins"]
        .as_array_mut()
        .expect("the example's inner plugins")
        .push(json!({"type": plugin}));
    plugin_stdin(&conflist)
}

/// Fails every ADD after leaving a file (state of its own, as a plugin's
/// iptables chain would be), and fails the first DEL without removing it.
const FLAKY: &str = r#"#!/usr/bin/python3
import json, os, sys
conf = json.load(sys.stdin)
made = "DIR/made"
tried = "DIR/del-tried"
if os.environ.get("CNI_COMMAND") == "ADD":
    open(made, "w").close()
    print(json.dumps({"cniVersion": conf["cniVersion"], "code": 999, "msg": "flaky ADD fails"}))
    sys.exit(1)
if os.environ.get("CNI_COMMAND") == "DEL":
    if not os.path.exists(tried):
        open(tried, "w").close()
        print(json.dumps({"cniVersion": conf["cniVersion"], "code": 999, "msg": "flaky DEL fails once"}))
        sys.exit(1)
    if os.path.exists(made):
        os.remove(made)
"#;

/// The rollback of a failed ADD fails: the record stays, `failed`, with
/// the chain's progress; CHECK says so; the runtime's DEL then runs the
/// inner DEL again, which removes what the rollback left, and the infra.
#[test]
fn del_finishes_what_a_failed_rollback_left() {
    let Some(lab) = Lab::new(lab::binary!(), "failed_rollback") else {
        return;
    };
    let marks = install_marking_plugin(&lab, "flaky", FLAKY);
    let conf = conf_with("flaky", None).to_string();
    let c = lab.container();
    let made = marks.join("made");

    let out = lab.plugin(&lab.plugin_env("ADD", "flaky-1", &c.netns()), &conf);
    let err = out
        .cni_error()
        .unwrap_or_else(|| panic!("ADD: no error object: {out}"));
    assert_eq!(
        err.code, 999,
        "the inner plugin's error is passed through: {out}"
    );
    assert!(made.exists(), "the flaky plugin's ADD did not run");
    let records = lab.attachment_records();
    assert_eq!(
        records.len(),
        1,
        "records after the failed ADD: {records:?}"
    );
    assert!(
        lab::is_failed_record(&records[0]),
        "the record: {}",
        records[0]
    );
    assert!(
        records[0]["result"].is_object(),
        "no progress kept: {}",
        records[0]
    );

    let out = lab.plugin(&lab.plugin_env("CHECK", "flaky-1", &c.netns()), &conf);
    let err = out
        .cni_error()
        .unwrap_or_else(|| panic!("CHECK: no error object: {out}"));
    assert_eq!(err.code, 103, "CHECK of a failed ADD: {out}");

    let out = lab.plugin(&lab.plugin_env("DEL", "flaky-1", &c.netns()), &conf);
    assert!(out.ok(), "DEL after the failed ADD: {out}");
    assert!(
        !made.exists(),
        "the DEL did not finish what the rollback left"
    );
    lab.assert_no_infra("after the DEL");
}

/// The chain succeeded, but the lock to record the result cannot be had
/// within `lockTimeout`: the runtime gets code 11 and nothing of the ADD is
/// left (the container's interface, its lease, its port, its record, the
/// infra it started), without any DEL.
#[test]
fn add_that_cannot_record_its_result_undoes_itself() {
    let Some(lab) = Lab::new(lab::binary!(), "add_lock_lost") else {
        return;
    };
    let marks = install_marking_plugin(&lab, "slowadd", lab::SLOWADD);
    let mut conf = conf_with("slowadd", Some(1));
    let port = free_tcp_port();
    conf["runtimeConfig"] = json!({"portMappings": [
        {"hostPort": port, "containerPort": 80, "protocol": "tcp", "hostIP": "127.0.0.1"}
    ]});
    let c = lab.container();
    let env = lab.plugin_env("ADD", "lock-lost", &c.netns());
    let add = spawn(&lab, &Call::plugin(&lab, &env, &conf.to_string()));

    let started = marks.join("started");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !started.exists() {
        assert!(Instant::now() < deadline, "the ADD never reached slowadd");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The state lock, held past the ADD's lockTimeout.
    let lock = lab.state_dir().join("rootless-cni-infra.lck");
    let held = lab.dir.join("held");
    let holder = spawn(
        &lab,
        &Call::argv(&[
            "flock",
            &lock.display().to_string(),
            "sh",
            "-c",
            &format!("touch {}; exec sleep 4", held.display()),
        ]),
    );
    while !Path::new(&held).exists() {
        assert!(Instant::now() < deadline, "flock did not take the lock");
        std::thread::sleep(Duration::from_millis(10));
    }

    let out = add.wait(Duration::from_secs(60));
    let err = out
        .cni_error()
        .unwrap_or_else(|| panic!("ADD: no error object: {out}"));
    assert_eq!(err.code, 11, "ADD that could not take the lock: {out}");
    let _ = holder.wait(Duration::from_secs(10));
    assert_eq!(
        lab.links(&c),
        vec!["lo"],
        "the container kept its interface"
    );
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
        "port {port} is still held"
    );
    lab.assert_no_infra("after the ADD that lost the lock");
}
