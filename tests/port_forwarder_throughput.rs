//! One iperf3 stream through a port the builtin driver publishes: a
//! figure, not a check (ignored unless asked for).

use lab::port_forwarder::{del, lab_with, Server};
use lab::NET;
use serde_json::json;
use std::thread;
use std::time::Duration;

/// One iperf3 stream through a published port, for a figure (not a
/// check): `cargo test --test port_forwarder_throughput -- --ignored --nocapture
/// one_stream_throughput`.
#[test]
#[ignore]
fn one_stream_throughput() {
    let Some(lab) = lab_with(lab::binary!(), "fwd_iperf", json!({})) else {
        return;
    };
    let c = lab.container();
    let port = lab::free_tcp_port();
    let cap = json!({"portMappings": [
        {"hostPort": port, "containerPort": 5201, "protocol": "tcp", "hostIP": "127.0.0.1"}
    ]})
    .to_string();
    let out = lab.cnitool_env(&[("CAP_ARGS", &cap)], "add", NET, &c.netns());
    assert!(out.ok(), "ADD: {out}");
    let server = Server(lab.start_in_netns(&c, &["iperf3", "-s", "-p", "5201"], "iperf3 -s"));
    thread::sleep(Duration::from_millis(500));
    for _ in 0..3 {
        let gbits = lab::iperf3_gbits(port, 5);
        eprintln!("[throughput] one stream: {gbits:.2} Gbit/s");
    }
    del(&lab, &c);
    drop(server);
    lab.assert_no_infra("after DEL");
}
