//! The sandbox: a process that only waits. It is started (by the supervisor)
//! in new network and mount namespaces, which are the infra. Here it makes
//! them fit for the reference plugins, then reports ready.

use super::outbound::Engine;
use super::Settings;
use crate::error::{Context, Result};
use crate::state::{self, StateDir};
use crate::sys;
use nix::mount::{mount, MsFlags};
use std::ffi::OsString;
use std::io::Write;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

pub const ENTRY: &str = "__sandbox";

/// The hidden `__sandbox` command line, as the supervisor builds it: of the
/// infra's settings, only those the namespaces are set up by.
#[derive(Debug, PartialEq, clap::Args)]
pub struct Args {
    #[arg(long)]
    pub state_dir: PathBuf,
    /// The write end of the pipe `spawn_own` waits on.
    #[arg(long)]
    pub ready_fd: i32,
    /// The way out: pasta's needs policy rules here (`refuse_off_path`).
    #[arg(long, value_parser = parse_outbound)]
    pub outbound: Engine,
    #[arg(long)]
    pub ipv6: bool,
    #[arg(long)]
    pub allow_host_loopback: bool,
}

impl Args {
    pub fn new(state: &StateDir, settings: &Settings, ready_fd: i32) -> Self {
        Args {
            state_dir: state.path.clone(),
            ready_fd,
            outbound: settings.outbound,
            ipv6: settings.ipv6,
            allow_host_loopback: settings.allow_host_loopback,
        }
    }

    /// What follows ENTRY on the command line; parses back into `self`.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--state-dir".into(),
            self.state_dir.clone().into(),
            "--ready-fd".into(),
            self.ready_fd.to_string().into(),
            "--outbound".into(),
            self.outbound.name().into(),
        ];
        if self.ipv6 {
            args.push("--ipv6".into());
        }
        if self.allow_host_loopback {
            args.push("--allow-host-loopback".into());
        }
        args
    }
}

fn parse_outbound(name: &str) -> std::result::Result<Engine, String> {
    Engine::from_name(name).ok_or_else(|| format!("{name:?} is not one of slirp4netns, pasta"))
}

/// Entry of the hidden `__sandbox` command.
pub fn main(args: &Args) -> i32 {
    let _ = sys::close_on_exec(args.ready_fd);
    // SAFETY: the supervisor handed us this fd for our exclusive use.
    let ready = unsafe { OwnedFd::from_raw_fd(args.ready_fd) };
    let mut ready = std::fs::File::from(ready);
    match setup(args) {
        Ok(()) => {
            let _ = ready.write_all(b"ok\n");
        }
        Err(e) => {
            let _ = writeln!(ready, "error: sandbox: {e}");
            return 1;
        }
    }
    drop(ready);
    loop {
        nix::unistd::pause();
    }
}

