//! The state dir when the runtime gives no XDG_RUNTIME_DIR (one started by
//! systemd, or as root, as kubelet's containerd is): a user's calls use
//! `/run/user/UID` (logind's dir) when it is there and theirs, real root's
//! use `/run/rootless-cni-plugin`; without either, ADD fails naming the fix
//! and DEL succeeds, since nothing can have been attached. A DEL finding no
//! state dir at all succeeds and creates nothing.
//!
//! Real root's dir is made in the lab's own host mount namespace (an
//! overlay over /run, `lab::hosts`), never on the machine's /run.

use lab::{
    example_conflist, plugin_stdin, result_ipv4, run_command, Lab, LabOptions, Out, RuntimeDir,
    GATEWAY, NET,
};
use serde_json::{json, Value};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// `argv` in the session with the lab's NETCONFPATH and CNI_PATH, and
/// XDG_RUNTIME_DIR removed from the environment.
fn without_runtime_dir(lab: &Lab, env: &[(&str, &str)], stdin: Option<&str>, argv: &[&str]) -> Out {
    let netconf = lab.netconf_dir().display().to_string();
    let cni_path = lab.cni_path();
    let mut full_env = vec![("NETCONFPATH", netconf.as_str()), ("CNI_PATH", &cni_path)];
    full_env.extend_from_slice(env);
    let mut full = vec!["env", "-u", "XDG_RUNTIME_DIR"];
    full.extend_from_slice(argv);
    lab.exec(&full_env, stdin.map(str::as_bytes), &full)
}

fn cnitool_without_runtime_dir(lab: &Lab, cmd: &str, netns: &str) -> Out {
    let cnitool = lab.dir.join("tools/cnitool").display().to_string();
    without_runtime_dir(lab, &[], None, &[&cnitool, cmd, NET, netns])
}

#[test]
fn a_user_without_xdg_runtime_dir_attaches_through_run_user_uid() {
    let options = LabOptions {
        runtime_dir: RuntimeDir::Logind,
        ..LabOptions::default()
    };
    let Some(lab) = Lab::new_with(lab::binary!(), "no_xdg_user", options) else {
        return;
    };
    lab.write_netconf(NET, &example_conflist());
    let c = lab.container();
    let add = cnitool_without_runtime_dir(&lab, "add", &c.netns());
    let ip = add.added_ipv4("ADD without XDG_RUNTIME_DIR");
    lab.assert_attached(&c, &ip);
    lab.assert_ping(&c, GATEWAY, "container -> gateway");
    // The state is in /run/user/UID/rootless-cni-plugin, where a call with
    // XDG_RUNTIME_DIR=/run/user/UID (logind's) finds it too.
    assert!(
        lab.state_dir().join("infra.json").exists(),
        "no infra.json in {}",
        lab.state_dir().display()
    );
    let check = cnitool_without_runtime_dir(&lab, "check", &c.netns());
    assert!(check.ok(), "CHECK without XDG_RUNTIME_DIR: {check}");
    let bin = lab.bin().join("rootless-cni").display().to_string();
    let status = without_runtime_dir(&lab, &[], None, &[&bin, "status", "--json"]);
    assert!(status.ok(), "status without XDG_RUNTIME_DIR: {status}");
    let attachments = status.json().map(|v| v["attachments"].clone());
    assert_eq!(
        attachments.as_ref().and_then(Value::as_array).map(Vec::len),
        Some(1),
        "{status}"
    );
    let del = cnitool_without_runtime_dir(&lab, "del", &c.netns());
    assert!(del.ok(), "DEL without XDG_RUNTIME_DIR: {del}");
    lab.assert_no_infra("after the DEL");
}

