//! The security model's hardening, checked from outside: the state dir is
//! made 0700 whatever the caller's umask, records are written through a
//! temporary file opened O_CREAT|O_EXCL|O_NOFOLLOW (a symlink planted at
//! its name is never written through), slirp4netns runs with its sandbox
//! and seccomp on and the host loopback closed, and a host port the user
//! cannot have (below `ip_unprivileged_port_start`, or on an address that is
//! not local) fails the ADD with code 107 before anything is touched.

use lab::{example_conflist, in_ci, outer, plugin_stdin, Lab};
use serde_json::{json, Value};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// Our binary in plugin mode, run by `sh` with `umask 000` first: the
/// loosest umask a runtime could hand down.
fn add_with_umask_0(lab: &Lab, id: &str, netns: &str, stdin: &str) -> lab::Out {
    let bin = lab.bin().join("rootless-cni").display().to_string();
    let env = lab.plugin_env("ADD", id, netns);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    lab.exec(
        &env,
        Some(stdin.as_bytes()),
        &["sh", "-c", "umask 000; exec \"$0\"", &bin],
    )
}

/// The state dir and what the plugin makes in it: 0700 and the user's even
/// under umask 000; records 0600 or tighter, no file of its writable by
/// others.
#[test]
fn state_dir_is_private_whatever_the_umask() {
    let Some(lab) = Lab::new(lab::binary!(), "hard_umask") else {
        return;
    };
    let c = lab.container();
    let stdin = plugin_stdin(&example_conflist()).to_string();
    let out = add_with_umask_0(&lab, "umask", &c.netns(), &stdin);
    assert!(out.ok(), "ADD under umask 000: {out}");
    let state = lab.state_dir();
    let meta = fs::metadata(&state).expect("the state dir");
    assert_eq!(
        meta.permissions().mode() & 0o7777,
        0o700,
        "{} mode",
        state.display()
    );
    assert_eq!(meta.uid(), lab.uid, "{} owner", state.display());
    // (The control socket's own mode follows the umask; the 0700 dir is
    // what keeps others out of it.)
    for name in ["attachments", "infra.json", "infra.log"] {
        let m = fs::symlink_metadata(state.join(name)).expect(name);
        assert_eq!(
            m.permissions().mode() & 0o022,
            0,
            "{name} is writable by group or others: {:o}",
            m.permissions().mode()
        );
    }
    let record = state.join("attachments/rootless+umask+eth0.json");
    let m = fs::metadata(&record).expect("the record");
    assert_eq!(
        m.permissions().mode() & 0o077,
        0,
        "the record: {:o}",
        m.mode()
    );
    let del = lab.plugin(&lab.plugin_env("DEL", "umask", &c.netns()), &stdin);
    assert!(del.ok(), "DEL: {del}");
    lab.assert_no_infra("after the DEL");
}

/// A symlink planted at a record's temporary name, pointing at a file of
/// the user's: the record is written all the same, as a file of its own,
/// and the file the symlink names is untouched. strace shows each
/// temporary file opened with O_CREAT|O_EXCL|O_NOFOLLOW.
#[test]
fn records_are_written_through_fresh_temporary_files() {
    let Some(lab) = Lab::new(lab::binary!(), "hard_tmp") else {
        return;
    };
    if !Path::new("/usr/bin/strace").exists() {
        assert!(!in_ci(), "strace is missing (scripts/deps installs it)");
        eprintln!("skipping: no strace");
        return;
    }
    let c = lab.container();
    let stdin = plugin_stdin(&example_conflist()).to_string();
    // The state dir as the plugin makes it (an ADD and its DEL), then the
    // planted link.
    for verb in ["ADD", "DEL"] {
        let out = lab.plugin(&lab.plugin_env(verb, "first", &c.netns()), &stdin);
        assert!(out.ok(), "{verb} first: {out}");
    }
    let state = lab.state_dir();
    assert!(state.join("attachments").is_dir(), "no attachments dir");
    let victim = lab.dir.join("victim");
    lab::write_as_user(&lab, &victim, b"the user's own file\n");
    let tmp = state.join("attachments/.rootless+planted+eth0.json.tmp");
    let link = lab.exec(
        &[],
        None,
        &[
            "ln",
            "-s",
            &victim.display().to_string(),
            &tmp.display().to_string(),
        ],
    );
    assert!(link.ok(), "planting the link: {link}");

    let bin = lab.bin().join("rootless-cni").display().to_string();
    let trace = lab.dir.join("strace.out").display().to_string();
    let env = lab.plugin_env("ADD", "planted", &c.netns());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let out = lab.exec(
        &env,
        Some(stdin.as_bytes()),
        // Not -f: the infra's supervisor, started by this call, runs on.
        &[
            "strace",
            "-qq",
            "-e",
            "trace=openat,open",
            "-o",
            &trace,
            &bin,
        ],
    );
    assert!(out.ok(), "ADD under strace: {out}");
    assert_eq!(
        fs::read_to_string(&victim).expect("victim"),
        "the user's own file\n",
        "the record was written through the planted symlink"
    );
    let record = state.join("attachments/rootless+planted+eth0.json");
    let m = fs::symlink_metadata(&record).expect("the record");
    assert!(m.file_type().is_file(), "the record is not a plain file");
    let text = fs::read_to_string(&record).expect("record");
    serde_json::from_str::<Value>(&text).expect("the record is JSON");

    let trace_text = fs::read_to_string(&trace).expect("strace output");
    let opens: Vec<&str> = trace_text
        .lines()
        .filter(|l| l.contains(".tmp\"") && l.contains("O_CREAT"))
        .collect();
    assert!(
        opens
            .iter()
            .any(|l| l.contains(".rootless+planted+eth0.json.tmp")),
        "the record's temporary file was not opened:\n{trace_text}"
    );
    for l in &opens {
        assert!(
            l.contains("O_EXCL") && l.contains("O_NOFOLLOW"),
            "a temporary file opened without O_EXCL|O_NOFOLLOW: {l}"
        );
    }
    let del = lab.plugin(&lab.plugin_env("DEL", "planted", &c.netns()), &stdin);
    assert!(del.ok(), "DEL: {del}");
    lab.assert_no_infra("after the DEL");
}

