//! The command line for people (doctor, exec, gc, ls, status) does what it
//! says, and callers outside the session's user namespace are served.
//!
//! - `doctor --json` in the session: every check passes but subuid/subgid
//!   (the lab's throwaway uid has no range), which says how to fix it.
//! - `exec -- CMD` runs in the infra; without an infra it fails clearly.
//! - `gc` forgets what is gone (a killed container, or everything not
//!   `--valid`), running the inner DEL, and stops an empty infra.
//! - `ls` is `status`; `status --json` lists published ports.
//! - Join: the lab uid outside the session (setpriv only) adds and deletes
//!   a container whose netns the session owns; a netns of another uid's
//!   user namespace is refused with code 4 (CNI_NETNS).

use lab::{
    example_conflist, free_tcp_port, plugin_stdin, run_command, Container, Lab, GATEWAY, NET,
};
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

/// ADD through cnitool; the container id cnitool made up for it (from
/// status: the one attachment not in `known`).
fn cnitool_add(lab: &Lab, c: &Container, known: &[String]) -> String {
    let add = lab.cnitool("add", NET, &c.netns());
    assert!(add.ok(), "ADD {}: {add}", c.netns());
    container_ids(lab)
        .into_iter()
        .find(|id| !known.contains(id))
        .unwrap_or_else(|| panic!("no new attachment in status after ADD: {}", lab.status()))
}

