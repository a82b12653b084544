//! Emergency cleanup (Ctrl-C, or a panic when panics abort): what is recorded
//! here (pids, lab uids, dirs) is undone by `run`.

use lab::{kill_processes_of, sigkill};
use std::fs;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::thread;
use std::time::Duration;

#[derive(Default)]
pub(crate) struct Leftovers {
    pub uid: Option<u32>,
    /// Labs of other phases (their own uids).
    pub more_uids: Vec<u32>,
    pub dirs: Vec<PathBuf>,
    pub pids: Vec<u32>,
}

pub(crate) static LEFTOVERS: Mutex<Leftovers> = Mutex::new(Leftovers {
    uid: None,
    more_uids: Vec::new(),
    dirs: Vec::new(),
    pids: Vec::new(),
});

pub(crate) fn with<R>(f: impl FnOnce(&mut Leftovers) -> R) -> R {
    let mut l = LEFTOVERS.lock().unwrap_or_else(|e| e.into_inner());
    f(&mut l)
}

/// The write end of the self-pipe the signal handler writes to.
pub(crate) static SIGNAL_PIPE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    let b = sig as u8;
    // SAFETY: write(2) is async-signal-safe; b lives for the call.
    unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
}

/// SIGINT/SIGTERM/SIGHUP: undo what is recorded, then exit. A handler
/// (reset to the default by exec) and a self-pipe, not a blocked mask:
/// a blocked mask is inherited by every process we start.
pub(crate) fn install() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let Ok((r, w)) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) else {
        return;
    };
    SIGNAL_PIPE.store(w.as_raw_fd(), Ordering::Relaxed);
    std::mem::forget(w);
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only calls write(2).
        let _ = unsafe { sigaction(s, &action) };
    }
    thread::spawn(move || {
        let mut b = [0u8; 1];
        if let Ok(1) = fs::File::from(r).read(&mut b) {
            eprintln!("bench: signal {}: cleaning up", b[0]);
            run();
            std::process::exit(130);
        }
    });
    if cfg!(panic = "abort") {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default(info);
            run();
        }));
    }
}

/// Kills recorded pids and every process of the lab uid, removes the
/// lab dir.
pub(crate) fn run() {
    let l = with(std::mem::take);
    for pid in &l.pids {
        sigkill(*pid);
    }
    for uid in l.uid.into_iter().chain(l.more_uids.iter().copied()) {
        kill_processes_of(uid, Duration::from_secs(5));
    }
    for dir in &l.dirs {
        let _ = fs::remove_dir_all(dir);
    }
}
