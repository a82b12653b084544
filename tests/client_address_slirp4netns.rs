//! Which address a container behind a port the slirp4netns driver
//! publishes sees for its client (IPv4 host addresses only): measured for
//! the README.

use lab::client_address::{
    assert_seen, client_addresses, cnitool, host_netns, peer_echo, stop, HOST_V4, PORT_V4,
    SERVER_PORT,
};
use lab::{example_conflist, outer, Lab};
use serde_json::json;
use std::time::Instant;

/// The slirp4netns driver (IPv4 host addresses only), for the README: what
/// its containers see of the same clients.
#[test]
fn slirp4netns_driver_client_addresses() {
    let mut conf = example_conflist();
    outer(&mut conf).insert("portDriver".into(), "slirp4netns".into());
    let mappings_v4 = json!([
        {"hostPort": PORT_V4, "containerPort": SERVER_PORT, "protocol": "tcp"},
        {"hostPort": PORT_V4, "containerPort": SERVER_PORT, "protocol": "udp"},
    ]);
    if !lab::have_python3("the peer-echo server") {
        return;
    }
    let Some(lab) = Lab::new(lab::binary!(), "client_addr_slirp") else {
        return;
    };
    let t0 = Instant::now();
    lab.write_netconf(lab::NET, &conf);
    let host = host_netns(&lab);
    let c = lab.container();
    cnitool(&lab, &host, "add", lab::NET, &c, &mappings_v4).add_result("ADD (slirp4netns driver)");
    let server = peer_echo(&lab, &c);
    assert_eq!(client_addresses(&lab)["kept"], true, "{}", lab.status());
    assert_seen(
        &host,
        "slirp4netns driver",
        &[
            ("tcp", "127.0.0.1", PORT_V4, "10.0.2.2"),
            ("tcp", HOST_V4, PORT_V4, HOST_V4),
            ("udp", "127.0.0.1", PORT_V4, "10.0.2.2"),
            ("udp", HOST_V4, PORT_V4, HOST_V4),
        ],
    );
    let del = cnitool(&lab, &host, "del", lab::NET, &c, &json!([]));
    assert!(del.ok(), "DEL: {del}");
    stop(&lab, server);
    lab.assert_no_infra("after DEL");
    eprintln!("[timing] client_addr_slirp: {:?}", t0.elapsed());
}
