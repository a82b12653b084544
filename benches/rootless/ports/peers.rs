//! The servers the ports phase talks to, started from the driver: our echo
//! server, and iperf3 behind rootlesskit's and pasta's port forwarding (each in
//! a lab of its own).

use super::SERVER_READY;
use crate::cleanup;
use crate::driver::Cx;
use crate::iperf::in_container;
use crate::procs::Background;
use crate::Res;
use crate::WORKER_ARG;
use lab::host_tools::write_user_files;
use lab::{retry, run_command};
use lab::{Container, Lab, LAB_PATH};
use serde_json::json;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// A process and everything it started, killed on drop (by pid: its
/// descendants are listed before any is killed, so that none is re-parented
/// out of sight).
pub(super) struct Tree(Background);

impl Drop for Tree {
    fn drop(&mut self) {
        for pid in lab::descendants(self.0.child.id()) {
            lab::sigkill(pid);
        }
    }
}

/// Starts `cmd` (stdout piped to us, stderr to `log`) and waits until a
/// line of its stdout contains `ready`; on failure the log's tail says why.
pub(super) fn start_logged(mut cmd: Command, what: &str, ready: &str, log: &Path) -> Res<Tree> {
    let file = fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    cmd.stdout(Stdio::piped()).stderr(file);
    let mut bg = Background::spawn(cmd, what)?;
    if let Err(e) = bg.wait_for_line(ready, Duration::from_secs(15)) {
        let text = fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().filter(|l| !l.contains("to syslog")).collect();
        let tail = tail[tail.len().saturating_sub(5)..].join(" | ");
        return Err(format!("{e}: {tail}"));
    }
    Ok(Tree(bg))
}

/// Our echo server (the worker task) in container `c`, or on the host's
/// loopback (as root) when None.
pub(super) fn echo_server_in(cx: &Cx, c: Option<&Container>, port: u16, what: &str) -> Res<Tree> {
    let argv = [cx.worker.clone(), WORKER_ARG.to_string()];
    let mut cmd = match c {
        Some(c) => in_container(cx, c, &argv),
        None => {
            let mut cmd = Command::new(&cx.worker);
            cmd.arg(WORKER_ARG);
            cmd
        }
    };
    // The task on stdin (as every worker task), then the ready line.
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().map_err(|e| format!("starting {what}: {e}"))?;
    cleanup::with(|l| l.pids.push(child.id()));
    let stdin = child.stdin.take();
    let mut bg = Background {
        child,
        what: what.to_string(),
    };
    let task = json!({ "task": "echo_server", "port": port }).to_string();
    stdin
        .ok_or("no stdin")?
        .write_all(task.as_bytes())
        .map_err(|e| format!("{what}: writing the task: {e}"))?;
    bg.wait_for_line(SERVER_READY, Duration::from_secs(10))?;
    Ok(Tree(bg))
}

/// A lab of its own for a peer of (b): its own uid, so that the peer has
/// the pipe quota of a user of its own, as our drivers have the main lab's
/// (pasta alone keeps 32 pipes of 1 MiB, half of `fs.pipe-user-pages-soft`;
/// sharing a uid, whoever runs later would get small pipes). Its processes
/// are killed with it, or by the bench's cleanup on a signal.
pub(super) fn peer_lab(name: &str) -> Res<Lab> {
    let lab = Lab::new(lab::binary!(), name).ok_or_else(|| format!("no lab for {name}"))?;
    cleanup::with(|l| {
        l.more_uids.push(lab.uid);
        l.dirs.push(lab.dir.clone());
    });
    Ok(lab)
}

/// An iperf3 server in a namespace of rootlesskit's own
/// (`--net=slirp4netns --port-driver=builtin`), its port published on the
/// host's 127.0.0.1 by `rootlessctl add-ports`. rootlesskit runs as the
/// lab's uid, which newuidmap wants in /etc/passwd with a subordinate
/// range: copies are bound over the machine's files in root's private mount
/// namespace, as the tests do, with the lab's tun node.
pub(super) fn rootlesskit_iperf(lab: &Lab, port: u16) -> Res<Tree> {
    write_user_files(lab, "rcnibench");
    let d = lab.dir.display().to_string();
    let u = lab.uid;
    let state = format!("{d}/rootlesskit-bench");
    let inner = format!(
        "set -e
         mount --bind {d}/tun /dev/net/tun
         for f in passwd group subuid subgid; do mount --bind {d}/etc-$f /etc/$f; done
         exec setpriv --reuid {u} --regid {u} --clear-groups -- env -i PATH={LAB_PATH} HOME={d} \
           rootlesskit --net=slirp4netns --disable-host-loopback --port-driver=builtin \
             --state-dir={state} iperf3 -s -p {port} --forceflush"
    );
    let mut cmd = lab.host_command("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &inner])
        .env_clear()
        .env("PATH", LAB_PATH)
        // mount(8) as real root keeps its utab under the machine's /run.
        .env("LIBMOUNT_UTAB", lab::utab());
    let tree = start_logged(
        cmd,
        "rootlesskit's iperf3 server",
        "Server listening",
        &lab.dir.join("rootlesskit-bench.log"),
    )?;
    let spec = format!("127.0.0.1:{port}:{port}/tcp");
    let socket = format!("{state}/api.sock");
    let out = retry(Duration::from_secs(10), || {
        let mut c = Command::new("rootlessctl");
        c.args(["--socket", &socket, "add-ports", &spec]);
        run_command(
            c,
            format!("rootlessctl add-ports {spec}"),
            None,
            Duration::from_secs(10),
        )
    });
    if !out.ok() {
        return Err(format!("rootlessctl add-ports: {out}"));
    }
    Ok(tree)
}

/// An iperf3 server in a namespace of pasta's own, its port forwarded from
/// the host's 127.0.0.1 by `pasta -t 127.0.0.1/PORT` (the form Debian's
/// pasta 0.0~git20230309 takes: address/port; no port forwarded the other
/// way). pasta runs as the lab's uid with the lab's tun node.
pub(super) fn pasta_iperf(lab: &Lab, port: u16) -> Res<Tree> {
    let d = lab.dir.display().to_string();
    let u = lab.uid;
    let inner = format!(
        "set -e
         mount --bind {d}/tun /dev/net/tun
         exec setpriv --reuid {u} --regid {u} --clear-groups -- env -i PATH={LAB_PATH} HOME={d} \
           pasta --config-net --foreground --quiet -t 127.0.0.1/{port} -u none -T none -U none \
             -- iperf3 -s -p {port} --forceflush"
    );
    let mut cmd = lab.host_command("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &inner])
        .env_clear()
        .env("PATH", LAB_PATH)
        .env("LIBMOUNT_UTAB", lab::utab());
    start_logged(
        cmd,
        "pasta's iperf3 server",
        "Server listening",
        &lab.dir.join("pasta-bench.log"),
    )
}
