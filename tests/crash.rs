//! Killed calls and stale state: the plugin SIGKILLed at random points of
//! ADD and DEL (alone, with its process group, or with the inner plugin it
//! runs), and stale or broken state left by a "reboot": the next calls
//! recover, no lock stays held, no record is half-written, a witness
//! attachment keeps its infra and passes CHECK, and nothing of ours is left
//! (or taken) after the last DEL.

use lab::{bad_records, panicked, supervisors, write_as_user, Call, Rng};
use lab::{example_conflist, outer, plugin_stdin, Container, Lab, Out, Snapshot};
use serde_json::Value;
use std::fs;
use std::thread;
use std::time::{Duration, Instant};

/// The example network, with a short lock timeout: a lock left held by a
/// killed call shows up as code 11 after 5 s instead of 30.
fn stdin() -> String {
    let mut conf = example_conflist();
    outer(&mut conf).insert("lockTimeout".into(), 5.into());
    outer(&mut conf).insert("logLevel".into(), "debug".into());
    plugin_stdin(&conf).to_string()
}

/// Our binary in plugin mode on `c` as container `id`.
fn call(lab: &Lab, verb: &str, id: &str, c: &Container, stdin: &str) -> Call {
    Call::plugin(lab, &lab.plugin_env(verb, id, &c.netns()), stdin)
}

fn must(lab: &Lab, verb: &str, id: &str, c: &Container, stdin: &str, when: &str) -> Out {
    let out = lab::run(lab, &call(lab, verb, id, c, stdin), Duration::from_secs(60));
    assert!(out.ok(), "{when}: {verb} {id}: {out}");
    out
}

/// The state lock is free (flock(1) as the lab user). A child the killed
/// call forked may hold it for the moment between its fork and its exec
/// (the lock fd is close-on-exec): that is allowed for up to 2 s, and
/// printed with the holders; a lock still held then is a failure naming them.
fn assert_lock_free(lab: &Lab, when: &str) {
    if !lab.state_dir().exists() {
        return;
    }
    let lock = lab.state_dir().join("rootless-cni-infra.lck");
    let lock_path = lock.display().to_string();
    let free = || lab.exec(&[], None, &["flock", "-n", "-E", "99", &lock_path, "true"]);
    let mut out = free();
    if out.ok() {
        return;
    }
    let holders = lock_holders(&lock);
    let since = Instant::now();
    while !out.ok() && since.elapsed() < Duration::from_secs(2) {
        thread::sleep(Duration::from_millis(50));
        out = free();
    }
    assert!(
        out.ok(),
        "{when}: the state lock is still held after 2 s: {out}\nheld open by: {holders:?}, now: {:?}",
        lock_holders(&lock)
    );
    eprintln!(
        "{when}: the state lock was held for {:?} after the kill, by {holders:?}",
        since.elapsed()
    );
}

/// The processes that have `file` open, described.
fn lock_holders(file: &std::path::Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let Ok(target) = fs::metadata(file) else {
        return Vec::new();
    };
    let pids = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok());
    pids.filter(|pid| {
        fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| {
                fs::metadata(fd.path())
                    .is_ok_and(|m| m.dev() == target.dev() && m.ino() == target.ino())
            })
    })
    .map(Lab::describe)
    .collect()
}

/// Runs a call to its end; a failure is a problem, not a panic, so one run
/// reports every kind of failure.
fn attempt(lab: &Lab, verb: &str, id: &str, c: &Container, stdin: &str) -> Result<Out, String> {
    let out = lab::run(lab, &call(lab, verb, id, c, stdin), Duration::from_secs(60));
    if out.ok() {
        Ok(out)
    } else {
        Err(format!("{verb} {id} failed: {out}"))
    }
}

/// Who the SIGKILL hits.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Victim {
    /// The plugin alone (what libcni does on a timeout); a running inner
    /// plugin, in its own process group, finishes its step.
    Plugin,
    /// The plugin's process group (the runtime was killed with its group).
    Group,
    /// The plugin's group and the group of the inner plugin it is running
    /// (the runtime and everything it started, at once): the inner plugin
    /// dies half-way through its step.
    WithInner,
}

