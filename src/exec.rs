//! Running an inner plugin inside the infra: `setns` into the sandbox's
//! mount and network namespaces between fork and exec. The container netns
//! is opened here, in the caller's namespaces, and inherited as a fd, so no
//! path has to be visible inside the infra.

use crate::cni::env::Verb;
use crate::error::{code, Error, Result};
use crate::infra::InfraInfo;
use crate::procfs::{self, ProcessId};
use crate::sys;
use nix::sched::{setns, CloneFlags};
use serde_json::Value;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Handles on the infra's namespaces, checked against infra.json.
pub struct InfraNs {
    net: OwnedFd,
    mnt: OwnedFd,
    /// `/proc/<our pid>/root` when that names our root from inside the
    /// infra too: the prefix of CNI_PATH entries the infra sees otherwise.
    caller_root: Option<String>,
    /// `/proc/<sandbox pid>/root`: the infra's view of the file system.
    infra_root: String,
}

impl InfraNs {
    pub fn open(info: &InfraInfo) -> Result<Self> {
        let open = |kind: &str, want: u64| -> Result<OwnedFd> {
            let path = format!("/proc/{}/ns/{kind}", info.sandbox.pid);
            let file = std::fs::File::open(&path).map_err(|e| {
                Error::internal(format!("opening the infra's {kind} namespace {path}: {e}"))
            })?;
            if file.metadata()?.ino() != want {
                return Err(Error::internal(format!(
                    "the infra's {kind} namespace changed under us (sandbox {} is gone)",
                    info.sandbox.pid
                )));
            }
            Ok(OwnedFd::from(file))
        };
        Ok(InfraNs {
            net: open("net", info.netns)?,
            mnt: open("mnt", info.mntns)?,
            caller_root: caller_root_seen_from(info.sandbox.pid),
            infra_root: format!("/proc/{}/root", info.sandbox.pid),
        })
    }
}

/// `/proc/<our pid>/root`, if the infra's /proc shows that pid in our mount
/// namespace (a caller in another PID namespace would be someone else
/// there, or no one; in our mount namespace it resolves the same paths).
fn caller_root_seen_from(sandbox: i32) -> Option<String> {
    let me = std::process::id();
    let inside = format!("/proc/{sandbox}/root/proc/{me}/ns/mnt");
    let ino = |p: &str| std::fs::metadata(p).map(|m| m.ino()).ok();
    match (ino(&inside), ino("/proc/self/ns/mnt")) {
        (Some(a), Some(b)) if a == b => Some(format!("/proc/{me}/root")),
        _ => {
            log::warn!(
                "our pid {me} is not us inside the infra: the inner plugins get CNI_PATH as it is"
            );
            None
        }
    }
}

impl InfraNs {
    /// What to exec for `binary` once inside the infra: its absolute path
    /// when the infra sees the very file the caller found there (a script
    /// plugin then sees its own path as $0), else the caller's fd of it:
    /// /proc/self is the child when it execs, whatever the infra's mount
    /// namespace holds at that path.
    fn program(&self, binary: &PluginBinary) -> PathBuf {
        let by_fd = PathBuf::from(format!("/proc/self/fd/{}", binary.fd.as_raw_fd()));
        let Ok(cwd) = std::env::current_dir() else {
            return by_fd;
        };
        let absolute = cwd.join(&binary.path);
        let inside = absolute.strip_prefix("/").unwrap_or(&absolute);
        let id = |m: std::fs::Metadata| (m.dev(), m.ino());
        let ours = binary
            .fd
            .try_clone()
            .ok()
            .and_then(|fd| std::fs::File::from(fd).metadata().ok())
            .map(id);
        let theirs = std::fs::metadata(Path::new(&self.infra_root).join(inside))
            .ok()
            .map(id);
        match ours.is_some() && ours == theirs {
            true => absolute,
            false => by_fd,
        }
    }