#[test]
fn without_any_state_dir_add_names_the_fix_and_del_succeeds() {
    // The default lab: XDG_RUNTIME_DIR is a lab dir and /run/user/UID does
    // not exist, so unsetting it leaves no state dir to use.
    let Some(lab) = Lab::with_example_net(lab::binary!(), "no_state_dir_at_all") else {
        return;
    };
    let run_user = format!("/run/user/{}", lab.uid);
    let c = lab.container();
    let stdin = plugin_stdin(&example_conflist()).to_string();
    let bin = lab.bin().join("rootless-cni").display().to_string();
    let call = |command: &str| {
        let env: Vec<(String, String)> = lab.plugin_env(command, "no-state-dir", &c.netns());
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        without_runtime_dir(&lab, &env, Some(&stdin), &[&bin])
    };
    let add = call("ADD");
    let err = add
        .cni_error()
        .unwrap_or_else(|| panic!("ADD without a state dir: {add}"));
    assert_eq!(err.code, 7, "{add}");
    for word in ["XDG_RUNTIME_DIR", "stateDir", &run_user] {
        assert!(err.mentions(word), "the error does not name {word}: {add}");
    }
    let del = call("DEL");
    assert!(del.ok(), "DEL without a state dir: {del}");
    assert!(del.stdout.trim().is_empty(), "DEL printed: {del}");
    let made = lab.exec(&[], None, &["test", "-e", &run_user]);
    assert!(!made.ok(), "{run_user} appeared: {made}");
    assert!(!lab.state_dir().exists(), "a state dir appeared");
    lab.assert_no_infra("after ADD and DEL without a state dir");
}

#[test]
fn del_with_no_state_dir_succeeds_and_creates_nothing() {
    let Some(lab) = Lab::with_example_net(lab::binary!(), "del_no_state_dir") else {
        return;
    };
    let c = lab.container();
    // The default state dir ($XDG_RUNTIME_DIR/rootless-cni-plugin), never
    // made: cnitool's DEL.
    let del = lab.cnitool("del", NET, &c.netns());
    assert!(del.ok(), "DEL with no state dir: {del}");
    assert!(!lab.state_dir().exists(), "DEL made the state dir");
    // A configured stateDir that does not exist (nor its parent).
    let absent = lab.dir.join("nowhere/state");
    let mut conf = example_conflist();
    conf["plugins"][0]["stateDir"] = json!(absent);
    let env = lab.plugin_env("DEL", "absent-state-dir", &c.netns());
    let del = lab.plugin(&env, &plugin_stdin(&conf).to_string());
    assert!(del.ok(), "DEL with an absent stateDir: {del}");
    assert!(
        !lab.dir.join("nowhere").exists(),
        "DEL made {}",
        absent.display()
    );
    lab.assert_no_infra("after the DELs");
}

// ---------------------------------------------------------------------------
// Real root

/// Real root's pod: a root process with its own network namespace (the
/// pod's) and mount namespace, where /run is a fresh tmpfs as on a booted
/// machine; real root's calls run in that mount namespace, so the state
/// dir they make is never on the machine's /run. Killed by pid on drop,
/// after stopping the infra through its state dir.
struct RootPod<'a> {
    lab: &'a Lab,
    holder: Child,
}

impl<'a> RootPod<'a> {
    fn start(lab: &'a Lab) -> RootPod<'a> {
        let mut cmd = std::process::Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--net", "sh", "-c"])
            .arg("mount -t tmpfs -o mode=0755 tmpfs /run && exec sleep infinity")
            .env_clear()
            .env("PATH", lab::LAB_PATH)
            // mount(8) would make /run/mount for its utab on the machine.
            .env("LIBMOUNT_UTAB", lab.dir.join("utab"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let pod = RootPod {
            lab,
            holder: cmd.spawn().expect("real root's pod"),
        };
        let pid = pod.holder.id();
        let host_net = fs::read_link("/proc/self/ns/net").ok();
        let deadline = Instant::now() + Duration::from_secs(10);
        while fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap_or_default()
            .trim()
            != "sleep"
            || fs::read_link(format!("/proc/{pid}/ns/net")).ok() == host_net
        {
            assert!(Instant::now() < deadline, "real root's pod did not come up");
            thread::sleep(Duration::from_millis(10));
        }
        pod
    }

    /// `argv` as real root in the pod's mount namespace, with only `env`
    /// and PATH.
    fn run(&self, env: &[(&str, &str)], stdin: Option<&str>, argv: &[&str]) -> Out {
        let mut cmd = std::process::Command::new("nsenter");
        cmd.arg(format!("--mount=/proc/{}/ns/mnt", self.holder.id()))
            .arg("--")
            .args(argv)
            .env_clear()
            .env("PATH", lab::LAB_PATH)
            .env("LIBMOUNT_UTAB", lab::utab());
        for (k, v) in env {
            cmd.env(k, v);
        }
        run_command(
            cmd,
            format!("[root] {}", argv.join(" ")),
            stdin.map(str::as_bytes),
            Duration::from_secs(60),
        )
    }

    fn netns(&self) -> String {
        format!("/proc/{}/ns/net", self.holder.id())
    }

    /// Real root's default state dir, as the test reaches it.
    fn state_dir(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/root/run/rootless-cni-plugin",
            self.holder.id()
        ))
    }

    /// Pids of processes with `arg` in their argv in the pod's mount
    /// namespace.
    fn processes_with_arg(&self, arg: &str) -> Vec<u32> {
        let mnt = fs::read_link(format!("/proc/{}/ns/mnt", self.holder.id())).ok();
        let Ok(dir) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|p| {
                fs::read(format!("/proc/{p}/cmdline"))
                    .map(|b| b.split(|&c| c == 0).any(|a| a == arg.as_bytes()))
                    .unwrap_or(false)
            })
            .filter(|p| mnt.is_some() && fs::read_link(format!("/proc/{p}/ns/mnt")).ok() == mnt)
            .collect()
    }
}

