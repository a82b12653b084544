//! Real runtimes other than cnitool in the lab's session.
//!
//! - rootlesskit: `rootlesskit --net=host --copy-up=/etc --copy-up=/run
//!   --copy-up=/var/lib CMD` is how rootless containerd/nerdctl/BuildKit
//!   run their CNI plugins. Here the lab uid (outside the lab's session,
//!   setpriv only) runs rootlesskit with a script that makes two container
//!   netns, adds, checks, pings and deletes them through cnitool and
//!   rootless-cni. rootlesskit needs the uid in /etc/passwd with a subuid
//!   range: both come from copies bound over /etc/passwd, /etc/group,
//!   /etc/subuid and /etc/subgid in a private mount namespace of root's, so
//!   the machine's files are never changed. /dev/net/tun is the lab's 0666
//!   node, bound over the machine's inside rootlesskit. It follows the
//!   README's recipe (the copy-up links to /run/netns and /var/lib/cni
//!   removed in the child), on the machine as it is and on a lab host
//!   where a rootful CNI runtime ran, with a logind-style XDG_RUNTIME_DIR.
//! - podman 4.3 (Debian; rootful, CNI backend): a container from an image
//!   imported from a busybox-static rootfs (no registry) on a network from
//!   conf-examples/podman/rootless.conflist in a private network config
//!   dir; root, runroot and tmpdir private. What podman changes on the
//!   host (/var/lib/cni, /var/lib/containers, /run/netns and its mount,
//!   /run/runc, ip_forward, cgroups) is recorded before and undone after.
//! - podman 4.3, rootless (CNI backend): the lab uid itself runs podman
//!   with conf-examples/podman/containers.conf (a drop-in) and
//!   rootless.conflist in its ~/.config (tests/common/podman.rs), publishes a port and the page is fetched on the host's
//!   127.0.0.1. podman runs CNI plugins in its own rootless-netns, so the
//!   infra starts there; see the test's doc for how the ports fit.

mod common;

use common::host_tools::{busybox_static, is_static_elf, skip_without, write_user_files};
use common::podman::{
    assert_page_on_host, busybox_rootfs_tar, leftovers_but, ns_of, only_attachment,
    private_mount_ns_holder, retry, root_command, run_root, skip_without_rootless_podman,
    web_container_args, RootlessPodman, IMAGE, PAGE, PODMAN_NET, PODMAN_TOOLS, ULIMITS,
};
use common::{
    example_conflist, free_tcp_port, plugin_stdin, result_ipv4, run_command, Host, Lab, LabOptions,
    Out, RuntimeDir, NET,
};
use serde_json::{json, Value};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

const PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin";

// ---------------------------------------------------------------------------
// rootlesskit

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

fn read_json(path: &Path) -> Value {
    let text =
        fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("parsing {}: {e}: {text}", path.display()))
}

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
    let Some(lab) = Lab::new_with(name, options) else {
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
         exec setpriv --reuid {u} --regid {u} --clear-groups -- env -i PATH={PATH} HOME={d} \
           XDG_RUNTIME_DIR={run} LAB={d} NET={NET} \
           rootlesskit --net=host --copy-up=/etc --copy-up=/run --copy-up=/var/lib \
             --state-dir={d}/rootlesskit-state {ROOTLESSKIT_CHILD} sh {d}/rootlesskit.sh"
    );
    // Root's private mount namespace, inside the lab's host.
    let mut cmd = lab.host_command("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &inner])
        .env_clear()
        .env("PATH", PATH)
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
            let r = read_json(&w.join(f));
            result_ipv4(&r).unwrap_or_else(|| panic!("no IPv4 in {f}: {r}"))
        })
        .collect();
    assert!(ips.iter().all(|ip| ip.starts_with("10.89.0.")), "{ips:?}");
    assert_ne!(ips[0], ips[1]);

    let during = read_json(&w.join("status-during.json"));
    assert!(during["infra"].is_object(), "no infra: {during}");
    assert_eq!(
        during["attachments"].as_array().map(Vec::len),
        Some(2),
        "{during}"
    );
    let after = read_json(&w.join("status-after.json"));
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

