//! buildah 1.28 (Debian; CNI backend) runs its build containers on a
//! rootless-cni network as an unprivileged user: `buildah run --network
//! rootless` makes libcni call our binary with the build container's
//! netns, and the DEL that follows the run leaves nothing behind.
//!
//! Everything runs as the lab's uid: buildah with storage driver vfs, its
//! root, runroot and TMPDIR in the lab dir, and `--isolation oci` (runc).
//! buildah's rootless default isolation refuses named networks ("cannot
//! use networks as rootless"), and its `chroot` isolation allows only the
//! host's network. The image is built here from a busybox-static rootfs
//! (`buildah from scratch`, `copy`, `commit`: no registry), and the
//! network comes from conf-examples/buildah/containers.conf with its
//! plugin and config dirs made the lab's.
//!
//! Two ways a user has a user namespace, one test each:
//! - inside the lab's session (a user namespace mapping the uid to root,
//!   `/var/lib/cni` writable), where a container attached by cnitool is
//!   the peer the build container pings;
//! - `buildah unshare`: buildah's own user namespace with the uid's
//!   subordinate ids, made from the user's ordinary shell. libcni caches
//!   results in `/var/lib/cni`, which the user cannot create there
//!   (`failed to set network "rootless" cached result: mkdir /var/lib/cni:
//!   permission denied`, after the plugins ran), so the script buildah
//!   unshare runs first lays an overlay of its own over `/var/lib`.

mod common;

use common::host_tools::{busybox_static, skip_without};
use common::{HostServer, Lab, Out, NET, SLIRP_HOST};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Instant;

/// The image both tests build and run.
const IMAGE: &str = "localhost/rcni-busybox:buildah";

/// What the tests need besides the lab.
const TOOLS: &[&str] = &["buildah", "runc", "apt-get", "dpkg-deb"];

/// The lab's buildah: its files under `<lab>/buildah`, the example
/// containers.conf with the lab's dirs at `<lab>/buildah/containers.conf`,
/// the example conflist in `<lab>/buildah/net.d` (a dir of the uid's:
/// buildah takes its `cni.lock` there).
struct Buildah<'a> {
    lab: &'a Lab,
}

impl<'a> Buildah<'a> {
    fn new(lab: &'a Lab) -> Buildah<'a> {
        let d = lab.dir.join("buildah");
        for sub in ["", "tmp", "net.d"] {
            let p = d.join(sub);
            fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
            std::os::unix::fs::chown(&p, Some(lab.uid), Some(lab.uid))
                .unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
        }
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf-examples");
        let conflist = fs::read_to_string(examples.join("rootless.conflist"))
            .expect("reading conf-examples/rootless.conflist");
        lab.write_file(&format!("buildah/net.d/{NET}.conflist"), &conflist);
        let conf = fs::read_to_string(examples.join("buildah/containers.conf"))
            .expect("reading conf-examples/buildah/containers.conf");
        lab.write_file("buildah/containers.conf", &lab_containers_conf(lab, &conf));
        let busybox = d.join("busybox");
        fs::copy(busybox_static(), &busybox).expect("copying busybox");
        fs::set_permissions(&busybox, fs::Permissions::from_mode(0o755)).expect("chmod busybox");
        Buildah { lab }
    }

    fn path(&self, rel: &str) -> String {
        self.lab.dir.join("buildah").join(rel).display().to_string()
    }

    /// `buildah ARGS` in the lab's session, with the lab's storage and
    /// containers.conf.
    fn run(&self, args: &[&str]) -> Out {
        let (conf, tmp) = (self.path("containers.conf"), self.path("tmp"));
        let (root, runroot) = (self.path("root"), self.path("runroot"));
        let mut argv = vec!["buildah", "--root", &root, "--runroot", &runroot];
        argv.extend(["--storage-driver", "vfs"]);
        argv.extend_from_slice(args);
        self.lab
            .exec(&[("CONTAINERS_CONF", &conf), ("TMPDIR", &tmp)], None, &argv)
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.ok(), "{out}");
        out.stdout.trim().to_string()
    }

