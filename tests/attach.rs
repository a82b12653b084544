//! Containers attached through rootless-cni talk to
//! each other, and to the host's loopback only when the config allows it.

use lab::outbound::{self, HostUdpEcho};
use lab::{
    example_conflist, host_global_ipv4, outer, result_ipv4, retry, HostServer, Lab, GATEWAY, NET,
    SLIRP_HOST,
};
use std::time::Duration;

/// Two containers on bridge + host-local + portmap + firewall + tuning.
#[test]
fn two_containers_ping_each_other() {
    let Some(lab) = Lab::with_example_net(lab::binary!(), "two_containers") else {
        return;
    };
    let (c1, c2) = (lab.container(), lab.container());

    let mut ips = Vec::new();
    for c in [&c1, &c2] {
        let add = lab.cnitool("add", NET, &c.netns());
        let result = add.add_result(&format!("ADD {}", c.netns()));
        let ip = result_ipv4(&result).unwrap_or_else(|| panic!("no IPv4 in result: {add}"));
        lab.assert_attached(c, &ip);
        // The runtime's netns, not the path the inner plugins were given.
        let sandboxes: Vec<&str> = result["interfaces"]
            .as_array()
            .map(|a| a.iter().filter_map(|i| i["sandbox"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(
            sandboxes,
            vec![c.netns().as_str()],
            "interfaces[].sandbox: {result}"
        );
        ips.push(ip);
    }
    assert_ne!(ips[0], ips[1], "both containers got the same address");

    lab.assert_ping(&c1, &ips[1], "c1 -> c2");
    lab.assert_ping(&c2, &ips[0], "c2 -> c1");
    lab.assert_ping(&c1, GATEWAY, "c1 -> gateway");

    for c in [&c1, &c2] {
        let check = lab.cnitool("check", NET, &c.netns());
        assert!(check.ok(), "CHECK {}: {check}", c.netns());
    }

    let cached = Lab::list(&lab.var_lib_cni().join("results"));
    assert_eq!(cached.len(), 2, "cnitool's result cache: {cached:?}");

    let status = lab.status();
    assert!(status["infra"].is_object(), "no infra in status: {status}");
    let attachments = status["attachments"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(attachments.len(), 2, "status attachments: {status}");
    for ip in &ips {
        let has_ip = |a: &serde_json::Value| {
            let addrs = a["addresses"].as_array().cloned().unwrap_or_default();
            addrs.iter().filter_map(|x| x.as_str()).any(|x| {
                x == ip.as_str()
                    || x.strip_prefix(ip.as_str())
                        .is_some_and(|r| r.starts_with('/'))
            })
        };
        let listed = attachments.iter().any(|a| {
            a["network"] == NET
                && a["ifname"] == "eth0"
                && a["containerId"]
                    .as_str()
                    .is_some_and(|id| id.starts_with("cnitool-"))
                && has_ip(a)
        });
        assert!(listed, "{ip} not among status attachments: {status}");
    }
    assert_eq!(lab.attachment_files().len(), 2, "attachment records");

    for c in [&c1, &c2] {
        let del = lab.cnitool("del", NET, &c.netns());
        assert!(del.ok(), "DEL {}: {del}", c.netns());
    }
    lab.assert_no_infra("after the last DEL");
}

/// With `allowHostLoopback: true` (the example), 10.0.2.2 is the host's
/// 127.0.0.1, over TCP and UDP, whichever engine is the way out.
fn host_loopback_reachable_when_allowed(engine: &str) {
    let test = format!("loopback_allowed_{engine}");
    if !outbound::available(engine, &test) {
        return;
    }
    let Some(lab) = Lab::new(lab::binary!(), &test) else {
        return;
    };
    let server = HostServer::start("127.0.0.1");
    let echo = HostUdpEcho::start("127.0.0.1");
    let mut conf = example_conflist();
    assert_eq!(conf["plugins"][0]["allowHostLoopback"], true);
    outbound::with_engine(&mut conf, engine);
    lab.write_netconf(NET, &conf);
    let c = lab.container();

    let add = lab.cnitool("add", NET, &c.netns());
    assert!(add.ok(), "ADD: {add}");
    let url = format!("http://{SLIRP_HOST}:{}/", server.port);
    let got = lab.curl(&c, &url);
    assert!(got.ok(), "{engine}: container -> host loopback: {got}");
    assert_eq!(got.stdout, HostServer::BODY, "{got}");
    assert!(server.connections() >= 1);
    if lab::have_python3("the UDP checks") {
        let got = retry(Duration::from_secs(5), || {
            outbound::udp_exchange(&lab, &c, SLIRP_HOST, echo.port, "udp-hello")
        });
        assert!(got.ok(), "{engine}: UDP container -> host loopback: {got}");
        assert_eq!(got.stdout.trim(), "udp-hello", "{got}");
        assert!(echo.datagrams() >= 1);
    }
    assert_eq!(
        lab.status()["infra"]["outbound"]["engine"],
        engine,
        "status names the engine"
    );

    lab.detach(&c);
    lab.assert_no_infra("after the DEL");
}

#[test]
fn host_loopback_reachable_when_allowed_slirp4netns() {
    host_loopback_reachable_when_allowed(outbound::SLIRP4NETNS);
}

#[test]
fn host_loopback_reachable_when_allowed_pasta() {
    host_loopback_reachable_when_allowed(outbound::PASTA);
}

/// With `allowHostLoopback: false` the same fetch fails, while the network
/// itself works: TCP and UDP to the host's own global address.
fn host_loopback_unreachable_when_not_allowed(engine: &str) {
    let test = format!("loopback_denied_{engine}");
    if !outbound::available(engine, &test) {
        return;
    }
    let Some(lab) = Lab::new(lab::binary!(), &test) else {
        return;
    };
    let server = HostServer::start("127.0.0.1");
    let echo = HostUdpEcho::start("127.0.0.1");
    let mut conf = example_conflist();
    outer(&mut conf).insert("allowHostLoopback".into(), false.into());
    outbound::with_engine(&mut conf, engine);
    lab.write_netconf(NET, &conf);
    let c = lab.container();

    let add = lab.cnitool("add", NET, &c.netns());
    assert!(add.ok(), "ADD: {add}");
    lab.assert_ping(&c, GATEWAY, "container -> gateway");

    let url = format!("http://{SLIRP_HOST}:{}/", server.port);
    let got = lab.curl(&c, &url);
    assert!(
        !got.ok(),
        "{engine}: host loopback reached although not allowed: {got}"
    );
    assert_eq!(
        server.connections(),
        0,
        "the loopback server was connected to"
    );
    let python = lab::have_python3("the UDP checks");
    if python {
        let got = outbound::udp_exchange(&lab, &c, SLIRP_HOST, echo.port, "udp-hello");
        assert!(
            !got.ok(),
            "{engine}: UDP to the host loopback answered: {got}"
        );
        assert_eq!(echo.datagrams(), 0, "the loopback UDP server got datagrams");
    }

    // The way out works: the host's own global address is reachable (when
    // the machine has one), over TCP and UDP.
    match host_global_ipv4() {
        Some(ip) => {
            let outside = HostServer::start(&ip);
            let got = lab.curl(&c, &format!("http://{ip}:{}/", outside.port));
            assert!(got.ok(), "{engine}: container -> host {ip}: {got}");
            assert_eq!(got.stdout, HostServer::BODY, "{got}");
            if python {
                let echo = HostUdpEcho::start(&ip);
                let got = retry(Duration::from_secs(5), || {
                    outbound::udp_exchange(&lab, &c, &ip, echo.port, "udp-out")
                });
                assert!(got.ok(), "{engine}: UDP container -> host {ip}: {got}");
                assert_eq!(got.stdout.trim(), "udp-out", "{got}");
            }
        }
        None => eprintln!("no global IPv4 on this host: outbound check skipped"),
    }

    lab.detach(&c);
    lab.assert_no_infra("after the DEL");
}

#[test]
fn host_loopback_unreachable_when_not_allowed_slirp4netns() {
    host_loopback_unreachable_when_not_allowed(outbound::SLIRP4NETNS);
}

#[test]
fn host_loopback_unreachable_when_not_allowed_pasta() {
    host_loopback_unreachable_when_not_allowed(outbound::PASTA);
}
