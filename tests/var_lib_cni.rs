//! A host without /var/lib/cni: a machine that never ran rootful CNI, where
//! an ordinary user cannot create it, so the infra has nothing to bind its
//! IPAM state onto. The infra must overlay /var/lib in its own mount
//! namespace and leave the caller's view untouched.
//!
//! The other case, a host (session) that has /var/lib/cni, is what every
//! default lab is: its session overlays /var/lib and binds a dir on
//! /var/lib/cni for cnitool's cache, so all the other tests cover it.

use lab::{example_conflist, plugin_stdin, result_ipv4, Lab, LabOptions, GATEWAY, NET};

#[test]
fn infra_makes_room_for_var_lib_cni_when_the_host_has_none() {
    let Some(lab) = Lab::new_with(
        lab::binary!(),
        "no_var_lib_cni",
        LabOptions {
            var_lib_cni: false,
            ..LabOptions::default()
        },
    ) else {
        return;
    };
    let absent = |when: &str| {
        let out = lab.exec(&[], None, &["test", "-e", "/var/lib/cni"]);
        assert!(
            out.status.is_some(),
            "{when}: `test -e /var/lib/cni` did not run: {out}"
        );
        !out.ok()
    };
    if !absent("before the ADD") {
        eprintln!(
            "skipping infra_makes_room_for_var_lib_cni_when_the_host_has_none: this host has \
             /var/lib/cni, so the session sees one; the premise (no /var/lib/cni) does not hold"
        );
        return;
    }

    // No cnitool here: libcni's cache needs /var/lib/cni. Our binary is
    // called directly, as a runtime would.
    let conf = plugin_stdin(&example_conflist());
    let stdin = conf.to_string();
    let c = lab.container();
    let id = "no-var-lib-cni-1";
    let add = lab.plugin(&lab.plugin_env("ADD", id, &c.netns()), &stdin);
    let result = add.add_result("ADD on a host without /var/lib/cni");
    let ip = result_ipv4(&result).unwrap_or_else(|| panic!("no IPv4 in result: {add}"));
    lab.assert_attached(&c, &ip);
    lab.assert_ping(&c, GATEWAY, "container -> gateway");

    // host-local's default dataDir landed in the state dir ...
    assert_eq!(
        lab.lease_files(NET),
        vec![ip.clone()],
        "leases under {}",
        lab.lease_dir(NET).display()
    );
    // ... seen inside the infra as /var/lib/cni, on an overlay of /var/lib
    // the infra made itself ...
    let sandbox = lab
        .sandbox_pid()
        .unwrap_or_else(|| panic!("no sandbox pid: {}", lab.status()));
    let mnt = format!("--mount=/proc/{sandbox}/ns/mnt");
    let lease = format!("/var/lib/cni/networks/{NET}/{ip}");
    let seen = lab.exec(&[], None, &["nsenter", &mnt, "--", "test", "-f", &lease]);
    assert!(seen.ok(), "{lease} not visible inside the infra: {seen}");
    let fstype = lab.exec(
        &[],
        None,
        &[
            "nsenter", &mnt, "--", "findmnt", "-rn", "-o", "FSTYPE", "/var/lib",
        ],
    );
    assert_eq!(
        fstype.stdout.lines().last().map(str::trim),
        Some("overlay"),
        "/var/lib inside the infra: {fstype}"
    );
    // ... and the caller's mount namespace still has no /var/lib/cni.
    assert!(
        absent("after the ADD"),
        "/var/lib/cni appeared in the session's mount namespace after the ADD"
    );

    let mut del_conf = conf.clone();
    del_conf["prevResult"] = result;
    let del = lab.plugin(
        &lab.plugin_env("DEL", id, &c.netns()),
        &del_conf.to_string(),
    );
    assert!(del.ok(), "DEL: {del}");
    assert_eq!(lab.links(&c), vec!["lo"], "the container kept interfaces");
    let leases = lab.lease_files(NET);
    assert!(leases.is_empty(), "leases left: {leases:?}");
    assert!(
        absent("after the DEL"),
        "/var/lib/cni appeared in the session's mount namespace after the DEL"
    );
    lab.assert_no_infra("after the DEL");
}