/// The conflists of conf-examples/{podman,nerdctl,crio,kubernetes} work as
/// they are: ADD, CHECK, a ping to the gateway and DEL through cnitool.
#[test]
fn the_runtime_examples_work_through_cnitool() {
    let Some(lab) = Lab::new("runtime_examples") else {
        return;
    };
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf-examples");
    for rel in [
        "podman/rootless.conflist",
        "nerdctl/rootless.conflist",
        "crio/10-rootless.conflist",
        "kubernetes/10-rootless.conflist",
    ] {
        let conf = read_json(&examples.join(rel));
        let name = conf["name"].as_str().expect("a network name").to_string();
        lab.write_netconf(&name, &conf);
        let c = lab.container();
        let add = lab.cnitool("add", &name, &c.netns());
        assert!(add.ok(), "{rel}: ADD: {add}");
        let check = lab.cnitool("check", &name, &c.netns());
        assert!(check.ok(), "{rel}: CHECK: {check}");
        lab.assert_ping(&c, common::GATEWAY, &format!("{rel}: container -> gateway"));
        let del = lab.cnitool("del", &name, &c.netns());
        assert!(del.ok(), "{rel}: DEL: {del}");
        lab.assert_no_infra(rel);
    }
}

// ---------------------------------------------------------------------------
// Real root: podman, and the infra in the initial user namespace

/// These tests run as real root and share the host; one at a time.
static AS_ROOT: Mutex<()> = Mutex::new(());

/// What rootful podman (and a rootful infra) could change on the host. The
/// tests run in a private mount namespace (their mounts never reach the
/// host's) with an overlay on /var/lib (/var/lib/cni, /var/lib/containers
/// stay as they are). /run is left as the host has it, a mount point or
/// not, since slirp4netns's sandbox behaves differently on the two; what
/// podman makes there (/run/netns entries, /run/runc), ip_forward and its
/// cgroups are recorded before and put back after.
#[derive(Debug, Clone, PartialEq)]
struct HostState {
    ip_forward: String,
    var_lib_cni: bool,
    var_lib_containers: bool,
    run_netns: Option<Vec<String>>,
    run_runc: bool,
    /// cgroup hierarchies that have a libpod_parent.
    libpod_cgroups: Vec<PathBuf>,
    mounts: Vec<String>,
}

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

fn cgroup_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![PathBuf::from(CGROUP_ROOT)];
    dirs.extend(
        Lab::list(Path::new(CGROUP_ROOT))
            .into_iter()
            .map(|n| Path::new(CGROUP_ROOT).join(n))
            .filter(|p| p.is_dir()),
    );
    dirs
}