    /// IMAGE, from a busybox-static rootfs.
    fn build_image(&self) {
        let busybox = self.path("busybox");
        self.ok(&["from", "--name", "rcni-rootfs", "scratch"]);
        self.ok(&["copy", "rcni-rootfs", &busybox, "/bin/busybox"]);
        self.ok(&["commit", "rcni-rootfs", IMAGE]);
        self.ok(&["rm", "rcni-rootfs"]);
    }
}

/// The example containers.conf with `cni_plugin_dirs` naming the lab's dir
/// of our binary, then /usr/lib/cni, and `network_config_dir` the lab's.
fn lab_containers_conf(lab: &Lab, example: &str) -> String {
    let dirs = format!(
        "cni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]",
        lab.bin().display()
    );
    let config_dir = format!(
        "network_config_dir = \"{}\"",
        lab.dir.join("buildah/net.d").display()
    );
    let (mut dirs_set, mut config_dir_set) = (false, false);
    let mut text = String::new();
    for line in example.lines() {
        let key = line.trim_start_matches(['#', ' ']);
        if line.starts_with("cni_plugin_dirs") {
            text.push_str(&dirs);
            dirs_set = true;
        } else if key.starts_with("network_config_dir") {
            text.push_str(&config_dir);
            config_dir_set = true;
        } else {
            text.push_str(line);
        }
        text.push('\n');
    }
    assert!(
        dirs_set && config_dir_set,
        "no cni_plugin_dirs or network_config_dir line in the example: {example}"
    );
    text
}

/// What the build container runs: its eth0 address, one ping to `peer`
/// and the host server's page through slirp4netns's `10.0.2.2`.
fn probe_script(peer: &str, port: u16) -> String {
    format!(
        "set -e
         /bin/busybox ip -4 -o addr show dev eth0
         /bin/busybox ping -c1 -W2 {peer}
         echo FETCHED
         /bin/busybox wget -qO- http://{SLIRP_HOST}:{port}/"
    )
}

/// Checks what `probe_script` printed: an address of the example network,
/// the ping answered, the page.
fn assert_probe(out: &Out, peer: &str) {
    assert!(out.ok(), "buildah run on the rootless network: {out}");
    assert!(
        out.stdout.contains("inet 10.89.0."),
        "the build container has no address of the network: {out}"
    );
    assert!(
        out.stdout.contains(&format!("64 bytes from {peer}")),
        "no answer from {peer}: {out}"
    );
    let page = out.stdout.split("FETCHED\n").nth(1).unwrap_or_default();
    assert_eq!(page, HostServer::BODY, "the host's page: {out}");
}

/// In the lab's user namespace: a container from a local image joins the
/// network with `buildah run --network rootless`, pings a container
/// attached by cnitool and fetches a page from the host's loopback; after
/// the run nothing of the build container is left (record, lease, rules,
/// processes), the peer's DEL then stops the infra, and nothing is left.
#[test]
fn buildah_run_joins_a_rootless_cni_network() {
    if skip_without("buildah_run", TOOLS) {
        return;
    }
    let Some(lab) = Lab::with_example_net("buildah_run") else {
        return;
    };
    let started = Instant::now();
    let b = Buildah::new(&lab);
    b.build_image();
    b.ok(&["from", "--name", "rcni-build", IMAGE]);
    eprintln!("image and working container in {:?}", started.elapsed());

    let peer = lab.container();
    let peer_ip = lab.attach(&peer);
    let server = HostServer::start("127.0.0.1");
    let attached = lab.snapshot();

    let script = probe_script(&peer_ip, server.port);
    let run_started = Instant::now();
    let out = b.run(&[
        "run",
        "--isolation",
        "oci",
        "--network",
        NET,
        "rcni-build",
        "--",
        "/bin/busybox",
        "sh",
        "-c",
        &script,
    ]);
    eprintln!("buildah run took {:?}", run_started.elapsed());
    assert_probe(&out, &peer_ip);
    assert!(
        server.connections() >= 1,
        "no connection to the host server"
    );

    let status = lab.status();
    assert_eq!(
        status["attachments"].as_array().map(Vec::len),
        Some(1),
        "only the peer is attached after the run: {status}"
    );
    lab.assert_no_leaks(&attached, "after buildah run");
    lab.detach(&peer);
    lab.assert_no_infra("after buildah run and the peer's DEL");
    eprintln!("buildah test took {:?}", started.elapsed());
}
