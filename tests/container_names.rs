//! Containers find each other by name: the `dnsname` plugin in the inner
//! chain (bridge + host-local + dnsname) starts a dnsmasq inside the infra
//! that answers for every container added with a `K8S_POD_NAME`. That
//! dnsmasq is the infra's: it goes when the infra stops, and when the infra
//! is found dead (its supervisor or sandbox SIGKILLed), so a killed infra
//! holds no network namespace and the next infra starts its own dnsmasq.

use lab::{Container, Lab, LabOptions, Out};
use serde_json::{json, Value};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

/// The example network with dnsname, its bridge's address (where dnsmasq
/// listens) and its domain.
const EXAMPLE: &str = "podman/rootless-dnsname.conflist";
const NAMES_NET: &str = "rootless-dns";
const NAMES_GATEWAY: &str = "10.89.1.1";
const DOMAIN: &str = "dns.podman";
const DNSNAME: &str = "/usr/lib/cni/dnsname";
const DNSMASQ: &str = "/usr/sbin/dnsmasq";

/// Whether this machine has dnsname and dnsmasq; with CI=true it must.
fn have_dnsname(test: &str) -> bool {
    let missing: Vec<&str> = [DNSNAME, DNSMASQ]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "{} (apt-get install golang-github-containernetworking-plugin-dnsname dnsmasq-base)",
        missing.join(", ")
    );
    if lab::in_ci() {
        panic!("{test} needs {why}");
    }
    eprintln!("skipping {test}: it needs {why}");
    false
}

/// A lab with the network NAMES_NET: the README's dnsname example.
fn names_lab(test: &str) -> Option<Lab> {
    if !have_dnsname(test) {
        return None;
    }
    // dnsmasq drops to the group `dip`: the session's user namespace maps
    // subordinate gids, as a rootless runtime's does.
    let options = LabOptions {
        subgids: true,
        ..LabOptions::default()
    };
    let lab = Lab::new_with(lab::binary!(), test, options)?;
    lab.write_netconf(NAMES_NET, &names_conflist());
    Some(lab)
}

/// conf-examples/podman/rootless-dnsname.conflist: the README's example.
fn names_conflist() -> Value {
    let conf = lab::conf_example(EXAMPLE);
    assert_eq!(conf["name"], NAMES_NET, "{EXAMPLE}");
    conf
}

/// CNI_ARGS naming the pod as podman and the CRI do: dnsname takes the
/// name from K8S_POD_NAME, and the reference plugins refuse an argument
/// they do not know unless IgnoreUnknown is set.
fn pod_args(name: &str) -> String {
    format!("IgnoreUnknown=1;K8S_POD_NAME={name}")
}

/// ADD of `c` as pod `name`; the ADD result.
fn add(lab: &Lab, c: &Container, name: &str) -> Value {
    add_with_aliases(lab, c, name, &[])
}

/// ADD of `c` as pod `name`, known also as `aliases` (the `aliases`
/// capability podman passes: network name → names); the ADD result.
fn add_with_aliases(lab: &Lab, c: &Container, name: &str, aliases: &[&str]) -> Value {
    let args = pod_args(name);
    let caps = json!({ "aliases": { NAMES_NET: aliases } }).to_string();
    let env = [("CNI_ARGS", args.as_str()), ("CAP_ARGS", caps.as_str())];
    let out = lab.cnitool_env(&env, "add", NAMES_NET, &c.netns());
    out.add_result(&format!("ADD {name}"))
}

/// DEL of `c` as pod `name`, which must succeed.
fn del(lab: &Lab, c: &Container, name: &str) {
    let args = pod_args(name);
    let out = lab.cnitool_env(&[("CNI_ARGS", &args)], "del", NAMES_NET, &c.netns());
    assert!(out.ok(), "DEL {name}: {out}");
}

/// `busybox nslookup NAME` against the infra's dnsmasq, from `c`.
fn lookup(lab: &Lab, c: &Container, name: &str) -> Out {
    lab.in_netns(c, &["busybox", "nslookup", name, NAMES_GATEWAY])
}

