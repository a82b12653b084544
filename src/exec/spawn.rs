//! Spawning an inner plugin inside the infra, its config on stdin, bounded
//! by pluginTimeout: what it printed, or its error.

use super::infra_ns::InfraNs;
use super::inner_error::inner_error;
use super::lookup::PluginBinary;
use super::netns::ContainerNetns;
use crate::cni::env::Verb;
use crate::error::{Error, Kind, Result};
use crate::sys;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

/// One inner plugin invocation.
pub struct Invocation<'a> {
    pub verb: Verb,
    pub container_id: &'a str,
    pub ifname: &'a str,
    pub args: &'a str,
    pub cni_path: &'a [PathBuf],
    pub timeout: std::time::Duration,
}

/// Runs `binary` inside the infra. Ok(stdout) on success; an inner error
/// object is passed through unchanged.
pub fn run_plugin(
    infra: &InfraNs,
    binary: &PluginBinary,
    inv: &Invocation,
    netns: &ContainerNetns,
    stdin: &[u8],
) -> Result<Vec<u8>> {
    let name = binary.name();
    let mut cmd = Command::new(infra.program(binary));
    cmd.arg0(&binary.path)
        .env_clear()
        .envs(std::env::vars_os().filter(|(k, _)| !k.to_string_lossy().starts_with("CNI_")))
        .env("PATH", path_with_sbin())
        // The infra's own runtime dir, which lives and goes with it (its
        // /run is the state dir's run/, emptied at each start). The
        // caller's would outlive the infra: dnsname keeps its dnsmasq's
        // pid and hosts files under $XDG_RUNTIME_DIR, and a later infra
        // would take a dead infra's dnsmasq for its own.
        .env("XDG_RUNTIME_DIR", "/run")
        .env("CNI_COMMAND", inv.verb.as_str())
        .env("CNI_CONTAINERID", inv.container_id)
        .env("CNI_NETNS", netns.inner_path())
        .env("CNI_IFNAME", inv.ifname)
        .env("CNI_ARGS", inv.args)
        .env("CNI_PATH", infra.cni_path(inv.cni_path))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        // Its own group, and no death signal: when a runtime kills us (on
        // its timeout, or killing our group), the inner plugin finishes its
        // step, as it would under libcni. An inner plugin killed half-way
        // leaves what its own DEL cannot find (the reference bridge drops
        // the veth before its masquerade chain); the next call on the
        // attachment waits for it instead (`settle_orphans`).
        .process_group(0);
    let keep = [netns.raw_fd(), Some(binary.fd.as_raw_fd())];
    infra.enter(&mut cmd, keep);
    let mut child = cmd.spawn().map_err(|e| {
        Error::new(
            Kind::InnerPlugin,
            format!(
                "running inner plugin {name} ({}) in the infra: {e}",
                binary.path.display()
            ),
        )
    })?;
    // A config larger than the pipe buffer must not deadlock against a
    // plugin that writes before it has read everything.
    let writer = child.stdin.take().map(|mut input| {
        let stdin = stdin.to_vec();
        // A plugin that exits without reading its config is judged by its
        // exit status, so a broken pipe here is not an error.
        std::thread::spawn(move || drop(input.write_all(&stdin)))
    });
    let stdout = child
        .stdout
        .take()
        .map(OwnedFd::from)
        .ok_or_else(|| Error::internal("no stdout pipe"))?;
    // pluginTimeout bounds the whole run: a plugin that closed its stdout
    // (or left it to a child) and hangs is as stuck as a silent one.
    let deadline = sys::deadline(inv.timeout);
    // Ok(None): still running at the deadline. Any way out but an exit
    // kills and reaps the plugin's group below.
    let finished = sys::read_to_end_timeout(stdout, inv.timeout).and_then(|output| match output {
        Some(output) => Ok(wait_until(&mut child, deadline)?.map(|status| (output, status))),
        None => Ok(None),
    });
    let (output, status) = match finished {
        Ok(Some(done)) => done,
        failed => {
            // The whole group: what the plugin started must not outlive it
            // (nor hold the runtime's stderr open).
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.wait();
            let why = match failed {
                Err(e) => format!("could not be waited for ({e}) and was killed"),
                _ => format!(
                    "did not finish within {}s and was killed (pluginTimeout)",
                    inv.timeout.as_secs()
                ),
            };
            return Err(Error::new(
                Kind::InnerPlugin,
                format!("inner plugin {name} {} {why}", inv.verb.as_str()),
            ));
        }
    };
    // The writer is not joined: a child of the plugin that kept its stdin
    // without reading would block it, and us, forever.
    drop(writer);
    if status.success() {
        return Ok(output);
    }
    Err(inner_error(&name, inv.verb, &output, status))
}

/// The child's exit status, or None when it still runs at `deadline`.
fn wait_until(
    child: &mut std::process::Child,
    deadline: Instant,
) -> Result<Option<std::process::ExitStatus>> {
    // Not reaped yet (we hold `child`), so its pid is still its own.
    let left = deadline.saturating_duration_since(Instant::now());
    if !sys::wait_exit_timeout(child.id() as i32, left)? {
        return Ok(None);
    }
    Ok(Some(child.wait()?))
}

/// The caller's PATH plus /usr/sbin and /sbin, where iptables lives: an
/// ordinary user's PATH lacks them, and bridge, portmap and firewall exec it.
pub fn path_with_sbin() -> String {
    let mut path = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into());
    for dir in ["/usr/local/sbin", "/usr/sbin", "/sbin"] {
        if !path.split(':').any(|p| p == dir) {
            path.push(':');
            path.push_str(dir);
        }
    }
    path
}
