//! Installing rootless-cni as a user would: scripts/install for a user and
//! for the system, and the Debian package of scripts/build-deb through
//! dpkg, used by a rootless podman with the example it ships.
//!
//! The package is installed and removed in a private mount namespace whose
//! overlays on /usr, /etc, /var/lib/dpkg and /var/log take every write of
//! dpkg's: the machine's files and package database stay as they were
//! (checked), and the overlays go with the namespace's holder when the
//! test ends, however it ends.

use lab::podman::{
    assert_page_on_host, only_attachment, run_root, skip_without_rootless_podman, user_clone,
    web_container_args, RootlessPodman, IMAGE,
};
use lab::{free_tcp_port, Lab, LAB_PATH};
use serde_json::json;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// scripts/install --user as a new user: the plugin in
/// ~/.local/libexec/cni, the command linked from ~/.local/bin; a second run
/// changes nothing; a changed binary is replaced; a file of the user's
/// where the link would go is left as it is. --system with --destdir: the
/// plugin in usr/lib/cni, the link in usr/bin.
#[test]
fn install_script_puts_the_plugin_where_runtimes_look() {
    let Some(lab) = Lab::new(lab::binary!(), "install_script") else {
        return;
    };
    let clone = user_clone(&lab);
    let install = clone.join("scripts/install").display().to_string();
    let home = lab.dir.display().to_string();
    let path = format!("{home}/.local/bin:{LAB_PATH}");
    let run = |args: &[&str]| {
        let argv: Vec<&str> = [&install[..]]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        lab.exec_outside(&[("PATH", &path)], None, &argv)
    };
    let plugin = lab.dir.join(".local/libexec/cni/rootless-cni");
    let link = lab.dir.join(".local/bin/rootless-cni");

    let first = run(&["--user"]);
    assert!(first.ok(), "{first}");
    for said in [
        format!("installed: {}", plugin.display()),
        format!("linked: {} -> ../libexec/cni/rootless-cni", link.display()),
    ] {
        assert!(first.stderr.contains(&said), "{said:?} not said: {first}");
    }
    let meta = fs::metadata(&plugin).expect("the plugin");
    assert_eq!(meta.uid(), lab.uid, "the plugin is not the user's");
    assert_eq!(meta.mode() & 0o777, 0o755);
    assert_eq!(
        fs::read_link(&link).expect("the link"),
        Path::new("../libexec/cni/rootless-cni")
    );
    let version = lab.exec_outside(&[("PATH", &path)], None, &["rootless-cni", "--version"]);
    assert!(version.ok(), "rootless-cni on PATH: {version}");
    assert!(!first.stderr.contains("not on your PATH"), "{first}");

    let again = run(&["--user"]);
    assert!(again.ok(), "{again}");
    assert_eq!(
        again.stderr.matches("unchanged: ").count(),
        2,
        "a second run changed something: {again}"
    );
    assert_eq!(
        fs::metadata(&plugin).expect("the plugin").ino(),
        meta.ino(),
        "a second run rewrote the plugin"
    );

    // A rebuild: another binary is replaced (a renamed new file).
    let other = lab.dir.join("other-build");
    fs::copy(env!("CARGO_BIN_EXE_rootless-cni"), &other).expect("copy");
    fs::OpenOptions::new()
        .append(true)
        .open(&other)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"\0"))
        .expect("changing the copy");
    std::os::unix::fs::chown(&other, Some(lab.uid), Some(lab.uid)).expect("chown");
    let other = other.display().to_string();
    let replaced = run(&["--user", "--binary", &other]);
    assert!(replaced.ok(), "{replaced}");
    assert!(
        replaced
            .stderr
            .contains(&format!("replaced: {}", plugin.display())),
        "{replaced}"
    );
    assert_ne!(fs::metadata(&plugin).expect("plugin").ino(), meta.ino());
    let leftovers: Vec<String> = Lab::list(plugin.parent().expect("dir"))
        .into_iter()
        .filter(|n| n != "rootless-cni")
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    // The user's own file where the link goes stays as it is.
    fs::remove_file(&link).expect("rm link");
    fs::write(&link, "#!/bin/sh\necho mine\n").expect("the user's file");
    let kept = run(&["--user"]);
    assert!(kept.ok(), "{kept}");
    assert!(
        kept.stderr.contains("is not our link; left as it is"),
        "{kept}"
    );
    assert_eq!(
        fs::read_to_string(&link).expect("the user's file"),
        "#!/bin/sh\necho mine\n"
    );

    // No binary: a clear error, nothing made.
    let missing = run(&[
        "--user",
        "--prefix",
        &format!("{home}/p"),
        "--binary",
        "/nonexistent",
    ]);
    assert!(!missing.ok(), "{missing}");
    assert!(
        missing.stderr.contains("cargo build --release"),
        "{missing}"
    );
    assert!(!lab.dir.join("p").exists(), "a failed install made dirs");

    // --system, staged.
    let stage = lab.dir.join("stage");
    let out = run_root(
        &[
            &install,
            "--system",
            "--binary",
            env!("CARGO_BIN_EXE_rootless-cni"),
            "--destdir",
            &stage.display().to_string(),
        ],
        Duration::from_secs(30),
    );
    assert!(out.ok(), "{out}");
    assert!(stage.join("usr/lib/cni/rootless-cni").is_file(), "{out}");
    assert_eq!(
        fs::read_link(stage.join("usr/bin/rootless-cni")).expect("the system link"),
        Path::new("../lib/cni/rootless-cni")
    );
}

