//! What the runtime's process hands us stays the runtime's: a fd it passed
//! without CLOEXEC is not inherited by the long-lived infra (supervisor,
//! sandbox, slirp4netns), and CNI_PATH means what it means where the runtime
//! stands (its working directory, its mount namespace), not inside the
//! infra: a relative entry, and one under the caller's /var/lib/cni (which
//! the infra has its own of), both run the plugins found there, including
//! the IPAM plugin the bridge runs through CNI_PATH.

use lab::{example_conflist, plugin_stdin, Lab, GATEWAY};
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

/// The inner plugins of the example chain, and bridge's IPAM.
const CHAIN: [&str; 5] = ["bridge", "host-local", "portmap", "firewall", "tuning"];

/// The pids of the lab's processes that hold `path` open.
fn holders_of(lab: &Lab, path: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for pid in lab::pids_of_uid(lab.uid) {
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if fs::read_link(fd.path()).is_ok_and(|l| l == path) {
                let cmd = fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                found.push(format!("{pid} ({})", cmd.replace('\0', " ").trim()));
            }
        }
    }
    found
}

#[test]
fn a_fd_the_runtime_passed_is_closed_when_the_add_returns() {
    let Some(lab) = Lab::new(lab::binary!(), "fds_runtime_pipe") else {
        return;
    };
    // A FIFO stands for the runtime's pipe: the test reads it, the ADD's
    // process gets its write end as fd 9, without CLOEXEC.
    let fifo = lab.dir.join("runtime-pipe");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    std::os::unix::fs::chown(&fifo, Some(lab.uid), Some(lab.uid)).expect("chown the fifo");
    let reader = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .expect("opening the fifo");

    let c = lab.container();
    let conf = plugin_stdin(&example_conflist()).to_string();
    let env = lab.plugin_env("ADD", "fds", &c.netns());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let bin = lab.bin().join("rootless-cni").display().to_string();
    let fifo_arg = fifo.display().to_string();
    let out = lab.exec(
        &env,
        Some(conf.as_bytes()),
        &["sh", "-c", "exec 9>\"$0\"; exec \"$@\"", &fifo_arg, &bin],
    );
    let result = out.add_result("ADD with fd 9 from the runtime");
    assert!(
        lab.status()["infra"].is_object(),
        "the ADD started no infra"
    );

    // Every writer is gone once the ADD's process is: EOF, now, while the
    // infra it started keeps running.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut buf = [0u8; 16];
    let eof = loop {
        // SAFETY: buf is a valid, writable buffer of its length.
        let n = unsafe { libc::read(reader.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n == 0 {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        eof,
        "no EOF on the runtime's pipe after the ADD returned: still held by {:?}",
        holders_of(&lab, &fifo)
    );
    assert!(lab.status()["infra"].is_object(), "the infra stopped");
    lab.assert_ping(&c, GATEWAY, "container -> gateway");
    drop(result);

    let out = lab.plugin(&lab.plugin_env("DEL", "fds", &c.netns()), &conf);
    assert!(out.ok(), "DEL: {out}");
    lab.assert_no_infra("after DEL");
}

/// Writes, under `dir` (as the test reaches it), a wrapper for each plugin
/// of the chain that logs its name to `log` and runs the real one.
fn wrappers(dir: &Path, log: &Path) {
    fs::create_dir_all(dir).expect("mkdir for the wrappers");
    for name in CHAIN {
        let path = dir.join(name);
        let body = format!(
            "#!/bin/sh\necho \"{name} $CNI_COMMAND\" >> '{}'\nexec /usr/lib/cni/{name}\n",
            log.display()
        );
        fs::write(&path, body).expect("writing a wrapper");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
    }
}

/// ADD and DEL with CNI_PATH `cni_path` from the working dir `cwd`: each
/// succeeds, the container gets its network, every plugin of the chain
/// that ran is a wrapper of `log`, and nothing is left.
fn attach_through(lab: &Lab, what: &str, cwd: &str, cni_path: &str, log: &Path) {
    fs::write(log, "").expect("the log");
    std::os::unix::fs::chown(log, Some(lab.uid), Some(lab.uid)).expect("chown the log");
    let c = lab.container();
    let conf = plugin_stdin(&example_conflist()).to_string();
    let bin = lab.bin().join("rootless-cni").display().to_string();
    let call = |verb: &str| {
        let mut env = lab.plugin_env(verb, "cnipath", &c.netns());
        env.retain(|(k, _)| k != "CNI_PATH");
        env.push(("CNI_PATH".into(), cni_path.into()));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        lab.exec(
            &env,
            Some(conf.as_bytes()),
            &["sh", "-c", "cd \"$0\" && exec \"$@\"", cwd, &bin],
        )
    };
    let out = call("ADD");
    assert!(out.ok(), "{what}: ADD: {out}");
    lab.assert_ping(&c, GATEWAY, &format!("{what}: container -> gateway"));
    let ran = fs::read_to_string(log).unwrap_or_default();
    for name in CHAIN {
        assert!(
            ran.contains(&format!("{name} ADD")),
            "{what}: {name} from CNI_PATH did not run:\n{ran}"
        );
    }
    let out = call("DEL");
    assert!(out.ok(), "{what}: DEL: {out}");
    let ran = fs::read_to_string(log).unwrap_or_default();
    assert!(ran.contains("bridge DEL"), "{what}: no DEL ran:\n{ran}");
    lab.assert_no_infra(&format!("{what}: after DEL"));
}

#[test]
fn cni_path_is_resolved_where_the_runtime_stands() {
    let Some(lab) = Lab::new(lab::binary!(), "fds_cni_path") else {
        return;
    };
    let log = lab.dir.join("plugins.log");

    // Relative to the runtime's working directory, which the infra's
    // processes (in `/` of the infra) do not share.
    wrappers(&lab.dir.join("relative-plugins"), &log);
    let cwd = lab.dir.display().to_string();
    attach_through(&lab, "relative CNI_PATH", &cwd, "relative-plugins", &log);

    // Under /var/lib/cni in the session's mount namespace: inside the infra
    // /var/lib/cni is its own (the state dir's), where this is not.
    wrappers(&lab.var_lib_cni().join("plugins"), &log);
    attach_through(
        &lab,
        "CNI_PATH under /var/lib/cni",
        "/",
        "/var/lib/cni/plugins",
        &log,
    );
}
