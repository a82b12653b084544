//! rootless-cni through containerd's CNI library, go-cni: the code path of
//! containerd's CRI plugin (kubelet through containerd), and of nerdctl.
//!
//! Our client (tools/gocni-client) calls go-cni as containerd 1.6's CRI
//! does: the loopback network plus the first config of its conf dir
//! (conf-examples/kubernetes/10-rootless.conflist), labels as `CNI_ARGS`,
//! the pod's annotations and DNS, and port mappings, bandwidth and IP
//! ranges as capability args. go-cni marshals those from Go structs without
//! JSON tags: a plugin receives `{"HostPort":…,"ContainerPort":…,
//! "Protocol":"tcp","HostIP":…}`, Go-cased keys, as Go plugins accept them.
//! It runs as the lab's unprivileged user inside the session, as cnitool
//! does in the other tests; libcni's result cache (`/var/lib/cni` of the
//! session) records what go-cni handed to the plugin.

use lab::gocni::{assert_page_on_loopback, kubernetes_conflist, pod_ipv4};
use lab::gocni::{GoCni, Pod, WebServer};
use lab::{free_tcp_port, testdata, Lab, NET};
use serde_json::{json, Value};
use std::time::Instant;

/// What kubelet gives every pod: DNS settings and some annotations
/// (containerd passes both on every call; the example network declares
/// neither capability, so libcni keeps them from the plugin).
fn kubelet_pod(name: &str, lab: &Lab) -> Pod {
    let dns = json!({"Servers": ["10.96.0.10"], "Searches": ["default.svc.cluster.local"], "Options": ["ndots:5"]});
    let annotations = json!({"kubernetes.io/config.source": "api"});
    Pod::new(name, lab.container())
        .with("-dns", &dns.to_string())
        .with("-annotations", &annotations.to_string())
}

/// The `portMappings` libcni was handed for a pod's ADD, if any.
fn sent_port_mappings(gocni: &GoCni, pod: &Pod) -> Option<Value> {
    gocni.cached(NET, pod)["capabilityArgs"]
        .get("portMappings")
        .cloned()
}

/// Asserts that nothing holds the host's `port` any more: it can be bound
/// on 0.0.0.0 (a forwarder still listening would accept a GET and then fail
/// to reach the removed pod, which a failed GET cannot tell from a closed
/// port).
fn assert_port_closed(port: u16, when: &str) {
    if let Err(e) = std::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, port)) {
        panic!("{when}: port {port} is still taken: {e}");
    }
}

/// A pod with two hostPorts (hostIP 127.0.0.1 and an empty hostIP) serves
/// a page from its netns on the host's loopback; CHECK finds the IPv4
/// port rules; after Remove the ports are closed and nothing of the infra
/// is left.
#[test]
fn go_cni_pod_with_host_ports_serves_the_host_loopback() {
    let Some(lab) = Lab::new(lab::binary!(), "gocni_ports") else {
        return;
    };
    let Some(gocni) = GoCni::new(&lab, &kubernetes_conflist()) else {
        return;
    };
    let t0 = Instant::now();
    let (p_lo, p_any) = (free_tcp_port(), free_tcp_port());
    // As the CRI gives them (protocol "TCP"); the client converts them as
    // containerd's toCNIPortMappings does.
    let ports = json!([
        {"hostPort": p_lo, "containerPort": 80, "protocol": "TCP", "hostIP": "127.0.0.1"},
        {"hostPort": p_any, "containerPort": 80, "protocol": "TCP", "hostIP": ""},
    ]);
    let pod = kubelet_pod("web", &lab).with("-ports", &ports.to_string());

    let result = gocni.setup(&pod);
    let ip = pod_ipv4(&result).unwrap_or_else(|| panic!("no eth0 IPv4 in {result}"));
    lab.assert_attached(&pod.container, &ip);
    assert_eq!(
        sent_port_mappings(&gocni, &pod),
        Some(json!([
            {"HostPort": p_lo, "ContainerPort": 80, "Protocol": "tcp", "HostIP": "127.0.0.1"},
            {"HostPort": p_any, "ContainerPort": 80, "Protocol": "tcp", "HostIP": ""},
        ])),
        "go-cni's portMappings"
    );

    let body = "served from a pod set up through go-cni\n";
    let web = WebServer::start(&lab, &pod.container, body);
    assert_page_on_loopback(p_lo, body, "hostIP 127.0.0.1");
    assert_page_on_loopback(p_any, body, "empty hostIP");

    // CHECK reaches the inner portmap with the mappings. Debian's portmap
    // (plugins 1.1.1) checks the IPv4 rules, then looks for IPv6 rules an
    // IPv4-only pod never got (containernetworking/plugins#819): that, and
    // only that, may fail it. containerd's CRI never calls CHECK.
    let check = gocni.run("check", &pod);
    if !check.ok() {
        assert!(
            check.stderr.contains("could not check ipv6 dnat"),
            "go-cni check of a pod with ports: {check}"
        );
        eprintln!("CHECK with ports, portmap 1.1.1: {}", check.stderr.trim());
    }
    gocni.remove(&pod);
    assert_port_closed(p_lo, "after remove");
    assert_port_closed(p_any, "after remove");
    drop(web);
    lab.assert_no_infra("after go-cni remove");
    eprintln!("[timing] go_cni ports: {:?}", t0.elapsed());
}

