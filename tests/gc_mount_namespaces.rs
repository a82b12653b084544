//! `rootless-cni gc` forgets an attachment only when its netns is gone,
//! not when the recorded netns path is not a namespace from where gc runs.
//!
//! Rootless podman's netns files are bind mounts inside its own mount
//! namespace; from the user's shell they are empty files. The lab makes the
//! same: a process with a private mount namespace (in the session's user
//! namespace) binds a new netns on `$XDG_RUNTIME_DIR/netns/c1` and the ADD
//! of that path runs from inside it. `gc` from the session and from outside
//! the user namespace keeps it and says why; `gc` from the private mount
//! namespace keeps it (the netns is there); once the bind mount is gone
//! (the netns with it), `gc` from the session removes it. Another
//! container, attached from the session, is never touched.

use lab::{run_command, Lab, Out, NET};
use serde_json::Value;
use std::process::Child;
use std::thread;
use std::time::{Duration, Instant};

/// A process holding a private mount namespace; killed (by pid) on drop,
/// which takes its mounts with it.
struct PrivateMounts {
    child: Child,
}

impl Drop for PrivateMounts {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the holder: a private mount namespace in the session in which
/// `netns_file` is a bind mount of a new netns (no process in it).
fn private_mounts(lab: &Lab, netns_file: &str) -> PrivateMounts {
    let ready = lab.xdg_runtime_dir().join("private-ready");
    let script = format!(
        "set -e
         mkdir -p \"$(dirname '{netns_file}')\"
         touch '{netns_file}'
         unshare --net mount --bind /proc/self/ns/net '{netns_file}'
         touch '{}'
         exec sleep infinity",
        ready.display()
    );
    let child = lab
        .session_daemon(&["unshare", "--mount", "--propagation", "private"])
        .args(["sh", "-c", &script])
        .spawn()
        .unwrap_or_else(|e| panic!("starting the private mount namespace: {e}"));
    let holder = PrivateMounts { child };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lab.run_dir().join("private-ready").exists() {
        assert!(
            Instant::now() < deadline,
            "the private mount namespace did not come up"
        );
        thread::sleep(Duration::from_millis(10));
    }
    holder
}

/// Runs `argv` as the lab user inside the holder's mount namespace, with
/// the lab's NETCONFPATH and CNI_PATH.
fn in_private(lab: &Lab, holder: &PrivateMounts, argv: &[&str]) -> Out {
    run_command(
        lab.command_in_mounts_of(holder.child.id(), argv),
        format!("[private mounts] {}", argv.join(" ")),
        None,
        Duration::from_secs(60),
    )
}

/// `gc --json` output, parsed; asserts success.
fn gc_json(out: Out, where_: &str) -> Value {
    assert!(out.ok(), "gc {where_}: {out}");
    out.json()
        .unwrap_or_else(|| panic!("gc --json {where_} is not JSON: {out}"))
}

fn ids(v: &Value, list: &str) -> Vec<String> {
    v[list]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["containerId"].as_str().map(String::from))
        .collect()
}

#[test]
fn gc_keeps_an_attachment_whose_netns_is_mounted_only_elsewhere() {
    let Some(lab) = Lab::with_example_net(lab::binary!(), "gc_mntns") else {
        return;
    };
    let t0 = Instant::now();
    // The infra is started from the session, as podman's first container
    // would; it lives in the session's mount namespace.
    let c0 = lab.container();
    lab.attach(&c0);
    let netns_file = lab.xdg_runtime_dir().join("netns/c1").display().to_string();
    let private = private_mounts(&lab, &netns_file);
    let cnitool = lab.dir.join("tools/cnitool").display().to_string();
    let add = in_private(&lab, &private, &[&cnitool, "add", NET, &netns_file]);
    add.add_result("ADD from the private mount namespace");
    let status = lab.status();
    let c1_id = status["attachments"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["netns"] == netns_file.as_str())
        .and_then(|a| a["containerId"].as_str())
        .unwrap_or_else(|| panic!("no attachment of {netns_file}: {status}"))
        .to_string();
    let bin = lab.bin().join("rootless-cni").display().to_string();

    // From the session and from outside the user namespace the path is an
    // empty file: gc keeps the attachment and says why.
    for where_ in ["in the session", "outside the user namespace"] {
        let out = match where_ {
            "in the session" => lab.cli(&["gc", "--json"]),
            _ => lab.exec_outside(&[], None, &[&bin, "gc", "--json"]),
        };
        let v = gc_json(out, where_);
        assert!(
            ids(&v, "removed").is_empty(),
            "gc {where_} removed a live attachment: {v}"
        );
        assert_eq!(ids(&v, "kept"), vec![c1_id.clone()], "gc {where_}: {v}");
        let why = v["kept"][0]["reason"].as_str().unwrap_or("");
        assert!(
            why.contains(&netns_file) && why.contains("mounted at"),
            "gc {where_} says why it kept it: {v}"
        );
    }
    let human = lab.cli(&["gc"]);
    assert!(
        human.ok() && human.stdout.contains("cannot tell whether it is gone"),
        "gc (human) says it kept one: {human}"
    );
    let eth0 = in_private(
        &lab,
        &private,
        &[
            "nsenter",
            &format!("--net={netns_file}"),
            "ip",
            "-o",
            "link",
            "show",
            "eth0",
        ],
    );
    assert!(eth0.ok(), "the container's eth0 after gc: {eth0}");
    assert_eq!(
        lab.status()["attachments"].as_array().map(Vec::len),
        Some(2)
    );

    // Where the runtime sees the netns, there is nothing to collect.
    let inside = in_private(&lab, &private, &[&bin, "gc", "--json"]);
    let v = gc_json(inside, "in the private mount namespace");
    assert!(
        ids(&v, "removed").is_empty() && ids(&v, "kept").is_empty(),
        "{v}"
    );

    // The netns really gone: gc from the session removes it, and only it.
    let umount = in_private(&lab, &private, &["umount", &netns_file]);
    assert!(umount.ok(), "umount {netns_file}: {umount}");
    let v = gc_json(lab.cli(&["gc", "--json"]), "after the netns is gone");
    assert_eq!(ids(&v, "removed"), vec![c1_id.clone()], "{v}");
    assert!(ids(&v, "kept").is_empty(), "{v}");
    let left = lab.status();
    assert_eq!(
        left["attachments"].as_array().map(Vec::len),
        Some(1),
        "c0 stays: {left}"
    );
    lab.assert_ping(&c0, lab::GATEWAY, "c0 after gc");

    lab.detach(&c0);
    drop(private);
    lab.kill_container(&c0);
    lab.assert_no_infra("after the DEL of c0");
    eprintln!("[timing] gc across mount namespaces: {:?}", t0.elapsed());
}
