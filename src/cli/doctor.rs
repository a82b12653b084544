//! `doctor`: every prerequisite, checked, with the fix for each failure.

use super::DEFAULT_CNI_PATH;
use crate::infra::prereq::{can_start_infra, find_in_path};
use crate::infra::Probe;
use crate::state::StateDir;
use serde_json::json;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
    fix: String,
}

pub fn doctor(state_dir: Option<PathBuf>, as_json: bool) -> i32 {
    let checks = vec![
        user_namespaces(),
        inside_user_namespace(),
        sub_ids(),
        tun(),
        outbound(state_dir.as_deref()),
        program(
            "iptables",
            &["iptables", "/usr/sbin/iptables", "/sbin/iptables"],
            "apt-get install iptables",
        ),
        program(
            "ip",
            &["ip", "/usr/sbin/ip", "/sbin/ip", "/bin/ip"],
            "apt-get install iproute2",
        ),
        reference_plugins(),
        runtime_dir(state_dir.clone()),
        namespaces(),
        client_addresses(state_dir),
    ];
    let failed = checks.iter().filter(|c| !c.ok).count();
    if as_json {
        let list: Vec<_> = checks
            .iter()
            .map(|c| json!({"check": c.name, "ok": c.ok, "detail": c.detail, "fix": c.fix}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "checks": list, "failed": failed }))
                .unwrap_or_default()
        );
    } else {
        for c in &checks {
            println!(
                "{:<4} {:<22} {}",
                if c.ok { "ok" } else { "FAIL" },
                c.name,
                c.detail
            );
            if !c.ok {
                println!("     {:<22} fix: {}", "", c.fix);
            }
        }
        match failed {
            0 => println!("\nall {} checks passed", checks.len()),
            n => println!("\n{n} of {} checks failed", checks.len()),
        }
    }
    i32::from(failed > 0)
}

fn check(name: &'static str, result: Result<String, (String, String)>) -> Check {
    match result {
        Ok(detail) => Check {
            name,
            ok: true,
            detail,
            fix: String::new(),
        },
        Err((detail, fix)) => Check {
            name,
            ok: false,
            detail,
            fix,
        },
    }
}

/// Whether the running infra lets containers see their clients' addresses
/// (builtin port driver); without an infra there is nothing to look at yet.
fn client_addresses(state_dir: Option<PathBuf>) -> Check {
    // A check only looks: a dead infra is left for the next call to reap.
    let running = || {
        let state = super::open_state(state_dir).ok()??;
        match crate::infra::InfraInfo::probe(&state).ok()? {
            Probe::Live(info) | Probe::Unrecorded(info) => Some(info),
            _ => None,
        }
    };
    let fix = "the kernel must give the infra IP_TRANSPARENT, policy routing and the CONNMARK target with the connmark and mark matches (xt_connmark, xt_mark); ip (iproute2) and iptables-restore must be installed; then `rootless-cni stop` and the next ADD starts an infra that uses them (infra.log says what failed)";
    check(
        "client addresses",
        match running() {
            None => Ok("no infra running: set up when one starts (`status` says)".into()),
            Some(i) => match (i.settings.port_driver, &i.client_addresses) {
                (crate::infra::PortDriver::Slirp4netns, _) => {
                    Ok("kept by the slirp4netns port driver".into())
                }
                (_, Some(c)) if c.complete(i.settings.ipv6) => Ok(c.describe(i.settings.ipv6)),
                (_, Some(c)) => Err((c.describe(i.settings.ipv6), fix.into())),
                (_, None) => Ok("not recorded by the running infra (an older release)".into()),
            },
        },
    )
}

