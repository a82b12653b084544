//! Issue #2, test 1: the problem and its fix, side by side.

mod common;

use common::{example_conflist, result_ipv4, Lab, GATEWAY, NET};

/// Without rootless-cni the bridge plugin cannot work for an unprivileged
/// user: the host netns belongs to the initial user namespace.
#[test]
fn bridge_plugin_directly_is_not_permitted() {
    let Some(lab) = Lab::new("control_direct") else {
        return;
    };
    let mut direct = example_conflist()["plugins"][0]["delegate"].clone();
    direct["name"] = "direct".into();
    lab.write_netconf("direct", &direct);
    let c = lab.container();

    let out = lab.cnitool("add", "direct", &c.netns());
    assert!(!out.ok(), "bridge directly should fail: {out}");
    assert!(
        out.stderr.contains("operation not permitted"),
        "expected 'operation not permitted': {out}"
    );
    assert_eq!(lab.links(&c), vec!["lo"], "the container got something");
}

/// The same chain through rootless-cni works.
#[test]
fn same_chain_through_rootless_cni_works() {
    let Some(lab) = Lab::new("control_rootless") else {
        return;
    };
    lab.write_netconf(NET, &example_conflist());
    let c = lab.container();

    let add = lab.cnitool("add", NET, &c.netns());
    assert!(add.ok(), "ADD through rootless-cni: {add}");
    let result = add
        .json()
        .unwrap_or_else(|| panic!("ADD result is not JSON: {add}"));
    let ip = result_ipv4(&result).unwrap_or_else(|| panic!("no IPv4 in the result: {add}"));
    assert!(
        ip.starts_with("10.89.0."),
        "address {ip} not in 10.89.0.0/24"
    );
    assert_eq!(lab.ipv4(&c, "eth0").as_deref(), Some(ip.as_str()));
    let ping = lab.ping(&c, GATEWAY);
    assert!(ping.ok(), "container -> gateway: {ping}");

    let del = lab.cnitool("del", NET, &c.netns());
    assert!(del.ok(), "DEL: {del}");
    lab.assert_no_infra("after the last DEL");
}
