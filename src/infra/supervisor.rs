//! The supervisor: stays in the caller's namespaces, starts the sandbox and
//! the way out (slirp4netns or pasta), restarts the way out when it dies,
//! and tears everything down on SIGTERM, when the sandbox dies, or when
//! idle.

use super::outbound::{self, Running};
use super::{control, sandbox, InfraInfo, PortDriver, Settings};
use crate::error::{Error, Kind, Result};
use crate::ports::{self, builtin::Builtin, client_addr, Driver};
use crate::procfs::{self, ProcessId};
use crate::state::{self, StateDir};
use crate::sys;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::ffi::OsString;
use std::io::Write;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

pub const ENTRY: &str = "__supervise";

const SANDBOX_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause before restarting a way out (slirp4netns, pasta) that died, doubled after each
/// failed restart up to RESTART_PAUSE_MAX: a broken one does not spin, and
/// one that can start again (the cause fixed) is back within seconds.
const RESTART_PAUSE: Duration = Duration::from_millis(100);
const RESTART_PAUSE_MAX: Duration = Duration::from_secs(5);
const IDLE_TICK_MS: u16 = 1000;

/// The hidden `__supervise` command line, as `start` builds it.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long)]
    pub state_dir: PathBuf,
    /// The write end of the pipe `spawn_own` waits on.
    #[arg(long)]
    pub ready_fd: i32,
    #[arg(long, value_parser = Settings::from_arg)]
    pub settings: Settings,
}

impl Args {
    pub fn new(state: &StateDir, settings: &Settings, ready_fd: i32) -> Self {
        Args {
            state_dir: state.path.clone(),
            ready_fd,
            settings: settings.clone(),
        }
    }

    /// What follows ENTRY on the command line; parses back into `self`.
    pub fn to_args(&self) -> Vec<OsString> {
        vec![
            "--state-dir".into(),
            self.state_dir.clone().into(),
            "--ready-fd".into(),
            self.ready_fd.to_string().into(),
            "--settings".into(),
            self.settings.to_arg().into(),
        ]
    }
}

struct Supervisor {
    state: StateDir,
    /// Published ports, by the configured driver.
    ports: Box<dyn Driver>,
    control: UnixListener,
    settings: Settings,
    sandbox: Child,
    sandbox_id: ProcessId,
    /// Pins the sandbox: a signal through it never reaches a process that
    /// got its PID after `waitpid(-1)` reaped it. None on kernels < 5.3,
    /// where `sandbox_reaped` alone keeps us from signalling a reaped PID.
    sandbox_pidfd: Option<OwnedFd>,
    sandbox_reaped: bool,
    /// The way out, None while it is down.
    outbound: Option<Running>,
    info: InfraInfo,
    /// Held for the supervisor's lifetime (see `super::ALIVE_LOCK`);
    /// released in `shutdown`, before infra.json goes.
    alive: Option<std::fs::File>,
    /// While the way out is down: when to try again, and the pause after that.
    restart: Option<(Instant, Duration)>,
}

/// Entry of the hidden `__supervise` command.
pub fn main(args: Args) -> i32 {
    // The plugin waits for EOF on this pipe: the sandbox and the way out
    // must not inherit it.
    let _ = sys::close_on_exec(args.ready_fd);
    // SAFETY: the plugin handed us this fd for our exclusive use.
    let mut ready = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(args.ready_fd) });
    let signals = match block_signals() {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(ready, "error: {e}");
            return 1;
        }
    };
    // What the infra makes without an explicit mode is for the user alone
    // whatever umask the runtime had: our control socket, slirp4netns's API
    // socket (either lets its user open host ports as us).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    // Every forwarded connection holds fds: take all the user may have.
    raise_fd_limit();
    let mut sup = match Supervisor::start(args.state_dir, args.settings) {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(ready, "error: {e}");
            return 1;
        }
    };
    let _ = ready.write_all(b"ok\n");
    drop(ready);
    log::info!(
        "infra up: supervisor {}, sandbox {}, {} {:?}",
        sup.info.supervisor.pid,
        sup.info.sandbox.pid,
        sup.settings.outbound.name(),
        sup.info.outbound_process().map(|p| p.pid)
    );
    sup.run(signals);
    0
}

