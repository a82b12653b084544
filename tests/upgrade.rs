//! A package upgrade while containers run: the plugin binary is replaced
//! under a running infra, and the next calls meet what the previous
//! release left (infra, records, control socket). And the other way: a
//! runtime that still calls the previous release's binary (a rollback, or
//! a second runtime with its own copy) meets what this one left.
//!
//! The previous release is built from the repository's own history
//! (`PREVIOUS_RELEASE`), with the same toolchain, once, and cached under
//! target/previous-release/<commit>/.

use lab::gocni::{assert_page_on_loopback, WebServer};
use lab::net::http_get;
use lab::{example_conflist, free_tcp_port, in_ci, plugin_stdin, Container, Lab, NET};
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

/// The previous release: the last commit before the infra's identity, the
/// state dir's fd-based access, `failed` records and the control
/// protocol's versions.
const PREVIOUS_RELEASE: &str = "151877adc5e76dc164f37767678060fc34845dc2";

/// The previous release's binary, built once per commit (None, after
/// saying why, when it cannot be built here and CI is not set).
fn previous_binary() -> Option<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BUILT.get_or_init(build_previous) {
        Ok(bin) => Some(bin.clone()),
        Err(e) if in_ci() => panic!("building the previous release {PREVIOUS_RELEASE}: {e}"),
        Err(e) => {
            eprintln!("skipping: cannot build the previous release {PREVIOUS_RELEASE}: {e}");
            None
        }
    }
}

/// `git archive` of PREVIOUS_RELEASE into target/previous-release/<commit>/src,
/// then `cargo build --locked` there with its own target dir: the cargo
/// that runs these tests, so the same toolchain.
fn build_previous() -> Result<PathBuf, String> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let base = repo.join("target/previous-release").join(PREVIOUS_RELEASE);
    let src = base.join("src");
    let bin = base.join("target/debug/rootless-cni");
    let run = |cmd: &mut Command| -> Result<(), String> {
        let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        Err(format!(
            "{cmd:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    };
    if !src.join("Cargo.toml").exists() {
        let tmp = base.join("src.tmp");
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).map_err(|e| format!("mkdir {}: {e}", tmp.display()))?;
        // A shallow clone lacks the commit: say so rather than fail vaguely.
        run(Command::new("git").arg("-C").arg(repo).args([
            "cat-file",
            "-e",
            &format!("{PREVIOUS_RELEASE}^{{commit}}"),
        ]))
        .map_err(|e| {
            format!("the clone lacks the commit (shallow? `git fetch --unshallow`): {e}")
        })?;
        run(Command::new("sh").arg("-c").arg(format!(
            "git -C '{}' archive {PREVIOUS_RELEASE} | tar -x -C '{}'",
            repo.display(),
            tmp.display()
        )))?;
        fs::rename(&tmp, &src).map_err(|e| format!("rename to {}: {e}", src.display()))?;
    }
    let started = Instant::now();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo)
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", base.join("target"))
        .args(["build", "--locked", "--bin", "rootless-cni"]))?;
    eprintln!(
        "previous release {PREVIOUS_RELEASE} built (or found built) in {:?}",
        started.elapsed()
    );
    Ok(bin)
}

/// The two binaries of a lab: the previous release in `<lab>/bin-previous`
/// (named as the plugin type, as the runtime finds it through CNI_PATH),
/// this one in the lab's bin dir.
struct Binaries {
    previous: String,
    current: String,
}

fn install_previous(lab: &Lab) -> Option<Binaries> {
    let built = previous_binary()?;
    let dir = lab.dir.join("bin-previous");
    fs::create_dir_all(&dir).expect("mkdir bin-previous");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod bin-previous");
    let to = dir.join("rootless-cni");
    fs::copy(&built, &to).expect("copying the previous release's binary");
    fs::set_permissions(&to, fs::Permissions::from_mode(0o755)).expect("chmod");
    Some(Binaries {
        previous: format!("{}:/usr/lib/cni", dir.display()),
        current: lab.cni_path(),
    })
}

/// `cnitool CMD` of `c` with the binary of `cni_path`, publishing `port`
/// (container port 80 on 127.0.0.1) when given.
fn call(lab: &Lab, cni_path: &str, cmd: &str, c: &Container, port: Option<u16>) -> lab::Out {
    let cap_args = port.map(|p| {
        format!(
            r#"{{"portMappings":[{{"hostPort":{p},"containerPort":80,"protocol":"tcp","hostIP":"127.0.0.1"}}]}}"#
        )
    });
    let mut env = vec![("CNI_PATH", cni_path)];
    if let Some(caps) = &cap_args {
        env.push(("CAP_ARGS", caps));
    }
    lab.cnitool_env(&env, cmd, NET, &c.netns())
}

