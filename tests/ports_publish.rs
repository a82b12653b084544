//! Published ports through both port drivers (`builtin`, `slirp4netns`),
//! with real servers inside containers and the test process as the client
//! on the host: TCP and UDP, several mappings on one container, the same
//! container port on two containers, `hostIP`, and the ports free again
//! after DEL.

use lab::net::http_get;
use lab::ports::{
    add, assert_echoes, assert_port_free, assert_serves, at, cni_error, del, free_port, httpd,
    lab_for, mapping, plugin_add, status_ports, stop_all, tcp, udp, udp_echo_server, LOCALHOST,
};
use lab::{host_global_ipv4, result_ipv4, NET};
use std::net::{IpAddr, Ipv6Addr};
use std::time::Instant;

// ---------------------------------------------------------------------------
// 1 + 3: TCP and UDP through each driver, several mappings on one container,
// the same container port on two containers; ports free again after DEL.

fn publish_tcp_udp_and_free_on_del(driver: &str) {
    let Some(lab) = lab_for(lab::binary!(), "p_basic", driver) else {
        return;
    };
    let t0 = Instant::now();
    let with_udp = lab::have_python3("the UDP tests");
    let (c1, c2) = (lab.container(), lab.container());
    let (p_web, p_alt, p_udp, p_web2) = (free_port(), free_port(), free_port(), free_port());

    // c1: two TCP mappings (to two servers) and one UDP mapping.
    let mut m1 = vec![tcp(p_web, 80), mapping("tcp", p_alt, 8080, None)];
    if with_udp {
        m1.push(udp(p_udp, 5353));
    }
    let r1 = add(&lab, &c1, &m1);
    assert!(result_ipv4(&r1).is_some(), "no IPv4 in ADD result: {r1}");
    // c2: the same container port 80 behind another host port.
    add(&lab, &c2, &[tcp(p_web2, 80)]);

    let mut servers = vec![
        httpd(&lab, &c1, 80, "container one, port 80\n"),
        httpd(&lab, &c1, 8080, "container one, port 8080\n"),
        httpd(&lab, &c2, 80, "container two, port 80\n"),
    ];
    servers.extend(with_udp.then(|| udp_echo_server(&lab, &c1, 5353, "one:")));

    let what = format!("{driver}, before DEL");
    assert_serves(at(LOCALHOST, p_web), "container one, port 80\n", &what);
    assert_serves(at(LOCALHOST, p_alt), "container one, port 8080\n", &what);
    assert_serves(at(LOCALHOST, p_web2), "container two, port 80\n", &what);
    if with_udp {
        assert_echoes(at(LOCALHOST, p_udp), "one:", &what);
    }
    // Several connections in a row, and a repeated datagram flow.
    for _ in 0..5 {
        assert_serves(at(LOCALHOST, p_web2), "container two, port 80\n", &what);
    }
    if with_udp {
        assert_echoes(at(LOCALHOST, p_udp), "one:", &what);
    }

    let ports = status_ports(&lab);
    for p in [p_web, p_alt, p_web2] {
        assert!(
            ports.iter().any(|s| s.contains(&format!(":{p}/tcp"))),
            "status does not list tcp port {p}: {ports:?}"
        );
    }

    // DEL of c1 with the infra still running (c2): its ports are closed.
    del(&lab, &c1);
    let what = format!("{driver}, after DEL of container one");
    assert_port_free(p_web, false, &what);
    assert_port_free(p_alt, false, &what);
    if with_udp {
        assert_port_free(p_udp, true, &what);
    }
    assert!(
        http_get(at(LOCALHOST, p_web)).is_err(),
        "{what}: port {p_web} still answers"
    );
    assert_serves(at(LOCALHOST, p_web2), "container two, port 80\n", &what);

    del(&lab, &c2);
    assert_port_free(p_web2, true, &format!("{driver}, after the last DEL"));
    stop_all(&lab, servers);
    lab.assert_no_infra(&format!("{driver}, after the last DEL"));
    eprintln!("[timing] ports basic ({driver}): {:?}", t0.elapsed());
}

#[test]
fn publish_tcp_udp_and_free_on_del_builtin() {
    publish_tcp_udp_and_free_on_del("builtin");
}

