//! What makes the infra the infra, and what it may not lean on: a call from
//! another PID namespace (where the recorded PIDs name other processes, or
//! none) never takes the running infra for dead; an unreadable infra.json
//! never leads to a second infra beside the first; the supervisor never
//! signals a PID it has already reaped; and the infra keeps working when the
//! directories its starter's mount namespace was built from are deleted
//! (rootless podman's rootless-netns), or is replaced when its mounts are no
//! longer the state dir's.

use lab::{in_ci, run_command, Container, Lab, Out, GATEWAY, NET};
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(60);

fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        })
        .unwrap_or(false)
}

fn infra_json(lab: &Lab) -> Value {
    lab::read_json(&lab.state_dir().join("infra.json"))
}

fn pid_of(info: &Value, what: &str) -> u32 {
    info[what]["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no {what} pid in infra.json: {info}")) as u32
}

/// A new container attached beside the others: in the infra recorded
/// `before`, still the only one.
fn attach_beside(lab: &Lab, before: &Value) -> Container {
    let c = lab.container();
    lab.attach(&c);
    let supervisors = lab::supervisors(lab);
    assert_eq!(supervisors.len(), 1, "supervisors: {supervisors:?}");
    assert_eq!(infra_json(lab)["supervisor"], before["supervisor"]);
    c
}

/// A call from a new PID namespace of the session's user namespace (with
/// its own /proc, as rootlesskit `--pidns` or a container gives it): the
/// infra's PIDs are not visible from there. It is refused with code 105
/// naming the cause, and the running infra keeps its record and socket.
#[test]
fn a_call_from_another_pid_namespace_is_refused_and_forgets_nothing() {
    let Some(lab) = Lab::with_example_net(lab::binary!(), "pidns_caller") else {
        return;
    };
    let c = lab.container();
    lab.attach(&c);
    let before = infra_json(&lab);
    let supervisor = pid_of(&before, "supervisor");
    let bin = lab.bin().join("rootless-cni").display().to_string();
    let other_pidns = ["unshare", "--pid", "--fork", "--mount-proc"];

    let mut argv = other_pidns.to_vec();
    argv.extend([bin.as_str(), "status"]);
    let status = lab.exec(&[], None, &argv);
    eprintln!("status from another PID namespace: {status}");
    assert!(
        !status.ok(),
        "status from another PID namespace succeeded: {status}"
    );
    assert!(
        status.stderr.contains("PID namespace"),
        "status from another PID namespace does not name the cause: {status}"
    );

    // The STATUS verb, as a runtime in that PID namespace sends it.
    let cni_path = lab.cni_path();
    let mut conf = lab::plugin_stdin(&lab::example_conflist());
    conf["cniVersion"] = "1.1.0".into();
    let conf = conf.to_string();
    let mut argv = other_pidns.to_vec();
    argv.push(bin.as_str());
    let verb = lab.exec(
        &[("CNI_COMMAND", "STATUS"), ("CNI_PATH", &cni_path)],
        Some(conf.as_bytes()),
        &argv,
    );
    eprintln!("STATUS from another PID namespace: {verb}");
    let err = verb
        .cni_error()
        .unwrap_or_else(|| panic!("STATUS from another PID namespace: no error: {verb}"));
    assert_eq!(err.code, 105, "STATUS from another PID namespace: {verb}");
    assert!(err.mentions("PID namespace"), "{verb}");

    assert!(alive(supervisor), "the supervisor {supervisor} died");
    assert!(
        lab.state_dir().join("infra.json").exists(),
        "infra.json was removed while the infra runs"
    );
    assert!(
        lab.state_dir().join("control.sock").exists(),
        "control.sock was removed while the infra runs"
    );
    assert_eq!(infra_json(&lab)["supervisor"], before["supervisor"]);

    // Back in the infra's PID namespace all is as it was: one infra.
    let c2 = attach_beside(&lab, &before);
    lab.assert_ping(&c2, GATEWAY, "container -> gateway");
    lab.detach(&c);
    lab.detach(&c2);
    lab.assert_no_infra("after the last DEL");
}