/// Two pods without ports, one as containerd 1.6's CRI calls go-cni (no
/// `portMappings` at all) and one as go-cni users that always pass the
/// list do (`portMappings: []`), ping each other; CHECK passes for both;
/// after Remove nothing is left.
#[test]
fn go_cni_pods_without_ports_ping_each_other() {
    let Some(lab) = Lab::new(lab::binary!(), "gocni_ping") else {
        return;
    };
    let Some(gocni) = GoCni::new(&lab, &kubernetes_conflist()) else {
        return;
    };
    let t0 = Instant::now();
    let a = kubelet_pod("a", &lab);
    let b = kubelet_pod("b", &lab).with("-always-ports", "true");

    let ip_a = pod_ipv4(&gocni.setup(&a)).expect("pod a has an IPv4");
    let ip_b = pod_ipv4(&gocni.setup(&b)).expect("pod b has an IPv4");
    lab.assert_attached(&a.container, &ip_a);
    lab.assert_attached(&b.container, &ip_b);
    assert_eq!(
        sent_port_mappings(&gocni, &a),
        None,
        "pod a: no portMappings"
    );
    assert_eq!(
        sent_port_mappings(&gocni, &b),
        Some(json!([])),
        "pod b: portMappings []"
    );
    let cni_args = gocni.cached(NET, &a)["cniArgs"].clone();
    for (k, v) in [
        ("K8S_POD_NAME", "a"),
        ("K8S_POD_NAMESPACE", "default"),
        ("K8S_POD_INFRA_CONTAINER_ID", a.id.as_str()),
        ("IgnoreUnknown", "1"),
    ] {
        assert!(
            cni_args
                .as_array()
                .is_some_and(|l| l.contains(&json!([k, v]))),
            "CNI_ARGS lack {k}={v}: {cni_args}"
        );
    }

    lab.assert_ping(&a.container, &ip_b, "pod a pings pod b");
    lab.assert_ping(&b.container, &ip_a, "pod b pings pod a");
    gocni.check(&a);
    gocni.check(&b);
    gocni.remove(&a);
    gocni.remove(&b);
    lab.assert_no_infra("after go-cni remove of both pods");
    eprintln!("[timing] go_cni ping: {:?}", t0.elapsed());
}

/// `tc qdisc show` in the infra's netns.
fn infra_qdiscs(lab: &Lab) -> String {
    let pid = lab.sandbox_pid().expect("a running infra");
    let net = format!("--net=/proc/{pid}/ns/net");
    let out = lab.exec(&[], None, &["nsenter", &net, "--", "tc", "qdisc", "show"]);
    assert!(out.ok(), "tc qdisc show in the infra: {out}");
    out.stdout
}

/// go-cni's bandwidth and ipRanges capability args reach the inner
/// plugins: the pod's address comes from the requested subnet, the
/// bandwidth plugin shapes its traffic in the infra, the pod still talks
/// to the bridge's gateway; after Remove nothing is left. go-cni's own
/// WithCapabilityIPRanges sends one flat list, which host-local (it reads
/// range sets) refuses: that setup fails with host-local's error, and the
/// Remove containerd does after a failed setup leaves nothing either.
#[test]
fn go_cni_bandwidth_and_ip_ranges_reach_the_inner_plugins() {
    let Some(lab) = Lab::new(lab::binary!(), "gocni_caps") else {
        return;
    };
    // The kubernetes example with the `bandwidth` and `ipRanges`
    // capabilities declared outside (libcni passes only declared ones) and
    // used inside: an inner `bandwidth` plugin and host-local ranges from
    // `ipRanges` only (host-local puts runtime ranges before its configured
    // ones and would hand out an address from each).
    let conflist = testdata::conflist("go-cni-bandwidth-ip-ranges");
    let Some(gocni) = GoCni::new(&lab, &conflist) else {
        return;
    };
    let t0 = Instant::now();
    let ranges = json!([[{"subnet": "10.89.7.0/24", "gateway": "10.89.7.1"}]]);
    let pod = kubelet_pod("shaped", &lab)
        .with("-ip-range-sets", &ranges.to_string())
        .with("-ingress-rate", "8000000")
        .with("-egress-rate", "16000000");

    let result = gocni.setup(&pod);
    let ip = pod_ipv4(&result).unwrap_or_else(|| panic!("no eth0 IPv4 in {result}"));
    assert!(
        ip.starts_with("10.89.7."),
        "address {ip} not from the requested 10.89.7.0/24"
    );
    assert_eq!(
        lab.ipv4(&pod.container, "eth0").as_deref(),
        Some(ip.as_str())
    );
    let caps = &gocni.cached(NET, &pod)["capabilityArgs"];
    assert_eq!(
        caps["bandwidth"]["IngressRate"],
        json!(8_000_000),
        "go-cni's bandwidth: {caps}"
    );
    let qdiscs = infra_qdiscs(&lab);
    eprintln!("qdiscs in the infra:\n{qdiscs}");
    for rate in ["8Mbit", "16Mbit"] {
        assert!(
            qdiscs
                .lines()
                .any(|l| l.contains("qdisc tbf") && l.contains(&format!("rate {rate} "))),
            "no tbf at {rate} in the infra: {qdiscs}"
        );
    }
    lab.assert_ping(&pod.container, "10.89.7.1", "the pod pings its gateway");
    gocni.check(&pod);
    gocni.remove(&pod);
    lab.assert_no_infra("after go-cni remove");

    let flat = Pod::new("flat", lab.container()).with(
        "-ip-ranges",
        &json!([{"subnet": "10.89.8.0/24"}]).to_string(),
    );
    let out = gocni.run("setup", &flat);
    assert!(
        !out.ok(),
        "setup with go-cni's flat ipRanges succeeded: {out}"
    );
    assert!(
        out.stderr.contains("host-local") || out.stderr.contains("RangeSet"),
        "not host-local's error: {out}"
    );
    eprintln!("go-cni's flat ipRanges: {}", out.stderr.trim());
    gocni.remove(&flat);
    lab.assert_no_infra("after the failed setup and its remove");
    eprintln!("[timing] go_cni capabilities: {:?}", t0.elapsed());
}
