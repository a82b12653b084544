//! Go-cased `portMappings` keys, as containerd's go-cni writes them
//! (structs without JSON tags): read case-insensitively, as Go plugins do,
//! through both port drivers.

use lab::ports::{
    add, assert_port_free, assert_serves, at, del, free_port, httpd, lab_for, status_ports,
    stop_all, LOCALHOST,
};
use serde_json::json;
use std::time::Instant;

// ---------------------------------------------------------------------------
// Go-cased keys, as containerd's go-cni writes them (structs without JSON
// tags). Go plugins read them case-insensitively; so do we.

fn go_cased_mappings(driver: &str) {
    let Some(lab) = lab_for(lab::binary!(), "p_gocase", driver) else {
        return;
    };
    let t0 = Instant::now();
    let c = lab.container();
    let (p_lo, p_empty, p_bare) = (free_port(), free_port(), free_port());
    let go = |port: u16, host_ip: &str| json!({"HostPort": port, "ContainerPort": 80, "Protocol": "tcp", "HostIP": host_ip});
    // No protocol at all: tcp, for us and for the inner portmap alike.
    let bare = json!({"HOSTPORT": p_bare, "containerport": 80});
    add(&lab, &c, &[go(p_lo, "127.0.0.1"), go(p_empty, ""), bare]);
    let body = format!("go-cased mappings, {driver}\n");
    let web = httpd(&lab, &c, 80, &body);

    // A HostIP left for the inner portmap would make its DNAT miss our
    // forward, which lands on the infra's own address.
    assert_serves(at(LOCALHOST, p_lo), &body, "HostIP 127.0.0.1");
    assert_serves(at(LOCALHOST, p_empty), &body, "HostIP \"\"");
    assert_serves(at(LOCALHOST, p_bare), &body, "no protocol");
    let ports = status_ports(&lab);
    for p in [p_lo, p_empty, p_bare] {
        assert!(
            ports.iter().any(|s| s.contains(&format!(":{p}/tcp"))),
            "status does not list port {p}: {ports:?}"
        );
    }

    del(&lab, &c);
    for p in [p_lo, p_empty, p_bare] {
        assert_port_free(p, false, &format!("{driver}: after DEL"));
    }
    stop_all(&lab, vec![web]);
    lab.assert_no_infra(&format!("{driver}: after DEL"));
    eprintln!("[timing] ports go-cased ({driver}): {:?}", t0.elapsed());
}

#[test]
fn go_cased_mappings_builtin() {
    go_cased_mappings("builtin");
}

#[test]
fn go_cased_mappings_slirp4netns() {
    go_cased_mappings("slirp4netns");
}
