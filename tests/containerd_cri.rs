//! containerd's CRI plugin (containerd 1.6, Debian) runs rootless-cni as
//! kubelet would have it, driven through the CRI by a real client (our
//! tools/cri-client): a pod with a `hostPort` on 127.0.0.1 whose container
//! serves a page, fetched from the host's loopback; a second pod whose
//! container pings the first pod; Stop/RemovePodSandbox; then nothing of
//! the pods or of our infra is left. Once with containerd as root, once
//! with containerd as an unprivileged uid inside `rootlesskit --net=host`
//! (Usernetes' shape). The network config is
//! conf-examples/kubernetes/10-rootless.conflist as shipped; containerd's
//! CNI library (go-cni) hands the hostPort over as `portMappings` with
//! Go-cased keys (`HostPort`, `ContainerPort`, `HostIP`, ...).
//!
//! Fixtures: `lab::containerd`. Prerequisites: scripts/deps,
//! scripts/build-cri-client, scripts/build-cri-images (scripts/test runs
//! them).

use lab::containerd::{
    cgroups_left, cri_prerequisites, page_on_host, Cri, Host, Pod, RootfulContainerd,
    RootlessContainerd, PAGE,
};
use lab::{free_tcp_port, Lab, LabOptions};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

/// The web pod (hostPort on 127.0.0.1 → container port 80, httpd serving
/// PAGE) and the client pod (a sleeping container to exec ping in), the
/// page fetched on the host and the ping checked. Returns the pods.
fn web_and_client(cri: &Cri, cgroup_parent: &str) -> (Pod, Pod) {
    let port = free_tcp_port();
    let web = cri.run_pod(cri.pod_config("web", &[(port, 80)], cgroup_parent));
    let httpd = cri.start_container(&web, "httpd", &["httpd", "-f", "-p", "80", "-h", "/www"]);
    let web_ip = cri.pod_ip(&web);
    assert!(
        web_ip.starts_with("10.89.0."),
        "pod IP {web_ip} is not in the example's 10.89.0.0/24"
    );
    let hostname = cri.exec(&httpd, &["hostname"]);
    assert_eq!(hostname["stdout"], "web\n", "{hostname}");
    let eth0 = cri.exec(&httpd, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
    let eth0 = eth0["stdout"].as_str().unwrap_or_default();
    assert!(eth0.contains(&format!(" {web_ip}/")), "eth0: {eth0}");

    let page = page_on_host(port);
    assert!(
        page.ok(),
        "the hostPort {port} on the host's 127.0.0.1: {page}"
    );
    assert_eq!(page.stdout, PAGE, "{page}");

    let client = cri.run_pod(cri.pod_config("client", &[], cgroup_parent));
    let pinger = cri.start_container(&client, "pinger", &["sleep", "infinity"]);
    let client_ip = cri.pod_ip(&client);
    assert!(client_ip.starts_with("10.89.0.") && client_ip != web_ip);
    let ping = cri.exec(&pinger, &["ping", "-c1", "-W2", &web_ip]);
    assert_eq!(
        ping["exit_code"], 0,
        "ping {web_ip} from the client pod: {ping}"
    );
    (web, client)
}

/// The attachments `rootless-cni status --json` lists.
fn attachments(status: &Value) -> usize {
    status["attachments"].as_array().map_or(0, Vec::len)
}

/// The host's mounts (`findmnt`), one line each.
fn host_mounts() -> Vec<String> {
    let out = Command::new("findmnt")
        .args(["-rn", "-o", "TARGET,FSTYPE"])
        .output()
        .expect("findmnt");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// What containerd's CRI plugin would leave on the host if it were not in
/// a mount namespace of its own: its pods' netns (`/run/netns/cni-*`),
/// libcni's cached results for our network, `/opt/containerd`. Only those:
/// other tests on the machine may make `/run/netns` or `/var/lib/cni`.
#[derive(Debug, PartialEq)]
struct HostDirs {
    cni_netns: Vec<String>,
    cni_results: Vec<String>,
    opt_containerd: bool,
}

impl HostDirs {
    fn capture() -> HostDirs {
        let with_prefix = |dir: &str, prefix: &str| -> Vec<String> {
            Lab::list(Path::new(dir))
                .into_iter()
                .filter(|n| n.starts_with(prefix))
                .collect()
        };
        HostDirs {
            cni_netns: with_prefix("/run/netns", "cni-"),
            cni_results: with_prefix("/var/lib/cni/results", "rootless-"),
            opt_containerd: Path::new("/opt/containerd").exists(),
        }
    }
}

#[test]
fn containerd_cri_as_root_runs_pods_with_a_host_port_through_rootless_cni() {
    if !cri_prerequisites("containerd_cri_as_root", false) {
        return;
    }
    let started = Instant::now();
    let host_before = HostDirs::capture();
    let mut cd = RootfulContainerd::start(lab::binary!(), "rootful");
    eprintln!("containerd up, images imported: {:?}", started.elapsed());

    let (web, client) = web_and_client(&cd.cri, &cd.cgroup_parent);
    let status = cd.status();
    assert!(status["infra"].is_object(), "no infra: {status}");
    assert_eq!(attachments(&status), 2, "{status}");

    cd.cri.stop_and_remove(&web);
    cd.cri.stop_and_remove(&client);
    let left = cd.leftovers();
    assert!(
        left.is_empty(),
        "left after RemovePodSandbox:\n{}\n--- containerd log\n{}",
        left.join("\n"),
        cd.log()
    );

    // The guard's own work, checked: containerd's namespace gone, no
    // cgroup, mount or host dir of its left.
    cd.stop();
    let dir = cd.dir.display().to_string();
    let mounts: Vec<String> = host_mounts()
        .into_iter()
        .filter(|m| m.contains(&dir))
        .collect();
    assert!(mounts.is_empty(), "mounts left on the host: {mounts:?}");
    assert_eq!(
        cgroups_left(&cd.cgroup_parent),
        Vec::<std::path::PathBuf>::new()
    );
    assert_eq!(HostDirs::capture(), host_before, "the host's dirs changed");
    eprintln!("containerd CRI as root: {:?}", started.elapsed());
}

/// The rootless test on a host of kind `host`.
fn rootless_containerd_cri(test: &str, host: Host) {
    if !cri_prerequisites(test, true) {
        return;
    }
    let started = Instant::now();
    // The lab's uid and tun node; its session is not used by containerd
    // (rootlesskit makes its own namespaces), only by the checks.
    let Some(lab) = Lab::new_with(
        lab::binary!(),
        "containerd_cri",
        LabOptions {
            var_lib_cni: false,
            ..LabOptions::default()
        },
    ) else {
        return;
    };
    for f in ["/etc/passwd", "/etc/group", "/etc/subuid", "/etc/subgid"] {
        assert!(
            Path::new(f).exists(),
            "{f} is missing: nothing to bind over"
        );
    }
    let host_before = HostDirs::capture();
    let cd = RootlessContainerd::start(&lab, host);
    eprintln!(
        "rootless containerd up, images imported: {:?}",
        started.elapsed()
    );
    let before = lab.snapshot();

    let (web, client) = web_and_client(&cd.cri, "");
    let status = cd.status(&lab);
    assert!(status["infra"].is_object(), "no infra: {status}");
    assert_eq!(attachments(&status), 2, "{status}");

    cd.cri.stop_and_remove(&web);
    cd.cri.stop_and_remove(&client);
    assert_eq!(cd.cri.pods(), Vec::<Value>::new(), "pods left");
    let status = cd.status(&lab);
    assert!(status["infra"].is_null(), "infra still running: {status}");
    assert_eq!(attachments(&status), 0, "{status}");
    lab.assert_no_leaks(&before, "after RemovePodSandbox of both pods");
    assert_eq!(HostDirs::capture(), host_before, "the host's dirs changed");
    drop(cd);
    drop(lab);
    eprintln!("{test}: {:?}", started.elapsed());
}

#[test]
fn containerd_cri_rootless_in_rootlesskit_runs_pods_with_a_host_port_through_rootless_cni() {
    rootless_containerd_cri("containerd_cri_rootless", Host::Clean);
}

/// Where a rootful CNI runtime ran, RootlessKit's copy-up leaves links to
/// root-owned /run/netns and /var/lib/cni; removing them (as
/// containerd-rootless.sh does) is what lets the CRI plugin make its netns
/// and libcni its cache.
#[test]
fn containerd_cri_rootless_works_where_a_rootful_cni_runtime_ran() {
    rootless_containerd_cri("containerd_cri_rootless_rootful_host", Host::RootfulCniRan);
}
