//! Stale or broken state left by a "reboot" or a crash: infra.json naming
//! dead processes, live processes that are not ours, or another network
//! namespace than the sandbox's, and empty or truncated infra and
//! attachment records. Calls never panic, never signal a process that is
//! not ours, recover (or refuse, while a live infra does not match its
//! record), and the last DEL leaves nothing.

use lab::crash::{call, infra_identity, must, stdin};
use lab::{bad_records, panicked, supervisors, write_as_user, Call};
use lab::{example_conflist, plugin_stdin, Container, Lab, Out};
use serde_json::Value;
use std::fs;
use std::thread;
use std::time::{Duration, Instant};

/// Each call with the checks every stale-state call must pass: no panic,
/// exit 0 or 1, an error object on stdout when it failed.
fn sane(lab: &Lab, call: &Call, when: &str) -> Out {
    let out = lab::run(lab, call, Duration::from_secs(60));
    assert!(!panicked(&out), "{when}: panic: {out}");
    assert!(
        matches!(out.status, Some(0) | Some(1)),
        "{when}: exit status: {out}"
    );
    out
}

fn sane_plugin(lab: &Lab, verb: &str, id: &str, c: &Container, when: &str) -> Out {
    let out = sane(
        lab,
        &call(lab, verb, id, c, &stdin()),
        &format!("{when}: {verb} {id}"),
    );
    if !out.ok() {
        assert!(
            out.cni_error().is_some(),
            "{when}: {verb} {id} failed without an error object: {out}"
        );
    }
    out
}

/// `status`, `status --json` and the STATUS verb (spec 1.1.0) on the state
/// as it is: none may panic.
fn all_status(lab: &Lab, when: &str) {
    let bin = lab.bin().join("rootless-cni").display().to_string();
    for args in [vec!["status"], vec!["status", "--json"]] {
        let mut argv = vec![bin.as_str()];
        argv.extend(args);
        let out = sane(lab, &Call::argv(&argv), &format!("{when}: {argv:?}"));
        assert!(out.ok(), "{when}: {argv:?}: {out}");
    }
    let mut conf = example_conflist();
    conf["cniVersion"] = "1.1.0".into();
    let env = vec![
        ("CNI_COMMAND".to_string(), "STATUS".to_string()),
        ("CNI_PATH".to_string(), lab.cni_path()),
    ];
    let out = sane(
        lab,
        &Call::plugin(lab, &env, &plugin_stdin(&conf).to_string()),
        &format!("{when}: STATUS"),
    );
    if !out.ok() {
        assert!(out.cni_error().is_some(), "{when}: STATUS: {out}");
    }
}

/// A fresh ADD works and the container gets its interface.
fn fresh_add(lab: &Lab, id: &str, c: &Container, when: &str) {
    let out = sane_plugin(lab, "ADD", id, c, when);
    assert!(out.ok(), "{when}: fresh ADD {id}: {out}");
    assert!(
        lab.links(c).contains(&"eth0".to_string()),
        "{when}: no eth0 after ADD"
    );
}

