//! Real root as the runtime (a rootful runtime's case, supported): starting
//! the infra in the initial user namespace leaves the host's netns mounts
//! under a shared /run/netns as they are, and the host as it was.

use lab::host_tools::skip_without;
use lab::rootful::{RootBox, AS_ROOT};
use lab::{example_conflist, plugin_stdin, LAB_PATH};
use serde_json::json;
use std::fs;
use std::thread;
use std::time::{Duration, Instant};

/// Real root starts the infra (a rootful runtime's case, supported) while
/// the host has a netns bind-mounted under a shared /run/netns, as
/// `ip netns add`, podman and CRI-O make them: the mount must survive.
#[test]
fn as_root_starting_the_infra_keeps_the_hosts_netns_mounts() {
    if !nix::unistd::geteuid().is_root() || skip_without("infra_as_root", &["ip", "slirp4netns"]) {
        return;
    }
    let _serial = AS_ROOT.lock().unwrap_or_else(|e| e.into_inner());
    let mut b = RootBox::new(lab::binary!(), "netns");
    let probe = format!("rcni-probe-{}", std::process::id());
    let probe_path = format!("/run/netns/{probe}");
    let add = b.run(&["ip", "netns", "add", &probe], None);
    assert!(add.ok(), "{add}");
    let mounted = |b: &RootBox| b.run(&["findmnt", "-rn", &probe_path], None).ok();
    assert!(mounted(&b), "ip netns add made no mount");

    // A container netns of root's, and an ADD through our binary.
    let mut holder = b
        .command(&["unshare", "--net", "sleep", "infinity"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting a netns holder");
    let pid = holder.id();
    let host_net = fs::read_link("/proc/self/ns/net").ok();
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs::read_link(format!("/proc/{pid}/ns/net")).ok() == host_net
        || fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap_or_default()
            .trim()
            != "sleep"
    {
        assert!(
            Instant::now() < deadline,
            "the netns holder did not come up"
        );
        thread::sleep(Duration::from_millis(10));
    }
    let mut conf = plugin_stdin(&example_conflist());
    conf["stateDir"] = json!(b.state_dir());
    let netns = format!("/proc/{pid}/ns/net");
    let env = |verb: &str| -> Vec<String> {
        vec![
            "env".into(),
            "-i".into(),
            format!("PATH={LAB_PATH}"),
            format!("CNI_COMMAND={verb}"),
            "CNI_CONTAINERID=as-root".into(),
            format!("CNI_NETNS={netns}"),
            "CNI_IFNAME=eth0".into(),
            format!("CNI_PATH={}:/usr/lib/cni", b.path("cni-bin")),
            b.path("cni-bin/rootless-cni"),
        ]
    };
    let argv = env("ADD");
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = b.run(&argv, Some(conf.to_string().as_bytes()));
    assert!(out.ok(), "ADD as root: {out}");
    let kept = mounted(&b);

    let argv = env("DEL");
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let del = b.run(&argv, Some(conf.to_string().as_bytes()));
    let _ = holder.kill();
    let _ = holder.wait();
    let _ = b.run(&["ip", "netns", "del", &probe], None);
    let _ = b.run(&["umount", &probe_path], None);
    let diffs = b.finish();

    assert!(
        kept,
        "starting the infra as root unmounted {probe_path} (a netns of the host's under the shared /run/netns)"
    );
    assert!(del.ok(), "DEL as root: {del}");
    assert!(diffs.is_empty(), "the host is not as it was: {diffs:?}");
}