impl Drop for RootPod<'_> {
    fn drop(&mut self) {
        if self.state_dir().join("infra.json").exists() {
            let bin = self.lab.bin().join("rootless-cni").display().to_string();
            let stop = self.run(
                &[],
                None,
                &[
                    &bin,
                    "--state-dir",
                    "/run/rootless-cni-plugin",
                    "stop",
                    "--force",
                ],
            );
            if !stop.ok() {
                eprintln!("stopping real root's infra: {stop}");
            }
        }
        // What real root started there and the stop did not end (it
        // failed, or the ADD died before infra.json): by pid, found by the
        // pod's mount namespace, before the holder that names it goes.
        if let Ok(mnt) = fs::read_link(format!("/proc/{}/ns/mnt", self.holder.id())) {
            let ours =
                |p: &u32| fs::read_link(format!("/proc/{p}/ns/mnt")).ok().as_ref() == Some(&mnt);
            let left: Vec<u32> = Lab::list(Path::new("/proc"))
                .into_iter()
                .filter_map(|n| n.parse::<u32>().ok())
                .filter(|&p| p != self.holder.id())
                .filter(ours)
                .collect();
            for p in left {
                lab::sigkill(p);
            }
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

#[test]
fn real_root_without_xdg_runtime_dir_runs_the_kubernetes_example_as_shipped() {
    let Some(lab) = Lab::new(lab::binary!(), "no_xdg_root") else {
        return;
    };
    let machine_dir = Path::new("/run/rootless-cni-plugin");
    let machine_had_it = machine_dir.exists();
    let pod = RootPod::start(&lab);
    let stdin = plugin_stdin(&lab::conf_example("kubernetes/10-rootless.conflist")).to_string();
    let bin = lab.bin().join("rootless-cni").display().to_string();
    let netns = pod.netns();
    let cni_path = lab.cni_path();
    let call = |command: &str| {
        let env = [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "k8s-pod"),
            ("CNI_NETNS", netns.as_str()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", cni_path.as_str()),
        ];
        pod.run(&env, Some(&stdin), &[&bin])
    };
    let add = call("ADD");
    let result = add.add_result("real root's ADD without XDG_RUNTIME_DIR");
    let ip = result_ipv4(&result).unwrap_or_else(|| panic!("no IPv4: {add}"));
    assert!(ip.starts_with("10.89.0."), "{ip}");
    let infra = pod.state_dir().join("infra.json");
    assert!(infra.exists(), "no {}", infra.display());
    let ping = pod.run(
        &[],
        None,
        &[
            "nsenter",
            &format!("--net={netns}"),
            "busybox",
            "ping",
            "-c1",
            "-W2",
            GATEWAY,
        ],
    );
    assert!(ping.ok(), "pod -> gateway: {ping}");
    let supervisors = pod.processes_with_arg("__supervise");
    assert!(
        !supervisors.is_empty(),
        "no supervisor of real root's infra"
    );

    let del = call("DEL");
    assert!(del.ok(), "real root's DEL without XDG_RUNTIME_DIR: {del}");
    assert!(!infra.exists(), "infra.json left after the DEL");
    let deadline = Instant::now() + Duration::from_secs(5);
    while supervisors
        .iter()
        .any(|p| Path::new(&format!("/proc/{p}")).exists())
    {
        assert!(
            Instant::now() < deadline,
            "real root's infra still runs: {supervisors:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let records = Lab::list(&pod.state_dir().join("attachments"));
    assert!(records.is_empty(), "records left: {records:?}");
    assert_eq!(
        machine_dir.exists(),
        machine_had_it,
        "the machine's /run changed"
    );
}