/// Where dpkg writes: each gets an overlay in the test's mount namespace.
const DPKG_WRITES: [&str; 4] = ["/usr", "/etc", "/var/lib/dpkg", "/var/log"];

/// What the machine shows of the package: dpkg's word and the files.
fn host_package_state() -> (bool, bool, bool) {
    let known = run_root(
        &["dpkg-query", "-W", "-f=${Status}", "rootless-cni"],
        Duration::from_secs(30),
    );
    // "unknown ok not-installed" (a package dpkg knows of, purged) is
    // not installed: the status's last word says it.
    (
        known.ok() && known.stdout.trim().ends_with(" installed"),
        Path::new("/usr/lib/cni/rootless-cni").exists(),
        Path::new("/usr/share/doc/rootless-cni").exists(),
    )
}

/// scripts/build-deb's package: dpkg -i puts the plugin beside the
/// reference plugins and the examples under /usr/share/doc; a rootless
/// podman with the shipped podman example as it is (a drop-in of
/// examples/podman/containers.conf, examples/podman/rootless.conflist)
/// runs a container through /usr/lib/cni/rootless-cni, its port is
/// reached from the host, and `podman rm` leaves nothing; dpkg -r and
/// --purge remove every file and the package's record.
#[test]
fn debian_package_installs_serves_rootless_podman_and_removes_cleanly() {
    let test = "debian_package";
    if skip_without_rootless_podman(test, &["dpkg", "dpkg-query", "bash"]) {
        return;
    }
    let Some(lab) = Lab::new(lab::binary!(), test) else {
        return;
    };
    let started = Instant::now();
    let host_before = host_package_state();
    assert_eq!(
        host_before,
        (false, false, false),
        "rootless-cni is installed on this machine: the test would not see its own"
    );

    let out_dir = lab.dir.join("deb");
    let build = run_root(
        &[
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("scripts/build-deb")
                .display()
                .to_string(),
            "--binary",
            env!("CARGO_BIN_EXE_rootless-cni"),
            "--out",
            &out_dir.display().to_string(),
        ],
        Duration::from_secs(60),
    );
    assert!(build.ok(), "scripts/build-deb: {build}");
    let deb = build.stdout.trim().to_string();
    assert!(
        deb.ends_with(".deb") && Path::new(&deb).is_file(),
        "{build}"
    );

    let d = lab.dir.display().to_string();
    let overlays: String = DPKG_WRITES
        .iter()
        .map(|dir| {
            let name = dir.trim_start_matches('/').replace('/', "-");
            format!(
                "mkdir -p {d}/ovl/{name}/upper {d}/ovl/{name}/work
                 mount -t overlay overlay -o lowerdir={dir},upperdir={d}/ovl/{name}/upper,workdir={d}/ovl/{name}/work {dir}\n"
            )
        })
        .collect();
    let mut pm = RootlessPodman::start(lab, &overlays);

    let install = pm.root_run(&["dpkg", "-i", &deb]);
    assert!(install.ok(), "dpkg -i: {install}");
    let status = pm.root_run(&["dpkg-query", "-W", "-f=${Status}", "rootless-cni"]);
    assert_eq!(status.stdout, "install ok installed", "{status}");
    for file in [
        "/usr/lib/cni/rootless-cni",
        "/usr/share/doc/rootless-cni/copyright",
        "/usr/share/doc/rootless-cni/README.md",
        "/usr/share/doc/rootless-cni/examples/podman/containers.conf",
        "/usr/share/doc/rootless-cni/examples/podman/rootless.conflist",
    ] {
        let there = pm.root_run(&["test", "-f", file]);
        assert!(there.ok(), "{file} is not installed");
    }
    let version = pm.user_run(&["rootless-cni", "--version"]);
    assert!(version.ok(), "/usr/bin/rootless-cni: {version}");
    assert_eq!(
        host_package_state(),
        host_before,
        "dpkg -i reached the machine"
    );

    // A user of the package: the shipped podman example, as it is.
    let setup = pm.user_run(&[
        "bash",
        "-e",
        "-c",
        "ex=/usr/share/doc/rootless-cni/examples/podman
         mkdir -p ~/.config/cni/net.d ~/.config/containers/containers.conf.d
         cp $ex/rootless.conflist ~/.config/cni/net.d/
         cp $ex/containers.conf ~/.config/containers/containers.conf.d/50-rootless-cni.conf",
    ]);
    assert!(setup.ok(), "{setup}");
    pm.import_image();
    let port = free_tcp_port();
    let publish = format!("127.0.0.1:{port}:80");
    let run = pm.podman(&web_container_args("rcni-web", Some(&publish), IMAGE));
    assert!(run.ok(), "podman run -p {publish}: {run}");
    assert_page_on_host(port);
    let status = pm.user_run(&["rootless-cni", "status", "--json"]);
    let status = status.json().unwrap_or_else(|| panic!("status: {status}"));
    let attachment = only_attachment(&status);
    assert_eq!(
        attachment["ports"],
        json!([format!("127.0.0.1:{port}/tcp -> container port 80")]),
        "{status}"
    );
    let supervisor = status["infra"]["supervisor"]["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no infra: {status}"));
    // The infra is the installed binary (its exe, as the mount namespace
    // where podman ran it shows it).
    let exe = pm.root_run(&["readlink", &format!("/proc/{supervisor}/exe")]);
    assert_eq!(exe.stdout.trim(), "/usr/lib/cni/rootless-cni", "{exe}");

    let rm = pm.podman(&["rm", "--force", "--time", "0", "rcni-web"]);
    assert!(rm.ok(), "podman rm: {rm}");
    pm.assert_nothing_left("after podman rm");

    let remove = pm.root_run(&["dpkg", "-r", "rootless-cni"]);
    assert!(remove.ok(), "dpkg -r: {remove}");
    for path in ["/usr/lib/cni/rootless-cni", "/usr/bin/rootless-cni"] {
        let gone = pm.root_run(&["test", "!", "-e", path, "-a", "!", "-L", path]);
        assert!(gone.ok(), "{path} left after dpkg -r");
    }
    let kept = pm.root_run(&["test", "-x", "/usr/lib/cni/bridge"]);
    assert!(kept.ok(), "dpkg -r took the reference plugins");
    let purge = pm.root_run(&["dpkg", "--purge", "rootless-cni"]);
    assert!(purge.ok(), "dpkg --purge: {purge}");
    let gone = pm.root_run(&["dpkg-query", "-W", "-f=${Status}", "rootless-cni"]);
    assert!(
        !gone.ok() || gone.stdout.contains("not-installed"),
        "dpkg still knows the package after --purge: {gone}"
    );
    let doc = pm.root_run(&["test", "!", "-e", "/usr/share/doc/rootless-cni"]);
    assert!(doc.ok(), "/usr/share/doc/rootless-cni left after --purge");
    let left = pm.root_run(&[
        "sh",
        "-c",
        "ls /var/lib/dpkg/info/rootless-cni.* 2>/dev/null",
    ]);
    assert!(
        left.stdout.is_empty(),
        "dpkg's files of the package left: {left}"
    );

    pm.finish();
    pm.lab.assert_no_infra("after the package's podman test");
    assert_eq!(host_package_state(), host_before, "the machine changed");
    let mounts = run_root(&["findmnt", "-rn", "-o", "TARGET"], Duration::from_secs(10));
    for dir in DPKG_WRITES {
        assert!(
            !mounts.stdout.lines().any(|l| l == dir),
            "{dir} is a mount point on the machine: {mounts}"
        );
    }
    eprintln!("the package test took {:?}", started.elapsed());
}
