//! What starting an infra needs of the host (its way out in PATH,
//! /dev/net/tun, new network and mount namespaces), checked without
//! starting one: for the STATUS verb and `doctor`.

use std::os::unix::process::CommandExt;

/// What starting the infra needs, checked without starting it.
pub fn can_start_infra(engine: crate::infra::outbound::Engine) -> std::result::Result<(), String> {
    engine_in_path(engine)?;
    let name = engine.name();
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| format!("cannot open /dev/net/tun ({e}); {name} needs it"))?;
    let mut probe = std::process::Command::new("/bin/true");
    // SAFETY: runs between fork and exec; unshare is async-signal-safe.
    unsafe {
        probe.pre_exec(|| {
            nix::sched::unshare(
                nix::sched::CloneFlags::CLONE_NEWNET | nix::sched::CloneFlags::CLONE_NEWNS,
            )
            .map_err(std::io::Error::from)
        });
    }
    match probe.status() {
        Ok(s) if s.success() => Ok(()),
        Ok(_) | Err(_) => Err(
            "cannot create network and mount namespaces here: run the runtime inside a user namespace (rootless podman, rootlesskit, unshare -Ur)"
                .into(),
        ),
    }
}

/// The way out `engine` is in PATH, or what to install.
pub fn engine_in_path(engine: crate::infra::outbound::Engine) -> std::result::Result<(), String> {
    let (name, package) = match engine {
        crate::infra::outbound::Engine::Slirp4netns => ("slirp4netns", "slirp4netns"),
        crate::infra::outbound::Engine::Pasta => ("pasta", "passt"),
    };
    find_in_path(name).map(drop).ok_or(format!(
        "{name} is not in PATH (Debian/Ubuntu: apt-get install {package})"
    ))
}

pub fn find_in_path(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|f| f.is_file())
        })
        .unwrap_or(None)
}