/// The running infra as infra.json names it: supervisor PID and start time.
fn infra_identity(lab: &Lab) -> Option<(u64, u64)> {
    let text = fs::read_to_string(lab.state_dir().join("infra.json")).ok()?;
    let info: Value = serde_json::from_str(&text).ok()?;
    let sup = &info["supervisor"];
    Some((sup["pid"].as_u64()?, sup["start_time"].as_u64()?))
}

/// The process groups of `pid`'s children other than its own: the inner
/// plugins it runs (each leads a group of its own). Not the infra it may
/// be starting: the supervisor is its child too until it dies, and is
/// found by its hidden entry (`__supervise`, `__sandbox`).
fn child_groups(lab: &Lab, pid: u32) -> Vec<i32> {
    let own = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid as i32))).ok();
    let mut groups = Vec::new();
    for p in lab::pids_of_uid(lab.uid) {
        let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let fields: Vec<&str> = after.split_whitespace().collect();
        let (ppid, pgrp) = (fields.get(1), fields.get(2));
        if ppid.and_then(|s| s.parse::<u32>().ok()) != Some(pid) {
            continue;
        }
        let cmdline = fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
        if cmdline.split(|&b| b == 0).any(|a| a.starts_with(b"__")) {
            continue;
        }
        if let Some(g) = pgrp.and_then(|s| s.parse::<i32>().ok()) {
            if Some(nix::unistd::Pid::from_raw(g)) != own && !groups.contains(&g) {
                groups.push(g);
            }
        }
    }
    groups
}

/// The shortest time from spawn to exit of `n` undisturbed calls of `verb`
/// (an ADD is undone, a DEL prepared, outside the measure): the shortest,
/// so that a kill delay drawn below it lands mid-call on a machine whose
/// load changes.
fn measure(lab: &Lab, verb: &str, c: &Container, stdin: &str, n: usize) -> Duration {
    let took: Vec<Duration> = (0..n)
        .map(|i| {
            let id = format!("measure-{i}");
            if verb == "DEL" {
                must(lab, "ADD", &id, c, stdin, "measure");
            }
            let started = Instant::now();
            must(lab, verb, &id, c, stdin, "measure");
            let t = started.elapsed();
            if verb == "ADD" {
                must(lab, "DEL", &id, c, stdin, "measure");
            }
            t
        })
        .collect();
    took.into_iter().min().unwrap_or_default()
}

/// The median time from spawn to exit of a call that does nothing: what
/// the session's setpriv and nsenter take before our binary runs.
fn spawn_overhead(lab: &Lab) -> Duration {
    let mut took: Vec<Duration> = (0..3)
        .map(|_| {
            let started = Instant::now();
            let out = lab::run(lab, &Call::argv(&["true"]), Duration::from_secs(30));
            assert!(out.ok(), "true: {out}");
            started.elapsed()
        })
        .collect();
    took.sort();
    took[1]
}

