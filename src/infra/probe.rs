//! What the state dir says of its infra, found without changing anything
//! (`InfraInfo::probe`), and acting on it apart (`reap_dead_infra`:
//! what a dead infra left, a broken one, an unreadable record;
//! `join_infra_userns`). The supervisor's lifetime lock (`ALIVE_LOCK`)
//! says whether one runs, whatever infra.json says.

use super::{control, end_leftovers, kill_and_reap, stop, InfraInfo};
use crate::error::{Error, Kind, Result};
use crate::procfs;
use crate::state::{self, StateDir, StateLock};
use crate::sys;
use std::time::{Duration, Instant};

/// Held (flock) by the supervisor for as long as it runs, released by the
/// kernel when it dies however it dies: whether an infra still runs does not
/// depend on infra.json being readable, nor on its PIDs being visible from
/// the caller's PID namespace.
pub const ALIVE_LOCK: &str = "infra.lck";

/// How long a caller waits for a supervisor that is shutting down to let go
/// of the lock (its own teardown waits up to STOP_TIMEOUT for leftovers).
pub(super) const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

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
pub(super) fn supervisor_holds_lock(state: &StateDir, wait: Duration) -> bool {
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
pub(super) fn forget_infra_files(state: &StateDir) -> Result<()> {
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