    /// Makes `cmd` start inside the infra: `setns` into its mount and
    /// network namespaces between fork and exec. `keep` are the fds to pass
    /// on; every other fd the caller had without CLOEXEC (the runtime's)
    /// is closed on exec: an inner plugin may start a daemon (dnsname's
    /// dnsmasq) that would hold it as long as the infra lives.
    pub fn enter(&self, cmd: &mut Command, keep: [Option<std::os::fd::RawFd>; 2]) {
        let (net, mnt) = (self.net.as_raw_fd(), self.mnt.as_raw_fd());
        // SAFETY: runs between fork and exec in the single-threaded child;
        // join_namespaces, close_range and fcntl are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                join_namespaces(mnt, net)?;
                sys::cloexec_inherited_fds()?;
                for fd in keep.into_iter().flatten() {
                    sys::keep_on_exec(fd)?;
                }
                Ok(())
            });
        }
    }
}

/// Joins the mount namespace `mnt`, then the network namespace `net` (both
/// fds), and moves to `/` of the new mount namespace: what makes a process
/// run inside the infra. Meant for `pre_exec`: setns into a mount namespace
/// needs a single-threaded caller, and nothing here allocates.
pub fn join_namespaces(mnt: std::os::fd::RawFd, net: std::os::fd::RawFd) -> std::io::Result<()> {
    use std::os::fd::BorrowedFd;
    // SAFETY: the caller keeps both fds open until it has exec'd.
    let (mnt, net) = unsafe { (BorrowedFd::borrow_raw(mnt), BorrowedFd::borrow_raw(net)) };
    setns(mnt.as_fd(), CloneFlags::CLONE_NEWNS).map_err(std::io::Error::from)?;
    setns(net.as_fd(), CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
    nix::unistd::chdir("/").map_err(std::io::Error::from)
}

/// The runtime's container netns, and the name inner plugins know it by.
pub struct ContainerNetns {
    /// What the runtime gave us as CNI_NETNS.
    pub runtime_path: Option<PathBuf>,
    fd: Option<OwnedFd>,
}

impl ContainerNetns {
    /// Opens the netns for ADD and CHECK, where it must exist.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| {
            Error::env(format!("CNI_NETNS {}: cannot open it: {e}", path.display()))
        })?;
        check_owned_by_our_userns(&file, path)?;
        Ok(ContainerNetns {
            runtime_path: Some(path.to_path_buf()),
            fd: Some(OwnedFd::from(file)),
        })
    }

    /// For DEL and GC: the netns may be gone, or not given at all. With
    /// `attached`, the inode of the netns the attachment was made in, a
    /// path that now names another netns (`/proc/PID/ns/net` of a reused
    /// PID) counts as gone too: the inner DEL must never run in a
    /// stranger's netns.
    pub fn open_if_present(path: Option<&Path>, attached: Option<u64>) -> Self {
        // A path that is no longer a netns (the runtime unmounted it and
        // left the file) is as gone as a missing one.
        let fd = path
            .and_then(|p| std::fs::File::open(p).ok())
            .filter(is_netns)
            .filter(|f| match (attached, f.metadata()) {
                (None, _) => true,
                (Some(ino), Ok(m)) if m.ino() == ino => true,
                (Some(ino), found) => {
                    let found = found.map(|m| m.ino().to_string());
                    log::warn!(
                        "{}: netns inode {found:?}, attached in {ino}: not the container's; \
                         the inner DEL runs without a netns",
                        path.unwrap_or(Path::new("")).display()
                    );
                    false
                }
            })
            .map(OwnedFd::from);
        ContainerNetns {
            runtime_path: path.map(Path::to_path_buf),
            fd,
        }
    }

    /// CNI_NETNS as the inner plugins see it.
    pub fn inner_path(&self) -> String {
        match &self.fd {
            Some(fd) => format!("/proc/self/fd/{}", fd.as_raw_fd()),
            // Gone (or never given): DEL without a netns, which the spec
            // allows and the plugins take as "clean up what is outside it".
            // The runtime's path would not do: inside the infra's mount
            // namespace it may not exist, or be something else.
            None => String::new(),
        }
    }

    pub fn inode(&self) -> Option<u64> {
        let fd = self.fd.as_ref()?.try_clone().ok()?;
        std::fs::File::from(fd).metadata().ok().map(|m| m.ino())
    }

    pub fn runtime_str(&self) -> String {
        self.runtime_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }
}

