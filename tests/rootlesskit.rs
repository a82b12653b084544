//! rootlesskit as a runtime: the README's RootlessKit recipe runs cnitool
//! through rootless-cni inside `rootlesskit --net=host --copy-up=/etc
//! --copy-up=/run --copy-up=/var/lib` (how rootless containerd, nerdctl and
//! BuildKit run their CNI plugins), on the machine as it is and on a host
//! where a rootful CNI runtime ran with a logind-style XDG_RUNTIME_DIR: two
//! containers are added, checked, ping each other and are deleted.
//!
//! The lab uid (outside the lab's session, setpriv only) runs rootlesskit.
//! It needs the uid in /etc/passwd with a subuid range: both come from
//! copies bound over /etc/passwd, /etc/group, /etc/subuid and /etc/subgid
//! in a private mount namespace of root's, so the machine's files are never
//! changed. /dev/net/tun is the lab's 0666 node, bound over the machine's
//! inside rootlesskit.

use lab::host_tools::{skip_without, write_user_files};
use lab::{
    example_conflist, result_ipv4, run_command, Host, Lab, LabOptions, RuntimeDir, LAB_PATH, NET,
};
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

/// What the README's RootlessKit recipe runs inside rootlesskit before the
/// runtime: it removes the links that `--copy-up` made to the host's
/// /run/netns and /var/lib/cni (root's on a host where a rootful CNI
/// runtime ran, so libcni's cache and netns mounts would fail there), as
/// containerd-rootless.sh does; the host's dirs stay as they are.
const ROOTLESSKIT_CHILD: &str = r#"sh -c 'rm -f /run/netns /var/lib/cni && exec "$0" "$@"'"#;

/// What rootlesskit runs: two containers through cnitool and rootless-cni.
/// Results and status go to files in $W for the test to check.
const ROOTLESSKIT_SCRIPT: &str = r#"set -eu
W="$LAB/rootlesskit-out"
mkdir -p "$W"
id -u > "$W/uid"
mount --bind "$LAB/tun" /dev/net/tun
export NETCONFPATH="$LAB/net.d" CNI_PATH="$LAB/bin:/usr/lib/cni"
CNITOOL="$LAB/tools/cnitool"
RCNI="$LAB/bin/rootless-cni"
unshare --net sleep infinity & C1=$!
unshare --net sleep infinity & C2=$!
trap 'kill $C1 $C2 2>/dev/null || true' EXIT
for c in $C1 $C2; do
    while [ "$(readlink /proc/$c/ns/net)" = "$(readlink /proc/self/ns/net)" ]; do sleep 0.01; done
done
"$CNITOOL" add "$NET" /proc/$C1/ns/net > "$W/add1.json"
"$CNITOOL" add "$NET" /proc/$C2/ns/net > "$W/add2.json"
"$CNITOOL" check "$NET" /proc/$C1/ns/net
"$CNITOOL" check "$NET" /proc/$C2/ns/net
IP2=$(nsenter --net=/proc/$C2/ns/net ip -o -4 addr show dev eth0 | sed -n 's/.* inet \([0-9.]*\)\/.*/\1/p')
IP1=$(nsenter --net=/proc/$C1/ns/net ip -o -4 addr show dev eth0 | sed -n 's/.* inet \([0-9.]*\)\/.*/\1/p')
# Up to three echoes each: one lost on a loaded machine is no broken network.
ping_from() { for _ in 1 2 3; do nsenter --net="/proc/$1/ns/net" busybox ping -c1 -W2 "$2" && return 0; sleep 0.3; done; return 1; }
ping_from "$C1" "$IP2"
ping_from "$C2" "$IP1"
echo "PINGED $IP1 $IP2"
"$RCNI" status --json > "$W/status-during.json"
"$CNITOOL" del "$NET" /proc/$C1/ns/net
"$CNITOOL" del "$NET" /proc/$C2/ns/net
"$RCNI" status --json > "$W/status-after.json"
echo DONE
"#;

#[test]
fn rootlesskit_net_host_runs_cnitool_through_rootless_cni() {
    rootlesskit_runs_cnitool("rootlesskit", LabOptions::default());
}

/// The same on a host where a rootful CNI runtime ran (root-owned
/// /var/lib/cni, /run/netns, /etc/cni/net.d, which rootlesskit's copy-up
/// links into its namespace) and with XDG_RUNTIME_DIR as logind makes it.
#[test]
fn rootlesskit_on_a_used_host_runs_cnitool_through_rootless_cni() {
    rootlesskit_runs_cnitool(
        "rootlesskit_used_host",
        LabOptions {
            host: Host::Used,
            runtime_dir: RuntimeDir::Logind,
            ..LabOptions::default()
        },
    );
}

