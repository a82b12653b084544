//! DNS through the infra (following a changed resolv.conf), the host's
//! loopback over IPv6, and MTU; each but the resolv.conf change for both
//! ways out (test names end in _slirp4netns or _pasta). pasta reads
//! resolv.conf once, at start, so only slirp4netns follows a change.
//!
//! - IPv6: conf-examples/dual-stack.conflist gives containers addresses in
//!   fd00:89::/64; they ping each other, and reach the host's `::1` as
//!   `fd00::2` only when `allowHostLoopback` is true.
//! - DNS: slirp4netns answers 10.0.2.3 by forwarding to the first nameserver
//!   of /etc/resolv.conf as its mount namespace sees it (the session's). The
//!   lab binds a resolv.conf naming a dnsmasq this test starts on a loopback
//!   address: no query ever leaves the machine's loopback.
//! - MTU: the infra's tap0 has the outer config's `mtu` (default 65520), a
//!   container's eth0 the bridge's.

use lab::outbound::{self, PASTA};
use lab::{example_conflist, outer, retry, HostServer, Lab, Out, NET};
use serde_json::Value;
use std::fs;
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The network of conf-examples/dual-stack.conflist.
const DUAL: &str = "dual-stack";
/// The host's `::1` as seen through slirp4netns (with host loopback allowed).
const SLIRP_HOST6: &str = "fd00::2";
/// slirp4netns's DNS forwarder.
const SLIRP_DNS: &str = "10.0.2.3";
/// A name only the test's DNS server knows, and its answer.
const LAB_NAME: &str = "only-the-lab.test";
const LAB_NAME_IP: &str = "10.1.2.3";

/// The first IPv6 address (without prefix) of a CNI result.
fn result_ipv6(result: &Value) -> Option<String> {
    result["ips"].as_array()?.iter().find_map(|ip| {
        let a = ip["address"].as_str()?;
        let addr = a.split('/').next()?;
        addr.contains(':').then(|| addr.to_string())
    })
}

