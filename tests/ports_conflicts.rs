//! Host ports that cannot be had, through both port drivers: a host port
//! in use is refused with code 107 and nothing is left, and one (protocol,
//! host port) serves one container, so the same port from a second host
//! address is refused too.

use lab::ports::{
    add, add_raw, assert_echoes, assert_port_free, assert_serves, at, cni_error, del, free_port,
    httpd, lab_for, mapping, plugin_add, stop_all, tcp, udp, udp_echo_server, LOCALHOST,
};
use lab::NET;
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::time::Instant;

/// The error code of a host port that cannot be had.
const HOST_PORT_CODE: u64 = 107;

// ---------------------------------------------------------------------------
// 4: a host port in use

fn port_in_use(driver: &str) {
    let Some(lab) = lab_for(lab::binary!(), "p_conflict", driver) else {
        return;
    };
    let t0 = Instant::now();
    let (c1, c2) = (lab.container(), lab.container());
    let taken = free_port();
    let holder = TcpListener::bind((Ipv4Addr::UNSPECIFIED, taken)).expect("holding a port");

    // No infra yet: the ADD that would start it fails and leaves nothing.
    let out = plugin_add(&lab, driver, "conflict-fresh", &c1, &[tcp(taken, 80)]);
    let err = cni_error(&out, &format!("ADD publishing the held port {taken}"));
    assert_eq!(err.code, HOST_PORT_CODE, "{out}");
    assert!(
        err.mentions(&taken.to_string()),
        "the error does not name port {taken}: {out}"
    );
    lab.assert_no_infra("after the conflicting ADD that started the infra");
    assert!(
        lab.lease_files(NET).is_empty(),
        "leases left: {:?}",
        lab.lease_files(NET)
    );
    assert_eq!(lab.links(&c1), vec!["lo"], "links of the container");
    // Through cnitool, the runtime's user reads the port in the message.
    let out = add_raw(&lab, &c1, &[tcp(taken, 80)]);
    assert!(!out.ok(), "cnitool ADD publishing the held port: {out}");
    assert!(
        out.stderr.contains(&taken.to_string()) || out.stdout.contains(&taken.to_string()),
        "cnitool's message does not name port {taken}: {out}"
    );
    lab.assert_no_infra("after the conflicting cnitool ADD");

    // A live infra with another container publishing a port.
    let p2 = free_port();
    add(&lab, &c2, &[tcp(p2, 80)]);
    let web2 = httpd(&lab, &c2, 80, "the bystander\n");
    assert_serves(
        at(LOCALHOST, p2),
        "the bystander\n",
        "c2 before the conflict",
    );
    let sandbox = lab.sandbox_pid();
    let leases = lab.lease_files(NET);
    assert_eq!(leases.len(), 1, "leases with c2 attached: {leases:?}");

    // The free port before the held one is opened, then closed again.
    let p_first = free_port();
    let out = plugin_add(
        &lab,
        driver,
        "conflict-live",
        &c1,
        &[tcp(p_first, 80), tcp(taken, 80)],
    );
    let err = cni_error(&out, &format!("ADD publishing the held port {taken}"));
    assert_eq!(err.code, HOST_PORT_CODE, "{out}");
    assert!(
        err.mentions(&taken.to_string()),
        "the error does not name port {taken}: {out}"
    );
    assert_port_free(p_first, false, "the other port of the failed ADD");
    // A held UDP port, too.
    let udp_taken = free_port();
    let udp_holder =
        UdpSocket::bind((Ipv4Addr::UNSPECIFIED, udp_taken)).expect("holding a UDP port");
    let out = plugin_add(&lab, driver, "conflict-udp", &c1, &[udp(udp_taken, 53)]);
    let err = cni_error(
        &out,
        &format!("ADD publishing the held UDP port {udp_taken}"),
    );
    assert_eq!(err.code, HOST_PORT_CODE, "{out}");
    assert!(
        err.mentions(&udp_taken.to_string()),
        "the error does not name port {udp_taken}: {out}"
    );

    // Nothing of the failed ADDs is left; the bystander is unaffected.
    assert_eq!(lab.sandbox_pid(), sandbox, "the infra was replaced");
    assert_eq!(
        lab.attachment_files().len(),
        1,
        "records: {:?}",
        lab.attachment_files()
    );
    assert_eq!(lab.lease_files(NET), leases, "leases after the failed ADDs");
    assert_eq!(lab.links(&c1), vec!["lo"], "links of the container");
    assert_serves(
        at(LOCALHOST, p2),
        "the bystander\n",
        "c2 after the conflicts",
    );
    lab.assert_ping(&c2, lab::GATEWAY, "c2 -> gateway after the conflicts");

    // Once the port is let go, the same container gets it.
    drop(holder);
    drop(udp_holder);
    add(&lab, &c1, &[tcp(taken, 80)]);
    let web1 = httpd(&lab, &c1, 80, "now it works\n");
    assert_serves(
        at(LOCALHOST, taken),
        "now it works\n",
        "c1 once the port is free",
    );

    del(&lab, &c1);
    del(&lab, &c2);
    stop_all(&lab, vec![web1, web2]);
    lab.assert_no_infra("after the DELs");
    assert_port_free(taken, false, "after the DELs");
    eprintln!("[timing] ports conflict ({driver}): {:?}", t0.elapsed());
}

