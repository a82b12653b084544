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

use lab::host_tools::{busybox_static, skip_without, write_user_files};
use lab::{run_command, HostServer, Lab, Out, GATEWAY, LAB_PATH, NET, SLIRP_HOST};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

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
        for dir in ["buildah/tmp", "buildah/net.d"] {
            user_dir(lab, dir);
        }
        lab.write_file(
            &format!("buildah/net.d/{NET}.conflist"),
            &example("rootless.conflist"),
        );
        let config_dir = lab.dir.join("buildah/net.d");
        let conf = lab_containers_conf(lab, Some(&config_dir));
        lab.write_file("buildah/containers.conf", &conf);
        install_busybox(lab, "buildah/busybox");
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

/// A file of conf-examples/.
fn example(rel: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("conf-examples")
        .join(rel);
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// `<lab>/rel` and the dirs leading to it, made and owned by the lab uid.
fn user_dir(lab: &Lab, rel: &str) {
    let mut p = lab.dir.clone();
    for part in Path::new(rel).components() {
        p.push(part);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        std::os::unix::fs::chown(&p, Some(lab.uid), Some(lab.uid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
    }
}

/// busybox-static at `<lab>/rel`, for `buildah copy` as the lab uid.
fn install_busybox(lab: &Lab, rel: &str) {
    let to = lab.dir.join(rel);
    fs::copy(busybox_static(), &to).expect("copying busybox");
    fs::set_permissions(&to, fs::Permissions::from_mode(0o755)).expect("chmod busybox");
}

/// conf-examples/buildah/containers.conf with `cni_plugin_dirs` naming the
/// lab's dir of our binary, then /usr/lib/cni, and, when given,
/// `network_config_dir` (else the example's commented line stays: the
/// rootless default ~/.config/cni/net.d).
fn lab_containers_conf(lab: &Lab, config_dir: Option<&Path>) -> String {
    let example = example("buildah/containers.conf");
    let dirs = format!(
        "cni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]",
        lab.bin().display()
    );
    let (mut dirs_set, mut config_dir_seen) = (false, false);
    let mut text = String::new();
    for line in example.lines() {
        let key = line.trim_start_matches(['#', ' ']);
        if line.starts_with("cni_plugin_dirs") {
            text.push_str(&dirs);
            dirs_set = true;
        } else if let (true, Some(dir)) = (key.starts_with("network_config_dir"), config_dir) {
            text.push_str(&format!("network_config_dir = \"{}\"", dir.display()));
            config_dir_seen = true;
        } else {
            config_dir_seen |= key.starts_with("network_config_dir");
            text.push_str(line);
        }
        text.push('\n');
    }
    assert!(
        dirs_set && config_dir_seen,
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
    let Some(lab) = Lab::with_example_net(lab::binary!(), "buildah_run") else {
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

/// What `buildah unshare` runs: an overlay over /var/lib with an empty
/// /var/lib/cni in it (libcni's result cache), the image from scratch, a
/// working container from it, a `buildah build` whose RUN step shows its
/// address, and the run; both on the default network of
/// ~/.config/containers/containers.conf. `ping` needs CAP_NET_RAW in a
/// container of buildah's own user namespace.
const UNSHARE_SCRIPT: &str = r#"set -eu
mount -t overlay overlay -o "lowerdir=/var/lib,upperdir=$W/varlib/upper,workdir=$W/varlib/work" /var/lib
mkdir -p /var/lib/cni
buildah from --name rcni-rootfs scratch
buildah copy rcni-rootfs "$W/busybox" /bin/busybox
buildah commit rcni-rootfs "$IMAGE"
buildah from --name rcni-build "$IMAGE"
mkdir -p "$W/context"
printf 'FROM %s\nRUN ["/bin/busybox", "ip", "-4", "-o", "addr", "show", "dev", "eth0"]\n' "$IMAGE" > "$W/Containerfile"
echo BUILD
buildah build --isolation oci -f "$W/Containerfile" "$W/context"
echo RUN
buildah run --isolation oci --cap-add CAP_NET_RAW rcni-build -- /bin/busybox sh -c "$PROBE"
"#;

/// The lab uid, from its ordinary shell (the initial user namespace, no
/// lab session), runs `buildah unshare` with the documented files: the
/// example containers.conf (its plugin dirs the lab's) in
/// ~/.config/containers/, storage driver vfs in ~/.config/containers/
/// storage.conf, conf-examples/rootless.conflist in ~/.config/cni/net.d/.
/// Inside, the RUN step of a `buildah build` and a `buildah run` of a
/// container from a local image are on the default network
/// (`default_network = "rootless"`); the run pings the bridge's gateway
/// and fetches a page from the host's loopback. After it no infra and
/// nothing else is left.
///
/// The uid is a named user with a subordinate id range, and the lab's 0666
/// tun node is /dev/net/tun, through copies bound over the machine's files
/// in a private mount namespace of root's (the machine's files untouched).
#[test]
fn buildah_unshare_runs_a_container_on_a_rootless_cni_network() {
    let test = "buildah_unshare";
    if skip_without(test, &[TOOLS, &["newuidmap", "newgidmap"]].concat()) {
        return;
    }
    let Some(lab) = Lab::new(lab::binary!(), test) else {
        return;
    };
    let started = Instant::now();
    write_user_files(&lab, "rcnibuildah");
    for dir in [
        ".config/containers",
        ".config/cni/net.d",
        "buildah/tmp",
        "buildah/varlib/upper",
        "buildah/varlib/work",
    ] {
        user_dir(&lab, dir);
    }
    lab.write_file(
        ".config/containers/containers.conf",
        &lab_containers_conf(&lab, None),
    );
    lab.write_file(
        ".config/containers/storage.conf",
        "[storage]\ndriver = \"vfs\"\n",
    );
    lab.write_file(
        &format!(".config/cni/net.d/{NET}.conflist"),
        &example("rootless.conflist"),
    );
    install_busybox(&lab, "buildah/busybox");
    lab.write_file("buildah/unshare.sh", UNSHARE_SCRIPT);
    let server = HostServer::start("127.0.0.1");

    let (d, u) = (lab.dir.display().to_string(), lab.uid);
    let probe = probe_script(GATEWAY, server.port);
    let inner = format!(
        "set -e
         for f in passwd group subuid subgid; do mount --bind {d}/etc-$f /etc/$f; done
         mount --bind {d}/tun /dev/net/tun
         exec setpriv --reuid {u} --regid {u} --clear-groups -- env -i PATH={LAB_PATH} \
           HOME={d} XDG_RUNTIME_DIR={d}/run TMPDIR={d}/buildah/tmp W={d}/buildah \
           IMAGE={IMAGE} PROBE=\"$PROBE\" buildah unshare sh {d}/buildah/unshare.sh"
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &inner])
        .env_clear()
        .env("PATH", LAB_PATH)
        .env("LIBMOUNT_UTAB", lab::utab())
        .env("PROBE", &probe);
    let out = run_command(
        cmd,
        "buildah unshare sh unshare.sh".into(),
        None,
        Duration::from_secs(120),
    );
    eprintln!("buildah unshare took {:?}", started.elapsed());
    assert!(out.ok(), "{out}");
    let (built, ran) = out
        .stdout
        .split_once("BUILD\n")
        .and_then(|(_, rest)| rest.split_once("RUN\n"))
        .unwrap_or_else(|| panic!("no BUILD and RUN markers: {out}"));
    assert!(
        built.contains("inet 10.89.0."),
        "the RUN step of buildah build is not on the network: {out}"
    );
    let run = Out {
        stdout: ran.to_string(),
        ..out.clone()
    };
    assert_probe(&run, GATEWAY);
    assert!(
        server.connections() >= 1,
        "no connection to the host server"
    );
    assert!(
        fs::read_dir(lab.dir.join("buildah/varlib/upper/cni/results")).is_ok(),
        "libcni cached no result in the overlay's /var/lib/cni: {out}"
    );
    lab.assert_no_infra("after buildah unshare");
}
