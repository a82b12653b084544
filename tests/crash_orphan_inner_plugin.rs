//! A killed call's inner plugin: the runtime kills the plugin while an
//! inner plugin is half-way through its ADD; the call that follows on that
//! attachment (DEL, the retried ADD, or a GC that drops it) waits for the
//! inner plugin to finish its step instead of undoing a half-made one.

use lab::crash::{call, must};
use lab::{write_as_user, Call, Lab};
use std::fs;
use std::thread;
use std::time::{Duration, Instant};

/// The runtime kills the plugin (libcni does, on its timeout) while an
/// inner plugin is half-way through its ADD. The inner plugin finishes its
/// step, as it would under libcni; the call that follows on that attachment
/// (`verb`: DEL, the runtime's retried ADD, or a GC that drops it) waits for it instead of undoing a
/// half-made step it would then redo behind the call's back. The inner
/// plugin logs each step: "ADD end" must come before "DEL".
fn orphan_inner_plugin_is_waited_for(name: &str, verb: &str) {
    let Some(lab) = Lab::new(lab::binary!(), name) else {
        return;
    };
    let log = lab.dir.join("slowstep.log");
    let script = lab.bin().join("slowstep");
    fs::write(
        &script,
        format!(
            // stderr closed: the killed call's pipes must not wait for it.
            "#!/bin/sh\nexec 2>/dev/null\ncat >/dev/null\nlog='{}'\n\
             if [ \"$CNI_COMMAND\" = ADD ]; then\n\
               echo 'ADD start' >>\"$log\"; sleep 2; echo 'ADD end' >>\"$log\"\n\
               echo '{{\"cniVersion\":\"1.0.0\"}}'\n\
             else\n  echo \"$CNI_COMMAND\" >>\"$log\"\nfi\n",
            log.display()
        ),
    )
    .expect("writing the slowstep plugin");
    fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod slowstep");
    // The log is written by the lab user.
    write_as_user(&lab, &log, b"");
    let stdin = lab::one_plugin_delegate_stdin("slowstep");
    let c = lab.container();

    let add = lab::spawn(&lab, &call(&lab, "ADD", "orphan", &c, &stdin.to_string()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("ADD start")
    {
        assert!(Instant::now() < deadline, "the inner ADD never started");
        thread::sleep(Duration::from_millis(10));
    }
    lab::sigkill(add.pid);
    let killed = add.wait(Duration::from_secs(10));
    assert!(killed.status.is_none(), "the ADD was not killed: {killed}");

    let started = Instant::now();
    let out = if verb == "GC" {
        let mut gc = stdin.clone();
        gc["cniVersion"] = "1.1.0".into();
        gc["cni.dev/valid-attachments"] = serde_json::json!([]);
        let env = vec![
            ("CNI_COMMAND".to_string(), "GC".to_string()),
            ("CNI_PATH".to_string(), lab.cni_path()),
        ];
        lab::run(
            &lab,
            &Call::plugin(&lab, &env, &gc.to_string()),
            Duration::from_secs(60),
        )
    } else {
        must(
            &lab,
            verb,
            "orphan",
            &c,
            &stdin.to_string(),
            "after the killed ADD",
        )
    };
    assert!(out.ok(), "{verb} after the killed ADD: {out}");
    eprintln!("{verb} after the killed ADD took {:?}", started.elapsed());
    let expected: &[&str] = if verb == "ADD" {
        // The runtime's retry: once the orphan's step is done, it undoes
        // what the killed ADD made (an inner DEL), then attaches; its DEL
        // ends it.
        must(&lab, "DEL", "orphan", &c, &stdin.to_string(), "the retry");
        &["ADD start", "ADD end", "DEL", "ADD start", "ADD end", "DEL"]
    } else {
        &["ADD start", "ADD end", "DEL"]
    };
    let steps = fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        steps.lines().collect::<Vec<_>>(),
        expected,
        "inner plugin steps"
    );
    lab.assert_no_infra(&format!("after the {verb}"));
}

#[test]
fn del_waits_for_the_inner_plugin_of_a_killed_add() {
    orphan_inner_plugin_is_waited_for("orphan_del", "DEL");
}

#[test]
fn add_waits_for_the_inner_plugin_of_a_killed_add() {
    orphan_inner_plugin_is_waited_for("orphan_add", "ADD");
}

#[test]
fn gc_waits_for_the_inner_plugin_of_a_killed_add() {
    orphan_inner_plugin_is_waited_for("orphan_gc", "GC");
}