/// CHECK passed. With a port, Debian's portmap (plugins 1.1.1) also looks
/// for IPv6 rules an IPv4-only container never got
/// (containernetworking/plugins#819): that, and only that, may fail it.
fn assert_checked(check: &lab::Out, port: Option<u16>, what: &str) {
    let portmap_bug = port.is_some() && check.stderr.contains("could not check ipv6 dnat");
    assert!(check.ok() || portmap_bug, "{what}: {check}");
}

fn assert_port_closed(port: u16, what: &str) {
    let got = http_get(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    assert!(got.is_err(), "{what}: port {port} still answers: {got:?}");
}

/// The state dir's supervisor pid, as infra.json records it.
fn supervisor_pid(lab: &Lab) -> Option<u64> {
    let text = fs::read_to_string(lab.state_dir().join("infra.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["supervisor"]["pid"].as_u64()
}

#[test]
fn attachments_of_the_previous_release_survive_an_upgrade() {
    let started = Instant::now();
    let Some(lab) = Lab::with_example_net(lab::binary!(), "upgrade_from_previous") else {
        return;
    };
    let Some(bins) = install_previous(&lab) else {
        return;
    };
    let (c1, c2, c3) = (lab.container(), lab.container(), lab.container());
    let (port1, port3) = (free_tcp_port(), free_tcp_port());

    // The previous release attaches two containers, one with a port.
    let add1 = call(&lab, &bins.previous, "add", &c1, Some(port1));
    let ip1 = add1.added_ipv4("previous ADD of c1");
    let ip2 = call(&lab, &bins.previous, "add", &c2, None).added_ipv4("previous ADD of c2");
    let old_supervisor = supervisor_pid(&lab).expect("the previous release's infra.json");
    let _web1 = WebServer::start(&lab, &c1, "c1\n");
    assert_page_on_loopback(
        port1,
        "c1\n",
        "c1's port, published by the previous release",
    );

    // The binary is upgraded: CHECK passes on both.
    for (c, port) in [(&c1, Some(port1)), (&c2, None)] {
        let check = call(&lab, &bins.current, "check", c, port);
        assert_checked(&check, port, "CHECK after the upgrade");
    }
    let status = lab.cli(&["status", "--json"]);
    assert!(status.ok(), "status after the upgrade: {status}");
    let leases_before = lab.lease_files(NET).len();
    assert_eq!(leases_before, 2, "two leases: {:?}", lab.lease_files(NET));

    // DEL of c1 by the new binary: its lease and its port go.
    let del1 = call(&lab, &bins.current, "del", &c1, Some(port1));
    assert!(del1.ok(), "DEL after the upgrade: {del1}");
    assert_port_closed(port1, "after the new DEL of c1");
    assert_eq!(
        lab.lease_files(NET),
        vec![ip2.clone()],
        "c1's lease ({ip1}) released, c2's kept"
    );

    // ADD of a third container next to the previous release's c2.
    let ip3 = call(&lab, &bins.current, "add", &c3, Some(port3)).added_ipv4("new ADD of c3");
    lab.assert_attached(&c3, &ip3);
    lab.assert_ping(&c3, &ip2, "c3 (new) to c2 (previous release)");
    lab.assert_ping(&c2, &ip3, "c2 (previous release) to c3 (new)");
    let _web3 = WebServer::start(&lab, &c3, "c3\n");
    assert_page_on_loopback(port3, "c3\n", "c3's port, published after the upgrade");
    // Worked with, not replaced: c2's address and routes never moved.
    assert_eq!(
        supervisor_pid(&lab),
        Some(old_supervisor),
        "the previous release's infra keeps running after the upgrade"
    );
    let versions: Vec<Option<u64>> = lab
        .attachment_records()
        .iter()
        .map(|r| r["formatVersion"].as_u64())
        .collect();
    assert!(
        versions.contains(&None) && versions.contains(&Some(2)),
        "c2's record as the previous release wrote it, c3's with its format: {versions:?}"
    );

    for (c, port) in [(&c2, None), (&c3, Some(port3))] {
        let del = call(&lab, &bins.current, "del", c, port);
        assert!(del.ok(), "DEL after the upgrade: {del}");
    }
    assert_port_closed(port3, "after the new DEL of c3");
    drop((_web1, _web3));
    lab.assert_no_infra("after the new binary deleted every attachment");
    eprintln!("upgrade from the previous release: {:?}", started.elapsed());
}

#[test]
fn the_previous_release_meets_the_state_of_this_one() {
    let started = Instant::now();
    let Some(lab) = Lab::with_example_net(lab::binary!(), "upgrade_rollback") else {
        return;
    };
    let Some(bins) = install_previous(&lab) else {
        return;
    };
    let (c1, c2, c3) = (lab.container(), lab.container(), lab.container());
    let port1 = free_tcp_port();

    let ip1 = call(&lab, &bins.current, "add", &c1, Some(port1)).added_ipv4("new ADD of c1");
    let ip2 = call(&lab, &bins.current, "add", &c2, None).added_ipv4("new ADD of c2");
    let _web1 = WebServer::start(&lab, &c1, "c1\n");
    assert_page_on_loopback(port1, "c1\n", "c1's port");

    // The previous release reads this one's records and infra.
    for (c, port) in [(&c1, Some(port1)), (&c2, None)] {
        let check = call(&lab, &bins.previous, "check", c, port);
        assert_checked(&check, port, "the previous release's CHECK");
    }

    let del1 = call(&lab, &bins.previous, "del", &c1, Some(port1));
    assert!(del1.ok(), "the previous release's DEL: {del1}");
    assert_port_closed(port1, "after the previous release's DEL of c1");
    assert_eq!(lab.lease_files(NET), vec![ip2.clone()], "{ip1} released");

    let ip3 = call(&lab, &bins.previous, "add", &c3, None).added_ipv4("previous ADD of c3");
    lab.assert_attached(&c3, &ip3);
    lab.assert_ping(&c3, &ip2, "c3 (previous release) to c2 (new)");

    // This binary goes on with what the previous one changed, and the
    // previous one stops this one's infra with its last DEL.
    let check = call(&lab, &bins.current, "check", &c3, None);
    assert!(check.ok(), "CHECK of the previous release's c3: {check}");
    let del2 = call(&lab, &bins.current, "del", &c2, None);
    assert!(del2.ok(), "DEL of c2: {del2}");
    let del3 = call(&lab, &bins.previous, "del", &c3, None);
    assert!(del3.ok(), "the previous release's last DEL: {del3}");
    drop(_web1);
    lab.assert_no_infra("after the previous release deleted the last attachment");

    // What the previous release left (it does not know infra.lck) does
    // not stop this binary from starting the next infra.
    let ip1 = call(&lab, &bins.current, "add", &c1, None).added_ipv4("new ADD after that");
    lab.assert_attached(&c1, &ip1);
    let del = call(&lab, &bins.current, "del", &c1, None);
    assert!(del.ok(), "DEL: {del}");
    lab.assert_no_infra("after every attachment was deleted");
    eprintln!(
        "the previous release on this one's state: {:?}",
        started.elapsed()
    );
}

/// Sets `formatVersion` of the JSON file at `path` (owner and mode kept).
fn set_format(path: &Path, version: Option<u64>) {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut v: serde_json::Value = serde_json::from_str(&text).expect("a JSON record");
    match version {
        Some(n) => v["formatVersion"] = n.into(),
        None => drop(
            v.as_object_mut()
                .expect("an object")
                .remove("formatVersion"),
        ),
    }
    fs::write(path, v.to_string()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// This binary, meeting a record and an infra.json of a newer format (as
/// an older release meets this one's, were it able to tell): a clear
/// error, and the files left as they are; never taken for corrupt, dead
/// or absent.
#[test]
fn a_newer_state_format_is_refused_and_left_as_it_is() {
    let Some(lab) = Lab::with_example_net(lab::binary!(), "upgrade_newer_format") else {
        return;
    };
    let (c1, c2) = (lab.container(), lab.container());
    let stdin = plugin_stdin(&example_conflist()).to_string();
    let plugin = |cmd: &str, id: &str, c: &Container| {
        lab.plugin(&lab.plugin_env(cmd, id, &c.netns()), &stdin)
    };
    let ip1 = plugin("ADD", "c1", &c1).added_ipv4("ADD of c1");
    let state = lab.state_dir();
    let record = state.join("attachments").join(&lab.attachment_files()[0]);
    let infra_json = state.join("infra.json");
    let supervisor = supervisor_pid(&lab);
    let newer = rootless_cni::state::FORMAT_VERSION + 1;
    let refused = |out: &lab::Out, what: &str| {
        let err = out
            .cni_error()
            .unwrap_or_else(|| panic!("{what}: no CNI error: {out}"));
        assert_eq!(err.code, 109, "{what}: {out}");
        assert!(err.mentions("newer rootless-cni"), "{what}: {out}");
    };

    set_format(&record, Some(newer));
    refused(&plugin("DEL", "c1", &c1), "DEL of a newer record");
    refused(&plugin("ADD", "c1", &c1), "ADD over a newer record");
    assert!(record.exists(), "the newer record is kept");
    assert_eq!(lab.lease_files(NET), vec![ip1.clone()], "its lease is kept");
    let status = lab.cli(&["status"]);
    assert!(
        !status.ok() && status.stderr.contains("newer"),
        "status: {status}"
    );
    set_format(&record, None);

    set_format(&infra_json, Some(newer));
    refused(&plugin("ADD", "c2", &c2), "ADD next to a newer infra");
    assert_eq!(
        supervisor_pid(&lab),
        supervisor,
        "no second infra was started"
    );
    assert_eq!(lab.attachment_files().len(), 1, "no record for c2");
    set_format(&infra_json, Some(rootless_cni::state::FORMAT_VERSION));

    let del = plugin("DEL", "c1", &c1);
    assert!(del.ok(), "DEL once the format is ours again: {del}");
    lab.assert_no_infra("after the DEL");
}
