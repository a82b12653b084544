//! The builtin driver when the infra cannot set up the rules that keep
//! clients' addresses (a failing or a hanging `iptables-restore`): the
//! infra starts in time, ports work as before with every client seen as
//! the infra's address, and `status`, `doctor` and infra.log say why.

use lab::client_address::{
    assert_seen, client_addresses, cnitool, host_netns, mappings, peer_echo, stop, HOST_V4, INFRA,
    PORT_DUAL, PORT_V4,
};
use lab::{example_conflist, Container, Lab, Server};
use serde_json::json;
use std::time::Instant;

/// ADD through cnitool from the lab's host netns with `script` first on
/// PATH as `iptables-restore` (what a kernel without the CONNMARK target,
/// or a command stuck on a lock, would do: neither is at hand), then the
/// peer-echo server in the container; the host netns, the container, the
/// server.
fn add_with_iptables_restore(
    lab: &Lab,
    script: &str,
    what: &str,
) -> (Container, Container, Server) {
    use std::os::unix::fs::PermissionsExt;
    lab.write_file("fakebin/iptables-restore", script);
    let bin = lab.dir.join("fakebin");
    for p in [bin.clone(), bin.join("iptables-restore")] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let path = format!("{}:{}", bin.display(), lab::LAB_PATH);
    let host = host_netns(lab);
    let c = lab.container();
    let netconf = lab.netconf_dir().display().to_string();
    let cni_path = lab.cni_path();
    let cap_args = json!({ "portMappings": mappings() }).to_string();
    let cnitool_bin = lab.dir.join("tools/cnitool").display().to_string();
    let net_arg = format!("--net={}", host.netns());
    let started = Instant::now();
    let add = lab.exec(
        &[
            ("PATH", &path),
            ("NETCONFPATH", &netconf),
            ("CNI_PATH", &cni_path),
            ("CAP_ARGS", &cap_args),
        ],
        None,
        &[
            "nsenter",
            &net_arg,
            "--",
            &cnitool_bin,
            "add",
            lab::NET,
            &c.netns(),
        ],
    );
    eprintln!("[timing] ADD with {what}: {:?}", started.elapsed());
    add.add_result(&format!("ADD with {what}"));
    let server = peer_echo(lab, &c);
    (host, c, server)
}

/// A lab named `name` whose ADD ran with `script` as `iptables-restore`
/// (see `add_with_iptables_restore`), checked to have started without the
/// rules, `status` saying why (`why`); the lab, host netns, container,
/// server and when it began. None when a prerequisite is missing.
fn started_without_rules(
    name: &str,
    script: &str,
    what: &str,
    why: &str,
) -> Option<(Lab, Container, Container, Server, Instant)> {
    if !lab::have_python3("the peer-echo server") {
        return None;
    }
    let lab = Lab::new(lab::binary!(), name)?;
    let t0 = Instant::now();
    lab.write_netconf(lab::NET, &example_conflist());
    let (host, c, server) = add_with_iptables_restore(&lab, script, what);
    let status = client_addresses(&lab);
    assert_eq!(status["kept"], false, "{status}");
    assert!(
        status["error"].as_str().unwrap_or_default().contains(why),
        "status does not say why: {status}"
    );
    Some((lab, host, c, server, t0))
}

/// The DEL through cnitool from the host netns, then nothing is left.
fn del_and_stop(lab: &Lab, host: &Container, c: &Container, server: Server) {
    let del = cnitool(lab, host, "del", lab::NET, c, &json!([]));
    assert!(del.ok(), "DEL: {del}");
    stop(lab, server);
    lab.assert_no_infra("after DEL");
}

/// When the infra cannot route replies to clients' addresses (here an
/// `iptables-restore` that fails as one without the CONNMARK target would:
/// a kernel without it is not at hand), ports work as before, every client
/// seen as the infra's address, and it is said: a warning in infra.log,
/// `status` and `doctor`.
#[test]
fn builtin_driver_without_the_rules_says_so_and_still_forwards() {
    let Some((lab, host, c, server, t0)) = started_without_rules(
        "client_addr_none",
        "#!/bin/sh\necho \"iptables-restore: Couldn't load target \\`CONNMARK' (injected by the test)\" >&2\nexit 2\n",
        "a failing iptables-restore",
        "injected by the test",
    ) else {
        return;
    };
    let text = lab.cli(&["status"]);
    assert!(text.stdout.contains("NOT kept"), "status: {text}");
    let log = std::fs::read_to_string(lab.state_dir().join("infra.log")).unwrap_or_default();
    assert!(
        log.contains("containers will not see every client's own address"),
        "infra.log: {log}"
    );
    let doctor = lab.cli(&["doctor", "--json"]);
    let report = doctor
        .json()
        .unwrap_or_else(|| panic!("doctor --json: {doctor}"));
    let check = report["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["check"] == "client addresses")
        .unwrap_or_else(|| panic!("no client addresses check: {doctor}"))
        .clone();
    assert_eq!(check["ok"], false, "{check}");
    assert!(
        !check["fix"].as_str().unwrap_or_default().is_empty(),
        "{check}"
    );

    assert_seen(
        &host,
        "without the rules",
        &[
            ("tcp", "127.0.0.1", PORT_V4, INFRA),
            ("tcp", HOST_V4, PORT_V4, INFRA),
            ("udp", "127.0.0.1", PORT_V4, INFRA),
            ("tcp", "::1", PORT_DUAL, INFRA),
        ],
    );
    del_and_stop(&lab, &host, &c, server);
    eprintln!("[timing] client_addr_none: {:?}", t0.elapsed());
}

/// A setup command that hangs (here an `iptables-restore` that never
/// returns, as one stuck on a lock or a module load would) is given up in
/// time: the infra starts within the plugin's wait, ports work as before
/// (every client the infra's address) and `status` says why.
#[test]
fn builtin_driver_with_a_hanging_rule_command_starts_without_it() {
    let Some((lab, host, c, server, t0)) = started_without_rules(
        "client_addr_hang",
        "#!/bin/sh\nexec sleep 60\n",
        "a hanging iptables-restore",
        "still running",
    ) else {
        return;
    };
    assert_seen(
        &host,
        "with a hanging rule command",
        &[
            ("tcp", "127.0.0.1", PORT_V4, INFRA),
            ("udp", HOST_V4, PORT_V4, INFRA),
        ],
    );
    del_and_stop(&lab, &host, &c, server);
    eprintln!("[timing] client_addr_hang: {:?}", t0.elapsed());
}
