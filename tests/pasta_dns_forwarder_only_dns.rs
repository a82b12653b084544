//! With pasta as the way out, the DNS forwarder's address (10.0.2.3,
//! fd00::3) carries DNS over UDP only: pasta redirects nothing else sent
//! there to the nameserver, and would send it to whatever has that address
//! on the host's own network. The infra refuses it at once
//! ("administratively prohibited"), whether or not the host's loopback is
//! allowed; UDP DNS through the forwarder is proven by net_extras.rs.

use lab::outbound::{self, PASTA};
use lab::{outer, Lab};

const DUAL: &str = "dual-stack";

/// Connects (TCP) or sends and waits for an answer on a connected socket
/// (UDP); prints "refused" when the infra's refusal comes back as the
/// error, else what happened.
const PROBE: &str = "import socket,sys,errno\n\
    host,port,kind=sys.argv[1],int(sys.argv[2]),sys.argv[3]\n\
    fam=socket.AF_INET6 if ':' in host else socket.AF_INET\n\
    s=socket.socket(fam, socket.SOCK_STREAM if kind=='tcp' else socket.SOCK_DGRAM)\n\
    s.settimeout(3)\n\
    try:\n\
    \x20 s.connect((host,port))\n\
    \x20 if kind=='udp':\n\
    \x20\x20 s.send(b'x'); s.recv(64)\n\
    \x20 print('reached')\n\
    except OSError as e:\n\
    \x20 print('refused' if e.errno in (errno.EHOSTUNREACH, errno.EACCES) else 'other: %r' % e)\n";

fn probe(lab: &Lab, c: &lab::Container, host: &str, port: u16, kind: &str) -> String {
    let port = port.to_string();
    let out = lab.in_netns(c, &["python3", "-c", PROBE, host, &port, kind]);
    format!("{} {}", out.stdout.trim(), out.stderr.trim())
        .trim()
        .to_string()
}

#[test]
fn pasta_dns_forwarder_address_carries_only_dns() {
    let test = "pasta_dns_only";
    if !outbound::available(PASTA, test) || !lab::have_python3("the UDP checks") {
        return;
    }
    let Some(lab) = Lab::new(lab::binary!(), test) else {
        return;
    };
    let c = lab.container();
    let mut conf = lab::conf_example("dual-stack.conflist");
    outbound::with_engine(&mut conf, PASTA);
    for allow in [false, true] {
        outer(&mut conf).insert("allowHostLoopback".into(), allow.into());
        lab.write_netconf(DUAL, &conf);
        let add = lab.cnitool("add", DUAL, &c.netns());
        assert!(add.ok(), "ADD (allowHostLoopback {allow}): {add}");
        let mut wrong = Vec::new();
        for (host, port, kind) in [
            ("10.0.2.3", 53, "tcp"),
            ("10.0.2.3", 80, "tcp"),
            ("10.0.2.3", 5353, "udp"),
            ("fd00::3", 53, "tcp"),
            ("fd00::3", 5353, "udp"),
        ] {
            // The kernel rate-limits the ICMP errors it sends a host: a
            // probe that heard nothing back is tried again a little later.
            let mut got = probe(&lab, &c, host, port, kind);
            for _ in 0..2 {
                if got == "refused" || got == "reached" {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1100));
                got = probe(&lab, &c, host, port, kind);
            }
            if got != "refused" {
                wrong.push(format!("{kind} {host}:{port}: {got}"));
            }
        }
        let del = lab.cnitool("del", DUAL, &c.netns());
        assert!(del.ok(), "DEL: {del}");
        lab.assert_no_infra(&format!("after the DEL (allowHostLoopback {allow})"));
        assert!(
            wrong.is_empty(),
            "allowHostLoopback {allow}: not refused in the infra: {wrong:?}"
        );
    }
}
