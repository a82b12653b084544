//! Hosts as they are: the core flow (two containers attached through
//! cnitool, CHECK, pings both ways, DEL, nothing left) on a host where a
//! rootful CNI runtime once ran (root-owned /var/lib/cni, /run/netns,
//! /etc/cni/net.d) and with XDG_RUNTIME_DIR as logind makes it (a 0700
//! tmpfs at /run/user/UID). Both are built in the lab's own mount
//! namespace (`lab::hosts`); the machine is never changed. And a
//! runtime's direct call of the plugin on a used host (no libcni cache of
//! the user's): the root-owned /var/lib/cni stays as it was.

use lab::{
    example_conflist, plugin_stdin, result_ipv4, Host, Lab, LabOptions, RuntimeDir, GATEWAY, NET,
    USED_HOST_DIRS,
};
use std::fs;
use std::os::unix::fs::MetadataExt;

fn lab(name: &str, host: Host, runtime_dir: RuntimeDir) -> Option<Lab> {
    let lab = Lab::new_with(
        lab::binary!(),
        name,
        LabOptions {
            host,
            runtime_dir,
            ..LabOptions::default()
        },
    )?;
    lab.write_netconf(NET, &example_conflist());
    Some(lab)
}

/// The lab's host is what the options promise, and the machine's own dirs
/// are not the ones the lab sees.
fn assert_host_is(lab: &Lab, host: Host, runtime_dir: RuntimeDir) {
    if host == Host::Used {
        for (path, mode) in USED_HOST_DIRS {
            let p = lab.host_root().join(path.trim_start_matches('/'));
            let m = fs::metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert!(m.is_dir() && m.uid() == 0, "{path}: not a dir of root's");
            // A dir the machine already had keeps its own mode.
            if !std::path::Path::new(path).exists() {
                assert_eq!(m.mode() & 0o7777, *mode, "{path}: mode {:o}", m.mode());
            }
        }
        // The lab user cannot write there (libcni's cache needs the bind
        // the session makes).
        let out = lab.exec_outside(&[], None, &["mkdir", "/var/lib/cni/results/probe"]);
        assert!(
            !out.ok(),
            "the lab user wrote into root's /var/lib/cni: {out}"
        );
    }
    if runtime_dir == RuntimeDir::Logind {
        let run = lab.xdg_runtime_dir().display().to_string();
        assert_eq!(run, format!("/run/user/{}", lab.uid));
        let m = fs::metadata(lab.run_dir()).expect("the runtime dir");
        assert_eq!(m.uid(), lab.uid, "{run} owner");
        assert_eq!(m.mode() & 0o7777, 0o700, "{run} mode");
        let out = lab.exec(&[], None, &["findmnt", "-rn", "-o", "FSTYPE", &run]);
        assert_eq!(out.stdout.trim(), "tmpfs", "{run} is not a tmpfs: {out}");
        assert!(
            !std::path::Path::new(&run).exists()
                || fs::metadata(&run).map(|m| m.uid()).ok() != Some(lab.uid),
            "{run} is on the machine itself"
        );
    }
}

/// The core flow in a lab `name` whose host is `host` with `runtime_dir`,
/// once the lab shows it is.
fn core_flow_on(name: &str, host: Host, runtime_dir: RuntimeDir) {
    let Some(lab) = lab(name, host, runtime_dir) else {
        return;
    };
    assert_host_is(&lab, host, runtime_dir);
    core_flow(&lab);
}

/// Two containers through cnitool: ADD, CHECK, pings, DEL, nothing left.
fn core_flow(lab: &Lab) {
    let (c1, c2) = (lab.container(), lab.container());
    let ip1 = lab.attach(&c1);
    let ip2 = lab.attach(&c2);
    lab.assert_attached(&c1, &ip1);
    lab.assert_attached(&c2, &ip2);
    for c in [&c1, &c2] {
        let check = lab.cnitool("check", NET, &c.netns());
        assert!(check.ok(), "CHECK {}: {check}", c.netns());
    }
    lab.assert_ping(&c1, &ip2, "c1 -> c2");
    lab.assert_ping(&c2, &ip1, "c2 -> c1");
    assert!(
        lab.state_dir().join("infra.json").exists(),
        "no infra.json in {}",
        lab.state_dir().display()
    );
    lab.detach(&c1);
    lab.detach(&c2);
    lab.assert_no_infra("after the DELs");
}

#[test]
fn a_used_host_attaches_pings_and_detaches_through_cnitool() {
    core_flow_on("used_host", Host::Used, RuntimeDir::LabDir);
}

#[test]
fn a_logind_runtime_dir_attaches_pings_and_detaches_through_cnitool() {
    core_flow_on("logind_run", Host::Pristine, RuntimeDir::Logind);
}

#[test]
fn a_used_host_with_a_logind_runtime_dir_attaches_pings_and_detaches() {
    core_flow_on("used_logind", Host::Used, RuntimeDir::Logind);
}

/// A runtime's own call of the plugin (no libcni cache of the user's) on a
/// used host: the infra puts its leases over the root-owned /var/lib/cni it
/// cannot write, and that dir stays as it was.
#[test]
fn a_used_host_keeps_its_var_lib_cni_when_the_plugin_is_called_directly() {
    let options = LabOptions {
        var_lib_cni: false,
        host: Host::Used,
        runtime_dir: RuntimeDir::Logind,
        ..LabOptions::default()
    };
    let Some(lab) = Lab::new_with(lab::binary!(), "used_host_direct", options) else {
        return;
    };
    let root_cni = lab.host_root().join("var/lib/cni");
    let before = Lab::list(&root_cni);
    let conf = plugin_stdin(&example_conflist());
    let c = lab.container();
    let add = lab.plugin(
        &lab.plugin_env("ADD", "used-host", &c.netns()),
        &conf.to_string(),
    );
    let result = add.add_result("ADD on a used host");
    let ip = result_ipv4(&result).unwrap_or_else(|| panic!("no IPv4 in result: {add}"));
    lab.assert_attached(&c, &ip);
    lab.assert_ping(&c, GATEWAY, "container -> gateway");
    assert_eq!(lab.lease_files(NET), vec![ip], "leases in the state dir");
    let mut del_conf = conf.clone();
    del_conf["prevResult"] = result;
    let del = lab.plugin(
        &lab.plugin_env("DEL", "used-host", &c.netns()),
        &del_conf.to_string(),
    );
    assert!(del.ok(), "DEL: {del}");
    lab.assert_no_infra("after the DEL");
    assert_eq!(
        Lab::list(&root_cni),
        before,
        "the host's /var/lib/cni changed"
    );
}
