//! The network configs shipped for each runtime
//! (conf-examples/{podman,nerdctl,crio,kubernetes}) work as they are:
//! ADD, CHECK, a ping to the gateway and DEL through cnitool.

use lab::Lab;

/// The conflists of conf-examples/{podman,nerdctl,crio,kubernetes} work as
/// they are: ADD, CHECK, a ping to the gateway and DEL through cnitool.
#[test]
fn the_runtime_examples_work_through_cnitool() {
    let Some(lab) = Lab::new(lab::binary!(), "runtime_examples") else {
        return;
    };
    for rel in [
        "podman/rootless.conflist",
        "nerdctl/rootless.conflist",
        "crio/10-rootless.conflist",
        "kubernetes/10-rootless.conflist",
    ] {
        let conf = lab::conf_example(rel);
        let name = conf["name"].as_str().expect("a network name").to_string();
        lab.write_netconf(&name, &conf);
        let c = lab.container();
        let add = lab.cnitool("add", &name, &c.netns());
        assert!(add.ok(), "{rel}: ADD: {add}");
        let check = lab.cnitool("check", &name, &c.netns());
        assert!(check.ok(), "{rel}: CHECK: {check}");
        lab.assert_ping(&c, lab::GATEWAY, &format!("{rel}: container -> gateway"));
        let del = lab.cnitool("del", &name, &c.netns());
        assert!(del.ok(), "{rel}: DEL: {del}");
        lab.assert_no_infra(rel);
    }
}