fn is_netns(file: &std::fs::File) -> bool {
    let nsfs = nix::sys::statfs::FsType(libc::NSFS_MAGIC as _);
    nix::sys::statfs::fstatfs(file).is_ok_and(|s| s.filesystem_type() == nsfs)
}

/// Makes sure our user namespace has the power over the container netns the
/// inner plugins need: it owns it, or we join the one that does when it is
/// ours (a runtime outside its own user namespace). Otherwise a clear error
/// instead of a failure deep inside a plugin.
fn check_owned_by_our_userns(netns: &std::fs::File, path: &Path) -> Result<()> {
    let what = format!("CNI_NETNS {}", path.display());
    match crate::userns::owner_of(netns) {
        Ok(crate::userns::Owner::Ours) => Ok(()),
        Ok(crate::userns::Owner::Foreign { userns, .. }) => {
            crate::userns::join_owned(&userns, &what)
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY) | Some(libc::EINVAL)) => {
            Err(Error::env(format!("{what} is not a network namespace")))
        }
        // The kernel will not even name the owner: it is outside ours.
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Err(Error::new(
            code::INVALID_ENV,
            format!(
                "{what} belongs to a user namespace outside ours that we do not own: the inner plugins could not configure it; run the runtime in the user namespace that created the container"
            ),
        )),
        // A kernel without the ioctl: let the plugins find out.
        Err(_) => Ok(()),
    }
}

/// One inner plugin invocation.
pub struct Invocation<'a> {
    pub verb: Verb,
    pub container_id: &'a str,
    pub ifname: &'a str,
    pub args: &'a str,
    pub cni_path: &'a [PathBuf],
    pub timeout: std::time::Duration,
}

/// An inner plugin as the caller found it in CNI_PATH, held open: the
/// exec happens after `setns` into the infra's mount namespace and
/// `chdir("/")`, where the path (relative, or under /run or /var/lib/cni,
/// which the infra has its own of) may name nothing or another binary.
pub struct PluginBinary {
    pub path: PathBuf,
    fd: OwnedFd,
}

impl PluginBinary {
    fn name(&self) -> String {
        self.path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("plugin")
            .to_string()
    }
}

