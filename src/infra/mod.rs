//! The infra: one per (user, user namespace). Its lifecycle runs under the
//! state lock; its processes are the supervisor (in the caller's
//! namespaces), the sandbox (whose network and mount namespaces *are* the
//! infra) and its way out, slirp4netns or pasta (`outbound`).

pub mod control;
pub mod outbound;
pub mod prereq;
pub mod sandbox;
pub mod supervisor;

use crate::error::{Error, Kind, Result};
use crate::procfs::{self, ProcessId};
use crate::state::{self, StateDir, StateLock};
use crate::sys;
use serde::{Deserialize, Serialize};

pub use crate::cni::config::PortDriver;
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Starting takes a few ms; this only bounds a broken start.
const START_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(3);
/// infra.log is truncated at start when it grew past this.
const MAX_LOG: u64 = 1 << 20;

/// How the infra is set up; fixed by the ADD that starts it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    pub mtu: u32,
    pub allow_host_loopback: bool,
    pub ipv6: bool,
    pub port_driver: PortDriver,
    /// What connects the infra to the outside (absent in a record of a
    /// version that knew slirp4netns only).
    #[serde(default)]
    pub outbound: outbound::Engine,
    pub idle_timeout_secs: Option<u64>,
    pub log_level: String,
    /// The builtin driver's bounds (absent in a record of a version that
    /// had none: the defaults).
    #[serde(default)]
    pub forward_limits: ForwardLimits,
}

/// Bounds of the builtin port driver's forwarder (config keys of the same
/// names; see the README).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ForwardLimits {
    pub max_connections: usize,
    pub max_connections_per_port: usize,
    pub max_udp_flows: usize,
    pub max_udp_flows_per_port: usize,
    /// 0: no idle timeout.
    pub tcp_idle_timeout_secs: u64,
    pub udp_idle_timeout_secs: u64,
}

impl Default for ForwardLimits {
    fn default() -> Self {
        ForwardLimits {
            max_connections: 32768,
            max_connections_per_port: 16384,
            max_udp_flows: 4096,
            max_udp_flows_per_port: 1024,
            // Two hours, as TCP keepalive's first probe: a connection that
            // quiet is most likely gone at the other end.
            tcp_idle_timeout_secs: 7200,
            udp_idle_timeout_secs: 60,
        }
    }
}

impl ForwardLimits {
    pub fn to_limits(self) -> crate::ports::forwarder::Limits {
        let secs = std::time::Duration::from_secs;
        crate::ports::forwarder::Limits {
            connections: self.max_connections,
            connections_per_port: self.max_connections_per_port,
            udp_flows: self.max_udp_flows,
            udp_flows_per_port: self.max_udp_flows_per_port,
            tcp_idle: Some(self.tcp_idle_timeout_secs)
                .filter(|s| *s > 0)
                .map(secs),
            udp_idle: secs(self.udp_idle_timeout_secs.max(1)),
        }
    }
}

impl Settings {
    pub fn from_conf(conf: &crate::cni::config::NetConf) -> Self {
        Settings {
            mtu: conf.mtu,
            allow_host_loopback: conf.allow_host_loopback,
            ipv6: conf.ipv6,
            port_driver: conf.port_driver,
            outbound: conf.outbound,
            idle_timeout_secs: conf.idle_timeout.map(|d| d.as_secs()),
            log_level: log::max_level().to_string().to_lowercase(),
            forward_limits: conf.forward_limits,
        }
    }

