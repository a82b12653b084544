//! Configs: the `network` key, and bad input refused with the right CNI
//! error (an inner plugin not in CNI_PATH: 102), leaving nothing behind.
//! Bad environments and configs refused before anything is touched are
//! the corpus of testdata/hostile/, run by tests/hostile.rs.

use lab::{example_conflist, outer, plugin_stdin, Lab, GATEWAY, NET};
use serde_json::Value;

/// The example's delegate as a conflist of its own named "inner", and an
/// outer conflist that references it by name (plus `confDir` if given).
fn by_name(conf_dir: Option<&str>) -> (Value, Value) {
    let mut conf = example_conflist();
    let mut inner = outer(&mut conf)
        .remove("delegate")
        .expect("the example has a delegate");
    inner["name"] = "inner".into();
    outer(&mut conf).insert("network".into(), "inner".into());
    if let Some(dir) = conf_dir {
        outer(&mut conf).insert("confDir".into(), dir.into());
    }
    (conf, inner)
}

/// ADD, ping, DEL through a config that names its inner network.
fn attach_by_name(lab: &Lab, conf: &Value) {
    lab.write_netconf(NET, conf);
    let c = lab.container();
    let add = lab.cnitool("add", NET, &c.netns());
    let ip = add.added_ipv4("ADD");
    assert!(
        ip.starts_with("10.89.0."),
        "address {ip} not in 10.89.0.0/24"
    );
    assert_eq!(
        lab.lease_files("inner"),
        vec![ip.clone()],
        "leases of network inner"
    );
    lab.assert_ping(&c, GATEWAY, "container -> gateway");
    let check = lab.cnitool("check", NET, &c.netns());
    assert!(check.ok(), "CHECK: {check}");

    lab.detach(&c);
    assert_eq!(
        lab.lease_files("inner"),
        Vec::<String>::new(),
        "leases after DEL"
    );
    lab.assert_no_infra("after DEL");
}

/// `"network": "inner"` found in ~/.config/cni/net.d (XDG_CONFIG_HOME unset).
#[test]
fn network_by_name_in_default_conf_dir() {
    let Some(lab) = Lab::new(lab::binary!(), "network_default_dir") else {
        return;
    };
    let (conf, inner) = by_name(None);
    lab.write_file(".config/cni/net.d/inner.conflist", &inner.to_string());
    attach_by_name(&lab, &conf);
}

/// `"network": "inner"` found in the `confDir` the config gives.
#[test]
fn network_by_name_in_conf_dir() {
    let Some(lab) = Lab::new(lab::binary!(), "network_conf_dir") else {
        return;
    };
    let dir = lab.dir.join("my-networks").display().to_string();
    let (conf, inner) = by_name(Some(&dir));
    lab.write_file("my-networks/inner.conflist", &inner.to_string());
    attach_by_name(&lab, &conf);
}

/// An inner plugin that is not in CNI_PATH: an error, and nothing left.
#[test]
fn inner_plugin_not_in_cni_path() {
    let Some(lab) = Lab::new(lab::binary!(), "inner_plugin_missing") else {
        return;
    };
    let c = lab.container();
    let mut env = lab.plugin_env("ADD", "no-bridge-1", &c.netns());
    let only_ours = lab.bin().display().to_string();
    for (k, v) in env.iter_mut() {
        if k == "CNI_PATH" {
            *v = only_ours.clone();
        }
    }
    let out = lab.plugin(&env, &plugin_stdin(&example_conflist()).to_string());
    assert!(!out.ok(), "ADD without the bridge plugin succeeded: {out}");
    let err = out
        .cni_error()
        .unwrap_or_else(|| panic!("no CNI error object on stdout: {out}"));
    assert_eq!(err.code, 102, "an inner plugin not in CNI_PATH: {out}");
    assert!(
        err.mentions("bridge"),
        "the missing plugin is not named: {out}"
    );

    assert_eq!(lab.links(&c), vec!["lo"], "the container got something");
    assert_eq!(lab.lease_files(NET), Vec::<String>::new(), "leases");
    lab.assert_no_infra("after a failed ADD");
}

/// The example network with an IPAM plugin that does not exist: the bridge
/// plugin creates the bridge and a veth, then fails.
fn bad_ipam_stdin() -> String {
    let mut conf = example_conflist();
    outer(&mut conf)["delegate"]["plugins"][0]["ipam"] =
        serde_json::json!({ "type": "no-such-ipam" });
    plugin_stdin(&conf).to_string()
}

