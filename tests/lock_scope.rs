//! What the state lock covers: records and the infra's lifecycle, never the
//! inner plugins. Two ADDs run their inner chains at the same time, and a
//! DEL owns its attachment while its inner DEL runs, so a second DEL of the
//! same attachment gets code 11 instead of racing it.

use lab::{install_plugin, write_as_user, Call};
use lab::{Container, Lab};
use std::fs;
use std::thread;
use std::time::{Duration, Instant};

/// How long the slow inner plugin's step takes: long enough that a second
/// call on a loaded machine starts its own step before the first ends.
const STEP: u64 = 3;

/// A lab with the inner plugin `slowlog`, which logs "VERB ID start" and
/// "VERB ID end" around a STEP-second sleep (in the verbs of `slow`) to
/// `log`, and a network whose inner chain is that plugin alone.
fn slow_lab(name: &str, slow: &str) -> Option<(Lab, String, std::path::PathBuf)> {
    let lab = Lab::new(lab::binary!(), name)?;
    let log = lab.dir.join("slowlog.log");
    write_as_user(&lab, &log, b"");
    install_plugin(
        &lab,
        "slowlog",
        &format!(
            // stderr closed: the caller's pipes must not wait for it.
            "#!/bin/sh\nexec 2>/dev/null\ncat >/dev/null\nlog='{}'\n\
             echo \"$CNI_COMMAND $CNI_CONTAINERID start\" >>\"$log\"\n\
             case ' {slow} ' in *\" $CNI_COMMAND \"*) sleep {STEP};; esac\n\
             echo \"$CNI_COMMAND $CNI_CONTAINERID end\" >>\"$log\"\n\
             [ \"$CNI_COMMAND\" = ADD ] && echo '{{\"cniVersion\":\"1.0.0\"}}'\n\
             exit 0\n",
            log.display()
        ),
    );
    let stdin = lab::one_plugin_delegate_stdin("slowlog").to_string();
    Some((lab, stdin, log))
}

fn call(lab: &Lab, verb: &str, id: &str, c: &Container, stdin: &str) -> Call {
    Call::plugin(lab, &lab.plugin_env(verb, id, &c.netns()), stdin)
}

fn must(lab: &Lab, verb: &str, id: &str, c: &Container, stdin: &str) {
    let out = lab::run(lab, &call(lab, verb, id, c, stdin), Duration::from_secs(60));
    assert!(out.ok(), "{verb} {id}: {out}");
}

/// Waits until the log holds `line`.
fn wait_for_line(log: &std::path::Path, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .any(|l| l == line)
    {
        assert!(Instant::now() < deadline, "no {line:?} in the log");
        thread::sleep(Duration::from_millis(10));
    }
}

/// Two ADDs on a warm network: the second one's inner plugin starts while
/// the first one's still runs. An implementation that held the lock (or any
/// lock) around the inner chain would log "end" of one before "start" of
/// the other.
#[test]
fn inner_plugins_of_two_adds_run_at_the_same_time() {
    let Some((lab, stdin, log)) = slow_lab("lock_overlap", "ADD") else {
        return;
    };
    let (warm, a, b) = (lab.container(), lab.container(), lab.container());
    // The network's first chain runs alone (see "Records and locking"):
    // one ADD first, so the two below run as any later ADDs do.
    must(&lab, "ADD", "warm", &warm, &stdin);
    write_as_user(&lab, &log, b"");

    let first = lab::spawn(&lab, &call(&lab, "ADD", "a", &a, &stdin));
    wait_for_line(&log, "ADD a start");
    let second = lab::spawn(&lab, &call(&lab, "ADD", "b", &b, &stdin));
    let (first, second) = (
        first.wait(Duration::from_secs(60)),
        second.wait(Duration::from_secs(60)),
    );
    assert!(first.ok(), "ADD a: {first}");
    assert!(second.ok(), "ADD b: {second}");
    let steps = fs::read_to_string(&log).unwrap_or_default();
    let at = |line: &str| {
        steps
            .lines()
            .position(|l| l == line)
            .unwrap_or_else(|| panic!("no {line:?} in:\n{steps}"))
    };
    assert!(
        at("ADD b start") < at("ADD a end"),
        "the second ADD's inner plugin waited for the first one's:\n{steps}"
    );
    for (id, c) in [("a", &a), ("b", &b), ("warm", &warm)] {
        must(&lab, "DEL", id, c, &stdin);
    }
    lab.assert_no_infra("after the DELs");
}

/// A second DEL of an attachment whose DEL is still running its inner DEL
/// gets code 11 (try again later) at once, and the inner DEL runs once;
/// the first DEL succeeds, and a DEL after it finds nothing and succeeds.
#[test]
fn second_del_of_the_same_attachment_gets_try_again_later() {
    let Some((lab, stdin, log)) = slow_lab("second_del", "DEL") else {
        return;
    };
    let (c, other) = (lab.container(), lab.container());
    // Another attachment keeps the infra, so the DEL is only the inner DEL.
    must(&lab, "ADD", "other", &other, &stdin);
    must(&lab, "ADD", "x", &c, &stdin);

    let first = lab::spawn(&lab, &call(&lab, "DEL", "x", &c, &stdin));
    wait_for_line(&log, "DEL x start");
    let second = lab::run(
        &lab,
        &call(&lab, "DEL", "x", &c, &stdin),
        Duration::from_secs(60),
    );
    let still_running = !fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .any(|l| l == "DEL x end");
    let err = second
        .cni_error()
        .unwrap_or_else(|| panic!("the second DEL gave no CNI error: {second}"));
    assert_eq!(
        err.code, 11,
        "the second DEL while the first runs: {second}"
    );
    assert!(
        still_running,
        "the second DEL answered only after the first DEL's inner DEL ended"
    );
    let first = first.wait(Duration::from_secs(60));
    assert!(first.ok(), "the first DEL: {first}");
    must(&lab, "DEL", "x", &c, &stdin);
    let dels = fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .filter(|l| *l == "DEL x start")
        .count();
    assert_eq!(dels, 1, "inner DELs of x (the last DEL finds no record)");
    must(&lab, "DEL", "other", &other, &stdin);
    lab.assert_no_infra("after the DELs");
}