/// A live infra's record and one attachment record, as text.
fn capture(lab: &Lab, c: &Container) -> (Value, Value) {
    must(lab, "ADD", "capture-1", c, &stdin(), "capture");
    let read = |p: std::path::PathBuf| -> Value {
        let text = fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    let infra = read(lab.state_dir().join("infra.json"));
    let record = read(
        lab.state_dir()
            .join("attachments/rootless+capture-1+eth0.json"),
    );
    must(lab, "DEL", "capture-1", c, &stdin(), "capture");
    lab.assert_no_infra("after capturing the state");
    (infra, record)
}

/// Kills the running infra the way a reboot does: everything at once, the
/// records left as they are.
fn crash_infra(lab: &Lab) {
    let text = fs::read_to_string(lab.state_dir().join("infra.json")).expect("infra.json");
    let info: Value = serde_json::from_str(&text).expect("infra.json is JSON");
    let pids: Vec<u32> = ["supervisor", "sandbox", "slirp4netns"]
        .iter()
        .filter_map(|k| info[k]["pid"].as_u64())
        .map(|p| p as u32)
        .collect();
    for &pid in &pids {
        lab::sigkill(pid);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|&p| lab.is_running(p)) {
        assert!(Instant::now() < deadline, "the infra survived SIGKILL");
        thread::sleep(Duration::from_millis(20));
    }
}

/// (a) infra.json and a record survive a "reboot": their PIDs are dead.
#[test]
fn stale_infra_record_with_dead_pids() {
    let Some(lab) = Lab::new(lab::binary!(), "stale_dead_pids") else {
        return;
    };
    let (old, new) = (lab.container(), lab.container());
    must(
        &lab,
        "ADD",
        "before-reboot",
        &old,
        &stdin(),
        "before the reboot",
    );
    crash_infra(&lab);
    let when = "after the reboot";
    all_status(&lab, when);
    let check = sane_plugin(&lab, "CHECK", "before-reboot", &old, when);
    let err = check
        .cni_error()
        .unwrap_or_else(|| panic!("{when}: CHECK of a lost attachment: {check}"));
    assert_eq!(err.code, 103, "{when}: CHECK of a lost attachment: {check}");
    fresh_add(&lab, "after-reboot", &new, when);
    let out = sane_plugin(&lab, "DEL", "before-reboot", &old, when);
    assert!(out.ok(), "{when}: DEL of the lost attachment: {out}");
    let out = sane_plugin(&lab, "DEL", "after-reboot", &new, when);
    assert!(out.ok(), "{when}: DEL: {out}");
    lab.assert_no_infra(when);
}

/// (b) infra.json names live processes of the user that are not ours: the
/// PID is right, the start time is not. They are never signalled.
#[test]
fn stale_infra_record_naming_live_processes() {
    let Some(lab) = Lab::new(lab::binary!(), "stale_live_pids") else {
        return;
    };
    let c = lab.container();
    let (infra, _) = capture(&lab, &c);
    assert!(
        infra["supervisor"].get("start_time").is_some(),
        "infra.json's process format changed: {infra}"
    );
    // Unrelated processes of the lab uid (not counted as leftovers).
    let (bystanders, starts) = start_bystanders(&lab);
    let variants: [(&str, [(usize, u64); 3]); 3] = [
        // All three the same bystander, start time made up.
        (
            "one bystander, made-up start time",
            [(0, 12345), (0, 12345), (0, 12345)],
        ),
        // One tick off: what a reused PID looks like.
        (
            "start times one tick off",
            [(0, starts[0] + 1), (1, starts[1] + 1), (2, starts[2] + 1)],
        ),
        // PID right, start time zero or huge.
        (
            "start times 0 and u64::MAX",
            [(1, 0), (2, u64::MAX), (0, 1)],
        ),
    ];
    for (name, procs) in variants {
        let when = format!("infra.json naming live processes ({name})");
        let mut info = infra.clone();
        for (key, (b, start)) in ["supervisor", "sandbox", "slirp4netns"].iter().zip(procs) {
            info[*key] = serde_json::json!({ "pid": bystanders[b].pid, "start_time": start });
        }
        // The sandbox's namespace as the bystander's own: only the start
        // time tells them apart.
        info["netns"] = netns_inode(bystanders[procs[1].0].pid).into();
        write_as_user(
            &lab,
            &lab.state_dir().join("infra.json"),
            info.to_string().as_bytes(),
        );
        all_status(&lab, &when);
        fresh_add(&lab, "after-reboot", &c, &when);
        let sups = supervisors(&lab);
        assert_eq!(sups.len(), 1, "{when}: infras:\n{}", sups.join("\n"));
        let out = sane_plugin(&lab, "DEL", "after-reboot", &c, &when);
        assert!(out.ok(), "{when}: DEL: {out}");
        assert_bystanders_untouched(&lab, &bystanders, &starts, &when);
        lab.assert_no_infra(&when);
    }
}

/// Three unrelated processes of the lab uid (not counted as leftovers) and
/// their start times.
fn start_bystanders(lab: &Lab) -> (Vec<Container>, Vec<u64>) {
    let bystanders: Vec<Container> = (0..3).map(|_| lab.container()).collect();
    let starts: Vec<u64> = bystanders
        .iter()
        .map(|b| lab::start_time(b.pid).expect("start time"))
        .collect();
    (bystanders, starts)
}

/// The inode of a process's network namespace, as infra.json records it.
fn netns_inode(pid: u32) -> u64 {
    fs::metadata(format!("/proc/{pid}/ns/net"))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .expect("bystander netns")
}

/// Each bystander still runs, as the same process (same start time), and
/// was not stopped either.
fn assert_bystanders_untouched(lab: &Lab, bystanders: &[Container], starts: &[u64], when: &str) {
    for (b, start) in bystanders.iter().zip(starts) {
        assert!(
            lab.is_running(b.pid) && lab::start_time(b.pid) == Some(*start),
            "{when}: bystander {} was killed",
            Lab::describe(b.pid)
        );
        let state = fs::read_to_string(format!("/proc/{}/stat", b.pid)).unwrap_or_default();
        assert!(
            !state.contains(") T "),
            "{when}: bystander {} was stopped",
            Lab::describe(b.pid)
        );
    }
}

/// infra.json naming live processes of the user with the right PIDs and
/// start times, while the recorded network namespace is not the sandbox's:
/// the infra counts as dead and is cleaned up, yet these processes are not
/// signalled, because their command lines are not ours (the last of the
/// three things checked before any signal).
#[test]
fn live_processes_with_right_start_times_but_not_our_command_line_are_left_alone() {
    let Some(lab) = Lab::new(lab::binary!(), "stale_right_starts") else {
        return;
    };
    let c = lab.container();
    let (infra, _) = capture(&lab, &c);
    let (bystanders, starts) = start_bystanders(&lab);
    let mut info = infra.clone();
    for (i, key) in ["supervisor", "sandbox", "slirp4netns"].iter().enumerate() {
        info[*key] = serde_json::json!({ "pid": bystanders[i].pid, "start_time": starts[i] });
    }
    // Another bystander's netns: not the "sandbox"'s own, so not alive.
    info["netns"] = netns_inode(bystanders[0].pid).into();
    write_as_user(
        &lab,
        &lab.state_dir().join("infra.json"),
        info.to_string().as_bytes(),
    );
    let when = "infra.json naming live processes with their right start times";
    all_status(&lab, when);
    fresh_add(&lab, "after-reboot", &c, when);
    let out = sane_plugin(&lab, "DEL", "after-reboot", &c, when);
    assert!(out.ok(), "{when}: DEL: {out}");
    assert_bystanders_untouched(&lab, &bystanders, &starts, when);
    lab.assert_no_infra(when);
}

/// The infra's own processes, with infra.json naming another network
/// namespace than the sandbox's: not alive (the sandbox must still hold the
/// recorded netns), so never used as the infra; and since its supervisor
/// still runs (it holds its lifetime lock), never cleaned up either: calls
/// refuse the state dir (code 105) and nothing is signalled. With the
/// record put back, the infra is the same one and DEL works.
#[test]
fn infra_whose_sandbox_is_not_in_the_recorded_netns_is_not_alive() {
    let Some(lab) = Lab::new(lab::binary!(), "stale_netns") else {
        return;
    };
    let (old, new, bystander) = (lab.container(), lab.container(), lab.container());
    must(&lab, "ADD", "before", &old, &stdin(), "before");
    let path = lab.state_dir().join("infra.json");
    let text = fs::read_to_string(&path).expect("infra.json");
    let mut info: Value = serde_json::from_str(&text).expect("JSON");
    let supervisor = infra_identity(&lab).expect("the infra");
    let ns = fs::metadata(bystander.netns())
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .expect("bystander netns");
    assert_ne!(info["netns"], ns, "the bystander is in the infra's netns");
    info["netns"] = ns.into();
    write_as_user(&lab, &path, info.to_string().as_bytes());

    let when = "infra.json naming another netns";
    let status = lab.cli(&["status", "--json"]);
    let alive = status
        .json()
        .is_some_and(|s| s["infra"]["supervisor"]["pid"].as_u64() == Some(supervisor.0));
    assert!(!alive, "{when}: taken for alive: {status}");
    let add = sane_plugin(&lab, "ADD", "after", &new, when);
    let err = add
        .cni_error()
        .unwrap_or_else(|| panic!("{when}: the ADD used the infra: {add}"));
    assert_eq!(err.code, 105, "{when}: ADD: {add}");
    assert_eq!(lab.links(&new), vec!["lo"], "{when}: the ADD attached");
    assert!(
        lab.is_running(supervisor.0 as u32)
            && lab::start_time(supervisor.0 as u32) == Some(supervisor.1),
        "{when}: the supervisor was signalled"
    );
    assert!(
        lab.is_running(bystander.pid),
        "{when}: the bystander was killed"
    );

    // The record put back: the same infra, alive again.
    write_as_user(&lab, &path, text.as_bytes());
    assert_eq!(infra_identity(&lab), Some(supervisor), "the infra changed");
    let check = sane_plugin(&lab, "CHECK", "before", &old, "record restored");
    assert!(check.ok(), "CHECK with the record restored: {check}");
    let out = sane_plugin(&lab, "DEL", "before", &old, "record restored");
    assert!(out.ok(), "DEL: {out}");
    lab.assert_no_infra(when);
}

/// (c) An empty and a truncated infra.json: treated as no infra.
#[test]
fn corrupt_infra_record() {
    let Some(lab) = Lab::new(lab::binary!(), "corrupt_infra") else {
        return;
    };
    let c = lab.container();
    let (infra, _) = capture(&lab, &c);
    let text = infra.to_string();
    for (name, contents) in [
        ("empty", String::new()),
        ("truncated", text[..text.len() / 2].to_string()),
        ("not an object", "[1, 2, 3]".to_string()),
    ] {
        let when = format!("{name} infra.json");
        write_as_user(
            &lab,
            &lab.state_dir().join("infra.json"),
            contents.as_bytes(),
        );
        all_status(&lab, &when);
        let out = sane_plugin(&lab, "CHECK", "x-1", &c, &when);
        assert!(!out.ok(), "{when}: CHECK of nothing succeeded: {out}");
        let out = sane_plugin(&lab, "DEL", "x-1", &c, &when);
        assert!(out.ok(), "{when}: DEL of nothing: {out}");
        fresh_add(&lab, "x-1", &c, &when);
        let out = sane_plugin(&lab, "CHECK", "x-1", &c, &when);
        assert!(out.ok(), "{when}: CHECK after the fresh ADD: {out}");
        let out = sane_plugin(&lab, "DEL", "x-1", &c, &when);
        assert!(out.ok(), "{when}: DEL: {out}");
        lab.assert_no_infra(&when);
    }
}

/// (d) Empty and truncated attachment records: never a panic; DEL forgets
/// them, ADD replaces them, and the last DEL leaves nothing.
#[test]
fn corrupt_attachment_records() {
    let Some(lab) = Lab::new(lab::binary!(), "corrupt_records") else {
        return;
    };
    let (c, other) = (lab.container(), lab.container());
    let (_, record) = capture(&lab, &c);
    let text = record.to_string();
    let dir = lab.state_dir().join("attachments");
    let empty = dir.join("rootless+stale-empty+eth0.json");
    let truncated = dir.join("rootless+stale-cut+eth0.json");
    let replaced = dir.join("rootless+stale-replaced+eth0.json");
    write_as_user(&lab, &empty, b"");
    write_as_user(&lab, &truncated, &text.as_bytes()[..text.len() / 2]);
    write_as_user(&lab, &replaced, &text.as_bytes()[..text.len() / 3]);
    let when = "with corrupt records";
    all_status(&lab, when);
    for id in ["stale-empty", "stale-cut"] {
        let out = sane_plugin(&lab, "CHECK", id, &c, when);
        assert!(!out.ok(), "{when}: CHECK {id} succeeded: {out}");
    }
    // ADD over a corrupt record replaces it.
    fresh_add(&lab, "stale-replaced", &c, when);
    let out = sane_plugin(&lab, "CHECK", "stale-replaced", &c, when);
    assert!(out.ok(), "{when}: CHECK of the replaced record: {out}");
    fresh_add(&lab, "other", &other, when);
    let out = sane_plugin(&lab, "DEL", "stale-replaced", &c, when);
    assert!(out.ok(), "{when}: DEL stale-replaced: {out}");
    let out = sane_plugin(&lab, "DEL", "other", &other, when);
    assert!(out.ok(), "{when}: DEL other: {out}");
    // The runtime then deletes the containers it knew before the reboot:
    // the last of these DELs is the last attachment.
    for id in ["stale-empty", "stale-cut"] {
        let out = sane_plugin(&lab, "DEL", id, &c, when);
        assert!(out.ok(), "{when}: DEL {id}: {out}");
    }
    assert!(
        bad_records(&lab).is_empty(),
        "records: {:?}",
        bad_records(&lab)
    );
    lab.assert_no_infra("after the last DEL");
}
