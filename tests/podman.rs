//! Podman as the runtime of rootless-cni:
//!
//! - podman 4.3 as root (CNI backend): a container from an image imported
//!   from a busybox-static rootfs (no registry) runs on a network from
//!   conf-examples/podman/rootless.conflist in a private network config
//!   dir, a second one pings it, and `podman rm` leaves no infra. Root,
//!   runroot and tmpdir are private; what podman changes on the host
//!   (/var/lib/cni, /var/lib/containers, /run/netns and its mount,
//!   /run/runc, ip_forward, cgroups) is recorded before and undone after.
//! - podman 4.3 rootless: the lab uid runs podman with
//!   conf-examples/podman/containers.conf (a drop-in) and rootless.conflist
//!   in its ~/.config, publishes a port and the page is fetched on the
//!   host's 127.0.0.1; podman runs CNI plugins in its own rootless-netns, so
//!   the infra starts there (the test's doc says how the ports fit).
//! - podman 3's rootless CNI dir ($XDG_RUNTIME_DIR/rootless-cni) is never
//!   taken for ours, and podman 3's cleanup of it leaves our attachment as
//!   it is.
//! - the busybox that goes into container images is a static one.

use lab::host_tools::{busybox_static, is_static_elf, skip_without};
use lab::podman::{
    assert_page_on_host, busybox_rootfs_tar, leftovers_but, ns_of, only_attachment, retry,
    run_root, skip_without_rootless_podman, web_container_args, RootlessPodman, IMAGE, PAGE,
    PODMAN_NET, ULIMITS,
};
use lab::rootful::{podman_prerequisites, HostState, RootfulPodman, AS_ROOT};
use lab::{free_tcp_port, Lab, NET};
use serde_json::json;
use std::fs;
use std::time::{Duration, Instant};

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

#[test]
fn podman_runs_containers_on_a_rootless_cni_network() {
    if !podman_prerequisites("podman_runs_containers") {
        return;
    }
    let _serial = AS_ROOT.lock().unwrap_or_else(|e| e.into_inner());
    let mut pm = RootfulPodman::new(lab::binary!(), "podman-run");
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
    let mut pm = RootfulPodman::new(lab::binary!(), "podman-port");
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
    let Some(lab) = Lab::new(lab::binary!(), "rootless_podman") else {
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
    let Some(lab) = Lab::with_example_net(lab::binary!(), "podman3_dir") else {
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
        lab::GATEWAY,
        "container -> gateway after podman 3's cleanup",
    );
    let check = lab.cnitool("check", NET, &c.netns());
    assert!(check.ok(), "CHECK after podman 3's cleanup: {check}");
    let del = lab.cnitool("del", NET, &c.netns());
    assert!(del.ok(), "DEL after podman 3's cleanup: {del}");
    lab.assert_no_infra("after the DEL");
}