fn setup(args: &Args) -> Result<()> {
    // Nothing we mount may leak back to the caller's mount namespace.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making / private")?;
    // The state dir checked and opened again, its dirs opened from its fd
    // and mounted from theirs: no path is looked up after the check, and
    // the mounts below (the state dir may live under /var/lib or /run)
    // cannot hide it.
    let state = StateDir::at(args.state_dir.clone())?;
    let run = state.open_dir(state::RUN_DIR)?;
    let var_lib_cni = state.open_dir(state::VAR_LIB_CNI_DIR)?;
    // The caller's own mounts on /var/lib and /run (rootless podman binds
    // them from directories of the user's, and deletes those when its
    // last container goes) must not carry the infra's: a mount whose
    // mountpoint is deleted is detached by the kernel in every namespace,
    // and the infra, which outlives the caller, would lose /var/lib/cni
    // and /run. What the caller's user namespace did not mount (the
    // machine's own mounts) is locked and stays.
    // The state dir itself may lie on such a mount (podman binds
    // $XDG_RUNTIME_DIR, /run/user/UID, under its /run; RootlessKit's
    // --copy-up=/run does the same): its dirs are cloned as mounts of
    // their own first, since the kernel binds nothing from a detached
    // mount. A kernel without open_tree keeps the caller's mounts.
    let run_tree = sys::clone_mount(run.as_fd());
    let var_lib_cni_tree = sys::clone_mount(var_lib_cni.as_fd());
    let detach = run_tree.is_some() && var_lib_cni_tree.is_some();
    if detach {
        detach_all("/var/lib/cni");
        detach_all("/var/lib");
    }
    // /run goes last: the overlay that may make room for /var/lib/cni
    // takes its upper dir from the state dir, which may lie under /run,
    // and the kernel refuses an upper dir on a detached mount.
    mount_var_lib_cni(&state, &var_lib_cni, var_lib_cni_tree.as_ref())?;
    if detach {
        detach_all("/run");
    }
    place(&run, run_tree.as_ref(), Path::new("/run"))?;
    sys::loopback_up()?;
    sysctl("net/ipv4/ip_forward", "1")?;
    if args.outbound == Engine::Pasta {
        refuse_off_path(args.ipv6, args.allow_host_loopback)?;
    }
    if args.ipv6 {
        // Forwarding turns off router advertisements unless accept_ra is 2,
        // and slirp4netns's tap0 gets its IPv6 address from one.
        sysctl("net/ipv6/conf/default/accept_ra", "2")?;
        // tap0 is alone on slirp4netns's link: duplicate address detection
        // would only keep its address unusable for the first seconds.
        sysctl("net/ipv6/conf/default/accept_dad", "0")?;
        sysctl("net/ipv6/conf/all/forwarding", "1")?;
    }
    Ok(())
}