fn read_sysctl(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn user_namespaces() -> Check {
    let max = read_sysctl("/proc/sys/user/max_user_namespaces");
    let debian = read_sysctl("/proc/sys/kernel/unprivileged_userns_clone");
    let apparmor = read_sysctl("/proc/sys/kernel/apparmor_restrict_unprivileged_userns");
    check("user namespaces", match (max.as_deref(), debian.as_deref(), apparmor.as_deref()) {
        (Some("0"), _, _) => Err(("user.max_user_namespaces is 0".into(), "sysctl -w user.max_user_namespaces=15000 (as root)".into())),
        (_, Some("0"), _) => Err(("kernel.unprivileged_userns_clone is 0".into(), "sysctl -w kernel.unprivileged_userns_clone=1 (as root)".into())),
        (_, _, Some("1")) => Err((
            "AppArmor restricts unprivileged user namespaces".into(),
            "give the runtime an AppArmor profile that allows userns, or sysctl -w kernel.apparmor_restrict_unprivileged_userns=0".into(),
        )),
        _ => Ok(format!("allowed (max {})", max.unwrap_or_else(|| "?".into()))),
    })
}

/// Whether we run as an ordinary user in the initial user namespace: the
/// user's own shell, not where a rootless runtime runs its plugins.
fn from_users_shell() -> bool {
    let map = std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
    let initial = map.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"];
    initial && !nix::unistd::geteuid().is_root()
}

/// The note both namespace checks carry when run from the user's shell:
/// they test what a runtime's user namespace would give, not the shell.
const FROM_SHELL: &str = "(from your shell: rootless runtimes run the plugin inside their own user namespace, never in your shell's; `podman unshare rootless-cni doctor` checks from inside podman's)";

/// The plugin must run where the runtime's user namespace makes it root.
/// From the user's shell that is never so, and need not be: a rootless
/// runtime calls the plugin inside its user namespace. Then what matters is
/// that such a namespace can be made, which is checked instead.
fn inside_user_namespace() -> Check {
    let map = std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
    let initial = crate::userns::in_initial_user_namespace();
    check(
        "in a user namespace",
        if from_users_shell() {
            match probe_namespaces(true) {
                Ok(()) => Ok(format!("not here, but a user namespace can be made {FROM_SHELL}")),
                Err(e) => Err((
                    format!("not here, and a user namespace cannot be made: {e}"),
                    "see the user namespaces check; the plugin must be called inside a user namespace (rootless podman, rootlesskit, unshare -Ur)".into(),
                )),
            }
        } else if initial {
            Ok("real root: rootless-cni works, but a rootful runtime does not need it".into())
        } else {
            Ok(format!(
                "uid map: {}",
                map.split_whitespace().collect::<Vec<_>>().join(" ")
            ))
        },
    )
}

/// Whether a child can make network and mount namespaces, in a new user
/// namespace of its own when `in_new_userns` (what a rootless runtime has).
fn probe_namespaces(in_new_userns: bool) -> Result<(), String> {
    use nix::sched::CloneFlags;
    use std::os::unix::process::CommandExt;
    let mut flags = CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWNS;
    if in_new_userns {
        flags |= CloneFlags::CLONE_NEWUSER;
    }
    let mut probe = std::process::Command::new("/bin/true");
    probe
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: runs between fork and exec; unshare is async-signal-safe.
    unsafe {
        probe.pre_exec(move || nix::sched::unshare(flags).map_err(std::io::Error::from));
    }
    match probe.status() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("unshare failed ({s})")),
        Err(e) => Err(format!("unshare failed: {e}")),
    }
}

fn sub_ids() -> Check {
    let uid = outside_uid();
    let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name);
    let listed = |file: &str| {
        std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .any(|l| {
                let owner = l.split(':').next().unwrap_or("");
                owner == uid.to_string() || Some(owner) == name.as_deref()
            })
    };
    check(
        "subuid/subgid",
        if uid == 0 || (listed("/etc/subuid") && listed("/etc/subgid")) {
            Ok(format!("uid {uid} has ranges (or is root)"))
        } else {
            Err((
            format!("uid {uid} has no range in /etc/subuid and /etc/subgid; rootless runtimes need one"),
            format!("usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {}", name.unwrap_or_else(|| uid.to_string())),
        ))
        },
    )
}

/// Our uid as the machine sees it, through the user namespace's map.
fn outside_uid() -> u32 {
    crate::userns::outside_uid(nix::unistd::getuid().as_raw())
}

fn tun() -> Check {
    check("/dev/net/tun", match std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun") {
        Ok(_) => Ok("can be opened".into()),
        Err(e) => Err((
            format!("cannot open it: {e}"),
            "slirp4netns and pasta need it: a desktop distribution makes it 0666; as root: chmod 0666 /dev/net/tun (or a udev rule)".into(),
        )),
    })
}

/// The way out the namespace checks take: slirp4netns (the default) unless
/// only pasta is installed.
fn installed_engine() -> crate::infra::outbound::Engine {
    use crate::infra::outbound::Engine;
    match find_in_path("slirp4netns") {
        None if find_in_path("pasta").is_some() => Engine::Pasta,
        _ => Engine::Slirp4netns,
    }
}

