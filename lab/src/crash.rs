//! The calls the crash tests make and the crash loop they share: the
//! plugin SIGKILLed at random points of ADD or DEL (alone, with its process
//! group, or with the inner plugin it runs), then checked for a held lock,
//! half-written records, a second infra, a failed recovery and leftovers.

use crate::{bad_records, panicked, supervisors, Call, Container, Lab, Out, Rng, Snapshot};
use crate::{example_conflist, outer, plugin_stdin};
use serde_json::Value;
use std::fs;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

/// The example network, with a short lock timeout: a lock left held by a
/// killed call shows up as code 11 after 5 s instead of 30.
pub fn stdin() -> String {
    let mut conf = example_conflist();
    outer(&mut conf).insert("lockTimeout".into(), 5.into());
    outer(&mut conf).insert("logLevel".into(), "debug".into());
    plugin_stdin(&conf).to_string()
}

/// Our binary in plugin mode on `c` as container `id`.
pub fn call(lab: &Lab, verb: &str, id: &str, c: &Container, stdin: &str) -> Call {
    Call::plugin(lab, &lab.plugin_env(verb, id, &c.netns()), stdin)
}

/// `call` run to its end (60 s at most); asserts that it succeeded.
pub fn must(lab: &Lab, verb: &str, id: &str, c: &Container, stdin: &str, when: &str) -> Out {
    let out = crate::run(lab, &call(lab, verb, id, c, stdin), Duration::from_secs(60));
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
    let out = crate::run(lab, &call(lab, verb, id, c, stdin), Duration::from_secs(60));
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
pub fn infra_identity(lab: &Lab) -> Option<(u64, u64)> {
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
    for p in crate::pids_of_uid(lab.uid) {
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
            let out = crate::run(lab, &Call::argv(&["true"]), Duration::from_secs(30));
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
/// (iptables rules) is compared too. `binary` is the plugin under test
/// (`lab::binary!()`).
pub fn crash_loop(binary: &Path, name: &str, verb: &str, iterations: usize, seed: u64) {
    /// The least share of kills that must land while the call runs.
    const MIN_MID_CALL: usize = 60;
    let Some(lab) = Lab::new(binary, name) else {
        return;
    };
    let wall = Instant::now();
    let mut rng = Rng::new(crate::seed(name, seed));
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
        let mut running = crate::spawn(&lab, &call(&lab, verb, &id, &c, &stdin));
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
                crate::sigkill(running.pid);
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
                crate::start_time(pid as u32) == Some(start) && lab.is_running(pid as u32)
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
pub fn iterations() -> usize {
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
