//! Containers in the lab: processes holding a network namespace inside
//! the session, commands in their netns, and the lab uid's processes.

use crate::process::{describe_process, pids_of_uid, proc_state, real_uid};
use crate::session::COMMAND_TIMEOUT;
use crate::{run_command, Lab, Out, LAB_PATH};
use std::fs;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// A container: a process holding a network namespace inside the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Container {
    pub pid: u32,
}

impl Container {
    /// The netns path a runtime would pass (`/proc/PID/ns/net`).
    pub fn netns(&self) -> String {
        format!("/proc/{}/ns/net", self.pid)
    }
}

impl Lab {
    /// `argv` as the lab user inside the session, with a clean environment
    /// and no stdio: for a process that outlives the call (more arguments
    /// may be added before it is spawned).
    pub fn session_daemon(&self, argv: &[&str]) -> Command {
        let u = self.uid.to_string();
        let mut cmd = Command::new("/usr/bin/setpriv");
        cmd.args(["--reuid", &u, "--regid", &u, "--clear-groups"])
            .args(["nsenter", "--preserve-credentials", "--user", "--mount"])
            .arg(format!("--target={}", self.holder))
            .arg("--")
            .args(argv)
            .env_clear()
            .env("PATH", LAB_PATH)
            .env("LIBMOUNT_UTAB", crate::utab())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    }

    /// Starts a container (a netns held by `sleep`) inside the session.
    pub fn container(&self) -> Container {
        self.container_with(&["--net"])
    }

    /// Starts a container inside the session whose `sleep` is in the new
    /// namespaces `unshare_flags` ask for (a netns among them).
    pub fn container_with(&self, unshare_flags: &[&str]) -> Container {
        let child = self
            .session_daemon(&["unshare"])
            .args(unshare_flags)
            .args(["sleep", "infinity"])
            .spawn()
            .unwrap_or_else(|e| panic!("lab: starting a container: {e}"));
        let pid = child.id();
        self.children.borrow_mut().push(child);
        // setpriv, nsenter and unshare exec: the pid ends up as `sleep`, in
        // a netns of its own (before that it is in the host's).
        let host_net = fs::read_link("/proc/self/ns/net").ok();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let net = fs::read_link(format!("/proc/{pid}/ns/net")).ok();
            if comm.trim() == "sleep" && net.is_some() && net != host_net {
                return Container { pid };
            }
            assert!(
                Instant::now() < deadline,
                "lab: container {pid} did not come up"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills a container's holder and reaps it: its netns is gone after.
    pub fn kill_container(&self, c: &Container) {
        let mut children = self.children.borrow_mut();
        if let Some(i) = children.iter().position(|ch| ch.id() == c.pid) {
            let mut child = children.remove(i);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Runs `argv` in a container's netns (inside the session).
    pub fn in_netns(&self, c: &Container, argv: &[&str]) -> Out {
        let (cmd, what) = self.netns_command(c, argv);
        run_command(cmd, what, None, COMMAND_TIMEOUT)
    }

    /// Starts `argv` in a container's netns in the background (stdio on
    /// /dev/null) and gives its pid; `what` names it in a failure.
    pub fn start_in_netns(&self, c: &Container, argv: &[&str], what: &str) -> u32 {
        let mut sh = vec![
            "sh",
            "-c",
            r#""$@" </dev/null >/dev/null 2>&1 & echo $!"#,
            "sh",
        ];
        sh.extend_from_slice(argv);
        let out = self.in_netns(c, &sh);
        assert!(out.ok(), "starting {what}: {out}");
        out.stdout
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("the pid of {what}: {out}"))
    }

    /// `<lab>/name` holding `source`, written once and readable by the lab
    /// user, for a script the lab runs; its path.
    pub fn script(&self, name: &str, source: &str) -> String {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.join(name);
        if !path.exists() {
            self.write_file(name, source);
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644))
                .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
        }
        path.display().to_string()
    }

    /// The command `in_netns` runs, for a process the caller starts and
    /// watches itself.
    pub fn in_netns_command(&self, c: &Container, argv: &[&str]) -> Command {
        self.netns_command(c, argv).0
    }

    /// `argv` behind `nsenter --net` into `c`'s netns, as `command` builds
    /// it, and its name for messages.
    fn netns_command(&self, c: &Container, argv: &[&str]) -> (Command, String) {
        let net = format!("--net={}", c.netns());
        let mut full = vec!["nsenter", net.as_str(), "--"];
        full.extend_from_slice(argv);
        self.command(&[], &full)
    }

    /// The IPv4 address of `ifname` in a container, if any.
    pub fn ipv4(&self, c: &Container, ifname: &str) -> Option<String> {
        let out = self.in_netns(c, &["ip", "-o", "-4", "addr", "show", "dev", ifname]);
        let fields: Vec<&str> = out.stdout.split_whitespace().collect();
        let i = fields.iter().position(|f| *f == "inet")?;
        Some(fields.get(i + 1)?.split('/').next()?.to_string())
    }

    /// The interface names in a container (`ip -o link`).
    pub fn links(&self, c: &Container) -> Vec<String> {
        let out = self.in_netns(c, &["ip", "-o", "link", "show"]);
        out.stdout
            .lines()
            .filter_map(|l| {
                let name = l.split(':').nth(1)?.trim();
                Some(name.split('@').next()?.to_string())
            })
            .collect()
    }

    // --- processes -------------------------------------------------------------

    /// Live (not zombie) processes of the lab uid with `arg` as one of their
    /// argv elements (e.g. "__supervise"), described.
    pub fn processes_with_arg(&self, arg: &str) -> Vec<String> {
        self.pids_with_arg(arg)
            .into_iter()
            .map(describe_process)
            .collect()
    }

    /// The PIDs `processes_with_arg` describes.
    pub fn pids_with_arg(&self, arg: &str) -> Vec<u32> {
        pids_of_uid(self.uid)
            .into_iter()
            .filter(|&p| !proc_state(p).unwrap_or_default().starts_with('Z'))
            .filter(|&p| {
                fs::read(format!("/proc/{p}/cmdline"))
                    .map(|b| b.split(|&c| c == 0).any(|a| a == arg.as_bytes()))
                    .unwrap_or(false)
            })
            .collect()
    }

    /// Whether `pid` is a live (not zombie) process of the lab uid.
    pub fn is_running(&self, pid: u32) -> bool {
        real_uid(pid) == Some(self.uid) && !proc_state(pid).unwrap_or_default().starts_with('Z')
    }

    /// `pid` described (command line and state), for messages.
    pub fn describe(pid: u32) -> String {
        describe_process(pid)
    }
}
