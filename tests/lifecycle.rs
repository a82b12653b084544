//! The infra's life: kept warm by idleTimeout, stopped by hand, shared by
//! parallel ADDs, reported by `status`, and gone with its supervisor.

use lab::{example_conflist, outer, Container, Lab, GATEWAY, NET};
use serde_json::Value;
use std::collections::BTreeSet;
use std::thread;
use std::time::{Duration, Instant};

/// A pid out of `status --json` (`infra.<which>.pid`).
fn infra_pid(status: &Value, which: &str) -> u32 {
    status["infra"][which]["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no infra.{which}.pid in status: {status}")) as u32
}

/// Polls `status --json` until it says no infra, for at most `bound`.
/// Returns how long that took.
fn wait_infra_gone(lab: &Lab, bound: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let status = lab.status();
        if status["infra"].is_null() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < bound,
            "infra still running {}s later: {status}",
            bound.as_secs()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the container has nothing but `lo` (its veth goes when the
/// infra's netns goes).
fn wait_only_lo(lab: &Lab, c: &Container, bound: Duration) {
    let deadline = Instant::now() + bound;
    while lab.links(c) != vec!["lo"] {
        assert!(
            Instant::now() < deadline,
            "{c:?} still has {:?} {}s later",
            lab.links(c),
            bound.as_secs()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// a. With `idleTimeout` the last DEL leaves the infra running; it stops by
/// itself once idle for that long, and not before. A machine that stalls
/// for longer than the timeout between the DEL and the look at `status`
/// cannot tell a kept infra from one that stopped in time: such a round
/// does not count, and is done again (at most three times).
#[test]
fn idle_timeout_keeps_the_infra_warm_then_stops_it() {
    const IDLE: u64 = 4;
    let Some(lab) = Lab::new(lab::binary!(), "idle_timeout") else {
        return;
    };
    let mut conf = example_conflist();
    outer(&mut conf).insert("idleTimeout".into(), IDLE.into());
    lab.write_netconf(NET, &conf);
    let c = lab.container();
    let idle = Duration::from_secs(IDLE);

    let mut rounds = 0;
    let (del_started, supervisor) = loop {
        rounds += 1;
        lab.attach(&c);
        let status = lab.status();
        assert_eq!(
            status["infra"]["idleTimeoutSeconds"], IDLE,
            "idle timeout of the running infra: {status}"
        );
        let del_started = Instant::now();
        lab.detach(&c);
        let del_ended = Instant::now();
        let status = lab.status();
        if status["infra"].is_object() {
            assert_eq!(
                status["attachments"],
                serde_json::json!([]),
                "attachments after the DEL: {status}"
            );
            break (del_started, infra_pid(&status, "supervisor"));
        }
        // Stopped: wrong unless the machine stalled past the timeout.
        assert!(
            del_ended.elapsed() >= idle,
            "the infra stopped at the last DEL despite idleTimeout {IDLE}: {status}"
        );
        assert!(
            rounds < 3,
            "the machine stalled past {IDLE}s {rounds} times"
        );
        eprintln!("round {rounds}: stalled past the idle timeout; again");
    };
    assert!(lab.is_running(supervisor), "supervisor {supervisor} gone");

    wait_infra_gone(&lab, idle + Duration::from_secs(30));
    let took = del_started.elapsed();
    eprintln!("idle infra stopped {took:?} after the last DEL began (idleTimeout {IDLE}s)");
    assert!(
        took >= idle,
        "the infra stopped {took:?} after the last DEL, before its idle timeout"
    );
    lab.assert_no_infra("after the idle timeout");
}

/// b. `stop` refuses while an attachment exists; `stop --force` stops the
/// infra, and the attachment is then reported lost until DEL.
#[test]
fn stop_refuses_with_attachments_and_force_stops() {
    let Some(lab) = Lab::with_example_net(lab::binary!(), "stop_force") else {
        return;
    };
    let c = lab.container();
    lab.attach(&c);

    let stop = lab.cli(&["stop"]);
    assert!(
        !stop.ok() && stop.status.is_some(),
        "stop with an attachment did not refuse: {stop}"
    );
    assert!(
        stop.stderr.contains("1 attachment") || stop.stderr.contains("DEL"),
        "stop's refusal names neither the attachment count nor DEL: {stop}"
    );
    let status = lab.status();
    assert!(
        status["infra"].is_object(),
        "the infra stopped although stop refused: {status}"
    );
    let check = lab.cnitool("check", NET, &c.netns());
    assert!(check.ok(), "CHECK after the refused stop: {check}");

    let stop = lab.cli(&["stop", "--force"]);
    assert!(stop.ok(), "stop --force: {stop}");
    let status = lab.status();
    assert!(
        status["infra"].is_null(),
        "infra after stop --force: {status}"
    );
    assert_eq!(
        status["attachments"][0]["state"], "lost",
        "the attachment after stop --force: {status}"
    );
    let left = lab.leftovers_after(Duration::from_secs(3));
    assert!(
        left.is_empty(),
        "processes left after stop --force:\n{}",
        left.join("\n")
    );

    let check = lab.cnitool("check", NET, &c.netns());
    assert!(!check.ok(), "CHECK after stop --force succeeded: {check}");
    assert!(
        check.stderr.contains("lost"),
        "CHECK does not say the attachment was lost: {check}"
    );
    lab.detach(&c);
    wait_only_lo(&lab, &c, Duration::from_secs(5));
    lab.assert_no_infra("after DEL of the lost attachment");
}

/// c. Eight ADDs at once share one infra; eight DELs at once stop it.
#[test]
fn parallel_adds_share_one_infra() {
    const N: usize = 8;
    let Some(lab) = Lab::with_example_net(lab::binary!(), "parallel") else {
        return;
    };
    let containers: Vec<Container> = (0..N).map(|_| lab.container()).collect();
    let netns: Vec<String> = containers.iter().map(Container::netns).collect();

    let started = Instant::now();
    let adds = lab.cnitool_parallel("add", NET, &netns);
    eprintln!("{N} parallel ADDs took {:?}", started.elapsed());
    let mut ips = Vec::new();
    for (add, c) in adds.iter().zip(&containers) {
        let ip = add.added_ipv4(&format!("parallel ADD {}", c.netns()));
        lab.assert_attached(c, &ip);
        ips.push(ip);
    }
    let distinct: BTreeSet<&String> = ips.iter().collect();
    assert_eq!(distinct.len(), N, "addresses not all distinct: {ips:?}");

    // Exactly one infra, and every attachment lives in it.
    let supervisors = lab::supervisors(&lab);
    assert_eq!(
        supervisors.len(),
        1,
        "supervisors running:\n{}",
        supervisors.join("\n")
    );
    let status = lab.status();
    let sandbox = infra_pid(&status, "sandbox");
    let supervisor = infra_pid(&status, "supervisor");
    assert!(
        supervisors[0].starts_with(&format!("pid {supervisor} ")),
        "status names supervisor {supervisor}, running: {supervisors:?}"
    );
    let attachments = status["attachments"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(attachments.len(), N, "status: {status}");
    assert!(
        attachments.iter().all(|a| a["state"] == "ready"),
        "not all attachments ready in the running infra: {status}"
    );
    let records = lab.attachment_records();
    assert_eq!(records.len(), N, "attachment records");
    for r in &records {
        assert_eq!(
            r["infra"]["pid"].as_u64(),
            Some(u64::from(sandbox)),
            "a record of another infra (sandbox is {sandbox}): {r}"
        );
    }
    assert_eq!(lab.lease_files(NET).len(), N, "leases");
    // (Not to its own address: a container's `lo` is down.)
    lab.assert_ping(
        &containers[0],
        &ips[N - 1],
        "first container -> last container",
    );

    let started = Instant::now();
    let dels = lab.cnitool_parallel("del", NET, &netns);
    eprintln!("{N} parallel DELs took {:?}", started.elapsed());
    for (del, c) in dels.iter().zip(&containers) {
        assert!(del.ok(), "parallel DEL {}: {del}", c.netns());
    }
    for c in &containers {
        assert_eq!(lab.links(c), vec!["lo"], "{c:?} kept interfaces");
    }
    lab.assert_no_infra("after the parallel DELs");
}

/// d. `status` for people lists each attachment's container id (its first
/// 20 characters) and address.
#[test]
fn status_lists_attachments_for_people() {
    let Some(lab) = Lab::with_example_net(lab::binary!(), "status_human") else {
        return;
    };
    let c = lab.container();
    let ip = lab.attach(&c);
    let json = lab.status();
    let id = json["attachments"][0]["containerId"]
        .as_str()
        .unwrap_or_else(|| panic!("no attachment in status --json: {json}"))
        .to_string();
    let prefix: String = id.chars().take(20).collect();

    let out = lab.cli(&["status"]);
    assert!(out.ok(), "status: {out}");
    assert!(
        out.stdout.contains("infra:") && out.stdout.contains("running"),
        "status does not say the infra runs: {out}"
    );
    assert!(
        out.stdout.contains("attachments: 1"),
        "status does not count one attachment: {out}"
    );
    let row = out
        .stdout
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no row for container {prefix}: {out}"));
    assert!(
        row.split([' ', ',', '/']).any(|w| w == ip),
        "the row of {prefix} lacks {ip}: {row:?}\n{out}"
    );
    assert!(row.contains("eth0") && row.contains(NET), "row: {row:?}");

    lab.detach(&c);
    let out = lab.cli(&["status"]);
    assert!(out.ok(), "status after DEL: {out}");
    assert!(
        out.stdout.contains("not running") && out.stdout.contains("attachments: 0"),
        "status after the last DEL: {out}"
    );
    lab.assert_no_infra("after DEL");
}

/// d. `status --json` before anything ever ran: no state dir, no infra, no
/// attachment, and status does not create the state dir.
#[test]
fn status_json_with_no_state_dir() {
    let Some(lab) = Lab::new(lab::binary!(), "status_empty") else {
        return;
    };
    assert!(
        !lab.state_dir().exists(),
        "{} exists before anything ran",
        lab.state_dir().display()
    );
    let status = lab.status();
    assert!(status["infra"].is_null(), "infra: {status}");
    assert_eq!(
        status["attachments"],
        serde_json::json!([]),
        "attachments: {status}"
    );
    assert!(
        !lab.state_dir().exists(),
        "status created {}",
        lab.state_dir().display()
    );
}

/// e. SIGKILL of the supervisor takes the sandbox and slirp4netns with it
/// (PDEATHSIG); the attachment is lost, DEL forgets it, the next ADD starts
/// a fresh infra.
#[test]
fn killed_supervisor_takes_the_infra_with_it() {
    let Some(lab) = Lab::with_example_net(lab::binary!(), "killed_supervisor") else {
        return;
    };
    let c = lab.container();
    lab.attach(&c);
    let status = lab.status();
    let (supervisor, sandbox, slirp) = (
        infra_pid(&status, "supervisor"),
        infra_pid(&status, "sandbox"),
        infra_pid(&status, "slirp4netns"),
    );
    for pid in [supervisor, sandbox, slirp] {
        assert!(
            lab.is_running(pid),
            "{} not running before the kill: {status}",
            Lab::describe(pid)
        );
    }

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(supervisor as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap_or_else(|e| panic!("killing supervisor {supervisor}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let alive: Vec<String> = [supervisor, sandbox, slirp]
            .into_iter()
            .filter(|&p| lab.is_running(p))
            .map(Lab::describe)
            .collect();
        if alive.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still running 5 s after SIGKILL of supervisor {supervisor}:\n{}",
            alive.join("\n")
        );
        thread::sleep(Duration::from_millis(20));
    }

    let check = lab.cnitool("check", NET, &c.netns());
    assert!(!check.ok(), "CHECK after the supervisor died: {check}");
    assert!(
        check.stderr.contains("lost"),
        "CHECK does not say the attachment was lost: {check}"
    );
    lab.detach(&c);
    wait_only_lo(&lab, &c, Duration::from_secs(5));
    lab.assert_no_infra("after DEL of the lost attachment");

    // A new ADD works, in a new infra.
    let ip = lab.attach(&c);
    assert_eq!(lab.ipv4(&c, "eth0").as_deref(), Some(ip.as_str()));
    lab.assert_ping(&c, GATEWAY, "container -> gateway on the new infra");
    let fresh = infra_pid(&lab.status(), "supervisor");
    assert_ne!(fresh, supervisor, "the killed supervisor is still recorded");
    lab.detach(&c);
    lab.assert_no_infra("after the last DEL");
}