impl HostState {
    fn capture() -> HostState {
        let mounts = Command::new("findmnt")
            .args(["-rn", "-o", "TARGET,SOURCE,FSTYPE"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        HostState {
            ip_forward: fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
                .unwrap_or_default()
                .trim()
                .to_string(),
            var_lib_cni: Path::new("/var/lib/cni").exists(),
            var_lib_containers: Path::new("/var/lib/containers").exists(),
            run_netns: Path::new("/run/netns")
                .is_dir()
                .then(|| Lab::list(Path::new("/run/netns"))),
            run_runc: Path::new("/run/runc").exists(),
            libpod_cgroups: cgroup_dirs()
                .into_iter()
                .filter(|d| d.join("libpod_parent").is_dir())
                .collect(),
            mounts: mounts.lines().map(String::from).collect(),
        }
    }

    /// Puts back ip_forward, removes what podman (or `ip netns`) made in
    /// /run and the libpod cgroups; what still differs from `self` after
    /// (other processes' own netns under /run/netns are not counted).
    fn restore(&self) -> Vec<String> {
        let now = HostState::capture();
        if now.ip_forward != self.ip_forward {
            let _ = fs::write("/proc/sys/net/ipv4/ip_forward", &self.ip_forward);
        }
        let before_netns = self.run_netns.clone().unwrap_or_default();
        for n in now.run_netns.iter().flatten() {
            let ours = n.starts_with("netns-") || n.starts_with("rcni-probe");
            if ours && !before_netns.contains(n) {
                let _ = fs::remove_file(Path::new("/run/netns").join(n));
            }
        }
        if self.run_netns.is_none() {
            // Only when empty: another process may have come to use it.
            let _ = fs::remove_dir("/run/netns");
        }
        if !self.run_runc && now.run_runc {
            let _ = fs::remove_dir_all("/run/runc");
        }
        for dir in now
            .libpod_cgroups
            .iter()
            .filter(|d| !self.libpod_cgroups.contains(d))
        {
            remove_empty_dirs(&dir.join("libpod_parent"));
        }
        let after = HostState::capture();
        let mut diffs = Vec::new();
        if after.ip_forward != self.ip_forward {
            diffs.push(format!(
                "ip_forward {} (was {})",
                after.ip_forward, self.ip_forward
            ));
        }
        if after.var_lib_cni != self.var_lib_cni {
            diffs.push(format!("/var/lib/cni exists: {}", after.var_lib_cni));
        }
        if after.var_lib_containers != self.var_lib_containers {
            diffs.push(format!(
                "/var/lib/containers exists: {}",
                after.var_lib_containers
            ));
        }
        let podman_netns = |l: &Option<Vec<String>>| -> Vec<String> {
            l.iter()
                .flatten()
                .filter(|n| n.starts_with("netns-") || n.starts_with("rcni-probe"))
                .cloned()
                .collect()
        };
        if podman_netns(&after.run_netns) != podman_netns(&self.run_netns)
            || (self.run_netns.is_none() && after.run_netns.as_ref().is_some_and(|l| l.is_empty()))
        {
            diffs.push(format!(
                "/run/netns: {:?} (was {:?})",
                after.run_netns, self.run_netns
            ));
        }
        if after.run_runc != self.run_runc {
            diffs.push(format!("/run/runc exists: {}", after.run_runc));
        }
        if after.libpod_cgroups != self.libpod_cgroups {
            diffs.push(format!("libpod cgroups: {:?}", after.libpod_cgroups));
        }
        let ours =
            |m: &&String| !m.starts_with("/run/netns/") || m.starts_with("/run/netns/netns-");
        for m in after.mounts.iter().filter(ours) {
            if !self.mounts.contains(m) && !m.starts_with("/run/netns ") {
                diffs.push(format!("new mount: {m}"));
            }
        }
        for m in self.mounts.iter().filter(ours) {
            if !after.mounts.contains(m) {
                diffs.push(format!("mount gone: {m}"));
            }
        }
        diffs
    }
}

/// rmdir of `dir` and every dir under it, deepest first (cgroups).
fn remove_empty_dirs(dir: &Path) {
    for name in Lab::list(dir) {
        let p = dir.join(name);
        if p.is_dir() {
            remove_empty_dirs(&p);
        }
    }
    let _ = fs::remove_dir(dir);
}

/// A private dir for a root test, a mount namespace of its own (held by a
/// `sleep`) with an overlay on /var/lib whose upper dir is in the private
/// dir, and the host's state recorded. Commands run in that mount
/// namespace through nsenter. Dropping it kills what the test started
/// (processes whose command line names the private dir), the holder, puts
/// the host back and removes the dir.
struct RootBox {
    dir: PathBuf,
    holder: Option<std::process::Child>,
    before: HostState,
    done: bool,
}

impl RootBox {
    fn new(name: &str) -> RootBox {
        let before = HostState::capture();
        let dir = PathBuf::from(format!(
            "/tmp/rootless-cni-root.{name}.{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        let mut b = RootBox {
            dir,
            holder: None,
            before,
            done: false,
        };
        for sub in ["ovl/var-lib/upper", "ovl/var-lib/work", "cni-bin"] {
            fs::create_dir_all(b.dir.join(sub)).expect("mkdir");
        }
        fs::create_dir_all(b.dir.join("state")).expect("mkdir state");
        fs::set_permissions(b.dir.join("state"), fs::Permissions::from_mode(0o700))
            .expect("chmod state");
        fs::copy(
            env!("CARGO_BIN_EXE_rootless-cni"),
            b.dir.join("cni-bin/rootless-cni"),
        )
        .expect("copying rootless-cni");
        let d = b.dir.display();
        let setup = format!(
            "mount -t overlay overlay -o lowerdir=/var/lib,upperdir={d}/ovl/var-lib/upper,workdir={d}/ovl/var-lib/work /var/lib"
        );
        b.holder = Some(private_mount_ns_holder(&b.dir, "holder", &setup));
        b
    }

    fn path(&self, rel: &str) -> String {
        self.dir.join(rel).display().to_string()
    }

    fn state_dir(&self) -> String {
        self.path("state/rootless-cni-plugin")
    }

    /// `argv` as root in the box's mount namespace.
    fn command(&self, argv: &[&str]) -> Command {
        let pid = self.holder.as_ref().map(|c| c.id()).unwrap_or(0);
        let mut cmd = root_command(&["nsenter", &format!("--target={pid}"), "--mount", "--"]);
        cmd.args(argv);
        cmd
    }

    fn run(&self, argv: &[&str], stdin: Option<&[u8]>) -> Out {
        run_command(
            self.command(argv),
            argv.join(" "),
            stdin,
            Duration::from_secs(120),
        )
    }

    /// `rootless-cni --state-dir ... ARGS` as root in the box.
    fn rootless_cni(&self, args: &[&str]) -> Out {
        let (bin, state) = (self.path("cni-bin/rootless-cni"), self.state_dir());
        let mut argv = vec![bin.as_str(), "--state-dir", state.as_str()];
        argv.extend_from_slice(args);
        self.run(&argv, None)
    }

    fn status(&self) -> Value {
        let out = self.rootless_cni(&["status", "--json"]);
        assert!(out.ok(), "status: {out}");
        out.json().unwrap_or_else(|| panic!("status --json: {out}"))
    }

    /// Stops what the test started and puts the host back; what still
    /// differs from before.
    fn finish(&mut self) -> Vec<String> {
        if self.done {
            return Vec::new();
        }
        self.done = true;
        let _ = self.rootless_cni(&["stop", "--force"]);
        kill_processes_mentioning(&self.dir.display().to_string());
        if let Some(mut holder) = self.holder.take() {
            let _ = holder.kill();
            let _ = holder.wait();
        }
        let diffs = self.before.restore();
        let _ = fs::remove_dir_all(&self.dir);
        diffs
    }
}

impl Drop for RootBox {
    fn drop(&mut self) {
        let diffs = self.finish();
        if !diffs.is_empty() {
            eprintln!("the host is not as it was: {diffs:?}");
        }
    }
}

/// SIGKILL to every process whose command line mentions `text` (a test's
/// private dir: only what the test started), until none is left.
fn kill_processes_mentioning(text: &str) {
    let me = std::process::id().to_string();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids: Vec<i32> = Lab::list(Path::new("/proc"))
            .into_iter()
            .filter(|n| *n != me)
            .filter_map(|n| n.parse::<i32>().ok())
            .filter(|pid| {
                let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let zombie = stat
                    .rsplit(')')
                    .next()
                    .is_some_and(|s| s.trim_start().starts_with('Z'));
                !zombie && String::from_utf8_lossy(&cmdline).contains(text)
            })
            .collect();
        if pids.is_empty() || Instant::now() > deadline {
            return;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Real root starts the infra (a rootful runtime's case, supported) while
/// the host has a netns bind-mounted under a shared /run/netns, as
/// `ip netns add`, podman and CRI-O make them: the mount must survive.
#[test]
fn as_root_starting_the_infra_keeps_the_hosts_netns_mounts() {
    if !nix::unistd::geteuid().is_root() || skip_without("infra_as_root", &["ip", "slirp4netns"]) {
        return;
    }
    let _serial = AS_ROOT.lock().unwrap_or_else(|e| e.into_inner());
    let mut b = RootBox::new("netns");
    let probe = format!("rcni-probe-{}", std::process::id());
    let probe_path = format!("/run/netns/{probe}");
    let add = b.run(&["ip", "netns", "add", &probe], None);
    assert!(add.ok(), "{add}");
    let mounted = |b: &RootBox| b.run(&["findmnt", "-rn", &probe_path], None).ok();
    assert!(mounted(&b), "ip netns add made no mount");

    // A container netns of root's, and an ADD through our binary.
    let mut holder = b
        .command(&["unshare", "--net", "sleep", "infinity"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting a netns holder");
    let pid = holder.id();
    let host_net = fs::read_link("/proc/self/ns/net").ok();
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs::read_link(format!("/proc/{pid}/ns/net")).ok() == host_net
        || fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap_or_default()
            .trim()
            != "sleep"
    {
        assert!(
            Instant::now() < deadline,
            "the netns holder did not come up"
        );
        thread::sleep(Duration::from_millis(10));
    }
    let mut conf = plugin_stdin(&example_conflist());
    conf["stateDir"] = json!(b.state_dir());
    let netns = format!("/proc/{pid}/ns/net");
    let env = |verb: &str| -> Vec<String> {
        vec![
            "env".into(),
            "-i".into(),
            format!("PATH={PATH}"),
            format!("CNI_COMMAND={verb}"),
            "CNI_CONTAINERID=as-root".into(),
            format!("CNI_NETNS={netns}"),
            "CNI_IFNAME=eth0".into(),
            format!("CNI_PATH={}:/usr/lib/cni", b.path("cni-bin")),
            b.path("cni-bin/rootless-cni"),
        ]
    };
    let argv = env("ADD");
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = b.run(&argv, Some(conf.to_string().as_bytes()));
    assert!(out.ok(), "ADD as root: {out}");
    let kept = mounted(&b);

    let argv = env("DEL");
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let del = b.run(&argv, Some(conf.to_string().as_bytes()));
    let _ = holder.kill();
    let _ = holder.wait();
    let _ = b.run(&["ip", "netns", "del", &probe], None);
    let _ = b.run(&["umount", &probe_path], None);
    let diffs = b.finish();

    assert!(
        kept,
        "starting the infra as root unmounted {probe_path} (a netns of the host's under the shared /run/netns)"
    );
    assert!(del.ok(), "DEL as root: {del}");
    assert!(diffs.is_empty(), "the host is not as it was: {diffs:?}");
}

/// podman with everything private: root, runroot, tmpdir, network config
/// dir (conf-examples/podman/rootless.conflist with the box's state dir),
/// CNI plugin dirs (our binary, then /usr/lib/cni), in a RootBox.
struct Podman {
    b: RootBox,
}

impl Podman {
    fn new(name: &str) -> Podman {
        let b = RootBox::new(name);
        for sub in ["root", "runroot", "tmp", "net.d", "rootfs", "home"] {
            fs::create_dir_all(b.dir.join(sub)).expect("mkdir");
        }
        let conf = format!(
            "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]\nnetwork_config_dir = \"{}\"\n",
            b.path("cni-bin"),
            b.path("net.d")
        );
        fs::write(b.dir.join("containers.conf"), conf).expect("containers.conf");
        let example =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("conf-examples/podman/rootless.conflist");
        let text = fs::read_to_string(&example).expect("reading the podman example");
        let mut conflist: Value = serde_json::from_str(&text).expect("parsing the podman example");
        assert_eq!(conflist["name"], PODMAN_NET);
        conflist["plugins"][0]["stateDir"] = json!(b.state_dir());
        fs::write(
            b.dir.join(format!("net.d/{PODMAN_NET}.conflist")),
            conflist.to_string(),
        )
        .expect("writing the conflist");
        Podman { b }
    }

    fn podman(&self, args: &[&str]) -> Out {
        let p = |s: &str| self.b.path(s);
        let (root, runroot, tmp, netd) = (p("root"), p("runroot"), p("tmp"), p("net.d"));
        let (conf, home) = (
            format!("CONTAINERS_CONF={}", p("containers.conf")),
            p("home"),
        );
        let (home, tmpdir) = (format!("HOME={home}"), format!("TMPDIR={tmp}"));
        let path = format!("PATH={PATH}");
        let mut argv = vec!["env", "-i", &path, &conf, &home, &tmpdir, "podman"];
        argv.extend_from_slice(&["--root", &root, "--runroot", &runroot, "--tmpdir", &tmp]);
        argv.extend_from_slice(&["--network-config-dir", &netd, "--runtime", "runc"]);
        argv.extend_from_slice(&["--cgroup-manager", "cgroupfs", "--storage-driver", "vfs"]);
        argv.extend_from_slice(&["--events-backend", "none"]);
        argv.extend_from_slice(args);
        let mut out = self.b.run(&argv, None);
        out.what = format!("podman {}", args.join(" "));
        out
    }

    /// A busybox-static rootfs with httpd and a page, imported as an image.
    fn import_image(&self) -> String {
        let tar = busybox_rootfs_tar(&self.b.dir);
        let out = self.podman(&["import", &tar, IMAGE]);
        assert!(out.ok(), "podman import: {out}");
        IMAGE.to_string()
    }

    /// Removes the containers, then what RootBox::finish does.
    fn finish(&mut self) -> Vec<String> {
        if !self.b.done {
            let _ = self.podman(&["rm", "--all", "--force", "--time", "0"]);
        }
        self.b.finish()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        if !self.b.done {
            let _ = self.podman(&["rm", "--all", "--force", "--time", "0"]);
        }
    }
}

/// The busybox that goes into container images is static, whichever
/// busybox package the machine has (a dynamic one is not taken).
#[test]
fn container_images_get_a_static_busybox() {
    if skip_without("busybox_static", &["apt-get", "dpkg-deb"]) {
        return;
    }
    let busybox = busybox_static();
    assert!(
        is_static_elf(&busybox),
        "{} is not static",
        busybox.display()
    );
    let sh = fs::canonicalize("/bin/sh").expect("/bin/sh");
    assert!(!is_static_elf(&sh), "{} taken for static", sh.display());
}

fn podman_prerequisites(test: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping {test}: podman runs as root here");
        return false;
    }
    !skip_without(test, &PODMAN_TOOLS)
}

#[test]
fn podman_runs_containers_on_a_rootless_cni_network() {
    if !podman_prerequisites("podman_runs_containers") {
        return;
    }
    let _serial = AS_ROOT.lock().unwrap_or_else(|e| e.into_inner());
    let mut pm = Podman::new("podman-run");
    let image = pm.import_image();

    let run = pm.podman(&web_container_args("rcni-web", None, &image));
    assert!(run.ok(), "podman run: {run}");
    let format = format!("{{{{(index .NetworkSettings.Networks \"{PODMAN_NET}\").IPAddress}}}}");
    let ip = pm.podman(&["inspect", "-f", &format, "rcni-web"]);
    assert!(ip.ok(), "podman inspect: {ip}");
    let ip = ip.stdout.trim().to_string();
    assert!(ip.starts_with("10.89.0."), "address {ip:?}");

    let status = pm.b.status();
    assert!(status["infra"].is_object(), "no infra: {status}");
    assert_eq!(
        status["attachments"].as_array().map(Vec::len),
        Some(1),
        "{status}"
    );

    let ping = pm.podman(
        &[
            &["run", "--rm", "--network", PODMAN_NET][..],
            &ULIMITS,
            &[&image, "ping", "-c1", "-W2", &ip],
        ]
        .concat(),
    );
    assert!(ping.ok(), "a second container pings the first: {ping}");

    let rm = pm.podman(&["rm", "--force", "--time", "0", "rcni-web"]);
    assert!(rm.ok(), "podman rm: {rm}");
    let status = pm.b.status();
    assert!(status["infra"].is_null(), "infra after podman rm: {status}");
    assert_eq!(
        status["attachments"].as_array().map(Vec::len),
        Some(0),
        "{status}"
    );
    let diffs = pm.finish();
    assert!(diffs.is_empty(), "the host is not as it was: {diffs:?}");
}

#[test]
#[ignore = "rootful podman 4.3 reserves published host ports itself, which our host-side forward already holds (README, Runtimes); rootless podman publishes ports: rootless_podman_publishes_a_port_through_rootless_cni"]
fn podman_publishes_a_port_through_rootless_cni() {
    if !podman_prerequisites("podman_publishes_a_port") {
        return;
    }
    let _serial = AS_ROOT.lock().unwrap_or_else(|e| e.into_inner());
    let mut pm = Podman::new("podman-port");
    let image = pm.import_image();
    let port = free_tcp_port();

    let publish = format!("127.0.0.1:{port}:80");
    let run = pm.podman(&web_container_args("rcni-pub", Some(&publish), &image));
    assert!(run.ok(), "podman run -p {publish}: {run}");
    assert_page_on_host(port);

    let rm = pm.podman(&["rm", "--force", "--time", "0", "rcni-pub"]);
    assert!(rm.ok(), "podman rm: {rm}");
    let status = pm.b.status();
    assert!(status["infra"].is_null(), "infra after podman rm: {status}");
    let diffs = pm.finish();
    assert!(diffs.is_empty(), "the host is not as it was: {diffs:?}");
}

// ---------------------------------------------------------------------------
// Rootless podman: the lab's unprivileged uid runs podman itself

/// An unprivileged uid runs rootless podman 4.3 (CNI backend) on a network
/// whose conflist uses rootless-cni, publishes a port on the host's
/// 127.0.0.1 and the page is fetched through it; `podman rm` leaves
/// nothing of the infra, and the host is as it was.
///
/// What podman does (measured here, and podman 4.3's
/// libpod/networking_linux.go): it runs the CNI plugins inside its own
/// rootless-netns (a netns of its user namespace with its own slirp4netns,
/// entered with a fresh mount namespace where /run and /var/lib/cni are
/// its own), so our infra starts there, and our forwarder listens on the
/// published port in that netns, where nothing else wants it. The host's
/// port is podman's rootlessport's: it listens in the host's netns and its
/// child dials the container's address from inside the container's netns.
/// So both are checked: the page from the host (rootlessport) and from
/// podman's rootless-netns through our forwarder, infra and portmap.
#[test]
fn rootless_podman_publishes_a_port_through_rootless_cni() {
    let test = "rootless_podman_publishes_a_port";
    if skip_without_rootless_podman(test, &[]) {
        return;
    }
    let Some(lab) = Lab::new("rootless_podman") else {
        return;
    };
    // No root test changes the host meanwhile: the comparison below holds.
    let _serial = AS_ROOT.lock().unwrap_or_else(|e| e.into_inner());
    let before = HostState::capture();
    let started = Instant::now();
    let mut pm = RootlessPodman::new(lab);
    let tar = busybox_rootfs_tar(&pm.lab.dir);
    let import = pm.podman(&["import", &tar, IMAGE]);
    assert!(import.ok(), "podman import: {import}");
    let port = free_tcp_port();

    let publish = format!("127.0.0.1:{port}:80");
    let run = pm.podman(&web_container_args("rcni-web", Some(&publish), IMAGE));
    assert!(run.ok(), "podman run -p {publish}: {run}");
    assert_page_on_host(port);

    let format = format!(
        "{{{{(index .NetworkSettings.Networks \"{PODMAN_NET}\").IPAddress}}}} {{{{.State.Pid}}}}"
    );
    let inspect = pm.podman(&["inspect", "-f", &format, "rcni-web"]);
    assert!(inspect.ok(), "podman inspect: {inspect}");
    let fields: Vec<&str> = inspect.stdout.split_whitespace().collect();
    let [ip, ctr_pid] = fields[..] else {
        panic!("podman inspect: {inspect}");
    };
    assert!(ip.starts_with("10.89.0."), "address {ip:?}");
    let ctr_pid: u32 = ctr_pid.parse().expect("a container pid");

    let status = pm.status();
    assert!(status["infra"].is_object(), "no infra: {status}");
    let attachment = only_attachment(&status);
    assert_eq!(
        attachment["addresses"],
        json!([format!("{ip}/24")]),
        "{status}"
    );
    assert_eq!(
        attachment["ports"],
        json!([format!("127.0.0.1:{port}/tcp -> container port 80")]),
        "podman passed no portMappings: {status}"
    );

    // Where podman ran us: in its user namespace, in a netns that is
    // neither the host's nor the container's (its rootless-netns).
    let supervisor = status["infra"]["supervisor"]["pid"]
        .as_u64()
        .expect("a supervisor pid") as u32;
    let pause = pm.pause_pid().expect("podman's pause process");
    assert_eq!(
        ns_of(supervisor, "user"),
        ns_of(pause, "user"),
        "the infra is not in podman's user namespace"
    );
    let me = std::process::id();
    let infra_caller_net = ns_of(supervisor, "net");
    assert_ne!(
        infra_caller_net,
        ns_of(me, "net"),
        "the infra's caller netns is the host's"
    );
    assert_ne!(
        infra_caller_net,
        ns_of(ctr_pid, "net"),
        "the infra's caller netns is the container's"
    );

    // Our half of the published port, in podman's rootless-netns: the
    // forwarder, the infra's portmap DNAT, the bridge.
    let supervisor_net = format!("--net=/proc/{supervisor}/ns/net");
    let url = format!("http://127.0.0.1:{port}/");
    let ours = retry(Duration::from_secs(5), || {
        run_root(
            &[
                "nsenter",
                &supervisor_net,
                "--",
                "curl",
                "-sS",
                "--max-time",
                "3",
                &url,
            ],
            Duration::from_secs(10),
        )
    });
    assert!(ours.ok(), "curl {url} in podman's rootless-netns: {ours}");
    assert_eq!(ours.stdout, PAGE, "{ours}");

    // A second container reaches the first over the infra's bridge. It
    // keeps running and pings by `podman exec`: under the test harness,
    // podman 4.3 rootless noticed a container's own exit only after its
    // 20 s conmon timeout (`run --rm`, `wait`), while exec and rm are quick.
    let peer = pm.podman(
        &[
            &["run", "-d", "--name", "rcni-peer", "--network", PODMAN_NET][..],
            &["--cap-add", "NET_RAW"],
            &ULIMITS,
            &[IMAGE, "sleep", "600"],
        ]
        .concat(),
    );
    assert!(peer.ok(), "podman run (the peer): {peer}");
    let ping = pm.podman(&["exec", "rcni-peer", "ping", "-c1", "-W2", ip]);
    assert!(ping.ok(), "a second container pings the first: {ping}");
    let status = pm.status();
    assert_eq!(
        status["attachments"].as_array().map(Vec::len),
        Some(2),
        "{status}"
    );

    let rm = pm.podman(&["rm", "--force", "--time", "0", "rcni-web", "rcni-peer"]);
    assert!(rm.ok(), "podman rm: {rm}");
    let status = pm.status();
    assert!(status["infra"].is_null(), "infra after podman rm: {status}");
    assert_eq!(
        status["attachments"].as_array().map(Vec::len),
        Some(0),
        "{status}"
    );
    assert_eq!(
        pm.lab.attachment_files(),
        Vec::<String>::new(),
        "records left"
    );
    assert_eq!(
        pm.lab.lease_files(PODMAN_NET),
        Vec::<String>::new(),
        "leases left"
    );
    assert!(
        !pm.lab.state_dir().join("infra.json").exists(),
        "infra.json left"
    );
    let left = leftovers_but(&pm.lab, pause, Duration::from_secs(3));
    assert!(
        left.is_empty(),
        "processes left besides podman's pause process:\n{}",
        left.join("\n")
    );
    let netns = Lab::list(&pm.lab.run_dir().join("netns"));
    assert!(netns.is_empty(), "podman's netns files left: {netns:?}");

    pm.finish();
    let left = pm.lab.leftovers_after(Duration::from_secs(3));
    assert!(left.is_empty(), "processes left:\n{}", left.join("\n"));
    assert_eq!(HostState::capture(), before, "the host is not as it was");
    eprintln!("rootless podman test took {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------
// podman 3's rootless CNI dir

/// Podman 3.2 to 3.4 keep their rootless CNI namespace files in
/// $XDG_RUNTIME_DIR/rootless-cni and remove that dir when their last
/// container goes. With such a dir there before the first ADD (podman 3
/// makes it before it runs any plugin), the infra's files go elsewhere
/// (where infra.json appears, and what `status` says), and podman 3's
/// cleanup, run as the user under the running infra, leaves our record,
/// the container's network, CHECK and DEL untouched.
#[test]
fn podman3_rootless_cni_dir_is_not_ours() {
    let Some(lab) = Lab::with_example_net("podman3_dir") else {
        return;
    };
    let c = lab.container();
    let xdg = lab.xdg_runtime_dir().display().to_string();
    let theirs = format!("{xdg}/rootless-cni");
    let made = lab.exec(
        &[],
        None,
        &[
            "sh",
            "-c",
            "mkdir -p \"$1/run/systemd\" \"$1/var/lib/cni/results\" && \
             echo 'nameserver 10.0.2.3' >\"$1/resolv.conf\" && \
             echo 1 >\"$1/rootless-cni-slirp4netns.pid\"",
            "sh",
            &theirs,
        ],
    );
    assert!(made.ok(), "making podman 3's dir: {made}");
    let ip = lab.attach(&c);

    // Where the infra's files went, as the plugin chose: not podman 3's.
    let found = lab.exec(&[], None, &["find", &xdg, "-name", "infra.json"]);
    let infra_json: Vec<&str> = found.stdout.lines().collect();
    assert_eq!(infra_json.len(), 1, "infra.json under {xdg}: {found}");
    assert!(
        !infra_json[0].starts_with(&format!("{theirs}/")),
        "the infra's files are in podman 3's dir: {found}"
    );
    let status = lab.status();
    let state = status["stateDir"].as_str().unwrap_or_default().to_string();
    assert!(
        !state.is_empty() && !format!("{state}/").starts_with(&format!("{theirs}/")),
        "status names podman 3's dir as ours: {status}"
    );
    assert_eq!(
        Lab::list(&lab.run_dir().join("rootless-cni")),
        ["resolv.conf", "rootless-cni-slirp4netns.pid", "run", "var"],
        "the plugin wrote into podman 3's dir"
    );

    // Podman 3's cleanup after its last container, as the user.
    let removed = lab.exec(&[], None, &["rm", "-rf", &theirs]);
    assert!(removed.ok(), "removing podman 3's dir: {removed}");

    assert_eq!(lab.attachment_files().len(), 1, "our record");
    lab.assert_attached(&c, &ip);
    lab.assert_ping(
        &c,
        common::GATEWAY,
        "container -> gateway after podman 3's cleanup",
    );
    let check = lab.cnitool("check", NET, &c.netns());
    assert!(check.ok(), "CHECK after podman 3's cleanup: {check}");
    let del = lab.cnitool("del", NET, &c.netns());
    assert!(del.ok(), "DEL after podman 3's cleanup: {del}");
    lab.assert_no_infra("after the DEL");
}