/// Asserts that `from` resolves `name` (short and in DOMAIN) to `ip`.
fn assert_resolves(lab: &Lab, from: &Container, name: &str, ip: &str) {
    for query in [name.to_string(), format!("{name}.{DOMAIN}")] {
        let out = lookup(lab, from, &query);
        assert!(
            out.ok() && out.stdout.contains(ip),
            "{query} should resolve to {ip}: {out}"
        );
    }
}

/// The IPv4 address (without prefix) in an ADD result.
fn ipv4(result: &Value) -> String {
    lab::result_ipv4(result).unwrap_or_else(|| panic!("no IPv4 in {result}"))
}

/// Live dnsmasq processes of the lab uid (observed by name only here, to
/// say what leaked; the plugin itself never goes by names).
fn dnsmasqs(lab: &Lab) -> Vec<u32> {
    lab::pids_of_uid(lab.uid)
        .into_iter()
        .filter(|&p| lab.is_running(p))
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "dnsmasq")
        })
        .collect()
}

/// The infra's process `which` ("supervisor" or "sandbox"), from status.
fn infra_pid(lab: &Lab, which: &str) -> u32 {
    let status = lab.status();
    status["infra"][which]["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no {which} pid in status: {status}")) as u32
}

/// Waits until `pid` is no longer a live process (a zombie counts as gone).
fn wait_dead(lab: &Lab, pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while lab.is_running(pid) {
        assert!(Instant::now() < deadline, "{pid} still runs after SIGKILL");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Two containers, each resolves the other by name (and one the other's
/// alias) through the dnsmasq that dnsname started in the infra, whose
/// address the ADD result gives as nameserver; CHECK passes dnsname's
/// answer through; after the DEL of both nothing is left, no dnsmasq
/// either.
#[test]
fn containers_resolve_each_other_by_name() {
    let Some(lab) = names_lab("container_names") else {
        return;
    };
    let (a, b) = (lab.container(), lab.container());
    let ra = add(&lab, &a, "alpha");
    let rb = add_with_aliases(&lab, &b, "bravo", &["web"]);
    for r in [&ra, &rb] {
        assert_eq!(
            r["dns"]["nameservers"],
            json!([NAMES_GATEWAY]),
            "the ADD result names the infra's dnsmasq: {r}"
        );
        assert_eq!(r["dns"]["search"], json!([DOMAIN]), "search domain: {r}");
    }
    assert_eq!(dnsmasqs(&lab).len(), 1, "one dnsmasq for the network");
    // dnsname's files are the infra's, under its /run, not in the user's
    // XDG_RUNTIME_DIR where they would outlive it.
    let files = lab
        .state_dir()
        .join("run/containers/cni/dnsname")
        .join(NAMES_NET);
    assert!(
        files.join("addnhosts").is_file(),
        "no {}/addnhosts",
        files.display()
    );
    assert!(
        !lab.run_dir().join("containers").exists(),
        "dnsname wrote into XDG_RUNTIME_DIR: {:?}",
        Lab::list(&lab.run_dir())
    );
    assert_resolves(&lab, &a, "bravo", &ipv4(&rb));
    assert_resolves(&lab, &b, "alpha", &ipv4(&ra));
    assert_resolves(&lab, &a, "web", &ipv4(&rb));
    let args = pod_args("alpha");
    let check = lab.cnitool_env(&[("CNI_ARGS", &args)], "check", NAMES_NET, &a.netns());
    // dnsname 1.3.1's CHECK looks for its files one directory too high and
    // always fails; its error comes through as it is.
    assert!(
        !check.ok() && check.stderr.contains("addnhost file missing"),
        "CHECK alpha: dnsname's own error expected: {check}"
    );
    let unknown = lookup(&lab, &a, "charlie");
    assert!(!unknown.ok(), "an unknown name resolved: {unknown}");

    del(&lab, &a, "alpha");
    let gone = lookup(&lab, &b, "alpha");
    assert!(!gone.ok(), "alpha still resolves after its DEL: {gone}");
    del(&lab, &b, "bravo");
    lab.assert_no_infra("after the DEL of both containers");
}

/// `rootless-cni stop --force` under live attachments takes the infra's
/// dnsmasq with it, though dnsname never got a DEL.
#[test]
fn forced_stop_ends_the_infras_dnsmasq() {
    let Some(lab) = names_lab("names_forced_stop") else {
        return;
    };
    let a = lab.container();
    add(&lab, &a, "alpha");
    assert_eq!(dnsmasqs(&lab).len(), 1, "one dnsmasq for the network");
    let stop = lab.cli(&["stop", "--force"]);
    assert!(stop.ok(), "stop --force: {stop}");
    assert!(
        dnsmasqs(&lab).is_empty(),
        "dnsmasq outlived the stopped infra: {:?}",
        dnsmasqs(&lab)
            .into_iter()
            .map(Lab::describe)
            .collect::<Vec<_>>()
    );
    del(&lab, &a, "alpha");
    lab.assert_no_infra("after stop --force and the DEL");
}

/// The supervisor, then the sandbox, is SIGKILLed under two named
/// containers: the call that finds the infra dead (`rootless-cni gc`, a
/// DEL) ends the dnsmasq left in its network namespace, and after the
/// DELs nothing is left.
#[test]
fn killed_infra_takes_its_dnsmasq_with_it() {
    let Some(lab) = names_lab("names_killed_infra") else {
        return;
    };
    let (a, b) = (lab.container(), lab.container());
    for (victim, noticed_by_gc) in [("supervisor", true), ("sandbox", false)] {
        add(&lab, &a, "alpha");
        add(&lab, &b, "bravo");
        let dns = dnsmasqs(&lab);
        assert_eq!(dns.len(), 1, "one dnsmasq for the network");
        let pid = infra_pid(&lab, victim);
        lab::sigkill(pid);
        wait_dead(&lab, pid);
        if noticed_by_gc {
            let gc = lab.cli(&["gc"]);
            assert!(gc.ok(), "gc after the {victim} was killed: {gc}");
            assert!(
                !lab.is_running(dns[0]),
                "{victim} killed: dnsmasq {} survives gc",
                Lab::describe(dns[0])
            );
        }
        del(&lab, &a, "alpha");
        del(&lab, &b, "bravo");
        lab.assert_no_infra(&format!("{victim} killed, then DEL of both"));
    }
}

/// After a killed infra, the next infra's containers resolve each other:
/// the state dir (here a persistent XDG_RUNTIME_DIR, as the lab's) keeps
/// nothing of the dead infra's dnsmasq, so dnsname starts a new one.
#[test]
fn names_resolve_in_the_infra_after_a_killed_one() {
    let Some(lab) = names_lab("names_after_killed") else {
        return;
    };
    let (a, b) = (lab.container(), lab.container());
    add(&lab, &a, "alpha");
    let old = dnsmasqs(&lab);
    let supervisor = infra_pid(&lab, "supervisor");
    lab::sigkill(supervisor);
    wait_dead(&lab, supervisor);

    // alpha's attachment was lost with the infra; its DEL forgets it.
    del(&lab, &a, "alpha");
    // Its eth0 goes when the kernel tears down the dead infra's netns (the
    // veth's other end), after its last process: asynchronously, and on a
    // loaded machine not at once. Until then an ADD meets it ("eth0
    // already exists"), as any bridge ADD would.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while lab.links(&a) != vec!["lo"] && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let ra = add(&lab, &a, "alpha");
    let rb = add(&lab, &b, "bravo");
    let new = dnsmasqs(&lab);
    assert!(
        new.len() == 1 && !old.contains(&new[0]),
        "dnsmasq before the kill {old:?}, after {new:?}"
    );
    assert_resolves(&lab, &a, "bravo", &ipv4(&rb));
    assert_resolves(&lab, &b, "alpha", &ipv4(&ra));
    del(&lab, &a, "alpha");
    del(&lab, &b, "bravo");
    lab.assert_no_infra("after the DEL of both in the new infra");
}