/// The plugin binary for `plugin_type`, first match in CNI_PATH, opened
/// (O_PATH) where the caller stands.
pub fn find_plugin(plugin_type: &str, cni_path: &[PathBuf]) -> Result<PluginBinary> {
    for dir in cni_path {
        let candidate = dir.join(plugin_type);
        let Ok(file) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(&candidate)
        else {
            continue;
        };
        if let Ok(meta) = file.metadata() {
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return Ok(PluginBinary {
                    path: candidate,
                    fd: OwnedFd::from(file),
                });
            }
        }
    }
    let dirs: Vec<String> = cni_path.iter().map(|d| d.display().to_string()).collect();
    Err(Error::new(
        code::INNER_PLUGIN,
        format!(
            "inner plugin {plugin_type:?} not found in CNI_PATH [{}]",
            dirs.join(":")
        ),
    ))
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
        .env(
            "CNI_PATH",
            inner_cni_path(
                inv.cni_path,
                infra.caller_root.as_deref(),
                &infra.infra_root,
            ),
        )
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
    let keep = [
        netns.fd.as_ref().map(|f| f.as_raw_fd()),
        Some(binary.fd.as_raw_fd()),
    ];
    infra.enter(&mut cmd, keep);
    let mut child = cmd.spawn().map_err(|e| {
        Error::new(
            code::INNER_PLUGIN,
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
                code::INNER_PLUGIN,
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

/// Waits for inner plugins that still run for `container_id`/`ifname` in
/// the infra after the call that started them was killed, so the next call
/// on that attachment does not race them; after `timeout` (pluginTimeout)
/// their groups are killed. They are found by what we gave them: the
/// infra's netns and CNI_CONTAINERID/CNI_IFNAME in their environment.
/// Only a call that finds a pending record of a dead caller looks.
pub fn settle_orphans(infra: &InfraInfo, container_id: &str, ifname: &str, timeout: Duration) {
    let orphans = orphans_of(infra, container_id, ifname);
    if orphans.is_empty() {
        return;
    }
    log::info!(
        "waiting for {} inner plugin process(es) of {container_id} left by a killed call",
        orphans.len()
    );
    let (id_var, ifname_var) = orphan_vars(container_id, ifname);
    let deadline = sys::deadline(timeout);
    while orphans.iter().any(ProcessId::is_alive) {
        if Instant::now() >= deadline {
            log::warn!("inner plugins of {container_id} still run after {timeout:?}; killing");
            for p in &orphans {
                // The plugin leads its group (process_group(0)); a child of
                // it that it started, e.g. iptables, is killed with it. The
                // PID is pinned and re-checked first: it may have exited and
                // been reused since the scan.
                p.kill_group_if(|p| is_orphan_of(p, infra.netns, &id_var, &ifname_var));
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn orphans_of(infra: &InfraInfo, container_id: &str, ifname: &str) -> Vec<ProcessId> {
    let (id_var, ifname_var) = orphan_vars(container_id, ifname);
    procfs::in_netns(infra.netns)
        .into_iter()
        .filter(|p| p.pid != infra.sandbox.pid)
        .filter(|p| has_vars(p, &id_var, &ifname_var))
        .collect()
}

fn orphan_vars(container_id: &str, ifname: &str) -> (String, String) {
    (
        format!("CNI_CONTAINERID={container_id}"),
        format!("CNI_IFNAME={ifname}"),
    )
}

/// Still in the infra's netns with the attachment's variables.
fn is_orphan_of(p: &ProcessId, netns: u64, id_var: &str, ifname_var: &str) -> bool {
    procfs::ns_inode(format!("/proc/{}/ns/net", p.pid)) == Some(netns)
        && has_vars(p, id_var, ifname_var)
}

fn has_vars(p: &ProcessId, id_var: &str, ifname_var: &str) -> bool {
    let environ = std::fs::read(format!("/proc/{}/environ", p.pid)).unwrap_or_default();
    let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
    vars.contains(&id_var.as_bytes()) && vars.contains(&ifname_var.as_bytes())
}

/// The plugin's own error object when it printed one, else ours naming it.
fn inner_error(name: &str, verb: Verb, stdout: &[u8], status: std::process::ExitStatus) -> Error {
    if let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(stdout) {
        if let Some(c) = obj.get("code").and_then(Value::as_u64) {
            let msg = obj
                .get("msg")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let details = obj
                .get("details")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let mut e = Error::new(c as u32, format!("{name}: {msg}")).with_details(details);
            e.passthrough = Some(stdout.to_vec());
            return e;
        }
    }
    let text = String::from_utf8_lossy(stdout);
    Error::new(
        code::INNER_PLUGIN,
        format!(
            "inner plugin {name} {} failed ({status}) without an error object",
            verb.as_str()
        ),
    )
    .with_details(crate::cni::env::shorten(text.trim()))
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

/// CNI_PATH as the inner plugins must see it to find the binaries the
/// caller would (bridge runs its IPAM plugin from CNI_PATH): relative
/// entries made absolute against our working directory; an entry the
/// infra sees as another dir (under /run or /var/lib/cni, which it has its
/// own of, or not there at all) goes under `root`, `/proc/<our pid>/root`.
/// Only those: that path dies with us, and an inner plugin of ours that
/// outlives a killed call (a DEL's bridge, about to run host-local) must
/// still find its IPAM plugin in the usual dirs.
fn inner_cni_path(paths: &[PathBuf], root: Option<&str>, infra_root: &str) -> String {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    paths
        .iter()
        .map(|p| {
            let absolute = cwd.join(p);
            let inside = absolute.strip_prefix("/").unwrap_or(&absolute);
            let same_inside =
                id(&absolute).is_some() && id(&absolute) == id(&Path::new(infra_root).join(inside));
            match root {
                Some(root) if !same_inside => Path::new(root).join(inside).display().to_string(),
                _ => absolute.display().to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(":")
}