/// SIGKILL at random points of ADD or DEL, `iterations` times, to the
/// plugin alone, its process group, or its group and the inner plugin it
/// runs. The kill delay is drawn from the measured time of an undisturbed
/// call (after the session's own start), measured again with each
/// iteration's fresh call as the load changes, so most kills land while the
/// call runs; at least MIN_MID_CALL percent must. After each kill the
/// container's DEL and a fresh ADD+DEL must work, and the no-leak checker
/// must find nothing new and nothing gone. The second half runs with a
/// witness attached, so the infra is not started and stopped by the killed
/// call: its infra must stay the same one (supervisor PID and start time),
/// CHECK of it must pass, and what the killed call could leave in the infra
/// (iptables rules) is compared too.
fn crash_loop(name: &str, verb: &str, iterations: usize, seed: u64) {
    /// The least share of kills that must land while the call runs.
    const MIN_MID_CALL: usize = 60;
    let Some(lab) = Lab::new(lab::binary!(), name) else {
        return;
    };
    let wall = Instant::now();
    let mut rng = Rng::new(lab::seed(name, seed));
    let stdin = stdin();
    let c = lab.container();
    let witness = lab.container();
    // What the lab may hold between iterations: nothing, then the witness.
    let mut baseline = Snapshot::default();
    let mut witness_infra = None;
    let overhead = spawn_overhead(&lab);
    let mut call_time = measure(&lab, verb, &c, &stdin, 5);
    let mut recent = std::collections::VecDeque::new();
    eprintln!("{name}: spawn overhead {overhead:?}, {verb} without an infra {call_time:?}");
    let (mut finished_before_kill, mut killed, mut inner_killed, mut with_inner) = (0, 0, 0, 0);
    let mut problems: Vec<String> = Vec::new();

    for i in 0..iterations {
        if i == iterations / 2 {
            must(&lab, "ADD", "witness", &witness, &stdin, "witness");
            call_time = measure(&lab, verb, &c, &stdin, 5);
            recent.clear();
            eprintln!("{name}: {verb} beside the witness {call_time:?}");
            baseline = lab.snapshot();
            witness_infra = infra_identity(&lab);
            assert!(
                witness_infra.is_some(),
                "no infra.json after the witness ADD"
            );
        }
        let id = format!("crash-{i}");
        let victim = *rng.pick(&[Victim::Plugin, Victim::Group, Victim::WithInner]);
        // From the end of the session's start to just before the call's end.
        // With the inner plugin: in the first half, where the chain runs
        // (a DEL that stops the infra spends its second half on that).
        let span = call_time.saturating_sub(overhead).as_millis().max(1) as u64;
        let span = match victim {
            Victim::WithInner => span / 2,
            _ => span * 9 / 10,
        };
        let delay = overhead + Duration::from_millis(rng.below(span + 1));
        let when = format!("iteration {i} ({verb} killed after {delay:?}, {victim:?})");
        let mut problem = |p: String| problems.push(format!("{when}: {p}"));
        if verb == "DEL" {
            if let Err(e) = attempt(&lab, "ADD", &id, &c, &stdin) {
                problem(e);
                continue;
            }
        }
        let mut running = lab::spawn(&lab, &call(&lab, verb, &id, &c, &stdin));
        thread::sleep(delay);
        // Its children before it dies: once it is gone they are re-parented.
        // From the delay on, the first inner plugin to run is the one hit
        // (the delay picks which step of the chain).
        let mut inner = Vec::new();
        if victim == Victim::WithInner {
            let until = Instant::now() + call_time * 2;
            loop {
                inner = child_groups(&lab, running.pid);
                if !inner.is_empty() || running.exited() || Instant::now() > until {
                    break;
                }
                thread::sleep(Duration::from_millis(1));
            }
        }
        match victim {
            Victim::Plugin => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(running.pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            Victim::Group | Victim::WithInner => running.kill_group(),
        }
        for g in &inner {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(*g),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let out = running.wait(Duration::from_secs(10));
        if out.status.is_some() {
            finished_before_kill += 1;
        } else {
            killed += 1;
        }
        let inner_hit = victim == Victim::WithInner && !inner.is_empty() && out.status.is_none();
        if victim == Victim::WithInner {
            with_inner += 1;
            if inner_hit {
                inner_killed += 1;
            }
        }
        eprintln!(
            "{when}: {}{}",
            match out.status {
                Some(code) => format!("had already exited {code}"),
                None => "was running".into(),
            },
            if inner.is_empty() {
                String::new()
            } else {
                format!(", inner plugin groups {inner:?} killed too")
            }
        );
        if panicked(&out) {
            problem(format!("panic: {out}"));
        }

        // Right after the kill: no lock held, every record whole, at most
        // one infra.
        assert_lock_free(&lab, &when);
        let bad: Vec<String> = bad_records(&lab)
            .into_iter()
            .filter(|b| !b.ends_with("not a record"))
            .collect();
        if !bad.is_empty() {
            problem(format!("half-written records: {bad:?}"));
        }
        let sups = supervisors(&lab);
        if sups.len() > 1 {
            problem(format!("{} infras:\n{}", sups.len(), sups.join("\n")));
        }

        // Recovery: DEL of the container, then a fresh ADD and DEL.
        match attempt(&lab, "DEL", &id, &c, &stdin) {
            Err(e) => problem(format!("recovery: {e}")),
            Ok(out) => {
                let links = lab.links(&c);
                if links != vec!["lo"] {
                    problem(format!(
                        "after the recovery DEL: {links:?}, then {:?}; the DEL: {out}",
                        lab.links(&c)
                    ));
                }
            }
        }
        let fresh = format!("fresh-{i}");
        for fresh_verb in ["ADD", "DEL"] {
            let started = Instant::now();
            match attempt(&lab, fresh_verb, &fresh, &c, &stdin) {
                Err(e) => problem(format!("fresh: {e}")),
                // An undisturbed call: the kill delays follow the machine's
                // load as it changes (the shortest of the last three).
                Ok(_) if fresh_verb == verb => {
                    recent.push_back(started.elapsed());
                    if recent.len() > 3 {
                        recent.pop_front();
                    }
                    call_time = recent.iter().copied().min().unwrap_or(call_time);
                }
                Ok(_) => {}
            }
        }
        let links = lab.links(&c);
        if links != vec!["lo"] {
            problem(format!(
                "after the fresh DEL: {links:?}, then {:?}",
                lab.links(&c)
            ));
        }
        // The witness lives through it all in the same infra.
        if let Some(expected) = witness_infra {
            let now = infra_identity(&lab);
            let alive = now.is_some_and(|(pid, start)| {
                lab::start_time(pid as u32) == Some(start) && lab.is_running(pid as u32)
            });
            if now != Some(expected) || !alive {
                problem(format!(
                    "the witness's infra (supervisor pid, start time) was {expected:?}, is \
                     {now:?} (alive: {alive})"
                ));
            }
            if let Err(e) = attempt(&lab, "CHECK", "witness", &witness, &stdin) {
                problem(format!("the witness: {e}"));
            }
        }
        let leaks = lab.leaks_since(&baseline);
        if inner_hit && verb == "DEL" && is_bridge_masquerade_leftover(&leaks, &id) {
            eprintln!("{when}: the known limit of a bridge killed mid-DEL:\n{leaks}");
            baseline = lab.snapshot();
        } else if !leaks.is_empty() {
            problem(format!("leaked:\n{leaks}"));
            // Reported once: later iterations compare with what is left.
            baseline = lab.snapshot();
            witness_infra = witness_infra.and(infra_identity(&lab));
        }
    }
    eprintln!(
        "{name}: {iterations} kills ({killed} while running, {finished_before_kill} after the \
         call had finished; {inner_killed} of {with_inner} with an inner plugin killed mid-step) \
         in {:.1}s, {} problems",
        wall.elapsed().as_secs_f64(),
        problems.len()
    );
    assert!(
        problems.is_empty(),
        "{} problems:\n\n{}",
        problems.len(),
        problems.join("\n\n")
    );
    assert!(
        killed * 100 >= MIN_MID_CALL * iterations,
        "only {killed} of {iterations} kills landed while the call ran (at least \
         {MIN_MID_CALL}% must): the kill delays do not fit the call"
    );
    assert!(
        inner_killed * 2 >= with_inner,
        "only {inner_killed} of {with_inner} kills of the plugin with its inner plugin found an \
         inner plugin running"
    );
    must(&lab, "DEL", "witness", &witness, &stdin, "witness");
    lab.assert_no_infra("after the last DEL");
}

/// Kills a loop: CRASH_ITERATIONS (default 25, so 50 in all with both
/// verbs) raises it for a longer hunt.
fn iterations() -> usize {
    std::env::var("CRASH_ITERATIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(25)
}

/// Whether `leaks` are only the masquerade rules of container `id` that
/// the reference bridge plugin (1.1.1) leaves when it is itself killed in
/// the middle of its DEL: after removing the container's interface, before
/// its rules; its next DEL finds no interface, so no address whose rules to
/// remove. A known limit (README, "Killed calls"), accepted only where the
/// loop killed an inner plugin during a DEL.
fn is_bridge_masquerade_leftover(leaks: &str, id: &str) -> bool {
    let of_id = format!("id: \\\"{id}\\\"");
    !leaks.is_empty()
        && leaks.lines().all(|l| {
            l.strip_prefix("iptables rule: ")
                .is_some_and(|rule| rule.contains(&of_id) || rule.starts_with(":CNI-"))
        })
}

#[test]
fn sigkill_during_add_then_recover() {
    crash_loop("crash_add", "ADD", iterations(), 0xADD0_2024);
}

#[test]
fn sigkill_during_del_then_recover() {
    crash_loop("crash_del", "DEL", iterations(), 0xDE1_2024);
}

// ---------------------------------------------------------------------------
// Stale state

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
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
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

// ---------------------------------------------------------------------------
// A killed call's inner plugin

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
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(add.pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
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