/// The README's RootlessKit recipe on the lab's host: two containers
/// through cnitool inside `rootlesskit --net=host`, nothing left after.
fn rootlesskit_runs_cnitool(name: &str, options: LabOptions) {
    if skip_without(
        "rootlesskit",
        &["rootlesskit", "newuidmap", "newgidmap", "sed"],
    ) {
        return;
    }
    let readme = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    assert!(
        readme.contains(ROOTLESSKIT_CHILD),
        "the README's RootlessKit recipe is not what this test runs: {ROOTLESSKIT_CHILD}"
    );
    let Some(lab) = Lab::new_with(lab::binary!(), name, options) else {
        return;
    };
    let host_cni_results = lab.host_root().join("var/lib/cni/results");
    let host_results_before = Lab::list(&host_cni_results);
    for f in ["/etc/passwd", "/etc/group", "/etc/subuid", "/etc/subgid"] {
        assert!(
            Path::new(f).exists(),
            "{f} is missing: nothing to bind over"
        );
    }
    let var_lib_cni_before = Path::new("/var/lib/cni").exists();
    lab.write_netconf(NET, &example_conflist());

    write_user_files(&lab, "rcnilab");
    let d = lab.dir.display().to_string();
    let u = lab.uid;
    let run = lab.xdg_runtime_dir().display().to_string();
    lab.write_file("rootlesskit.sh", ROOTLESSKIT_SCRIPT);

    let inner = format!(
        "set -e
         for f in passwd group subuid subgid; do mount --bind {d}/etc-$f /etc/$f; done
         exec setpriv --reuid {u} --regid {u} --clear-groups -- env -i PATH={LAB_PATH} HOME={d} \
           XDG_RUNTIME_DIR={run} LAB={d} NET={NET} \
           rootlesskit --net=host --copy-up=/etc --copy-up=/run --copy-up=/var/lib \
             --state-dir={d}/rootlesskit-state {ROOTLESSKIT_CHILD} sh {d}/rootlesskit.sh"
    );
    // Root's private mount namespace, inside the lab's host.
    let mut cmd = lab.host_command("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &inner])
        .env_clear()
        .env("PATH", LAB_PATH)
        .env("LIBMOUNT_UTAB", lab.dir.join("utab"));
    let started = Instant::now();
    let out = run_command(
        cmd,
        "rootlesskit --net=host ... sh rootlesskit.sh".into(),
        None,
        Duration::from_secs(90),
    );
    assert!(out.ok(), "rootlesskit run: {out}");
    eprintln!("rootlesskit run took {:?}", started.elapsed());
    assert!(out.stdout.contains("PINGED"), "no ping: {out}");
    assert!(out.stdout.contains("DONE"), "{out}");

    let w = lab.dir.join("rootlesskit-out");
    assert_eq!(
        fs::read_to_string(w.join("uid")).unwrap_or_default().trim(),
        "0",
        "rootlesskit's child is not root in its user namespace"
    );
    let ips: Vec<String> = ["add1.json", "add2.json"]
        .iter()
        .map(|f| {
            let r = lab::read_json(&w.join(f));
            result_ipv4(&r).unwrap_or_else(|| panic!("no IPv4 in {f}: {r}"))
        })
        .collect();
    assert!(ips.iter().all(|ip| ip.starts_with("10.89.0.")), "{ips:?}");
    assert_ne!(ips[0], ips[1]);

    let during = lab::read_json(&w.join("status-during.json"));
    assert!(during["infra"].is_object(), "no infra: {during}");
    assert_eq!(
        during["attachments"].as_array().map(Vec::len),
        Some(2),
        "{during}"
    );
    let after = lab::read_json(&w.join("status-after.json"));
    assert!(after["infra"].is_null(), "infra after the DELs: {after}");
    assert_eq!(
        after["attachments"].as_array().map(Vec::len),
        Some(0),
        "{after}"
    );

    // Processes, namespaces, mounts, leases, records, the infra's files:
    // the no-leak checker, as everywhere.
    lab.assert_no_infra("after the DELs inside rootlesskit");
    assert_eq!(
        Path::new("/var/lib/cni").exists(),
        var_lib_cni_before,
        "the host's /var/lib/cni changed"
    );
    assert_eq!(
        Lab::list(&host_cni_results),
        host_results_before,
        "libcni's cache went into the lab host's {}",
        host_cni_results.display()
    );
}