/// infra.json torn or garbled while the infra runs: the next ADD uses the
/// running infra (its supervisor says what it is) instead of starting a
/// second one beside it, whose ports and processes nobody would stop.
#[test]
fn an_unreadable_infra_json_never_starts_a_second_infra() {
    let Some(lab) = Lab::with_example_net(lab::binary!(), "corrupt_infra_json") else {
        return;
    };
    let c = lab.container();
    lab.attach(&c);
    let before = infra_json(&lab);
    let supervisor = pid_of(&before, "supervisor");
    // Keeps owner and mode: the file is rewritten in place.
    fs::write(lab.state_dir().join("infra.json"), "{\"supervisor\": {\"pi").unwrap();

    let c2 = lab.container();
    let add = lab.cnitool("add", NET, &c2.netns());
    eprintln!("ADD with a garbled infra.json: {add}");
    let supervisors = lab::supervisors(&lab);
    assert_eq!(
        supervisors.len(),
        1,
        "a second infra was started beside the running one: {supervisors:?}"
    );
    assert!(
        alive(supervisor),
        "the running supervisor {supervisor} died"
    );
    assert!(add.ok(), "ADD with a garbled infra.json: {add}");
    assert_eq!(infra_json(&lab)["supervisor"], before["supervisor"]);
    lab.assert_ping(&c2, GATEWAY, "container -> gateway");
    lab.assert_ping(&c, GATEWAY, "first container -> gateway");
    lab.detach(&c);
    lab.detach(&c2);
    lab.assert_no_infra("after the last DEL");
}

