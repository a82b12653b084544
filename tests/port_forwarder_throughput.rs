//! One iperf3 stream through a port the builtin driver publishes: a
//! figure, not a check (ignored unless asked for).

use lab::port_forwarder::{del, lab_with, Server};
use lab::NET;
use serde_json::{json, Value};
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
    let out = lab.in_netns(
        &c,
        &[
            "sh",
            "-c",
            "iperf3 -s -p 5201 </dev/null >/dev/null 2>&1 & echo $!",
        ],
    );
    let server = Server(out.stdout.trim().parse().expect("iperf3's pid"));
    thread::sleep(Duration::from_millis(500));
    for _ in 0..3 {
        let out = std::process::Command::new("iperf3")
            .args(["-c", "127.0.0.1", "-p", &port.to_string(), "-t", "5", "-J"])
            .output()
            .expect("iperf3 -c");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let bps = v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0);
        eprintln!("[throughput] one stream: {:.2} Gbit/s", bps / 1e9);
    }
    del(&lab, &c);
    drop(server);
    lab.assert_no_infra("after DEL");
}