/// Raises the soft RLIMIT_NOFILE to the hard one (the forwarder sizes its
/// bounds from it).
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                log::warn!("raising the fd limit from {soft} to {hard}: {e}");
            }
        }
        _ => {}
    }
}

fn block_signals() -> Result<SignalFd> {
    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        mask.add(s);
    }
    mask.thread_block()?;
    Ok(SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC)?)
}

impl Supervisor {
    fn start(state_dir: PathBuf, settings: Settings) -> Result<Self> {
        let state = StateDir::at(state_dir)?;
        // First: a second supervisor of the same state dir must not start.
        let alive = super::hold_alive_lock(&state)?;
        let (sandbox, sandbox_id) = spawn_sandbox(&state, &settings)?;
        // Our unreaped child: its PID cannot have been reused yet.
        let sandbox_pidfd = sys::pidfd_open(sandbox_id.pid);
        let ns = |kind: &str| procfs::ns_inode(format!("/proc/{}/ns/{kind}", sandbox_id.pid));
        let (Some(netns), Some(mntns)) = (ns("net"), ns("mnt")) else {
            return Err(Error::new(
                Kind::InfraStart,
                "the sandbox vanished after start",
            ));
        };
        let info = InfraInfo {
            supervisor: ProcessId::of(std::process::id() as i32)
                .ok_or_else(|| Error::internal("cannot read our own /proc entry"))?,
            sandbox: sandbox_id,
            netns,
            mntns,
            slirp4netns: None,
            pasta: None,
            userns: procfs::self_ns_inode("user").unwrap_or(0),
            pidns: procfs::self_ns_inode("pid").unwrap_or(0),
            started: state::now_secs(),
            settings: settings.clone(),
            outbound: Default::default(),
            client_addresses: None,
        };
        let ports: Box<dyn Driver> = match settings.port_driver {
            PortDriver::Builtin => {
                let netns = std::fs::File::open(format!("/proc/{}/ns/net", sandbox_id.pid))?;
                Box::new(Builtin::new(
                    OwnedFd::from(netns),
                    settings.forward_limits.to_limits(),
                    settings.ipv6,
                )?)
            }
            PortDriver::Slirp4netns => {
                Box::new(ports::slirp::Slirp::new(state.file(state::SLIRP_SOCKET)))
            }
        };
        let control = control::listen(&state)?;
        let mut sup = Supervisor {
            state,
            ports,
            control,
            settings,
            sandbox,
            sandbox_id,
            sandbox_pidfd,
            sandbox_reaped: false,
            outbound: None,
            info,
            alive: Some(alive),
            restart: None,
        };
        // The routing for clients' addresses is made while the way out
        // starts: neither waits for the other.
        let t0 = Instant::now();
        let setup = (sup.settings.port_driver == PortDriver::Builtin)
            .then(|| client_addr::start_setup(sup.sandbox_id.pid, sup.settings.ipv6));
        let started = sup.start_outbound();
        if let Some(setup) = setup {
            let outbound_ready = t0.elapsed();
            sup.keep_client_addresses(setup.finish());
            log::info!(
                "client addresses: rules made in {:?} ({} was ready after {outbound_ready:?})",
                t0.elapsed(),
                sup.settings.outbound.name()
            );
        }
        if let Err(e) = started {
            sup.kill_children();
            return Err(e);
        }
        Ok(sup)
    }

    /// Records what the infra's start made of clients' addresses, and lets
    /// the forwarder use what works; what does not is logged.
    fn keep_client_addresses(&mut self, outcome: client_addr::ClientAddresses) {
        if let Some(why) = &outcome.error {
            log::warn!(
                "published ports: containers will not see every client's own address: {why}; {}",
                outcome.describe(self.settings.ipv6)
            );
        }
        self.ports.keep_client_addresses(outcome.kept);
        self.info.client_addresses = Some(outcome);
        if let Err(e) = self.info.save(&self.state) {
            log::warn!("recording the client addresses: {e}");
        }
    }

