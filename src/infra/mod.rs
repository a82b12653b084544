//! The infra: one per (user, user namespace). Its lifecycle runs under the
//! state lock; its processes are the supervisor (in the caller's
//! namespaces), the sandbox (whose network and mount namespaces *are* the
//! infra) and its way out, slirp4netns or pasta (`outbound`). Here: the
//! record (`InfraInfo`) and starting and stopping; what the state dir says
//! of a running one is `probe`, how it is set up `settings`.

pub mod control;
pub mod outbound;
pub mod prereq;
mod probe;
pub mod sandbox;
mod settings;
pub mod supervisor;

use crate::error::{Error, Kind, Result};
use crate::procfs::{self, ProcessId};
use crate::state::{self, StateDir, StateLock};
use crate::sys;
use serde::{Deserialize, Serialize};

pub use crate::cni::config::PortDriver;
use probe::{forget_infra_files, supervisor_holds_lock, SHUTDOWN_GRACE};
pub use probe::{
    hold_alive_lock, join_infra_userns, reap_and_join, reap_dead_infra, Probe, ALIVE_LOCK,
};
pub use settings::{ForwardLimits, Settings};
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Starting takes a few ms; this only bounds a broken start.
const START_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(3);
/// infra.log is truncated at start when it grew past this.
const MAX_LOG: u64 = 1 << 20;

/// infra.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InfraInfo {
    pub supervisor: ProcessId,
    pub sandbox: ProcessId,
    pub netns: u64,
    pub mntns: u64,
    pub slirp4netns: Option<ProcessId>,
    /// pasta, when it is the way out (`settings.outbound`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pasta: Option<ProcessId>,
    pub userns: u64,
    /// The supervisor's PID namespace: the PIDs above mean these processes
    /// only there (0 in a record of a version that did not keep it).
    #[serde(default)]
    pub pidns: u64,
    /// Seconds since the epoch.
    pub started: u64,
    pub settings: Settings,
    /// The way out's restarts, and whether it is down now.
    #[serde(default)]
    pub outbound: outbound::Health,
    /// Whether containers see their clients' addresses through the builtin
    /// port driver (None: the slirp4netns driver, or an older supervisor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_addresses: Option<crate::ports::client_addr::ClientAddresses>,
}

impl InfraInfo {
    /// The recorded infra, if the record is readable. A corrupt record is
    /// no infra here; `running` asks a supervisor that still runs.
    pub fn load(state: &StateDir) -> Option<Self> {
        Self::load_checked(state).unwrap_or(None)
    }

    /// `load`, except that an infra.json of a newer state format is an
    /// error: that infra is another release's, neither dead nor ours.
    pub fn load_checked(state: &StateDir) -> Result<Option<Self>> {
        match state.read_json::<InfraInfo>(state::INFRA_FILE) {
            Ok(info) => Ok(info),
            Err(e) if e.kind == Kind::NewerState => Err(e),
            Err(e) => {
                log::warn!("ignoring {e}");
                Ok(None)
            }
        }
    }

    /// Supervisor and sandbox are the recorded processes, and the sandbox
    /// still holds the recorded network namespace.
    pub fn is_alive(&self) -> bool {
        self.supervisor.is_alive()
            && self.sandbox.is_alive()
            && procfs::ns_inode(format!("/proc/{}/ns/net", self.sandbox.pid)) == Some(self.netns)
    }

    /// The sandbox's /run and /var/lib/cni are still the state dir's `run/`
    /// and `var-lib-cni/`: a mount whose mountpoint the caller's mount
    /// namespace deleted is detached by the kernel, and a deleted source
    /// leaves a `//deleted` mount that no file can be made in. When the
    /// sandbox's side cannot be looked at, that is not proof of damage.
    pub fn mounts_ok(&self, state: &StateDir) -> bool {
        let root = format!("/proc/{}/root", self.sandbox.pid);
        [
            ("run", state::RUN_DIR),
            ("var/lib/cni", state::VAR_LIB_CNI_DIR),
        ]
        .iter()
        .all(|(inside, ours)| {
            use std::os::unix::fs::MetadataExt;
            match std::fs::metadata(std::path::Path::new(&root).join(inside)) {
                Err(_) => true,
                Ok(m) => m.nlink() > 0 && Some((m.dev(), m.ino())) == dir_id(state, ours),
            }
        })
    }