/// The ways out installed, and which one the running infra uses (a
/// network's `outbound` picks it; slirp4netns by default).
fn outbound(state_dir: Option<&Path>) -> Check {
    use crate::infra::{outbound, InfraInfo};
    let found =
        |p: &str| find_in_path(p).map_or("not installed".to_string(), |f| f.display().to_string());
    let installed = format!(
        "slirp4netns: {}; pasta: {}",
        found("slirp4netns"),
        found("pasta")
    );
    let running = StateDir::resolve(state_dir)
        .ok()
        .and_then(|path| StateDir::open_existing(path).ok().flatten())
        .and_then(|state| InfraInfo::load(&state))
        .filter(InfraInfo::is_alive);
    match running {
        Some(info) => {
            let engine = info.settings.outbound.name();
            match outbound::outbound_down(&info) {
                None => check(
                    "outbound",
                    Ok(format!(
                        "the running infra's way out is {engine} (pid {}); {installed}",
                        info.outbound_process().map_or(0, |p| p.pid)
                    )),
                ),
                Some(why) => check(
                    "outbound",
                    Err((
                        format!("{why}; {installed}"),
                        format!("see infra.log in the state dir; is {engine} installed and working?"),
                    )),
                ),
            }
        }
        None if find_in_path("slirp4netns").is_some() || find_in_path("pasta").is_some() => check(
            "outbound",
            Ok(format!(
                "no infra running; {installed} (a network's \"outbound\" picks one, slirp4netns by default)"
            )),
        ),
        None => check(
            "outbound",
            Err((
                format!("neither slirp4netns nor pasta is installed ({installed})"),
                "apt-get install slirp4netns (or passt, for \"outbound\": \"pasta\")".into(),
            )),
        ),
    }
}

fn program(name: &'static str, candidates: &[&str], fix: &str) -> Check {
    let found = candidates.iter().find_map(|c| {
        if c.starts_with('/') {
            Path::new(c).is_file().then(|| PathBuf::from(c))
        } else {
            find_in_path(c)
        }
    });
    check(
        name,
        match found {
            Some(p) => Ok(p.display().to_string()),
            None => Err((format!("{name} not found"), fix.to_string())),
        },
    )
}

fn reference_plugins() -> Check {
    let path = std::env::var("CNI_PATH").unwrap_or_else(|_| DEFAULT_CNI_PATH.into());
    let dirs: Vec<PathBuf> = path
        .split(':')
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .collect();
    let missing: Vec<&str> = ["bridge", "host-local", "portmap", "firewall", "tuning"]
        .into_iter()
        .filter(|p| crate::exec::find_plugin(p, &dirs).is_err())
        .collect();
    check(
        "reference plugins",
        if missing.is_empty() {
            Ok(format!(
                "bridge, host-local, portmap, firewall, tuning in {path}"
            ))
        } else {
            Err((
                format!("missing in {path}: {}", missing.join(", ")),
                "apt-get install containernetworking-plugins (or set CNI_PATH)".into(),
            ))
        },
    )
}

fn runtime_dir(state_dir: Option<PathBuf>) -> Check {
    let resolved = StateDir::resolve(state_dir.as_deref());
    check(
        "state dir",
        match resolved {
            Err(e) => Err((
                e.msg,
                "export XDG_RUNTIME_DIR=/run/user/$(id -u) (a 0700 dir of yours), or set stateDir"
                    .into(),
            )),
            Ok(path) => {
                let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
                match std::fs::metadata(&parent) {
                    Err(e) => Err((
                        format!("{}: {e}", parent.display()),
                        format!("mkdir -m 0700 {}", parent.display()),
                    )),
                    Ok(m) if m.uid() != nix::unistd::geteuid().as_raw() => Err((
                        format!(
                            "{} is owned by uid {}, not by us",
                            parent.display(),
                            m.uid()
                        ),
                        "use a runtime dir of your own".into(),
                    )),
                    Ok(_) => Ok(path.display().to_string()),
                }
            }
        },
    )
}

fn namespaces() -> Check {
    if from_users_shell() {
        // can_start_infra would fail here by design; check what a rootless
        // runtime's user namespace gives the plugin instead.
        return check(
            "namespaces",
            match can_start_infra_in_userns() {
                Ok(()) => Ok(format!(
                    "network and mount namespaces can be created in a user namespace {FROM_SHELL}"
                )),
                Err(msg) => Err((msg, "see the checks above".into())),
            },
        );
    }
    check(
        "namespaces",
        match can_start_infra(installed_engine()) {
            Ok(()) => Ok("network and mount namespaces can be created".into()),
            Err(msg) => Err((msg, "see the checks above".into())),
        },
    )
}

/// `can_start_infra`'s checks as they would go in a new user namespace.
fn can_start_infra_in_userns() -> Result<(), String> {
    crate::infra::prereq::engine_in_path(installed_engine())?;
    probe_namespaces(true).map_err(|e| {
        format!("cannot create network and mount namespaces in a new user namespace: {e}")
    })
}