/// The `dns` a result carries.
fn result_nameservers(result: &Value) -> Vec<String> {
    result["dns"]["nameservers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// ADD through cnitool; the result, parsed.
fn add(lab: &Lab, net: &str, netns: &str) -> Value {
    lab.cnitool("add", net, netns)
        .add_result(&format!("ADD {netns}"))
}

fn del(lab: &Lab, net: &str, netns: &str) {
    let del = lab.cnitool("del", net, netns);
    assert!(del.ok(), "DEL {netns}: {del}");
}

/// Runs `argv` in the infra's network namespace (from inside the session).
fn in_infra(lab: &Lab, argv: &[&str]) -> Out {
    let pid = lab.sandbox_pid().expect("no infra running");
    let net = format!("--net=/proc/{pid}/ns/net");
    let mut full = vec!["nsenter", net.as_str(), "--"];
    full.extend_from_slice(argv);
    lab.exec(&[], None, &full)
}

/// The `mtu` of `ip -o link show` output.
fn link_mtu(out: &Out) -> Option<u32> {
    let fields: Vec<&str> = out.stdout.split_whitespace().collect();
    let i = fields.iter().position(|f| *f == "mtu")?;
    fields.get(i + 1)?.parse().ok()
}

/// Waits until the infra's tap0 has a usable fd00::/64 address and a
/// default route. With slirp4netns they come from its router advertisement
/// (SLAAC, past duplicate address detection), 3-4 s after the infra's
/// start, and until then replies to the infra's (masqueraded) IPv6 traffic
/// are dropped; pasta sets them, with the route via fd00::2, before the
/// first ADD returns. `since`: when the infra was started, for the message.
fn wait_for_infra_slaac(lab: &Lab, engine: &str, since: Instant) {
    let via = if engine == PASTA {
        "via fd00::2"
    } else {
        "via fe80::2"
    };
    let addr = retry(Duration::from_secs(10), || {
        let mut out = in_infra(lab, &["ip", "-o", "-6", "addr", "show", "dev", "tap0"]);
        let usable = out
            .stdout
            .lines()
            .any(|l| l.contains("inet6 fd00::") && !l.contains("tentative"));
        if !usable {
            out.status = Some(1);
        }
        out
    });
    assert!(addr.ok(), "tap0 got no usable fd00::/64 address: {addr}");
    let route = retry(Duration::from_secs(10), || {
        let mut out = in_infra(lab, &["ip", "-6", "route", "show", "default"]);
        if !out.stdout.contains(via) {
            out.status = Some(1);
        }
        out
    });
    assert!(route.ok(), "the infra has no IPv6 default route: {route}");
    eprintln!(
        "the infra's IPv6 (tap0 SLAAC) was ready {} ms after the first ADD began",
        since.elapsed().as_millis()
    );
}

// ---------------------------------------------------------------------------
// IPv6

/// Two containers on the dual-stack example: distinct fd00:89:: addresses,
/// ping both ways over IPv6, and the host's [::1] reached as [fd00::2].
fn ipv6_containers_and_host_loopback(engine: &str) {
    let test = format!("ipv6_{engine}");
    if !outbound::available(engine, &test) {
        return;
    }
    let Some(lab) = Lab::new(lab::binary!(), &test) else {
        return;
    };
    let server = HostServer::start("::1");
    let mut conf = lab::conf_example("dual-stack.conflist");
    outbound::with_engine(&mut conf, engine);
    assert_eq!(conf["plugins"][0]["ipv6"], true, "{conf}");
    assert_eq!(conf["plugins"][0]["allowHostLoopback"], true, "{conf}");
    lab.write_netconf(DUAL, &conf);
    let (c1, c2) = (lab.container(), lab.container());

    let started = Instant::now();
    let mut ips = Vec::new();
    for c in [&c1, &c2] {
        let result = add(&lab, DUAL, &c.netns());
        let ip6 = result_ipv6(&result).unwrap_or_else(|| panic!("no IPv6 in result: {result}"));
        assert!(ip6.starts_with("fd00:89::"), "{ip6} not in fd00:89::/64");
        assert_eq!(
            result_nameservers(&result),
            [SLIRP_DNS],
            "dns of the result: {result}"
        );
        let shown = lab.in_netns(c, &["ip", "-o", "-6", "addr", "show", "dev", "eth0"]);
        assert!(
            shown.stdout.contains(&format!("inet6 {ip6}/64")),
            "eth0 lacks {ip6}: {shown}"
        );
        ips.push(ip6);
    }
    assert_ne!(ips[0], ips[1], "both containers got the same IPv6 address");

    let ping = retry(Duration::from_secs(5), || lab.ping(&c1, &ips[1]));
    assert!(ping.ok(), "c1 -> c2 over IPv6: {ping}");
    let ping = retry(Duration::from_secs(5), || lab.ping(&c2, &ips[0]));
    assert!(ping.ok(), "c2 -> c1 over IPv6: {ping}");

    wait_for_infra_slaac(&lab, engine, started);
    // pasta relays pings through the host's "ping" sockets, which only the
    // gids of net.ipv4.ping_group_range may open ("1 0", none, by
    // default): slirp4netns answers pings to its gateway itself.
    if engine != PASTA {
        let ping = retry(Duration::from_secs(5), || lab.ping(&c1, SLIRP_HOST6));
        assert!(ping.ok(), "{engine}: c1 -> {SLIRP_HOST6}: {ping}");
    }

    let url = format!("http://[{SLIRP_HOST6}]:{}/", server.port);
    let got = retry(Duration::from_secs(5), || {
        lab.in_netns(&c2, &["curl", "-g", "-sS", "--max-time", "3", &url])
    });
    assert!(
        got.ok(),
        "{engine}: container -> host [::1] via {url}: {got}"
    );
    assert_eq!(got.stdout, HostServer::BODY, "{got}");
    assert!(server.connections() >= 1, "the [::1] server saw nothing");

    for c in [&c1, &c2] {
        del(&lab, DUAL, &c.netns());
    }
    lab.assert_no_infra("after DEL of both");
}

#[test]
fn ipv6_containers_and_host_loopback_slirp4netns() {
    ipv6_containers_and_host_loopback(outbound::SLIRP4NETNS);
}

#[test]
fn ipv6_containers_and_host_loopback_pasta() {
    ipv6_containers_and_host_loopback(PASTA);
}

/// With `allowHostLoopback: false`, [fd00::2]:PORT does not reach the host's
/// [::1], while IPv6 through the infra works. slirp4netns itself answers
/// pings to fd00::2; with pasta (`--no-map-gw`) the infra refuses every
/// packet to the gateway, pings included.
fn ipv6_host_loopback_unreachable_when_not_allowed(engine: &str) {
    let test = format!("ipv6_denied_{engine}");
    if !outbound::available(engine, &test) {
        return;
    }
    let Some(lab) = Lab::new(lab::binary!(), &test) else {
        return;
    };
    let server = HostServer::start("::1");
    let mut conf = lab::conf_example("dual-stack.conflist");
    outer(&mut conf).insert("allowHostLoopback".into(), false.into());
    outbound::with_engine(&mut conf, engine);
    lab.write_netconf(DUAL, &conf);
    let c = lab.container();

    let started = Instant::now();
    add(&lab, DUAL, &c.netns());
    wait_for_infra_slaac(&lab, engine, started);
    if engine == PASTA {
        let ping = lab.ping(&c, SLIRP_HOST6);
        assert!(!ping.ok(), "pasta: {SLIRP_HOST6} answered a ping: {ping}");
    } else {
        let ping = retry(Duration::from_secs(5), || lab.ping(&c, SLIRP_HOST6));
        assert!(
            ping.ok(),
            "container -> {SLIRP_HOST6} (slirp4netns): {ping}"
        );
    }

    let url = format!("http://[{SLIRP_HOST6}]:{}/", server.port);
    let got = lab.in_netns(&c, &["curl", "-g", "-sS", "--max-time", "3", &url]);
    assert!(
        !got.ok(),
        "{engine}: host [::1] reached although not allowed: {got}"
    );
    assert_eq!(server.connections(), 0, "the [::1] server was connected to");

    del(&lab, DUAL, &c.netns());
    lab.assert_no_infra("after the DEL");
}

#[test]
fn ipv6_host_loopback_unreachable_when_not_allowed_slirp4netns() {
    ipv6_host_loopback_unreachable_when_not_allowed(outbound::SLIRP4NETNS);
}

#[test]
fn ipv6_host_loopback_unreachable_when_not_allowed_pasta() {
    ipv6_host_loopback_unreachable_when_not_allowed(PASTA);
}

// ---------------------------------------------------------------------------
// DNS

/// A dnsmasq on a loopback address, answering only `LAB_NAME`; it forwards
/// nothing (`--no-resolv`, no servers). Killed by its PID on drop.
struct Dnsmasq {
    ip: String,
    child: Child,
    log: PathBuf,
}

impl Dnsmasq {
    const BIN: &'static str = "/usr/sbin/dnsmasq";

    /// Starts one on the first of a few loopback addresses whose port 53 is
    /// free, answering LAB_NAME with LAB_NAME_IP; the log goes to `log`.
    fn start(log: PathBuf) -> Dnsmasq {
        Dnsmasq::answering(log, LAB_NAME_IP)
    }

    /// `start`, answering LAB_NAME with `answer`.
    fn answering(log: PathBuf, answer: &str) -> Dnsmasq {
        let candidates = ["127.0.0.53", "127.53.0.1", "127.53.0.2", "127.53.0.3"];
        'candidates: for ip in candidates {
            let free = UdpSocket::bind((ip, 53)).is_ok() && TcpListener::bind((ip, 53)).is_ok();
            if !free {
                continue;
            }
            let stderr = fs::File::create(&log)
                .unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
            let child = Command::new(Self::BIN)
                .args(["--no-daemon", "--conf-file=/dev/null", "--port=53"])
                .arg(format!("--listen-address={ip}"))
                .args(["--bind-interfaces", "--no-resolv", "--no-hosts"])
                .arg(format!("--address=/{LAB_NAME}/{answer}"))
                .arg(format!("--local=/{LAB_NAME}/")) // AAAA: no data, not REFUSED
                .args(["--log-queries", "--log-facility=-"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", Self::BIN));
            let mut dns = Dnsmasq {
                ip: ip.to_string(),
                child,
                log: log.clone(),
            };
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if let Ok(Some(st)) = dns.child.try_wait() {
                    // Another test's dnsmasq took the address between the
                    // look and the start: the next one.
                    if dns.log_text().contains("Address already in use") {
                        continue 'candidates;
                    }
                    panic!("dnsmasq on {ip} exited ({st}): {}", dns.log_text());
                }
                let probe = Command::new("busybox")
                    .args(["nslookup", LAB_NAME, ip])
                    .output();
                if probe.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(answer)) {
                    return dns;
                }
                assert!(
                    Instant::now() < deadline,
                    "dnsmasq on {ip} does not answer: {}",
                    dns.log_text()
                );
                thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("port 53 is taken on every candidate loopback address {candidates:?}");
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The queries for `LAB_NAME` it logged, one line each.
    fn queries(&self) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| l.contains("query[") && l.contains(LAB_NAME))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `busybox nslookup LAB_NAME 10.0.2.3` from a container.
fn lookup(lab: &Lab, c: &lab::Container) -> Out {
    lab.in_netns(c, &["busybox", "nslookup", LAB_NAME, SLIRP_DNS])
}

/// A container resolves a name only the test's DNS server knows, through
/// the way out's forwarder 10.0.2.3, which forwards to the loopback
/// nameserver of the session's /etc/resolv.conf; `allowHostLoopback: false`
/// (slirp4netns --disable-host-loopback, pasta --no-map-gw) does not stop
/// that forwarding.
fn dns_through_the_infra_forwarder(engine: &str) {
    let test = format!("dns_{engine}");
    if !outbound::available(engine, &test) {
        return;
    }
    if !Path::new(Dnsmasq::BIN).exists() {
        let why = format!("{} (apt-get install dnsmasq-base)", Dnsmasq::BIN);
        if lab::in_ci() {
            panic!("dns_through_the_infra_forwarder needs {why}");
        }
        eprintln!("skipping dns_through_the_infra_forwarder: it needs {why}");
        return;
    }
    let Some(lab) = Lab::new(lab::binary!(), &test) else {
        return;
    };
    let dns = Dnsmasq::start(lab.dir.join("dnsmasq.log"));
    lab.bind_resolv_conf(&format!("nameserver {}\n", dns.ip));
    let c = lab.container();
    let mut conf = example_conflist();
    assert_eq!(conf["plugins"][0]["allowHostLoopback"], true, "{conf}");
    outbound::with_engine(&mut conf, engine);

    for allow in [true, false] {
        outer(&mut conf).insert("allowHostLoopback".into(), allow.into());
        lab.write_netconf(NET, &conf);
        let before = dns.queries().len();
        let result = add(&lab, NET, &c.netns());
        assert_eq!(
            result_nameservers(&result),
            [SLIRP_DNS],
            "dns of the result: {result}"
        );
        let got = retry(Duration::from_secs(5), || {
            let mut out = lookup(&lab, &c);
            if !out.stdout.contains(LAB_NAME_IP) {
                out.status = Some(1);
            }
            out
        });
        assert!(
            got.ok(),
            "{engine}, allowHostLoopback {allow}: {LAB_NAME} through {SLIRP_DNS}: {got}\n\
             dnsmasq log:\n{}",
            dns.log_text()
        );
        // dnsmasq saw it, from the engine's socket on the host's loopback.
        let seen = dns.queries();
        assert!(
            seen.len() > before && seen[before..].iter().all(|l| l.contains("from 127.")),
            "allowHostLoopback {allow}: dnsmasq's queries: {seen:?}"
        );
        if !allow {
            // The setting took effect: the host's loopback itself is closed.
            let server = HostServer::start("127.0.0.1");
            let url = format!("http://10.0.2.2:{}/", server.port);
            let got = lab.curl(&c, &url);
            assert!(
                !got.ok(),
                "host loopback reached although not allowed: {got}"
            );
            assert_eq!(server.connections(), 0);
        }
        del(&lab, NET, &c.netns());
        lab.assert_no_infra(&format!("after DEL (allowHostLoopback {allow})"));
    }
}

#[test]
fn dns_through_the_infra_forwarder_slirp4netns() {
    dns_through_the_infra_forwarder(outbound::SLIRP4NETNS);
}

#[test]
fn dns_through_the_infra_forwarder_pasta() {
    dns_through_the_infra_forwarder(PASTA);
}

/// slirp4netns's forwarder follows /etc/resolv.conf as it changes (pasta's
/// does not: it reads the file once, at start): with the infra
/// running, the session's file is rewritten to name another nameserver,
/// and the next lookups through 10.0.2.3 reach that one (each server gives
/// its own answer, and logs the query).
#[test]
fn dns_forwarder_follows_a_changed_resolv_conf() {
    if !Path::new(Dnsmasq::BIN).exists() {
        let why = format!("{} (apt-get install dnsmasq-base)", Dnsmasq::BIN);
        assert!(!lab::in_ci(), "the test needs {why}");
        eprintln!("skipping: it needs {why}");
        return;
    }
    let Some(lab) = Lab::with_example_net(lab::binary!(), "dns_reread") else {
        return;
    };
    let first = Dnsmasq::answering(lab.dir.join("first.log"), "10.1.2.4");
    let second = Dnsmasq::answering(lab.dir.join("second.log"), "10.4.5.6");
    lab.bind_resolv_conf(&format!("nameserver {}\n", first.ip));
    let c = lab.container();
    add(&lab, NET, &c.netns());
    let answered = |ip: &str| {
        retry(Duration::from_secs(10), || {
            let mut out = lookup(&lab, &c);
            if !out.stdout.contains(ip) {
                out.status = Some(1);
            }
            out
        })
    };
    let got = answered("10.1.2.4");
    assert!(got.ok(), "through the first nameserver: {got}");
    // The bound file rewritten in place, as a resolver manager does.
    fs::write(
        lab.dir.join("resolv.conf"),
        format!("nameserver {}\n", second.ip),
    )
    .expect("rewriting resolv.conf");
    let before = second.queries().len();
    let got = answered("10.4.5.6");
    assert!(
        got.ok(),
        "after resolv.conf named {}: {got}\nsecond dnsmasq:\n{}",
        second.ip,
        second.log_text()
    );
    assert!(
        second.queries().len() > before,
        "the second nameserver saw no query"
    );
    del(&lab, NET, &c.netns());
    lab.assert_no_infra("after the DEL");
}

// ---------------------------------------------------------------------------
// MTU

/// tap0 in the infra has the outer `mtu` (65520 by default, 1500 when set),
/// a container's eth0 the bridge's `mtu`.
fn mtu_of_tap0_and_eth0(engine: &str) {
    let test = format!("mtu_{engine}");
    if !outbound::available(engine, &test) {
        return;
    }
    let Some(lab) = Lab::new(lab::binary!(), &test) else {
        return;
    };
    let c = lab.container();
    let mut conf = example_conflist();
    outbound::with_engine(&mut conf, engine);
    assert!(outer(&mut conf).get("mtu").is_none(), "{conf}");
    assert_eq!(conf["plugins"][0]["delegate"]["plugins"][0]["mtu"], 65520);

    for (outer_mtu, bridge_mtu) in [(None, 65520), (Some(1500), 1500)] {
        if let Some(m) = outer_mtu {
            outer(&mut conf).insert("mtu".into(), m.into());
            conf["plugins"][0]["delegate"]["plugins"][0]["mtu"] = m.into();
        }
        lab.write_netconf(NET, &conf);
        add(&lab, NET, &c.netns());
        let tap = in_infra(&lab, &["ip", "-o", "link", "show", "tap0"]);
        assert_eq!(
            link_mtu(&tap),
            Some(outer_mtu.unwrap_or(65520)),
            "tap0 (outer mtu {outer_mtu:?}): {tap}"
        );
        let eth0 = lab.in_netns(&c, &["ip", "-o", "link", "show", "eth0"]);
        assert_eq!(link_mtu(&eth0), Some(bridge_mtu), "eth0: {eth0}");
        del(&lab, NET, &c.netns());
        lab.assert_no_infra(&format!("after DEL (outer mtu {outer_mtu:?})"));
    }
}

#[test]
fn mtu_of_tap0_and_eth0_slirp4netns() {
    mtu_of_tap0_and_eth0(outbound::SLIRP4NETNS);
}

#[test]
fn mtu_of_tap0_and_eth0_pasta() {
    mtu_of_tap0_and_eth0(PASTA);
}