    /// The process of the configured way out, as recorded.
    pub fn outbound_process(&self) -> Option<ProcessId> {
        match self.settings.outbound {
            outbound::Engine::Slirp4netns => self.slirp4netns,
            outbound::Engine::Pasta => self.pasta,
        }
    }

    /// Records the way out's process (None: it is down).
    pub fn set_outbound_process(&mut self, p: Option<ProcessId>) {
        match self.settings.outbound {
            outbound::Engine::Slirp4netns => self.slirp4netns = p,
            outbound::Engine::Pasta => self.pasta = p,
        }
    }

    pub fn save(&self, state: &StateDir) -> Result<()> {
        state.write_json(state::INFRA_FILE, self, state::Durability::Synced)
    }

    /// Each process with what its command line must hold to be ours.
    fn processes(&self) -> impl Iterator<Item = (ProcessId, &'static str)> {
        [
            Some((self.supervisor, supervisor::ENTRY)),
            Some((self.sandbox, sandbox::ENTRY)),
            self.slirp4netns.map(|p| (p, "slirp4netns")),
            self.pasta.map(|p| (p, "pasta")),
        ]
        .into_iter()
        .flatten()
    }
}

/// The running infra, started when there is none. The bool says whether
/// this call started it.
pub fn ensure_running(
    state: &StateDir,
    lock: &StateLock,
    settings: &Settings,
) -> Result<(InfraInfo, bool)> {
    if let Some(info) = reap_and_join(state, lock)? {
        if info.settings.mtu != settings.mtu
            || info.settings.allow_host_loopback != settings.allow_host_loopback
            || info.settings.ipv6 != settings.ipv6
            || info.settings.port_driver != settings.port_driver
            || info.settings.outbound != settings.outbound
        {
            log::warn!(
                "infra already running with {}; this config's settings apply from the next infra start",
                info.settings.to_arg()
            );
        }
        return Ok((info, false));
    }
    Ok((start(state, lock, settings)?, true))
}

/// Spawns the supervisor, detached from the caller (own session, stdio on
/// /dev/null and the log: a runtime reads our stdout until EOF), and waits
/// for it to report the infra ready.
pub fn start(state: &StateDir, _lock: &StateLock, settings: &Settings) -> Result<InfraInfo> {
    let started = Instant::now();
    // The dirs below are the running infra's: never reset under it.
    if supervisor_holds_lock(state, SHUTDOWN_GRACE) {
        return Err(Error::new(
            Kind::InfraStart,
            format!(
                "an infra supervisor still holds {}: not starting a second infra",
                state.file(ALIVE_LOCK).display()
            ),
        ));
    }
    for dir in [
        state::RUN_DIR,
        state::VAR_LIB_CNI_DIR,
        state::OVERLAY_DIR,
        state::WARM_DIR,
    ] {
        state.reset_dir(dir)?;
    }
    state.remove(state::SLIRP_SOCKET)?;
    let log_path = state.file(state::LOG_FILE);
    let log = state.open_log(state::LOG_FILE, MAX_LOG)?;
    // SAFETY: setsid is async-signal-safe and allocates nothing.
    let spawned = unsafe {
        spawn_own(
            supervisor::ENTRY,
            |ready_fd| supervisor::Args::new(state, settings, ready_fd).to_args(),
            |cmd| {
                cmd.stderr(log).current_dir("/");
            },
            || {
                nix::unistd::setsid()
                    .map(drop)
                    .map_err(std::io::Error::from)
            },
            START_TIMEOUT,
        )
    };
    let failure = match spawned {
        Ok(mut child) => match InfraInfo::load(state) {
            Some(info) if info.is_alive() => {
                log::info!("infra started in {:?}", started.elapsed());
                return Ok(info);
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                "the supervisor reported ready but the infra is not running".to_string()
            }
        },
        Err(e) => e.msg,
    };
    if let Some(info) = InfraInfo::load(state) {
        kill_and_reap(state, &info);
    }
    let _ = forget_infra_files(state);
    Err(
        Error::new(Kind::InfraStart, format!("starting the infra: {failure}")).with_details(
            format!("{}:\n{}", log_path.display(), sys::tail(&log_path, 10)),
        ),
    )
}