#[test]
fn port_in_use_builtin() {
    port_in_use("builtin");
}

#[test]
fn port_in_use_slirp4netns() {
    port_in_use("slirp4netns");
}

// ---------------------------------------------------------------------------
// One (protocol, host port) serves one container. Inside the infra every
// forward lands on tap0's address and portmap tells forwards apart by
// protocol and port alone, so the same port from a second host address
// would reach the first container: such an ADD is refused with code 107.

fn one_port_one_container(driver: &str) {
    let Some(lab) = lab_for(lab::binary!(), "p_oneport", driver) else {
        return;
    };
    let (c1, c2) = (lab.container(), lab.container());
    let p = free_port();
    add(&lab, &c1, &[mapping("tcp", p, 80, Some("127.0.0.1"))]);
    let body = format!("container 1, {driver}\n");
    let web = httpd(&lab, &c1, 80, &body);

    let mut refused = vec![
        (
            "another loopback address",
            mapping("tcp", p, 80, Some("127.0.0.2")),
        ),
        ("every address", mapping("tcp", p, 80, Some("0.0.0.0"))),
    ];
    if driver == "builtin" {
        refused.push(("IPv6 loopback", mapping("tcp", p, 80, Some("::1"))));
    }
    for (what, m) in refused {
        let out = plugin_add(&lab, driver, "container-2", &c2, &[m]);
        let err = cni_error(&out, &format!("ADD of container 2 on port {p}, {what}"));
        assert_eq!(err.code, HOST_PORT_CODE, "{what}: {out}");
        assert!(
            err.mentions(&p.to_string()),
            "{what}: the port is not named: {out}"
        );
        assert_eq!(
            lab.attachment_files().len(),
            1,
            "{what}: records after the refusal"
        );
    }
    assert_serves(at(LOCALHOST, p), &body, "container 1 after the refusals");

    // The other protocol on the same port is another forward: allowed, and
    // each container gets its own traffic.
    let mut servers = vec![web];
    if lab::have_python3("the UDP tests") {
        add(&lab, &c2, &[mapping("udp", p, 53, Some("127.0.0.1"))]);
        servers.push(udp_echo_server(&lab, &c2, 53, "container 2: "));
        assert_echoes(at(LOCALHOST, p), "container 2: ", "UDP to container 2");
        assert_serves(at(LOCALHOST, p), &body, "TCP still to container 1");
        del(&lab, &c2);
    }

    // One ADD's own mappings: the same port to two container ports is as
    // ambiguous, and refused before anything is touched.
    let q = free_port();
    let out = plugin_add(
        &lab,
        driver,
        "container-2",
        &c2,
        &[
            mapping("tcp", q, 80, Some("127.0.0.1")),
            mapping("tcp", q, 81, Some("127.0.0.2")),
        ],
    );
    let err = cni_error(&out, "one ADD publishing a port twice");
    assert_eq!(err.code, HOST_PORT_CODE, "{out}");
    assert_port_free(q, false, "after the refused ADD");

    del(&lab, &c1);
    stop_all(&lab, servers);
    lab.assert_no_infra(&format!("{driver}: after DEL"));
}

#[test]
fn one_port_one_container_builtin() {
    one_port_one_container("builtin");
}

#[test]
fn one_port_one_container_slirp4netns() {
    one_port_one_container("slirp4netns");
}