#[test]
fn publish_tcp_udp_and_free_on_del_slirp4netns() {
    publish_tcp_udp_and_free_on_del("slirp4netns");
}

// ---------------------------------------------------------------------------
// 2: hostIP

fn host_ip(driver: &str) {
    let Some(lab) = lab_for(lab::binary!(), "p_hostip", driver) else {
        return;
    };
    let t0 = Instant::now();
    let c = lab.container();
    let (p_lo, p_any, p_empty, p_v6any) = (free_port(), free_port(), free_port(), free_port());
    add(
        &lab,
        &c,
        &[
            mapping("tcp", p_lo, 80, Some("127.0.0.1")),
            mapping("tcp", p_any, 80, Some("0.0.0.0")),
            mapping("tcp", p_empty, 80, Some("")),
            mapping("tcp", p_v6any, 80, Some("::")),
        ],
    );
    let body = format!("hostIP test, {driver}\n");
    let web = httpd(&lab, &c, 80, &body);

    assert_serves(at(LOCALHOST, p_lo), &body, "hostIP 127.0.0.1 on 127.0.0.1");
    assert_serves(at(LOCALHOST, p_any), &body, "hostIP 0.0.0.0 on 127.0.0.1");
    assert_serves(at(LOCALHOST, p_empty), &body, "hostIP \"\" on 127.0.0.1");
    match driver {
        // [::]: a dual-stack listener; [::1] reaches it.
        "builtin" => assert_serves(
            at(Ipv6Addr::LOCALHOST.into(), p_v6any),
            &body,
            "hostIP :: on [::1]",
        ),
        // slirp4netns takes IPv4 only: "::" means 0.0.0.0.
        _ => assert_serves(at(LOCALHOST, p_v6any), &body, "hostIP :: on 127.0.0.1"),
    }

    match host_global_ipv4() {
        Some(ip) => {
            let ip: IpAddr = ip.parse().expect("host_global_ipv4 gives an address");
            match http_get(at(ip, p_lo)) {
                Err(e) => eprintln!("hostIP 127.0.0.1 not reachable on {ip}, as it should: {e}"),
                Ok(got) => panic!("hostIP 127.0.0.1 answered on {ip}:{p_lo}: {got:?}"),
            }
            assert_serves(at(ip, p_any), &body, "hostIP 0.0.0.0 on a global address");
            assert_serves(at(ip, p_empty), &body, "hostIP \"\" on a global address");
        }
        None => eprintln!("no global IPv4 on this host: the not-on-other-addresses check skipped"),
    }

    if driver == "slirp4netns" {
        // An IPv6 host address other than "::" is refused, naming it, and
        // leaves nothing: the ports of the failed ADD are free again.
        let c2 = lab.container();
        let p_ok = free_port();
        let out = plugin_add(
            &lab,
            driver,
            "v6-host-ip",
            &c2,
            &[
                mapping("tcp", p_ok, 80, None),
                mapping("tcp", free_port(), 80, Some("::1")),
            ],
        );
        let err = cni_error(&out, "ADD with hostIP ::1 on slirp4netns");
        assert_eq!(err.code, 7, "hostIP ::1 on slirp4netns: {out}");
        assert!(err.mentions("::1"), "the error does not name ::1: {out}");
        assert_port_free(p_ok, false, "after the refused ADD");
        assert_eq!(
            lab.attachment_files().len(),
            1,
            "records after the refused ADD"
        );
        assert_eq!(
            lab.lease_files(NET).len(),
            1,
            "leases after the refused ADD"
        );
    }

    del(&lab, &c);
    for p in [p_lo, p_any, p_empty, p_v6any] {
        assert_port_free(p, false, &format!("{driver}: after DEL"));
    }
    stop_all(&lab, vec![web]);
    lab.assert_no_infra(&format!("{driver}: after DEL"));
    eprintln!("[timing] ports hostIP ({driver}): {:?}", t0.elapsed());
}

#[test]
fn host_ip_builtin() {
    host_ip("builtin");
}

#[test]
fn host_ip_slirp4netns() {
    host_ip("slirp4netns");
}