/// The container ids in `status --json`.
fn container_ids(lab: &Lab) -> Vec<String> {
    lab.status()["attachments"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x["containerId"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// `gc ARGS --json`: the container ids it says it removed.
fn gc(lab: &Lab, args: &[&str]) -> Vec<String> {
    let mut argv = vec!["gc"];
    argv.extend_from_slice(args);
    argv.push("--json");
    let out = lab.cli(&argv);
    assert!(out.ok(), "gc: {out}");
    let v = out
        .json()
        .unwrap_or_else(|| panic!("gc --json is not JSON: {out}"));
    let mut ids: Vec<String> = v["removed"]
        .as_array()
        .unwrap_or_else(|| panic!("gc --json has no \"removed\" list: {out}"))
        .iter()
        .map(|r| {
            assert_eq!(r["network"], NET, "{out}");
            assert_eq!(r["ifname"], "eth0", "{out}");
            r["containerId"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    ids.sort();
    ids
}

/// `status` text with the uptime ("running for Ns") blanked out.
fn without_uptime(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("running for ") {
        let (head, tail) = rest.split_at(i + "running for ".len());
        out.push_str(head);
        rest = tail.trim_start_matches(|c: char| c.is_ascii_digit());
        out.push('N');
    }
    out.push_str(rest);
    out
}

#[test]
fn doctor_in_the_session() {
    let Some(lab) = Lab::new(lab::binary!(), "cli_doctor") else {
        return;
    };
    let out = lab.cli(&["doctor", "--json"]);
    let report = out
        .json()
        .unwrap_or_else(|| panic!("doctor --json is not JSON: {out}"));
    let checks = report["checks"]
        .as_array()
        .unwrap_or_else(|| panic!("no checks: {out}"));
    assert!(checks.len() >= 5, "too few checks: {out}");
    for c in checks {
        let name = c["check"].as_str().unwrap_or_default();
        if name.contains("subuid") {
            assert_eq!(c["ok"], false, "the lab uid has no subuid range: {c}");
            let fix = c["fix"].as_str().unwrap_or_default();
            assert!(!fix.is_empty(), "no fix for {name}: {c}");
            assert!(
                fix.contains("subuid") || fix.contains("usermod"),
                "the fix does not say how: {c}"
            );
            let detail = c["detail"].as_str().unwrap_or_default();
            assert!(
                detail.contains(&lab.uid.to_string()),
                "the detail does not name uid {}: {c}",
                lab.uid
            );
        } else {
            assert_eq!(c["ok"], true, "check {name} failed in the session: {c}");
        }
    }
    assert_eq!(report["failed"], 1, "{out}");
    assert_eq!(
        out.status,
        Some(1),
        "doctor exits 1 when a check fails: {out}"
    );
}

#[test]
fn exec_runs_inside_the_infra() {
    let Some(lab) = Lab::with_example_net(lab::binary!(), "cli_exec") else {
        return;
    };
    let c = lab.container();
    let add = lab.cnitool("add", NET, &c.netns());
    assert!(add.ok(), "ADD: {add}");

    let out = lab.cli(&["exec", "--", "ip", "-br", "addr"]);
    assert!(out.ok(), "exec: {out}");
    for ifname in ["rcni0", "tap0"] {
        assert!(
            out.stdout.lines().any(|l| l.starts_with(ifname)),
            "{ifname} not in the infra: {out}"
        );
    }
    let out = lab.cli(&["exec", "--", "sh", "-c", "exit 3"]);
    assert_eq!(out.status, Some(3), "exec passes the exit code on: {out}");

    lab.detach(&c);
    lab.assert_no_infra("after DEL");

    let out = lab.cli(&["exec", "--", "ip", "-br", "addr"]);
    assert!(!out.ok(), "exec without an infra succeeded: {out}");
    assert!(
        out.stderr.contains("no infra is running"),
        "exec without an infra does not say so: {out}"
    );
    assert!(out.stdout.trim().is_empty(), "{out}");
}

#[test]
fn gc_forgets_killed_containers_and_stops_the_infra() {
    let Some(lab) = Lab::with_example_net(lab::binary!(), "cli_gc_killed") else {
        return;
    };
    let (c1, c2) = (lab.container(), lab.container());
    let id1 = cnitool_add(&lab, &c1, &[]);
    let id2 = cnitool_add(&lab, &c2, std::slice::from_ref(&id1));
    assert_eq!(lab.lease_files(NET).len(), 2);

    assert_eq!(gc(&lab, &[]), Vec::<String>::new(), "gc with nothing gone");
    assert_eq!(lab.attachment_files().len(), 2);

    lab.kill_container(&c2);
    assert_eq!(
        gc(&lab, &[]),
        std::slice::from_ref(&id2),
        "gc after killing c2"
    );
    assert_eq!(
        container_ids(&lab),
        std::slice::from_ref(&id1),
        "attachments after gc"
    );
    assert_eq!(lab.lease_files(NET).len(), 1, "c2's lease is still held");
    assert!(lab.status()["infra"].is_object(), "the infra stopped early");
    lab.assert_ping(&c1, GATEWAY, "c1 lost its network");

    lab.kill_container(&c1);
    assert_eq!(gc(&lab, &[]), [id1], "gc after killing c1");
    assert_eq!(lab.lease_files(NET), Vec::<String>::new(), "leases");
    lab.assert_no_infra("after the last gc");
}

#[test]
fn gc_valid_keeps_only_the_listed_attachment() {
    let Some(lab) = Lab::with_example_net(lab::binary!(), "cli_gc_valid") else {
        return;
    };
    let (c1, c2) = (lab.container(), lab.container());
    let id1 = cnitool_add(&lab, &c1, &[]);
    let id2 = cnitool_add(&lab, &c2, std::slice::from_ref(&id1));

    let valid = format!("{id1}/eth0");
    assert_eq!(gc(&lab, &["--valid", &valid]), [id2], "gc --valid {valid}");
    assert_eq!(container_ids(&lab), [id1], "attachments after gc");
    assert!(
        !lab.links(&c2).contains(&"eth0".to_string()),
        "c2's eth0 survived gc"
    );
    lab.assert_ping(&c1, GATEWAY, "the kept attachment lost its network");

    lab.detach(&c1);
    lab.assert_no_infra("after DEL");
}

/// A runtime that unmounts a netns bind mount but leaves the file (what
/// podman's cleanup can leave in /run/netns): the netns is gone, the path
/// is a plain file. gc must forget the attachment all the same.
#[test]
fn gc_forgets_an_attachment_whose_netns_file_is_no_longer_a_netns() {
    let Some(lab) = Lab::new(lab::binary!(), "cli_gc_plain_file") else {
        return;
    };
    let c = lab.container();
    let file = lab.dir.join("netns-file");
    lab.write_file("netns-file", "");
    let path = file.display().to_string();
    let bind = lab.exec(&[], None, &["mount", "--bind", &c.netns(), &path]);
    assert!(bind.ok(), "binding the container netns on {path}: {bind}");

    let conf = plugin_stdin(&example_conflist()).to_string();
    let add = lab.plugin(&lab.plugin_env("ADD", "bound", &path), &conf);
    assert!(add.ok(), "ADD on {path}: {add}");

    let umount = lab.exec(&[], None, &["umount", &path]);
    assert!(umount.ok(), "umount {path}: {umount}");
    lab.kill_container(&c);

    let out = lab.cli(&["gc", "--json"]);
    assert!(out.ok(), "gc after the netns went away: {out}");
    lab.assert_no_infra("after gc");
}

#[test]
fn ls_is_status_and_status_lists_ports() {
    let Some(lab) = Lab::with_example_net(lab::binary!(), "cli_ls") else {
        return;
    };
    let c = lab.container();
    let port = free_tcp_port();
    let cap_args = format!(
        r#"{{"portMappings":[{{"hostPort":{port},"containerPort":80,"protocol":"tcp","hostIP":"127.0.0.1"}}]}}"#
    );
    let add = lab.cnitool_env(&[("CAP_ARGS", &cap_args)], "add", NET, &c.netns());
    assert!(add.ok(), "ADD with a port: {add}");

    for json in [false, true] {
        let flag: &[&str] = if json { &["--json"] } else { &[] };
        let status = lab.cli(&[&["status"], flag].concat());
        let ls = lab.cli(&[&["ls"], flag].concat());
        assert!(status.ok() && ls.ok(), "{status}\n{ls}");
        if json {
            let mut a = status.json().expect("status --json");
            let mut b = ls.json().expect("ls --json");
            for v in [&mut a, &mut b] {
                v["infra"]["uptimeSeconds"] = Value::Null;
            }
            assert_eq!(a, b, "ls --json differs from status --json");
        } else {
            assert_eq!(
                without_uptime(&status.stdout),
                without_uptime(&ls.stdout),
                "ls differs from status"
            );
            assert!(
                status.stdout.contains(&port.to_string()),
                "status does not show port {port}: {status}"
            );
        }
    }

    let status = lab.status();
    let ports: Vec<String> = status["attachments"][0]["ports"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(ports.len(), 1, "ports in status --json: {status}");
    assert!(
        ports[0].contains(&format!("127.0.0.1:{port}")) && ports[0].contains("80"),
        "the published port is not described: {ports:?}"
    );

    let del = lab.cnitool_env(&[("CAP_ARGS", &cap_args)], "del", NET, &c.netns());
    assert!(del.ok(), "DEL: {del}");
    lab.assert_no_infra("after DEL");
}

/// The plugin environment as pairs of &str.
fn env_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

#[test]
fn a_caller_outside_the_session_joins_it() {
    let Some(lab) = Lab::new(lab::binary!(), "cli_join") else {
        return;
    };
    let conflist = example_conflist();
    lab.write_netconf(NET, &conflist);
    let (c1, c2) = (lab.container(), lab.container());
    // The infra starts inside the session.
    cnitool_add(&lab, &c1, &[]);
    let ip1 = lab.ipv4(&c1, "eth0").expect("c1's address");

    // The same uid, outside: no nsenter, the initial user namespace.
    let bin = lab.bin().join("rootless-cni").display().to_string();
    let conf = plugin_stdin(&conflist).to_string();
    let env = lab.plugin_env("ADD", "outside", &c2.netns());
    let add = lab.exec_outside(&env_refs(&env), Some(conf.as_bytes()), &[&bin]);
    let ip2 = add.added_ipv4("ADD from outside the session");
    assert_eq!(lab.ipv4(&c2, "eth0").as_deref(), Some(ip2.as_str()));
    lab.assert_ping(&c1, &ip2, "inside -> outside-added container");
    lab.assert_ping(&c2, &ip1, "outside-added container -> inside");
    assert_eq!(lab.attachment_files().len(), 2, "attachment records");

    let env = lab.plugin_env("DEL", "outside", &c2.netns());
    let del = lab.exec_outside(&env_refs(&env), Some(conf.as_bytes()), &[&bin]);
    assert!(del.ok(), "DEL from outside the session: {del}");
    assert_eq!(lab.attachment_files().len(), 1, "attachment records");
    assert!(
        !lab.links(&c2).contains(&"eth0".to_string()),
        "eth0 survived the DEL from outside"
    );

    let del = lab.cnitool("del", NET, &c1.netns());
    assert!(del.ok(), "DEL inside: {del}");
    lab.assert_no_infra("after both DELs");
}

/// Root's `mount`/`umount` in the session's mount namespace.
fn in_session_mount_ns(lab: &Lab, argv: &[&str]) {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--target={}", lab.holder))
        .args(["--mount", "--"])
        .args(argv)
        // Real root's mount(8) would make /run/mount on the machine.
        .env("LIBMOUNT_UTAB", lab::utab());
    let out = run_command(cmd, argv.join(" "), None, Duration::from_secs(10));
    assert!(out.ok(), "{out}");
}

#[test]
fn a_netns_of_another_uids_user_namespace_is_refused() {
    let Some(lab) = Lab::new(lab::binary!(), "cli_foreign") else {
        return;
    };
    let Some(other) = Lab::new(lab::binary!(), "cli_foreign_other") else {
        return;
    };
    let foreign = other.container();
    // The other uid's netns, visible in our session as a file (the lab user
    // could not open the other uid's /proc/PID/ns/net).
    lab.write_file("foreign-netns", "");
    let file = lab.dir.join("foreign-netns").display().to_string();
    in_session_mount_ns(&lab, &["mount", "--bind", &foreign.netns(), &file]);

    let conf = plugin_stdin(&example_conflist()).to_string();
    let add = lab.plugin(&lab.plugin_env("ADD", "foreign", &file), &conf);
    in_session_mount_ns(&lab, &["umount", &file]);

    let err = add
        .cni_error()
        .unwrap_or_else(|| panic!("no CNI error object: {add}"));
    assert_eq!(err.code, 4, "{add}");
    assert!(
        err.mentions("CNI_NETNS"),
        "the message does not name CNI_NETNS: {add}"
    );
    // The owner is outside our user namespace's scope: NS_GET_USERNS
    // itself is refused there, so the error can name the netns, not its
    // owner.
    assert!(
        err.mentions(&file),
        "the error does not name the netns {file}: {add}"
    );
    assert_eq!(
        other.links(&foreign),
        ["lo"],
        "the foreign netns was touched"
    );
    lab.assert_no_infra("after the refused ADD");
    let left = other.leftovers_after(Duration::from_secs(1));
    assert!(left.is_empty(), "the other uid has processes: {left:?}");
}