    fn start_outbound(&mut self) -> Result<()> {
        let socket = self.state.file(state::SLIRP_SOCKET);
        let _ = self.state.remove(state::SLIRP_SOCKET);
        let running = outbound::start(&outbound::Options {
            sandbox_pid: self.sandbox_id.pid,
            settings: &self.settings,
            api_socket: &socket,
        })?;
        self.info.set_outbound_process(Some(running.id));
        self.outbound = Some(running);
        // The slirp4netns driver's forwards died with slirp4netns; the
        // builtin driver's live in our own process and need nothing.
        self.ports.slirp_restarted(&socket);
        if self.info.outbound.down.take().is_some() {
            self.info.outbound.restarts += 1;
        }
        // The way out runs: a record we could not write must not count as
        // a failed start, which would start a second one beside it.
        if let Err(e) = self.info.save(&self.state) {
            log::warn!(
                "recording the restarted {}: {e}",
                self.settings.outbound.name()
            );
        }
        Ok(())
    }

    fn run(&mut self, signals: SignalFd) {
        let mut idle_since: Option<Instant> = None;
        loop {
            self.restart_outbound_if_due();
            let idle_tick = self.settings.idle_timeout_secs.map(|_| IDLE_TICK_MS);
            let restart_in = self.restart.map(|(at, _)| {
                // Rounded up, so the wake-up is never early (no busy loop).
                let left = at.saturating_duration_since(Instant::now()).as_millis() + 1;
                u16::try_from(left).unwrap_or(u16::MAX)
            });
            let timeout = match (idle_tick, restart_in) {
                (Some(a), Some(b)) => nix::poll::PollTimeout::from(a.min(b)),
                (Some(t), None) | (None, Some(t)) => nix::poll::PollTimeout::from(t),
                (None, None) => nix::poll::PollTimeout::NONE,
            };
            let mut fds = [
                nix::poll::PollFd::new(signals.as_fd(), nix::poll::PollFlags::POLLIN),
                nix::poll::PollFd::new(self.control.as_fd(), nix::poll::PollFlags::POLLIN),
            ];
            let polled = nix::poll::poll(&mut fds, timeout);
            let control_ready = fds[1].any().unwrap_or(false);
            if control_ready {
                control::serve_one(&self.control, self.ports.as_mut(), &self.info);
            }
            match polled {
                Ok(0) => {
                    if self.idle_expired(&mut idle_since) {
                        return;
                    }
                    continue;
                }
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    log::error!("poll: {e}; stopping the infra");
                    self.shutdown();
                    return;
                }
            }
            if control_ready && !fds[0].any().unwrap_or(false) {
                continue;
            }
            let Ok(Some(sig)) = signals.read_signal() else {
                continue;
            };
            match Signal::try_from(sig.ssi_signo as i32) {
                Ok(Signal::SIGCHLD) => {
                    if !self.reap_children() {
                        return;
                    }
                }
                Ok(s) => {
                    log::info!("{s}: stopping the infra");
                    self.shutdown();
                    return;
                }
                Err(_) => {}
            }
        }
    }

    /// Reaps what exited. False when the sandbox died: the infra is gone.
    fn reap_children(&mut self) -> bool {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return true,
                Ok(status) => {
                    let Some(pid) = status.pid() else { return true };
                    if pid.as_raw() == self.sandbox_id.pid {
                        self.sandbox_reaped = true;
                        log::error!("sandbox exited ({status:?}); the infra is gone");
                        self.shutdown();
                        return false;
                    }
                    if Some(pid.as_raw()) == self.info.outbound_process().map(|p| p.pid) {
                        let engine = self.settings.outbound.name();
                        log::warn!("{engine} exited ({status:?}); restarting it");
                        self.outbound_down(format!("{engine} exited ({status:?})"));
                    }
                }
            }
        }
    }

    /// Records the way out as down (so STATUS, CHECK and `status` say so)
    /// and schedules the first restart.
    fn outbound_down(&mut self, why: String) {
        self.outbound = None;
        self.info.set_outbound_process(None);
        self.info.outbound.down = Some(outbound::Down {
            since: state::now_secs(),
            failed_restarts: 0,
            error: why,
        });
        if let Err(e) = self.info.save(&self.state) {
            log::error!(
                "recording that {} is down: {e}",
                self.settings.outbound.name()
            );
        }
        self.restart = Some((Instant::now() + RESTART_PAUSE, RESTART_PAUSE));
    }

    /// Tries to restart the way out when a restart is due; after a failure,
    /// schedules the next try with a doubled pause, and never gives up
    /// while the infra runs.
    fn restart_outbound_if_due(&mut self) {
        let Some((at, pause_done)) = self.restart else {
            return;
        };
        if Instant::now() < at {
            return;
        }
        let engine = self.settings.outbound.name();
        match self.start_outbound() {
            Ok(()) => {
                self.restart = None;
                log::info!(
                    "{engine} restarted (pid {:?})",
                    self.info.outbound_process().map(|p| p.pid)
                );
            }
            Err(e) => {
                let next = (pause_done * 2).min(RESTART_PAUSE_MAX);
                log::error!(
                    "restarting {engine}: {e}; trying again in {}ms",
                    next.as_millis()
                );
                if let Some(down) = self.info.outbound.down.as_mut() {
                    down.failed_restarts += 1;
                    down.error = format!("last restart: {}", e.msg);
                }
                if let Err(e) = self.info.save(&self.state) {
                    log::error!("recording the failed restart: {e}");
                }
                self.restart = Some((Instant::now() + next, next));
            }
        }
    }

    /// With an idle timeout, stops the infra once no attachment was seen for
    /// that long. Only when the lock is free, so never under a running call.
    fn idle_expired(&mut self, idle_since: &mut Option<Instant>) -> bool {
        let Some(secs) = self.settings.idle_timeout_secs else {
            return false;
        };
        let Ok(Some(lock)) = self.state.try_lock() else {
            return false;
        };
        match self.state.has_attachments(&lock) {
            Ok(false) => {}
            _ => {
                *idle_since = None;
                return false;
            }
        }
        let since = *idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() < Duration::from_secs(secs) {
            return false;
        }
        log::info!("idle for {secs}s: stopping the infra");
        self.shutdown();
        let _ = self.state.remove(state::INFRA_FILE);
        // Released in shutdown; under the state lock no caller looks at it.
        let _ = self.state.remove(super::ALIVE_LOCK);
        drop(lock);
        true
    }

    fn shutdown(&mut self) {
        self.kill_children();
        self.ports.close_all();
        let _ = self.state.remove(state::SLIRP_SOCKET);
        let _ = self.state.remove(control::SOCKET);
        // Nothing of the infra runs any more.
        self.alive = None;
    }

    /// The sandbox first, then what else runs in the infra's namespaces (an
    /// inner plugin's daemon outlives the sandbox), so they die with them.
    fn kill_children(&mut self) {
        // std's Child does not know when `waitpid(-1)` reaped it, and would
        // signal the (maybe reused) PID: only an unreaped sandbox is killed.
        if !self.sandbox_reaped {
            match &self.sandbox_pidfd {
                Some(fd) => drop(sys::pidfd_send_signal(fd, Signal::SIGKILL)),
                None => drop(self.sandbox.kill()),
            }
            let _ = self.sandbox.wait();
            self.sandbox_reaped = true;
        }
        super::end_leftovers(&self.state, &self.info);
        if let Some(mut out) = self.outbound.take() {
            let _ = out.child.kill();
            let _ = out.child.wait();
        }
    }
}

/// The sandbox is our own binary, exec'd after `unshare` of the network and
/// mount namespaces; it dies with us.
fn spawn_sandbox(state: &StateDir, settings: &Settings) -> Result<(Child, ProcessId)> {
    let parent = nix::unistd::getpid();
    // SAFETY: prctl, getppid and unshare are async-signal-safe and
    // allocate nothing.
    let child = unsafe {
        super::spawn_own(
            sandbox::ENTRY,
            |ready_fd| sandbox::Args::new(state, settings, ready_fd).to_args(),
            |_| {},
            move || {
                sys::die_with_parent(parent)?;
                let flags =
                    nix::sched::CloneFlags::CLONE_NEWNET | nix::sched::CloneFlags::CLONE_NEWNS;
                nix::sched::unshare(flags).map_err(std::io::Error::from)
            },
            SANDBOX_TIMEOUT,
        )
    }?;
    let id = ProcessId::of(child.id() as i32)
        .ok_or_else(|| Error::new(Kind::InfraStart, "the sandbox exited during setup"))?;
    Ok((child, id))
}
