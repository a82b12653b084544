//! A dead infra's clean-up ends only its own leftovers: the network and
//! mount namespace inodes it recorded are reused by the kernel for the next
//! namespaces made on the machine, and what runs in them is not ours.

use lab::{Container, Lab, NET};
use serde_json::Value;
use std::fs;
use std::thread;
use std::time::{Duration, Instant};

fn ns(pid: u32, kind: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(format!("/proc/{pid}/ns/{kind}"))
        .ok()
        .map(|m| m.ino())
}

fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// A process of the lab user, in a network and mount namespace of its own:
/// someone else's container as far as the plugin is concerned.
fn victim(lab: &Lab) -> Container {
    let v = lab.container_with(&["--net", "--mount"]);
    thread::sleep(Duration::from_millis(100));
    v
}

/// A crashed infra's recorded namespace inodes are free for the kernel to
/// give to any new namespace. The next call's clean-up of the dead infra
/// must not kill what runs in them.
#[test]
fn dead_infra_cleanup_spares_a_stranger_in_reused_namespaces() {
    let Some(lab) = Lab::with_example_net(lab::binary!(), "rv_reuse") else {
        return;
    };
    let c = lab.container();
    lab.attach(&c);
    let infra_file = lab.state_dir().join("infra.json");
    let mut info: Value = serde_json::from_str(&fs::read_to_string(&infra_file).unwrap()).unwrap();
    // The infra crashes (OOM killer, say): every recorded process SIGKILLed.
    for p in ["supervisor", "sandbox", "slirp4netns"] {
        if let Some(pid) = info[p]["pid"].as_u64() {
            lab::sigkill(pid as u32);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for p in ["supervisor", "sandbox", "slirp4netns"] {
        if let Some(pid) = info[p]["pid"].as_u64() {
            while alive(pid as u32) {
                assert!(Instant::now() < deadline, "{p} survived");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
    thread::sleep(Duration::from_millis(200));
    // Then someone else makes a container.
    let v = victim(&lab);
    let pid = v.pid;
    let (net, mnt) = (ns(pid, "net").unwrap(), ns(pid, "mnt").unwrap());
    let natural = info["netns"] == net && info["mntns"] == mnt;
    eprintln!(
        "recorded netns {} mntns {}; stranger's {net} {mnt}: natural reuse: {natural}",
        info["netns"], info["mntns"]
    );
    if !natural {
        // The kernel handed the stranger other numbers this time; as it
        // may hand it the recorded ones, say so in the record.
        info["netns"] = net.into();
        info["mntns"] = mnt.into();
        fs::write(&infra_file, info.to_string()).unwrap();
    }
    let del = lab.cnitool("del", NET, &c.netns());
    eprintln!("DEL: {del}");
    thread::sleep(Duration::from_millis(300));
    assert!(
        alive(pid),
        "the plugin killed a stranger's process {pid} in the namespaces a dead infra had \
         (natural reuse: {natural})"
    );
}