    /// Handed to the supervisor as one JSON argument (`supervisor::Args`).
    pub fn to_arg(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_arg(arg: &str) -> Result<Self> {
        serde_json::from_str(arg).map_err(|e| Error::internal(format!("bad --settings: {e}")))
    }
}

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

/// Held (flock) by the supervisor for as long as it runs, released by the
/// kernel when it dies however it dies: whether an infra still runs does not
/// depend on infra.json being readable, nor on its PIDs being visible from
/// the caller's PID namespace.
pub const ALIVE_LOCK: &str = "infra.lck";

/// How long a caller waits for a supervisor that is shutting down to let go
/// of the lock (its own teardown waits up to STOP_TIMEOUT for leftovers).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The supervisor's side of `ALIVE_LOCK`; refuses when another supervisor
/// holds it. Close-on-exec: the sandbox and the way out do not hold it.
pub fn hold_alive_lock(state: &StateDir) -> Result<std::fs::File> {
    let path = state.file(ALIVE_LOCK);
    let file = state.open_file(ALIVE_LOCK, true)?;
    match sys::try_flock(&file) {
        Ok(true) => Ok(file),
        Ok(false) => Err(Error::new(
            Kind::InfraStart,
            format!(
                "another infra's supervisor holds {}: not starting a second infra",
                path.display()
            ),
        )),
        Err(e) => Err(Error::new(
            Kind::InfraStart,
            format!("locking {}: {e}", path.display()),
        )),
    }
}

/// Whether a supervisor holds `ALIVE_LOCK` after up to `wait` (one that
/// is shutting down lets go within it). A lock file we cannot open says
/// nothing: an older supervisor did not take it, and none is there when
/// no supervisor made it.
fn supervisor_holds_lock(state: &StateDir, wait: Duration) -> bool {
    let Ok(file) = state.open_file(ALIVE_LOCK, false) else {
        return false;
    };
    let deadline = sys::deadline(wait);
    loop {
        match sys::try_flock(&file) {
            // Taken only to look: released at once (dropped with the file).
            Ok(true) | Err(_) => return false,
            Ok(false) if Instant::now() >= deadline => return true,
            Ok(false) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// What the state dir says of its infra, found without changing anything.
pub enum Probe {
    /// No infra runs: none was recorded, or the record is torn and no
    /// supervisor runs (`reap_dead_infra` removes the infra's files).
    Absent,
    /// A live infra whose mounts are the state dir's.
    Live(InfraInfo),
    /// infra.json is missing or unreadable, but its supervisor runs and
    /// said what its infra is (`reap_dead_infra` writes the record again).
    Unrecorded(InfraInfo),
    /// Alive, but its /run or /var/lib/cni is no longer the state dir's
    /// (deleted under it?): it is to be replaced, its attachments are lost.
    Broken(InfraInfo),
    /// Recorded, dead: what it left is found by its PIDs and namespaces.
    Dead(InfraInfo),
    /// Recorded in a PID namespace whose supervisor is gone: its PIDs name
    /// nothing here, so what it left is found by namespace inodes only.
    DeadElsewhere(InfraInfo),
}

impl InfraInfo {
    /// The state of the recorded infra. Reads files and /proc, and asks a
    /// supervisor whose record is unreadable; signals, kills and removes
    /// nothing. An infra of another PID namespace that still runs, or whose
    /// PIDs mean other processes here, is an error: this caller can neither
    /// use nor clean it up.
    pub fn probe(state: &StateDir) -> Result<Probe> {
        let info = match InfraInfo::load_checked(state)? {
            Some(info) => info,
            None => match unrecorded_supervisor(state)? {
                Some(info) => return Ok(Probe::Unrecorded(info)),
                None => return Ok(Probe::Absent),
            },
        };
        let my_pidns = procfs::self_ns_inode("pid").unwrap_or(0);
        if info.pidns != 0 && my_pidns != 0 && info.pidns != my_pidns {
            if supervisor_holds_lock(state, SHUTDOWN_GRACE) {
                return Err(other_pid_namespace(state, &info, my_pidns));
            }
            // A record with a PID namespace is one whose supervisor took
            // `ALIVE_LOCK`, and none holds it: that infra is dead (its PID
            // namespace may have gone, killing it).
            return Ok(Probe::DeadElsewhere(info));
        }
        if info.is_alive() {
            return Ok(if info.mounts_ok(state) {
                Probe::Live(info)
            } else {
                Probe::Broken(info)
            });
        }
        if supervisor_holds_lock(state, SHUTDOWN_GRACE) {
            // /proc says the recorded processes are gone, yet a supervisor
            // runs: the record's PIDs mean other processes from here.
            return Err(other_pid_namespace(state, &info, my_pidns));
        }
        Ok(Probe::Dead(info))
    }
}

/// Acts on a probe under the state lock: removes what a dead infra left
/// (its processes still in its namespaces, its files), stops a broken one,
/// writes an unreadable record again. The live infra, if one is left.
pub fn reap_dead_infra(
    state: &StateDir,
    lock: &StateLock,
    probe: Probe,
) -> Result<Option<InfraInfo>> {
    match probe {
        Probe::Live(info) => Ok(Some(info)),
        Probe::Unrecorded(info) => {
            log::warn!(
                "{} was unreadable; written again from what supervisor {} says",
                state::INFRA_FILE,
                info.supervisor.pid
            );
            info.save(state)?;
            Ok(Some(info))
        }
        Probe::Absent => {
            // A torn record of a dead infra, or none at all.
            forget_infra_files(state)?;
            Ok(None)
        }
        Probe::Broken(info) => {
            log::warn!(
                "the infra's /run or /var/lib/cni is no longer the state dir's (deleted under it?); replacing the infra, its attachments are lost"
            );
            stop(state, lock, &info)?;
            Ok(None)
        }
        Probe::Dead(info) => {
            log::info!(
                "infra recorded in {} is gone; cleaning up",
                state.path.display()
            );
            kill_and_reap(state, &info);
            forget_infra_files(state)?;
            Ok(None)
        }
        Probe::DeadElsewhere(info) => {
            log::info!(
                "infra recorded in {} (started in PID namespace {}) is gone; cleaning up",
                state.path.display(),
                info.pidns
            );
            // Its PIDs name nothing here, so none is signalled: what it left
            // in its namespaces is found by their inodes, as after any death.
            end_leftovers(state, &info);
            forget_infra_files(state)?;
            Ok(None)
        }
    }
}

/// The live infra after `reap_dead_infra`, with this process joined to
/// the infra's user namespace when it was outside it (`join_infra_userns`),
/// so that the caller can enter the infra's namespaces.
pub fn reap_and_join(state: &StateDir, lock: &StateLock) -> Result<Option<InfraInfo>> {
    let Some(info) = reap_dead_infra(state, lock, InfraInfo::probe(state)?)? else {
        return Ok(None);
    };
    join_infra_userns(state, &info)?;
    Ok(Some(info))
}

/// infra.json is missing or unreadable: a supervisor that still runs says
/// what its infra is. None when no supervisor runs.
fn unrecorded_supervisor(state: &StateDir) -> Result<Option<InfraInfo>> {
    if !supervisor_holds_lock(state, SHUTDOWN_GRACE) {
        return Ok(None);
    }
    let lock = state.file(ALIVE_LOCK);
    let info = control::info(state).map_err(|e| {
        Error::new(
            Kind::UnsafeStateDir,
            format!(
                "an infra supervisor still runs (it holds {}) but {} is unreadable and its control socket does not answer ({}); end that supervisor (`fuser {}` names it), then retry",
                lock.display(),
                state.file(state::INFRA_FILE).display(),
                e.msg,
                lock.display()
            ),
        )
    })?;
    Ok(Some(info))
}

/// A caller whose PID namespace is not the supervisor's cannot tell the
/// infra's processes from others (a PID names another process there, or
/// none): it must neither use nor clean up the infra.
fn other_pid_namespace(state: &StateDir, info: &InfraInfo, mine: u64) -> Error {
    Error::new(
        Kind::UnsafeStateDir,
        format!(
            "state dir {} belongs to an infra started in another PID namespace ({}, ours is {mine}); run this in the PID namespace the infra was started from, or give this runtime its own \"stateDir\"",
            state.path.display(),
            if info.pidns == 0 { "unrecorded".to_string() } else { info.pidns.to_string() },
        ),
    )
}

/// Removes what only a running infra has in the state dir: infra.json and
/// the sockets. A SIGKILLed supervisor could not remove them itself.
/// Callers hold the state lock and have seen no supervisor holding
/// `ALIVE_LOCK` (a new one starts only under the state lock).
fn forget_infra_files(state: &StateDir) -> Result<()> {
    state.remove(ALIVE_LOCK)?;
    state.remove(state::SLIRP_SOCKET)?;
    state.remove(control::SOCKET)?;
    state.remove(state::INFRA_FILE)
}

/// A caller outside the infra's user namespace joins it when it owns it;
/// any other caller must use a state dir of its own. Joining changes the
/// whole (single-threaded) process.
pub fn join_infra_userns(state: &StateDir, info: &InfraInfo) -> Result<()> {
    let mine = procfs::self_ns_inode("user").unwrap_or(0);
    if info.userns == mine {
        return Ok(());
    }
    let elsewhere = || {
        Error::new(
            Kind::UnsafeStateDir,
            format!(
                "state dir {} belongs to the infra of another user namespace ({}, ours is {mine}); give this runtime its own \"stateDir\"",
                state.path.display(),
                info.userns
            ),
        )
    };
    let userns = std::fs::File::open(format!("/proc/{}/ns/user", info.supervisor.pid))
        .map_err(|_| elsewhere())?;
    if procfs::ns_inode(format!("/proc/{}/ns/user", info.supervisor.pid)) != Some(info.userns) {
        return Err(elsewhere());
    }
    crate::userns::join_owned(&std::os::fd::OwnedFd::from(userns), "the infra")
        .map_err(|e| elsewhere().with_details(e.msg))
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