/// What pasta would carry to the host's own network although the infra
/// means an address of its own there:
///
/// - the gateway (10.0.2.2, fd00::2) with `--no-map-gw` (no
///   `allowHostLoopback`): not the host's loopback any more, but that
///   address on the host's network;
/// - the DNS forwarder (10.0.2.3, fd00::3): pasta redirects only UDP to
///   port 53 to the nameserver; TCP (DNS over TCP included), pings and
///   other UDP ports would go to whatever has that address on the host's
///   network (slirp4netns answers none of them).
///
/// Policy rules refuse it here, in the infra, for the protocols pasta
/// carries (the infra and its containers get "administratively
/// prohibited" at once). They match on the protocol, so the kernel's own
/// lookups (protocol 0), such as the gateway's when pasta adds the default
/// route, still work, and they outlive pasta's restarts.
fn refuse_off_path(ipv6: bool, allow_host_loopback: bool) -> Result<()> {
    // Below the kernel's 32766 (main) and 32767 (default).
    const DNS_PREF: u32 = 32000;
    use super::outbound::{DNS, DNS6, GATEWAY, GATEWAY6};
    let mut families = vec![("-4", GATEWAY, DNS, "32", "icmp")];
    if ipv6 {
        families.push(("-6", GATEWAY6, DNS6, "128", "ipv6-icmp"));
    }
    let ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .ok_or_else(|| {
            crate::error::Error::internal("no ip command (iproute2) to refuse the gateway with")
        })?;
    for (family, gateway, dns, len, icmp) in families {
        let mut rules = String::new();
        if !allow_host_loopback {
            for proto in ["tcp", "udp", icmp] {
                rules += &format!("rule add to {gateway}/{len} ipproto {proto} prohibit\n");
            }
        }
        for proto in ["tcp", icmp] {
            rules += &format!("rule add to {dns}/{len} ipproto {proto} prohibit\n");
        }
        // UDP but port 53: a port range cannot name 65535, so port 53 is
        // let through by a rule of its own, looked at first.
        rules += &format!(
            "rule add pref {DNS_PREF} to {dns}/{len} ipproto udp dport 53 lookup main\n\
             rule add pref {} to {dns}/{len} ipproto udp prohibit\n",
            DNS_PREF + 1
        );
        let mut child = std::process::Command::new(ip)
            .args([family, "-batch", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("running {ip}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(rules.as_bytes())
                .with_context(|| format!("writing to {ip}"))?;
        }
        let out = child
            .wait_with_output()
            .with_context(|| format!("running {ip}"))?;
        if !out.status.success() {
            return Err(crate::error::Error::internal(format!(
                "refusing traffic to the gateway and the DNS forwarder ({ip} {family} -batch: {}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    Ok(())
}

fn sysctl(key: &str, value: &str) -> Result<()> {
    std::fs::write(format!("/proc/sys/{key}"), value)
        .with_context(|| format!("setting {key} to {value}"))
}

/// Lazily unmounts every mount stacked on `path` (with what is mounted
/// under it), up to the first one we may not unmount: a locked mount of
/// the machine's, or none left.
fn detach_all(path: &str) {
    for _ in 0..32 {
        match nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => log::debug!("sandbox: detached the caller's mount on {path}"),
            Err(_) => return,
        }
    }
}

/// Mounts the dir `dir` is open on at `dst`: its clone when there is one
/// (see `sys::clone_mount`), else a bind from its fd.
fn place(dir: &OwnedFd, tree: Option<&OwnedFd>, dst: &Path) -> Result<()> {
    match tree {
        Some(tree) => sys::move_mount_to(tree, dst).with_context(|| {
            format!(
                "mounting {} on {}",
                sys::fd_path(dir.as_fd()).display(),
                dst.display()
            )
        }),
        None => bind(&sys::fd_path(dir.as_fd()), dst),
    }
}

fn bind(src: &Path, dst: &Path) -> Result<()> {
    mount(Some(src), dst, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .with_context(|| format!("bind-mounting {} on {}", src.display(), dst.display()))
}

/// /var/lib/cni from the state dir. When there is no /var/lib/cni (and
/// the user cannot create it), /var/lib gets an overlay to make room.
fn mount_var_lib_cni(
    state: &StateDir,
    var_lib_cni: &OwnedFd,
    tree: Option<&OwnedFd>,
) -> Result<()> {
    let target = Path::new("/var/lib/cni");
    if !target.is_dir() {
        state.ensure_dir(state::OVERLAY_DIR)?;
        let overlay = state.open_dir(state::OVERLAY_DIR)?;
        let upper = state::dir_in(overlay.as_fd(), "upper")?;
        let work = state::dir_in(overlay.as_fd(), "work")?;
        // The overlay takes paths in a comma-separated list: /proc/self/fd/N
        // names the dirs without the state dir's path (and whatever commas
        // or colons it holds).
        let u = sys::fd_path(upper.as_fd()).display().to_string();
        let w = sys::fd_path(work.as_fd()).display().to_string();
        let opts = format!("lowerdir=/var/lib,upperdir={u},workdir={w}");
        let with_userxattr = format!("{opts},userxattr");
        mount(
            Some("overlay"),
            "/var/lib",
            Some("overlay"),
            MsFlags::empty(),
            Some(opts.as_str()),
        )
        .or_else(|_| {
            mount(
                Some("overlay"),
                "/var/lib",
                Some("overlay"),
                MsFlags::empty(),
                Some(with_userxattr.as_str()),
            )
        })
        .or_else(|e| {
            // The kernel refuses a lower dir with mounts under it that our
            // user namespace may not unmount (a host's /var/lib/docker,
            // /var/lib/kubelet, ...): "failed to clone lowerpath". The
            // inner plugins need nothing of /var/lib but cni: an empty
            // tmpfs then makes the room instead.
            log::info!("sandbox: no overlay on /var/lib ({e}); a tmpfs instead");
            mount(
                Some("tmpfs"),
                "/var/lib",
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some("mode=0755"),
            )
        })
        .context("mounting an overlay (or a tmpfs) on /var/lib to make room for /var/lib/cni")?;
        std::fs::create_dir_all(target).context("creating /var/lib/cni in the overlay")?;
    }
    place(var_lib_cni, tree, target)
}