struct Tracer(Child);
impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// When the sandbox dies the supervisor reaps it with `waitpid(-1)`; its
/// PID is then free for any new process. The supervisor's teardown must not
/// signal that PID again (seen with strace: no kill(2) of the reaped PID).
#[test]
fn the_supervisor_never_signals_the_sandbox_it_reaped() {
    let Some(lab) = Lab::with_example_net(lab::binary!(), "reaped_sandbox") else {
        return;
    };
    let strace = Path::new("/usr/bin/strace");
    if !strace.exists() {
        assert!(!in_ci(), "strace is missing (scripts/deps installs it)");
        eprintln!("skipping: no strace");
        return;
    }
    let c = lab.container();
    lab.attach(&c);
    let info = infra_json(&lab);
    let (supervisor, sandbox) = (pid_of(&info, "supervisor"), pid_of(&info, "sandbox"));
    let trace = lab.dir.join("supervisor.strace");
    let tracer = Tracer(
        Command::new(strace)
            .args([
                "-qq",
                "-e",
                "trace=wait4,waitid,kill,tkill,tgkill,pidfd_send_signal",
            ])
            .arg("-o")
            .arg(&trace)
            .args(["-p", &supervisor.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting strace"),
    );
    // strace is attached once the supervisor shows a tracer.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fs::read_to_string(format!("/proc/{supervisor}/status"))
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("TracerPid:") && l.trim_end() != "TracerPid:\t0")
    {
        assert!(Instant::now() < deadline, "strace did not attach");
        thread::sleep(Duration::from_millis(10));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sandbox as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while alive(supervisor) {
        assert!(
            Instant::now() < deadline,
            "the supervisor outlived its sandbox"
        );
        thread::sleep(Duration::from_millis(20));
    }
    drop(tracer);
    let text = fs::read_to_string(&trace).unwrap_or_default();
    eprintln!("supervisor's syscalls:\n{text}");
    let reaped = text
        .lines()
        .position(|l| l.starts_with("wait4(") && l.trim_end().ends_with(&format!("= {sandbox}")))
        .unwrap_or_else(|| panic!("the supervisor never reaped its sandbox {sandbox}:\n{text}"));
    let late: Vec<&str> = text
        .lines()
        .skip(reaped + 1)
        .filter(|l| {
            l.starts_with(&format!("kill({sandbox},"))
                || l.starts_with(&format!("tkill({sandbox},"))
                || l.starts_with(&format!("tgkill({sandbox},"))
        })
        .collect();
    assert!(
        late.is_empty(),
        "the supervisor signalled its sandbox's PID {sandbox} after reaping it: {late:?}"
    );
    // The lost attachment's DEL, and nothing is left.
    lab.detach(&c);
    lab.assert_no_infra("after the DEL of the lost attachment");
}

/// A runtime's mount namespace the way rootless podman's rootless-netns is
/// built: /run and /var/lib bound from directories of the user's, which the
/// runtime deletes when it is done.
struct RuntimeNs {
    lab_dir: PathBuf,
    root: PathBuf,
    holder: Child,
}

impl RuntimeNs {
    fn start(lab: &Lab, name: &str) -> RuntimeNs {
        let root = lab.dir.join(name);
        for d in ["run", "varlib/cni"] {
            let p = root.join(d);
            fs::create_dir_all(&p).unwrap();
        }
        let out = Command::new("chown")
            .args(["-R", &format!("{0}:{0}", lab.uid)])
            .arg(&root)
            .output()
            .unwrap();
        assert!(out.status.success(), "chown {}: {out:?}", root.display());
        let ready = root.join("ready");
        let r = root.display().to_string();
        let setup = format!(
            "set -e
             mount --bind '{r}/run' /run
             mount --bind '{r}/varlib' /var/lib
             touch '{r}/ready'
             exec sleep infinity"
        );
        let holder = lab
            .session_daemon(&["unshare", "--mount", "--propagation", "private"])
            .args(["sh", "-c", &setup])
            .spawn()
            .unwrap();
        let ns = RuntimeNs {
            lab_dir: lab.dir.clone(),
            root,
            holder,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready.exists() {
            assert!(
                Instant::now() < deadline,
                "the runtime namespace did not come up"
            );
            thread::sleep(Duration::from_millis(10));
        }
        ns
    }

    /// `cnitool CMD NET NETNS` inside this mount namespace.
    fn cnitool(&self, lab: &Lab, cmd: &str, c: &Container) -> Out {
        let cnitool = self.lab_dir.join("tools/cnitool").display().to_string();
        let netns = c.netns();
        let command = lab.command_in_mounts_of(
            self.holder.id(),
            &[cnitool.as_str(), cmd, NET, netns.as_str()],
        );
        let what = format!("[{}] cnitool {cmd} {netns}", self.root.display());
        run_command(command, what, None, TIMEOUT)
    }

    /// The runtime is done: its namespace goes, then its directories.
    fn delete(mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        fs::remove_dir_all(&self.root)
            .unwrap_or_else(|e| panic!("removing {}: {e}", self.root.display()));
    }
}

impl Drop for RuntimeNs {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// The infra is started from a runtime's private mount namespace whose /run
/// and /var/lib are bound from the user's directories; the runtime goes and
/// deletes them while the infra runs on (an idle timeout, or an attachment
/// the runtime never DELs). The next runtime namespace, built the same way
/// from new directories, attaches through the same infra.
#[test]
fn the_infra_outlives_the_directories_of_its_starters_mount_namespace() {
    let Some(lab) = Lab::with_example_net(lab::binary!(), "deleted_runtime_ns") else {
        return;
    };
    let c1 = lab.container();
    let first = RuntimeNs::start(&lab, "rootless-netns-1");
    let add = first.cnitool(&lab, "add", &c1);
    assert!(add.ok(), "ADD from the first runtime namespace: {add}");
    let supervisor = infra_json(&lab)["supervisor"].clone();
    first.delete();

    let second = RuntimeNs::start(&lab, "rootless-netns-2");
    let c2 = lab.container();
    let add = second.cnitool(&lab, "add", &c2);
    assert!(
        add.ok(),
        "ADD after the first runtime namespace's directories were deleted: {add}"
    );
    lab.assert_ping(&c2, GATEWAY, "container -> gateway");
    lab.assert_ping(&c1, GATEWAY, "first container -> gateway");
    assert_eq!(
        infra_json(&lab)["supervisor"],
        supervisor,
        "the infra was replaced"
    );
    for c in [&c2, &c1] {
        let del = second.cnitool(&lab, "del", c);
        assert!(del.ok(), "DEL: {del}");
    }
    drop(second);
    lab.assert_no_infra("after the last DEL");
}

/// The infra's mounts are part of its liveness: with the state dir's
/// `var-lib-cni/` (bound on the infra's /var/lib/cni) deleted under a
/// running infra, the next ADD replaces the broken infra (the attachments
/// it held are reported lost) instead of failing in it.
#[test]
fn an_infra_whose_mounts_are_gone_is_replaced() {
    let Some(lab) = Lab::with_example_net(lab::binary!(), "broken_infra_mounts") else {
        return;
    };
    let c1 = lab.container();
    lab.attach(&c1);
    let sandbox = lab.sandbox_pid();
    fs::remove_dir_all(lab.state_dir().join("var-lib-cni")).unwrap();

    let c2 = lab.container();
    let add = lab.cnitool("add", NET, &c2.netns());
    assert!(
        add.ok(),
        "ADD on an infra whose /var/lib/cni is gone: {add}"
    );
    lab.assert_ping(&c2, GATEWAY, "container -> gateway");
    let fresh = lab.sandbox_pid();
    assert!(
        fresh.is_some() && fresh != sandbox,
        "sandbox {fresh:?}, broken one was {sandbox:?}"
    );
    let status = lab.status();
    let states: Vec<&str> = status["attachments"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x["state"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        states.contains(&"lost"),
        "the broken infra's attachment is not reported lost: {status}"
    );
    lab.detach(&c1);
    lab.detach(&c2);
    lab.assert_no_infra("after the last DEL");
}

/// infra.json unreadable while the infra runs, and a call from another PID
/// namespace: the supervisor that answers for the record is still an infra
/// this caller cannot tell the processes of. It is refused as with a
/// readable record, and `stop --force` there removes nothing (no second
/// infra follows in the infra's own PID namespace).
#[test]
fn an_unreadable_infra_json_is_no_licence_for_another_pid_namespace() {
    let Some(lab) = Lab::with_example_net(lab::binary!(), "pidns_unreadable") else {
        return;
    };
    let c = lab.container();
    lab.attach(&c);
    let before = infra_json(&lab);
    let supervisor = pid_of(&before, "supervisor");
    fs::write(lab.state_dir().join("infra.json"), "{\"supervisor\": {\"pi").unwrap();
    let bin = lab.bin().join("rootless-cni").display().to_string();
    for cmd in [&["status"][..], &["stop", "--force"]] {
        let mut argv = vec!["unshare", "--pid", "--fork", "--mount-proc", bin.as_str()];
        argv.extend(cmd);
        let out = lab.exec(&[], None, &argv);
        eprintln!("{cmd:?} from another PID namespace, infra.json unreadable: {out}");
        assert!(
            !out.ok() && out.stderr.contains("PID namespace"),
            "{cmd:?} from another PID namespace, infra.json unreadable: {out}"
        );
        assert!(alive(supervisor), "the supervisor {supervisor} died");
        for file in ["control.sock", "infra.lck"] {
            assert!(
                lab.state_dir().join(file).exists(),
                "{file} was removed while the infra runs ({cmd:?})"
            );
        }
    }
    let c2 = attach_beside(&lab, &before);
    lab.detach(&c);
    lab.detach(&c2);
    lab.assert_no_infra("after the last DEL");
}

/// infra.json unreadable and the infra's mounts gone: the supervisor's
/// word makes the record, not the infra sound. The next ADD replaces the
/// broken infra as it does when the record is readable.
#[test]
fn an_unreadable_infra_json_does_not_keep_a_broken_infra() {
    let Some(lab) = Lab::with_example_net(lab::binary!(), "broken_unreadable") else {
        return;
    };
    let c1 = lab.container();
    lab.attach(&c1);
    let sandbox = lab.sandbox_pid();
    fs::remove_dir_all(lab.state_dir().join("var-lib-cni")).unwrap();
    fs::write(lab.state_dir().join("infra.json"), "{\"supervisor\": {\"pi").unwrap();

    let c2 = lab.container();
    let add = lab.cnitool("add", NET, &c2.netns());
    assert!(
        add.ok(),
        "ADD on a broken infra with an unreadable record: {add}"
    );
    let fresh = lab.sandbox_pid();
    assert!(
        fresh.is_some() && fresh != sandbox,
        "sandbox {fresh:?}, broken one was {sandbox:?}"
    );
    lab.assert_ping(&c2, GATEWAY, "container -> gateway");
    lab.detach(&c1);
    lab.detach(&c2);
    lab.assert_no_infra("after the last DEL");
}
