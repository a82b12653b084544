//! DEL removes everything an ADD made, the last DEL stops
//! the infra, and DEL succeeds when there is nothing (left) to delete.

use lab::{example_conflist, plugin_stdin, Lab, GATEWAY, NET};

#[test]
fn del_removes_everything_and_the_last_stops_the_infra() {
    let Some(lab) = Lab::with_example_net(lab::binary!(), "del_everything") else {
        return;
    };
    let (c1, c2) = (lab.container(), lab.container());
    let ip1 = lab.attach(&c1);
    let ip2 = lab.attach(&c2);
    let leases = lab.lease_files(NET);
    assert!(
        leases.contains(&ip1) && leases.contains(&ip2),
        "leases {leases:?} lack {ip1} or {ip2}"
    );
    assert_eq!(lab.attachment_files().len(), 2);

    // The first DEL: c1 is detached, c2 and the infra live on.
    let del = lab.cnitool("del", NET, &c1.netns());
    assert!(del.ok(), "DEL c1: {del}");
    assert_eq!(lab.links(&c1), vec!["lo"], "c1 still has interfaces");
    let leases = lab.lease_files(NET);
    assert!(!leases.contains(&ip1), "lease of {ip1} left: {leases:?}");
    assert!(leases.contains(&ip2), "lease of {ip2} lost: {leases:?}");
    assert_eq!(lab.attachment_files().len(), 1, "records after one DEL");
    let status = lab.status();
    assert!(
        status["infra"].is_object(),
        "infra stopped with c2 attached: {status}"
    );
    lab.assert_ping(&c2, GATEWAY, "c2 -> gateway after c1's DEL");

    // The last DEL stops the infra.
    let del = lab.cnitool("del", NET, &c2.netns());
    assert!(del.ok(), "DEL c2: {del}");
    assert_eq!(lab.links(&c2), vec!["lo"], "c2 still has interfaces");
    lab.assert_no_infra("after the last DEL");

    // DEL again: nothing to do, success.
    let del = lab.cnitool("del", NET, &c2.netns());
    assert!(del.ok(), "second DEL of c2: {del}");
    lab.assert_no_infra("after a second DEL");
}

/// The runtime deletes after the container's netns is gone (cnitool uses the
/// path only to derive the container id).
#[test]
fn del_with_the_netns_gone_via_cnitool() {
    let Some(lab) = Lab::with_example_net(lab::binary!(), "del_netns_gone_cnitool") else {
        return;
    };
    let c = lab.container();
    let ip = lab.attach(&c);
    let netns = c.netns();
    lab.kill_container(&c);
    assert!(
        !std::path::Path::new(&netns).exists(),
        "{netns} still exists"
    );

    let del = lab.cnitool("del", NET, &netns);
    assert!(del.ok(), "DEL with the netns gone: {del}");
    let leases = lab.lease_files(NET);
    assert!(!leases.contains(&ip), "lease of {ip} left: {leases:?}");
    lab.assert_no_infra("after DEL of a gone netns");
}

/// The same, our binary called directly with CNI_NETNS pointing nowhere.
#[test]
fn del_with_the_netns_gone_direct() {
    let Some(lab) = Lab::new(lab::binary!(), "del_netns_gone_direct") else {
        return;
    };
    let stdin = plugin_stdin(&example_conflist()).to_string();
    let c = lab.container();
    let netns = c.netns();
    let env = lab.plugin_env("ADD", "direct-del-1", &netns);
    let add = lab.plugin(&env, &stdin);
    let ip = add.added_ipv4("direct ADD");
    lab.kill_container(&c);

    let env = lab.plugin_env("DEL", "direct-del-1", &netns);
    let del = lab.plugin(&env, &stdin);
    assert!(del.ok(), "direct DEL with the netns gone: {del}");
    assert!(del.stdout.trim().is_empty(), "DEL printed something: {del}");
    let leases = lab.lease_files(NET);
    assert!(!leases.contains(&ip), "lease of {ip} left: {leases:?}");
    lab.assert_no_infra("after a direct DEL of a gone netns");
}