/// Starts our own binary's hidden `entry` with the arguments `args` makes
/// of the write end of a pipe (its `--ready-fd`), runs `child_setup`
/// between fork and exec, and waits until the child closes the pipe: "ok"
/// means ready, anything else says why not (the child is then killed).
///
/// # Safety
///
/// `child_setup` runs in the forked child of a possibly multi-threaded
/// process: it must only make async-signal-safe calls (no allocation, no
/// locks), as `CommandExt::pre_exec` requires.
pub unsafe fn spawn_own(
    entry: &str,
    args: impl FnOnce(i32) -> Vec<OsString>,
    configure: impl FnOnce(&mut Command),
    mut child_setup: impl FnMut() -> std::io::Result<()> + Send + Sync + 'static,
    timeout: Duration,
) -> Result<std::process::Child> {
    let fail = |why: String| Error::new(Kind::InfraStart, why);
    let exe = std::env::current_exe().map_err(|e| fail(format!("finding our own binary: {e}")))?;
    let (ready_r, ready_w) = sys::pipe()?;
    let ready_fd = std::os::fd::AsRawFd::as_raw_fd(&ready_w);
    let mut cmd = Command::new(exe);
    cmd.arg(entry)
        .args(args(ready_fd))
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    // The infra outlives the call that starts it and serves every
    // container: it carries none of that call's CNI_* variables (without
    // CNI_COMMAND our binary is the CLI, not a plugin; and a container id
    // in its environment would make it look like that container's inner
    // plugin to `exec::settle_orphans`).
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("CNI_") {
            cmd.env_remove(key);
        }
    }
    configure(&mut cmd);
    // SAFETY: runs between fork and exec; fcntl is async-signal-safe, and
    // so is child_setup, by this function's contract.
    unsafe {
        cmd.pre_exec(move || {
            child_setup()?;
            // Only the ready pipe passes: the infra outlives the call, and
            // must not hold what the runtime passed it.
            sys::cloexec_inherited_fds()?;
            sys::keep_on_exec(ready_fd)
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| fail(format!("starting {entry}: {e}")))?;
    drop(ready_w);
    let why = match sys::read_report(ready_r, timeout)?
        .as_deref()
        .map(str::trim)
    {
        Some("ok") => return Ok(child),
        Some("") => format!("{entry} exited without a word"),
        Some(msg) => msg.trim_start_matches("error: ").to_string(),
        None => format!("{entry} was not ready within {}s", timeout.as_secs()),
    };
    let _ = child.kill();
    let _ = child.wait();
    Err(fail(why))
}

/// Asks the supervisor to stop everything and waits until it has; what
/// still runs after STOP_TIMEOUT is killed. Removes infra.json.
pub fn stop(state: &StateDir, _lock: &StateLock, info: &InfraInfo) -> Result<()> {
    info.supervisor
        .signal(nix::sys::signal::Signal::SIGTERM, supervisor::ENTRY);
    if wait_gone(&[info.supervisor, info.sandbox], STOP_TIMEOUT) {
        // The supervisor ended them already; a second look costs little.
        end_leftovers(state, info);
    } else {
        log::warn!(
            "infra supervisor {} did not stop in time; killing",
            info.supervisor.pid
        );
        kill_and_reap(state, info);
    }
    forget_infra_files(state)
}

/// SIGKILL to every recorded process that is still the one recorded (the
/// supervisor first, so it does not restart the way out), then to what is
/// left in the infra's network namespace.
fn kill_and_reap(state: &StateDir, info: &InfraInfo) {
    let procs: Vec<ProcessId> = info
        .processes()
        .filter(|(p, marker)| p.signal(nix::sys::signal::Signal::SIGKILL, marker))
        .map(|(p, _)| p)
        .collect();
    if !wait_gone(&procs, STOP_TIMEOUT) {
        log::warn!(
            "infra processes of {} still present after SIGKILL",
            info.supervisor.pid
        );
    }
    end_leftovers(state, info);
}

/// Kills every process still in the infra's network and mount namespaces
/// (their inodes as recorded, and a /run that is the state dir's `run/`)
/// and waits until they are gone. The sandbox's
/// death does not end them: a daemon an inner plugin started there
/// (dnsname's dnsmasq) has its own session and no parent of ours, and
/// would keep the namespaces alive, with the bridge and the containers'
/// veth peers in them.
pub(crate) fn end_leftovers(state: &StateDir, info: &InfraInfo) {
    // The inodes alone do not name the infra: once its namespaces are gone
    // (a crashed infra, or right after the sandbox died) the kernel gives
    // the same numbers to the next namespaces made on the machine, any
    // process's. What only the infra's mount namespace has is the state
    // dir's `run/` (made anew at each start) bound on /run.
    let Some(run) = state.dir_dev_ino(state::RUN_DIR) else {
        return;
    };
    let left: Vec<ProcessId> = procfs::in_netns(info.netns)
        .into_iter()
        .filter(|p| procfs::ns_inode(format!("/proc/{}/ns/mnt", p.pid)) == Some(info.mntns))
        .filter(|p| {
            dev_ino(std::path::Path::new(&format!("/proc/{}/root/run", p.pid))) == Some(run)
        })
        .collect();
    // The kernel reuses a namespace's inode once the namespace is gone, and
    // another infra of ours makes its two the same way: a live sandbox
    // other than the recorded one means these are now that infra's.
    if left
        .iter()
        .any(|p| *p != info.sandbox && p.runs(sandbox::ENTRY))
    {
        log::warn!(
            "the namespaces recorded for the infra are another infra's now; leaving them alone"
        );
        return;
    }
    let killed: Vec<ProcessId> = left
        .into_iter()
        .filter(|p| procfs::kill_in_netns(p, info.netns))
        .collect();
    if killed.is_empty() {
        return;
    }
    log::info!(
        "ended {} process(es) left in the infra's namespaces: {:?}",
        killed.len(),
        killed.iter().map(|p| p.pid).collect::<Vec<_>>()
    );
    if !wait_gone(&killed, STOP_TIMEOUT) {
        log::warn!("processes left in the infra's namespaces survive SIGKILL");
    }
}

/// Device and inode of what `path` names.
fn dev_ino(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// `dev_ino` of a directory that is not deleted (a deleted one has no
/// links left, a live one at least two).
/// Device and inode of the state dir's dir `name`, opened through its fd.
fn dir_id(state: &StateDir, name: &str) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let dir = std::fs::File::from(state.open_dir(name).ok()?);
    dir.metadata()
        .ok()
        .filter(|m| m.nlink() > 0)
        .map(|m| (m.dev(), m.ino()))
}

fn wait_gone(procs: &[ProcessId], timeout: Duration) -> bool {
    let deadline = crate::sys::deadline(timeout);
    let mut pause = Duration::from_micros(100);
    loop {
        if procs.iter().all(|p| !p.is_alive()) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

/// Stops the infra when no attachment is left and no idle timeout keeps it
/// warm (or `force`, for a failed ADD that started it).
pub fn stop_if_idle(state: &StateDir, lock: &StateLock, force: bool) -> Result<()> {
    if state.has_attachments(lock)? {
        return Ok(());
    }
    state.remove_temp_files(lock);
    let Some(info) = reap_and_join(state, lock)? else {
        return Ok(());
    };
    if info.settings.idle_timeout_secs.is_some() && !force {
        return Ok(());
    }
    log::info!("no attachment left; stopping the infra");
    stop(state, lock, &info)
}
