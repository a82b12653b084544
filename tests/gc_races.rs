//! GC and DEL act only on what they were asked about: GC collects its
//! stale attachments without the lock, so the runtime may delete and re-add
//! one meanwhile, and a recorded netns path may name another container's
//! netns by the time it runs. Neither may touch the other container.

use lab::{example_conflist, outer, plugin_stdin, result_ipv4, Container, Lab, NET};
use lab::{install_plugin, spawn, write_as_user, Call};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A last inner plugin that passes the result on and, on DEL of container
/// `slow`, logs "DEL slow start" and waits until the test creates the gate
/// file beside it (a minute at most): it holds GC in the middle of its work
/// while the test acts, however slow a loaded machine makes the test.
const SLOWDEL: &str = r#"#!/usr/bin/python3
import json, os, sys, time
conf = json.load(sys.stdin)
if os.environ.get("CNI_COMMAND") == "ADD":
    print(json.dumps(conf.get("prevResult") or {"cniVersion": conf["cniVersion"]}))
elif os.environ.get("CNI_COMMAND") == "DEL" and os.environ.get("CNI_CONTAINERID") == "slow":
    with open(sys.argv[0] + ".log", "a") as log:
        log.write("DEL slow start\n")
    deadline = time.monotonic() + 60
    while not os.path.exists(sys.argv[0] + ".go") and time.monotonic() < deadline:
        time.sleep(0.02)
"#;

fn gc_conf(valid: Value) -> Value {
    let mut gc = plugin_stdin(&example_conflist());
    gc["cniVersion"] = json!("1.1.0");
    gc["cni.dev/valid-attachments"] = valid;
    gc
}

fn gc_call(lab: &Lab, valid: Value) -> Call {
    let env = vec![
        ("CNI_COMMAND".to_string(), "GC".to_string()),
        ("CNI_PATH".to_string(), lab.cni_path()),
    ];
    Call::plugin(lab, &env, &gc_conf(valid).to_string())
}

fn plugin_call(lab: &Lab, conf: &Value, verb: &str, id: &str, netns: &str) -> lab::Out {
    lab.plugin(&lab.plugin_env(verb, id, netns), &conf.to_string())
}

/// The record of container `id`, if any.
fn record_of(lab: &Lab, id: &str) -> Option<Value> {
    lab.attachment_records()
        .into_iter()
        .find(|r| r["containerId"] == id)
}

/// GC started with k stale; while it is busy with another attachment, the
/// runtime deletes k and adds it again in a new netns. GC must leave the
/// new k alone: its record, its address and lease, its infra.
#[test]
fn gc_leaves_an_attachment_re_added_while_it_ran() {
    let Some(lab) = Lab::new(lab::binary!(), "gc_readd") else {
        return;
    };
    install_plugin(&lab, "slowdel", SLOWDEL);
    write_as_user(&lab, &lab.bin().join("slowdel.log"), b"");
    let mut conflist = example_conflist();
    outer(&mut conflist)["delegate"]["plugins"]
        .as_array_mut()
        .expect("the example's inner plugins")
        .push(json!({"type": "slowdel"}));
    let conf = plugin_stdin(&conflist);

    let (slow, k1, k2) = (lab.container(), lab.container(), lab.container());
    let add = |id: &str, c: &Container| {
        plugin_call(&lab, &conf, "ADD", id, &c.netns()).add_result(&format!("ADD {id}"))
    };
    add("slow", &slow);
    // GC takes the stale attachments oldest first: slow, then k.
    std::thread::sleep(Duration::from_millis(1100));
    add("k", &k1);

    let mut gc = spawn(&lab, &gc_call(&lab, json!([])));
    let log = lab.bin().join("slowdel.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("DEL slow start")
    {
        assert!(Instant::now() < deadline, "GC never reached slow's DEL");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The runtime restarts k meanwhile.
    let out = plugin_call(&lab, &conf, "DEL", "k", &k1.netns());
    assert!(out.ok(), "DEL k: {out}");
    let readded = add("k", &k2);
    let ip = result_ipv4(&readded).expect("an IPv4 address for the new k");
    // Else GC went on to k after the re-add was done, and nothing raced.
    assert!(
        !gc.exited(),
        "GC ended before the re-add of k: the race was not exercised"
    );
    write_as_user(&lab, &lab.bin().join("slowdel.go"), b"");

    let out = gc.wait(Duration::from_secs(60));
    assert!(out.ok(), "GC: {out}");
    let rec = record_of(&lab, "k").unwrap_or_else(|| panic!("GC removed the new k's record"));
    assert_eq!(rec["netns"], json!(k2.netns()), "k's record: {rec}");
    assert_eq!(lab.lease_files(NET), vec![ip.clone()], "leases after GC");
    assert_eq!(
        lab.ipv4(&k2, "eth0").as_deref(),
        Some(ip.as_str()),
        "the new k's eth0"
    );
    let check = plugin_call(&lab, &conf, "CHECK", "k", &k2.netns());
    assert!(check.ok(), "CHECK of the new k after GC: {check}");
    assert!(record_of(&lab, "slow").is_none(), "GC kept the stale slow");

    let out = plugin_call(&lab, &conf, "DEL", "k", &k2.netns());
    assert!(out.ok(), "DEL k: {out}");
    lab.assert_no_infra("after the last DEL");
}

/// Container a was attached through a path that now names container b's
/// netns (a reused `/proc/PID/ns/net`, or a bind mount moved). The inner
/// DEL of a, by GC or by the runtime's DEL, must not remove b's eth0.
fn stranger_netns_is_left_alone(name: &str, verb: &str) {
    let Some(lab) = Lab::new(lab::binary!(), name) else {
        return;
    };
    let conf = plugin_stdin(&example_conflist());
    let (a, b) = (lab.container(), lab.container());
    let path = lab.dir.join("netns-of-a");
    write_as_user(&lab, &path, b"");
    let p = path.display().to_string();
    let mount = |src: &str| {
        let out = lab.exec(&[], None, &["mount", "--bind", src, &p]);
        assert!(out.ok(), "bind {src} on {p}: {out}");
    };
    let umount = || {
        let out = lab.exec(&[], None, &["umount", &p]);
        assert!(out.ok(), "umount {p}: {out}");
    };
    mount(&a.netns());
    plugin_call(&lab, &conf, "ADD", "a", &p).add_result("ADD a");
    let b_ip = result_ipv4(&plugin_call(&lab, &conf, "ADD", "b", &b.netns()).add_result("ADD b"))
        .expect("b's IPv4");
    umount();
    mount(&b.netns());

    let out = match verb {
        "GC" => lab::run(
            &lab,
            &gc_call(&lab, json!([{"containerID": "b", "ifname": "eth0"}])),
            Duration::from_secs(60),
        ),
        _ => plugin_call(&lab, &conf, "DEL", "a", &p),
    };
    assert!(out.ok(), "{verb} of a: {out}");
    assert!(record_of(&lab, "a").is_none(), "{verb} kept a's record");
    assert_eq!(
        lab.ipv4(&b, "eth0").as_deref(),
        Some(b_ip.as_str()),
        "{verb} of a took b's eth0: {out}"
    );
    umount();
    let out = plugin_call(&lab, &conf, "DEL", "b", &b.netns());
    assert!(out.ok(), "DEL b: {out}");
    lab.assert_no_infra("after the last DEL");
}

#[test]
fn gc_never_deletes_in_a_strangers_netns() {
    stranger_netns_is_left_alone("gc_stranger", "GC");
}

#[test]
fn del_never_deletes_in_a_strangers_netns() {
    stranger_netns_is_left_alone("del_stranger", "DEL");
}
