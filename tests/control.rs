//! The problem and its fix, side by side: the bridge plugin run directly
//! by an unprivileged user is refused (the host netns belongs to the
//! initial user namespace), and the same chain through rootless-cni works.

use lab::{example_conflist, Lab, GATEWAY, NET};

/// Without rootless-cni the bridge plugin cannot work for an unprivileged
/// user: the host netns belongs to the initial user namespace.
#[test]
fn bridge_plugin_directly_is_not_permitted() {
    let Some(lab) = Lab::new(lab::binary!(), "control_direct") else {
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
    let Some(lab) = Lab::with_example_net(lab::binary!(), "control_rootless") else {
        return;
    };
    let c = lab.container();

    let add = lab.cnitool("add", NET, &c.netns());
    let ip = add.added_ipv4("ADD through rootless-cni");
    lab.assert_attached(&c, &ip);
    lab.assert_ping(&c, GATEWAY, "container -> gateway");

    lab.detach(&c);
    lab.assert_no_infra("after the last DEL");
}
