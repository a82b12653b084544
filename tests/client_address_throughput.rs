//! What keeping clients' addresses costs: one iperf3 stream through a
//! published port, with the address kept and without, in two infras at
//! once. A figure, not a check (ignored unless asked for).

use lab::client_address::client_addresses;
use lab::{Lab, Server};
use serde_json::json;
use std::thread;
use std::time::Duration;

/// One iperf3 stream through a published port from 127.0.0.1, with the
/// client's address kept and without (the rules refused, as in the test
/// above), alternately in two infras at once, so that both see the same
/// machine: what keeping the address costs. A figure, not a check:
/// `cargo test --test client_address_throughput -- --ignored --nocapture
/// throughput`.
#[test]
#[ignore]
fn throughput_with_and_without_client_addresses() {
    let (Some(kept), Some(plain)) = (
        Lab::with_example_net(lab::binary!(), "client_addr_iperf_kept"),
        Lab::with_example_net(lab::binary!(), "client_addr_iperf_plain"),
    ) else {
        return;
    };
    let fake_restore = |lab: &Lab| -> String {
        lab.write_file("fakebin/iptables-restore", "#!/bin/sh\nexit 2\n");
        use std::os::unix::fs::PermissionsExt;
        let bin = lab.dir.join("fakebin");
        for p in [bin.clone(), bin.join("iptables-restore")] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        format!("{}:{}", bin.display(), lab::LAB_PATH)
    };
    let mut ports = Vec::new();
    let mut servers = Vec::new();
    let mut containers = Vec::new();
    for (lab, path) in [(&kept, None), (&plain, Some(fake_restore(&plain)))] {
        let c = lab.container();
        let port = lab::free_tcp_port();
        let cap = json!({"portMappings": [
            {"hostPort": port, "containerPort": 5201, "protocol": "tcp", "hostIP": "127.0.0.1"}
        ]})
        .to_string();
        let mut env = vec![("CAP_ARGS", cap.as_str())];
        if let Some(p) = &path {
            env.push(("PATH", p.as_str()));
        }
        lab.cnitool_env(&env, "add", lab::NET, &c.netns())
            .add_result("ADD for iperf3");
        servers.push(Server {
            pid: lab.start_in_netns(&c, &["iperf3", "-s", "-p", "5201"], "iperf3 -s"),
        });
        ports.push(port);
        containers.push(c);
    }
    assert_eq!(client_addresses(&kept)["kept"], true);
    assert_eq!(client_addresses(&plain)["kept"], false);
    thread::sleep(Duration::from_millis(500));
    let mut figures: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..3 {
        for (i, port) in ports.iter().enumerate() {
            figures[i].push(lab::iperf3_gbits(*port, 4));
        }
    }
    eprintln!(
        "[throughput] one stream, Gbit/s: client address kept {:.2?}, not kept {:.2?}",
        figures[0], figures[1]
    );
    for (lab, c) in [(&kept, &containers[0]), (&plain, &containers[1])] {
        let del = lab.cnitool("del", lab::NET, &c.netns());
        assert!(del.ok(), "DEL: {del}");
    }
    drop(servers);
}