/// The bridge plugin's own error (code 999, "failed to find plugin ...").
fn assert_bad_ipam_error(out: &lab::Out) {
    assert!(!out.ok(), "ADD with a missing IPAM plugin succeeded: {out}");
    let err = out
        .cni_error()
        .unwrap_or_else(|| panic!("no CNI error object on stdout: {out}"));
    assert_eq!(
        err.code, 999,
        "the bridge plugin's error code is not passed through: {out}"
    );
    assert!(
        err.mentions("no-such-ipam"),
        "the bridge plugin's message is lost: {out}"
    );
}

/// The only record of `id` is a failed one, and the runtime's DEL of it
/// succeeds and removes it.
fn assert_failed_record_then_del(lab: &Lab, id: &str, c: &lab::Container) {
    let records: Vec<_> = lab
        .attachment_records()
        .into_iter()
        .filter(|r| r["containerId"] == id)
        .collect();
    assert_eq!(records.len(), 1, "records of {id}: {records:?}");
    assert!(lab::is_failed_record(&records[0]), "{}", records[0]);
    let del = lab.plugin(&lab.plugin_env("DEL", id, &c.netns()), &bad_ipam_stdin());
    assert!(del.ok(), "the runtime's DEL after the failed ADD: {del}");
    assert!(
        !lab.attachment_records()
            .iter()
            .any(|r| r["containerId"] == id),
        "{id}'s record survived its DEL"
    );
}

/// A bad-IPAM ADD that started the infra: rolled back, infra stopped, and
/// a good ADD afterwards works.
#[test]
fn bad_ipam_on_first_add_leaves_nothing_behind() {
    let Some(lab) = Lab::with_example_net(lab::binary!(), "bad_ipam_first") else {
        return;
    };
    let c = lab.container();
    let env = lab.plugin_env("ADD", "bad-ipam-1", &c.netns());
    let out = lab.plugin(&env, &bad_ipam_stdin());
    assert_bad_ipam_error(&out);
    assert_eq!(lab.links(&c), vec!["lo"], "the container kept an interface");
    assert_eq!(lab.lease_files(NET), Vec::<String>::new(), "leases");
    // The rollback's DEL fails too (no IPAM plugin to release with): the
    // record stays, failed, until the runtime's DEL after the failed ADD.
    assert_failed_record_then_del(&lab, "bad-ipam-1", &c);
    lab.assert_no_infra("after the failed ADD and its DEL");

    let add = lab.cnitool("add", NET, &c.netns());
    assert!(add.ok(), "good ADD after the failed one: {add}");
    lab.assert_ping(&c, GATEWAY, "container -> gateway");
    lab.detach(&c);
}

/// A bad-IPAM ADD on a running infra whose bridge is in use: rolled back
/// (plugins#620: the half-made veth must go), the other attachment is
/// unharmed, and a good ADD on the same bridge works.
#[test]
fn bad_ipam_on_a_live_bridge_leaves_it_usable() {
    let Some(lab) = Lab::with_example_net(lab::binary!(), "bad_ipam_live") else {
        return;
    };
    let (c1, c2) = (lab.container(), lab.container());
    let add = lab.cnitool("add", NET, &c1.netns());
    let ip1 = add.added_ipv4("ADD c1");
    let sandbox = lab.sandbox_pid();

    let env = lab.plugin_env("ADD", "bad-ipam-2", &c2.netns());
    let out = lab.plugin(&env, &bad_ipam_stdin());
    assert_bad_ipam_error(&out);
    assert_eq!(
        lab.links(&c2),
        vec!["lo"],
        "c2 kept the half-made interface"
    );
    assert_eq!(lab.lease_files(NET), vec![ip1.clone()], "leases");
    assert_failed_record_then_del(&lab, "bad-ipam-2", &c2);
    assert_eq!(lab.attachment_files().len(), 1, "records");
    assert_eq!(lab.sandbox_pid(), sandbox, "the infra was replaced");
    lab.assert_ping(&c1, GATEWAY, "c1 -> gateway after the failed ADD");

    let add = lab.cnitool("add", NET, &c2.netns());
    assert!(add.ok(), "good ADD of c2 on the same bridge: {add}");
    lab.assert_ping(&c2, &ip1, "c2 -> c1");
    for c in [&c1, &c2] {
        let del = lab.cnitool("del", NET, &c.netns());
        assert!(del.ok(), "DEL {}: {del}", c.netns());
    }
    lab.assert_no_infra("after the last DEL");
}
