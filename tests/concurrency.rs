//! Concurrent calls: a storm of ADDs and DELs shares one infra (the same
//! supervisor, by PID and start time, from the first ADD to the last DEL)
//! and keeps the records exact; a held state lock gives code 11; an ADD
//! racing the last DEL lands in a live infra; first chains with and
//! without ports all succeed.

use lab::{example_conflist, outer, plugin_stdin, result_ipv4, Container, Lab, NET};
use lab::{run_all, supervisors, Call};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// How long one storm phase may take before its calls are killed.
const STORM_BOUND: Duration = Duration::from_secs(240);

/// A supervisor as the kernel knows it: PID and start time. Two infras,
/// or one stopped and another started, never share both.
type InfraId = (u32, u64);

/// The live supervisors of the lab uid, by identity.
fn supervisor_ids(lab: &Lab) -> BTreeSet<InfraId> {
    supervisors(lab)
        .iter()
        .filter_map(|d| d.strip_prefix("pid ")?.split(' ').next()?.parse().ok())
        .filter_map(|pid: u32| Some((pid, lab::start_time(pid)?)))
        .collect()
}

/// Runs `calls` all at once, sampling the supervisors of the lab uid
/// meanwhile; every identity seen goes into `seen`. Returns the outputs,
/// the most supervisors seen at once and what was running then.
fn storm(
    lab: &Lab,
    what: &str,
    calls: &[Call],
    seen: &mut BTreeSet<InfraId>,
) -> (Vec<lab::Out>, usize, Vec<String>) {
    let started = Instant::now();
    let (mut max, mut worst, mut samples) = (0, Vec::new(), 0);
    let outs = run_all(lab, calls, STORM_BOUND, || {
        let now = supervisors(lab);
        seen.extend(supervisor_ids(lab));
        samples += 1;
        if now.len() > max {
            max = now.len();
            worst = now;
        }
    });
    seen.extend(supervisor_ids(lab));
    eprintln!(
        "{what}: {} calls took {:.1}s; {samples} samples of the supervisors, at most {max}",
        calls.len(),
        started.elapsed().as_secs_f64()
    );
    (outs, max, worst)
}

/// The records as (netns -> record), asserting they all parse.
fn records_by_netns(lab: &Lab) -> BTreeMap<String, Value> {
    lab.attachment_records()
        .into_iter()
        .map(|r| {
            let netns = r["netns"]
                .as_str()
                .unwrap_or_else(|| panic!("record without netns: {r}"))
                .to_string();
            (netns, r)
        })
        .collect()
}