/// slirp4netns's command line, as the kernel has it: sandbox, seccomp, and
/// (the default config) no route to the host's loopback.
#[test]
fn slirp4netns_runs_sandboxed_with_seccomp() {
    let Some(lab) = Lab::with_example_net(lab::binary!(), "hard_slirp") else {
        return;
    };
    let c = lab.container();
    // The example network allows the host loopback; the default does not.
    let mut conf = example_conflist();
    outer(&mut conf).remove("allowHostLoopback");
    let stdin = plugin_stdin(&conf).to_string();
    let out = lab.plugin(&lab.plugin_env("ADD", "slirp", &c.netns()), &stdin);
    assert!(out.ok(), "ADD: {out}");
    let info: Value = serde_json::from_str(
        &fs::read_to_string(lab.state_dir().join("infra.json")).expect("infra.json"),
    )
    .expect("infra.json is JSON");
    let pid = info["slirp4netns"]["pid"]
        .as_u64()
        .expect("slirp4netns pid");
    let argv: Vec<String> = fs::read(format!("/proc/{pid}/cmdline"))
        .expect("slirp4netns's cmdline")
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    assert!(
        argv.first().is_some_and(|a| a.ends_with("slirp4netns")),
        "pid {pid} is not slirp4netns: {argv:?}"
    );
    for flag in [
        "--enable-sandbox",
        "--enable-seccomp",
        "--disable-host-loopback",
    ] {
        assert!(argv.iter().any(|a| a == flag), "no {flag}: {argv:?}");
    }
    let del = lab.plugin(&lab.plugin_env("DEL", "slirp", &c.netns()), &stdin);
    assert!(del.ok(), "DEL: {del}");
    lab.assert_no_infra("after the DEL");
}

/// A port below `net.ipv4.ip_unprivileged_port_start`, and a hostIP that is
/// no address of the machine's: code 107 naming the port or the address,
/// with either port driver, and nothing left (no infra started for it).
#[test]
fn host_ports_the_user_cannot_have_are_code_107() {
    let start: u16 = fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024);
    let Some(lab) = Lab::new(lab::binary!(), "hard_107") else {
        return;
    };
    let c = lab.container();
    // TEST-NET-1 (RFC 5737): never a local address.
    let cases: Vec<(&str, Value, String)> = [
        (start > 1).then(|| {
            let port = start - 1;
            (
                "a privileged port",
                json!({"hostPort": port, "containerPort": 80, "protocol": "tcp", "hostIP": "127.0.0.1"}),
                port.to_string(),
            )
        }),
        Some((
            "a hostIP that is not local",
            json!({"hostPort": 28080, "containerPort": 80, "protocol": "tcp", "hostIP": "192.0.2.1"}),
            "192.0.2.1".to_string(),
        )),
    ]
    .into_iter()
    .flatten()
    .collect();
    assert!(
        cases.len() == 2 || !in_ci(),
        "ip_unprivileged_port_start is {start}: no port is privileged here"
    );
    for driver in ["builtin", "slirp4netns"] {
        for (what, mapping, named) in &cases {
            let mut conf = example_conflist();
            outer(&mut conf).insert("portDriver".into(), driver.into());
            let mut stdin = plugin_stdin(&conf);
            stdin["runtimeConfig"] = json!({ "portMappings": [mapping] });
            let out = lab.plugin(
                &lab.plugin_env("ADD", "p107", &c.netns()),
                &stdin.to_string(),
            );
            let when = format!("{driver}: {what}");
            let err = out
                .cni_error()
                .unwrap_or_else(|| panic!("{when}: no CNI error: {out}"));
            assert_eq!(err.code, 107, "{when}: {out}");
            assert!(
                err.mentions(named),
                "{when}: the error does not name {named}: {out}"
            );
            assert_eq!(
                lab.links(&c),
                vec!["lo"],
                "{when}: the container got something"
            );
            lab.assert_no_infra(&when);
        }
    }
}