/// Every record is ready, in one infra (the running one), and the records
/// are exactly `attached` (netns -> address).
fn assert_records_match(lab: &Lab, attached: &BTreeMap<String, String>, when: &str) {
    let records = records_by_netns(lab);
    let recorded: BTreeSet<&String> = records.keys().collect();
    let expected: BTreeSet<&String> = attached.keys().collect();
    assert_eq!(recorded, expected, "{when}: records vs attached containers");
    let status = lab.status();
    let sandbox = status["infra"]["sandbox"]["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("{when}: no running infra: {status}"));
    for (netns, r) in &records {
        assert_eq!(r["state"], "ready", "{when}: record of {netns}: {r}");
        assert_eq!(
            r["infra"]["pid"].as_u64(),
            Some(sandbox),
            "{when}: record of {netns} names another infra than sandbox {sandbox}: {r}"
        );
        let ip = result_ipv4(&r["result"]);
        assert_eq!(
            ip.as_ref(),
            attached.get(netns),
            "{when}: recorded address of {netns}: {r}"
        );
    }
    let leases: BTreeSet<String> = lab.lease_files(NET).into_iter().collect();
    let addresses: BTreeSet<String> = attached.values().cloned().collect();
    assert_eq!(leases, addresses, "{when}: leases vs addresses handed out");
    let listed = status["attachments"].as_array().map_or(0, Vec::len);
    assert_eq!(listed, attached.len(), "{when}: status: {status}");
}

/// Collects the addresses of successful ADDs; every call must have
/// succeeded.
fn added(outs: &[lab::Out], containers: &[Container], when: &str) -> BTreeMap<String, String> {
    let mut failures = Vec::new();
    let mut by_netns = BTreeMap::new();
    for (out, c) in outs.iter().zip(containers) {
        let ip = out.json().as_ref().and_then(result_ipv4);
        match ip {
            Some(ip) if out.ok() => {
                by_netns.insert(c.netns(), ip);
            }
            _ => failures.push(format!("{out}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{when}: {} of {} ADDs failed:\n{}",
        failures.len(),
        outs.len(),
        failures.join("\n\n")
    );
    let distinct: BTreeSet<&String> = by_netns.values().collect();
    assert_eq!(
        distinct.len(),
        by_netns.len(),
        "{when}: addresses not all distinct: {by_netns:?}"
    );
    by_netns
}

/// 64 ADDs at once, then 64 DELs interleaved with 16 new ADDs, then the
/// last 16 DELs: every call succeeds, never more than one infra, distinct
/// addresses, records exactly what is attached, nothing left at the end.
#[test]
fn storm_of_adds_and_dels_shares_one_infra() {
    const FIRST: usize = 64;
    const SECOND: usize = 16;
    let Some(lab) = Lab::new(lab::binary!(), "storm") else {
        return;
    };
    let wall = Instant::now();
    // The first ADDs of a network run their chains one at a time, each
    // waiting its turn: 64 cold ADDs on a loaded machine may need more
    // than the default 30 s lock timeout. What is tested here is that
    // they all succeed, not how fast.
    let mut conf = example_conflist();
    outer(&mut conf).insert("lockTimeout".into(), STORM_BOUND.as_secs().into());
    lab.write_netconf(NET, &conf);
    let first: Vec<Container> = (0..FIRST).map(|_| lab.container()).collect();
    let second: Vec<Container> = (0..SECOND).map(|_| lab.container()).collect();
    let cnitool = |cmd: &str, c: &Container| Call::cnitool(&lab, cmd, NET, &c.netns());

    // Every supervisor seen, from the first ADD to the last DEL: one.
    let mut seen = BTreeSet::new();
    let one_infra = |seen: &BTreeSet<InfraId>, when: &str| {
        assert_eq!(
            seen.len(),
            1,
            "{when}: supervisors (pid, start time) seen so far: {seen:?}"
        );
    };

    // Phase 1: 64 ADDs at once.
    let calls: Vec<Call> = first.iter().map(|c| cnitool("add", c)).collect();
    let (outs, max, worst) = storm(&lab, "phase 1 (64 ADDs)", &calls, &mut seen);
    let attached = added(&outs, &first, "phase 1");
    assert!(
        max <= 1,
        "phase 1: {max} supervisors at once:\n{}",
        worst.join("\n")
    );
    assert_eq!(supervisors(&lab).len(), 1, "phase 1: one infra after");
    one_infra(&seen, "phase 1");
    assert_records_match(&lab, &attached, "after phase 1");
    for c in &first {
        assert_eq!(
            lab.ipv4(c, "eth0").as_ref(),
            attached.get(&c.netns()),
            "eth0 of {c:?}"
        );
    }

    // Phase 2: the 64 DELs and 16 new ADDs at once.
    let mut calls: Vec<Call> = Vec::new();
    for i in 0..FIRST {
        calls.push(cnitool("del", &first[i]));
        if i % (FIRST / SECOND) == 0 {
            calls.push(cnitool("add", &second[i / (FIRST / SECOND)]));
        }
    }
    let (outs, max, worst) = storm(&lab, "phase 2 (64 DELs + 16 ADDs)", &calls, &mut seen);
    let (mut add_outs, mut failures) = (Vec::new(), Vec::new());
    for (call, out) in calls.iter().zip(outs) {
        if call.argv[1] == "add" {
            add_outs.push(out);
        } else if !out.ok() {
            failures.push(format!("{out}"));
        }
    }
    assert!(
        failures.is_empty(),
        "phase 2: {} of {FIRST} DELs failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    let attached = added(&add_outs, &second, "phase 2");
    assert!(
        max <= 1,
        "phase 2: {max} supervisors at once:\n{}",
        worst.join("\n")
    );
    one_infra(&seen, "phase 2");
    assert_records_match(&lab, &attached, "after phase 2");
    for c in &first {
        assert_eq!(lab.links(c), vec!["lo"], "{c:?} kept interfaces after DEL");
    }
    for c in &second {
        assert_eq!(
            lab.ipv4(c, "eth0").as_ref(),
            attached.get(&c.netns()),
            "eth0 of {c:?}"
        );
    }

    // Phase 3: the last 16 DELs at once.
    let calls: Vec<Call> = second.iter().map(|c| cnitool("del", c)).collect();
    let (outs, max, worst) = storm(&lab, "phase 3 (16 DELs)", &calls, &mut seen);
    let failures: Vec<String> = outs
        .iter()
        .filter(|o| !o.ok())
        .map(|o| o.to_string())
        .collect();
    assert!(failures.is_empty(), "phase 3:\n{}", failures.join("\n\n"));
    assert!(
        max <= 1,
        "phase 3: {max} supervisors at once:\n{}",
        worst.join("\n")
    );
    one_infra(&seen, "phase 3");
    for c in &second {
        assert_eq!(lab.links(c), vec!["lo"], "{c:?} kept interfaces after DEL");
    }
    lab.assert_no_infra("after the storm");
    eprintln!("storm: wall time {:.1}s", wall.elapsed().as_secs_f64());
}

/// The state lock held by someone else (flock(1) as the lab user): an ADD
/// with `lockTimeout: 1` gives up with code 11 within seconds and changes
/// nothing; so does a DEL. Once the lock is free, ADD and DEL work.
#[test]
fn held_lock_gives_try_again_later() {
    let Some(lab) = Lab::new(lab::binary!(), "lock_timeout") else {
        return;
    };
    let mut conf = example_conflist();
    outer(&mut conf).insert("lockTimeout".into(), 1.into());
    let stdin = plugin_stdin(&conf).to_string();
    let c = lab.container();

    // The state dir as the plugin makes it (0700, the user's), and its lock
    // taken by flock(1) for long enough.
    let state = lab.state_dir();
    let out = lab.exec(
        &[],
        None,
        &["mkdir", "-m", "0700", &state.display().to_string()],
    );
    assert!(out.ok(), "mkdir state dir: {out}");
    let lock = state.join("rootless-cni-infra.lck").display().to_string();
    let ready = lab.dir.join("locked").display().to_string();
    // Held until the guard kills it (by its pid), however long the calls
    // take on a loaded machine and whether the test passes or not.
    let mut holder = lab::KillOnDrop::new(lab::spawn(
        &lab,
        &Call::argv(&[
            "flock",
            &lock,
            "sh",
            "-c",
            &format!("touch {ready}; exec sleep infinity"),
        ]),
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::path::Path::new(&ready).exists() {
        assert!(Instant::now() < deadline, "flock did not take {lock}");
        std::thread::sleep(Duration::from_millis(10));
    }

    for verb in ["ADD", "DEL", "CHECK"] {
        let env = lab.plugin_env(verb, "locked-out-1", &c.netns());
        let started = Instant::now();
        let out = lab.plugin(&env, &stdin);
        let took = started.elapsed();
        eprintln!("{verb} with the lock held: {took:?}");
        let err = out
            .cni_error()
            .unwrap_or_else(|| panic!("{verb}: no CNI error object: {out}"));
        assert!(!out.ok(), "{verb} succeeded with the lock held: {out}");
        assert_eq!(err.code, 11, "{verb} with the lock held: {out}");
        assert!(
            err.mentions("lock"),
            "{verb}: the message does not say what is busy: {out}"
        );
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(10),
            "{verb} with lockTimeout 1 took {took:?}: {out}"
        );
    }
    assert_eq!(lab.links(&c), vec!["lo"], "the container got something");
    assert_eq!(supervisors(&lab), Vec::<String>::new(), "an infra started");
    assert!(lab.attachment_files().is_empty(), "records were written");

    holder.kill();
    lab.assert_no_infra("after the lock was released");

    // Free again: the same config works.
    let env = lab.plugin_env("ADD", "locked-out-1", &c.netns());
    let out = lab.plugin(&env, &stdin);
    assert!(out.ok(), "ADD once the lock is free: {out}");
    let env = lab.plugin_env("DEL", "locked-out-1", &c.netns());
    let out = lab.plugin(&env, &stdin);
    assert!(out.ok(), "DEL once the lock is free: {out}");
    lab.assert_no_infra("after ADD and DEL");
}

/// An ADD racing the DEL of the last attachment never lands in an infra
/// being torn down: both succeed, the new container works in whatever infra
/// it got, and nothing is left at the end. Repeated, since the interleaving
/// differs each time.
#[test]
fn add_racing_the_last_del_lands_in_a_live_infra() {
    let Some(lab) = Lab::with_example_net(lab::binary!(), "race_last_del") else {
        return;
    };
    let netconf = lab.netconf_dir().display().to_string();
    let cni_path = lab.cni_path();
    let cnitool = lab.dir.join("tools/cnitool").display().to_string();
    let env = [("NETCONFPATH", netconf.as_str()), ("CNI_PATH", &cni_path)];
    let mut last = lab.container();
    lab.attach(&last);
    for round in 0..8 {
        let next = lab.container();
        let (del, del_what) = lab.command(&env, &[&cnitool, "del", NET, &last.netns()]);
        let (add, add_what) = lab.command(&env, &[&cnitool, "add", NET, &next.netns()]);
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let spawn = |cmd, what| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                lab::run_command(cmd, what, None, Duration::from_secs(60))
            })
        };
        let (del, add) = (spawn(del, del_what), spawn(add, add_what));
        let (del, add) = (
            del.join().expect("DEL thread"),
            add.join().expect("ADD thread"),
        );
        assert!(del.ok(), "round {round}: DEL of the last attachment: {del}");
        let ip = add.added_ipv4(&format!("round {round}: the racing ADD"));
        lab.assert_attached(&next, &ip);
        lab.assert_ping(&next, "10.89.0.1", &format!("round {round}: the gateway"));
        let status = lab.status();
        assert!(
            !status["infra"].is_null(),
            "round {round}: the ADD returned but no infra runs: {status}"
        );
        lab.kill_container(&last);
        last = next;
    }
    let del = lab.cnitool("del", NET, &last.netns());
    assert!(del.ok(), "final DEL: {del}");
    lab.assert_no_infra("after the races");
}

/// containerd sends `portMappings` on every call, an empty list for a pod
/// without ports. `i`'s mapping: none for even `i` when `mixed`, else one
/// Go-cased hostPort, as go-cni spells it.
fn containerd_cap_args(i: usize, mixed: bool) -> String {
    match mixed && i % 2 == 0 {
        true => r#"{"portMappings":[]}"#.to_string(),
        false => serde_json::json!({"portMappings": [
            {"HostPort": lab::free_tcp_port(), "ContainerPort": 80,
             "Protocol": "tcp", "HostIP": "127.0.0.1"}
        ]})
        .to_string(),
    }
}

/// Starts `pods` ADDs at once, pod i with `containerd_cap_args(i, mixed)`;
/// all must succeed.
fn add_pods_at_once(lab: &Lab, pods: &[Container], mixed: bool, what: &str) {
    let calls: Vec<Call> = pods
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut call = Call::cnitool(lab, "add", NET, &c.netns());
            call.env
                .push(("CAP_ARGS".into(), containerd_cap_args(i, mixed)));
            call
        })
        .collect();
    let (outs, _, _) = storm(lab, what, &calls, &mut BTreeSet::new());
    added(&outs, pods, what);
}

/// A first pod without ports must not make the network look warm for pods
/// with ports (portmap makes its chains check-then-create): sixteen pods
/// with ports started at once right after it all succeed.
#[test]
fn pods_with_ports_after_a_first_pod_without_all_succeed() {
    let Some(lab) = Lab::new(lab::binary!(), "first_pod_no_ports") else {
        return;
    };
    lab.write_netconf(NET, &example_conflist());
    let first = lab.container();
    let no_ports = [("CAP_ARGS", r#"{"portMappings":[]}"#)];
    lab.cnitool_env(&no_ports, "add", NET, &first.netns())
        .add_result("the first pod, without ports");
    let pods: Vec<Container> = (0..16).map(|_| lab.container()).collect();
    add_pods_at_once(
        &lab,
        &pods,
        false,
        "sixteen pods with ports after one without",
    );
    for c in pods.iter().chain([&first]) {
        lab.detach(c);
    }
    lab.assert_no_infra("after the last DEL");
}

/// Sixteen pods at once on a fresh infra, half of them with ports, the
/// rest with containerd's empty list: all succeed.
#[test]
fn sixteen_first_pods_at_once_all_succeed() {
    let Some(lab) = Lab::new(lab::binary!(), "first_pods_at_once") else {
        return;
    };
    lab.write_netconf(NET, &example_conflist());
    let pods: Vec<Container> = (0..16).map(|_| lab.container()).collect();
    add_pods_at_once(&lab, &pods, true, "sixteen first pods at once");
    for c in &pods {
        lab.detach(c);
    }
    lab.assert_no_infra("after the last DEL");
}
