//! The lab itself: a throwaway uid, its dir, and the session (a user and
//! mount namespace of that uid, as a rootless runtime has) that commands
//! run in. Dropping the lab kills every process of its uid and removes
//! its dir.

use crate::hosts::{self, Host, RuntimeDir};
use crate::prereq::{cnitool_path, in_ci, missing_prerequisites};
use crate::process::{describe_process, kill_processes_of, pids_of_uid, run_command};
use crate::{example_conflist, Out, LAB_PATH, NET};
use std::cell::RefCell;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// How long a command inside the lab may take before it is killed.
pub(crate) const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// A uid nobody uses: not in /etc/passwd, no process.
fn fresh_uid() -> u32 {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let taken: Vec<u32> = passwd
        .lines()
        .filter_map(|l| l.split(':').nth(2)?.parse().ok())
        .collect();
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let uid = 1_600_000_000 + (std::process::id() % 100_000) * 1000 + n % 1000;
        if !taken.contains(&uid) && pids_of_uid(uid).is_empty() {
            return uid;
        }
    }
}

/// Writes the user namespace maps of the session holder `pid` (see
/// `LabOptions::subgids`): uid 0 is the lab uid; gid 0 the lab uid's gid and
/// 1..SUBGID_COUNT a subordinate range; then tells the holder to go on.
fn map_subgids(pid: u32, uid: u32, dir: &Path) -> Result<(), String> {
    let ours = fs::read_link("/proc/self/ns/user").ok();
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs::read_link(format!("/proc/{pid}/ns/user")).ok() == ours {
        if Instant::now() > deadline {
            return Err(format!("the session holder {pid} made no user namespace"));
        }
        thread::sleep(Duration::from_millis(5));
    }
    let write = |file: &str, map: String| {
        fs::write(format!("/proc/{pid}/{file}"), &map)
            .map_err(|e| format!("writing {map:?} to /proc/{pid}/{file}: {e}"))
    };
    write("uid_map", format!("0 {uid} 1\n"))?;
    write(
        "gid_map",
        format!("0 {uid} 1\n1 {SUBGID_BASE} {SUBGID_COUNT}\n"),
    )?;
    fs::write(dir.join("mapped"), "").map_err(|e| format!("{}/mapped: {e}", dir.display()))
}

pub struct Lab {
    pub uid: u32,
    /// The lab dir: the user's HOME; XDG_RUNTIME_DIR is `run/` in it.
    pub dir: PathBuf,
    /// The session holder: a process in the session's user + mount namespace.
    pub holder: u32,
    /// Our binary as the caller built it (`binary!`); the lab runs a copy.
    built: PathBuf,
    /// Holder and containers, killed and reaped on drop.
    pub(crate) children: RefCell<Vec<Child>>,
    /// The root process holding the lab's host mount namespace
    /// (`hosts`), when the options need one; killed on drop.
    host_holder: Option<Child>,
    options: LabOptions,
    /// The session's mounts once the lab was ready (and after the test's
    /// own binds): what the no-leak checker does not count.
    pub(crate) session_mounts: RefCell<Vec<String>>,
}

/// How a lab's session differs from the default one.
#[derive(Debug, Clone, Copy)]
pub struct LabOptions {
    /// The session overlays /var/lib and binds a lab dir on /var/lib/cni
    /// (libcni's result cache, so cnitool works). Without it the session
    /// sees the host's /var/lib as it is: a host that never ran rootful CNI
    /// has no /var/lib/cni, and only our binary in plugin mode can be used.
    pub var_lib_cni: bool,
    /// The machine as the lab sees it: as it is, or as a rootful CNI
    /// runtime leaves it (see `hosts`).
    pub host: Host,
    /// Where XDG_RUNTIME_DIR is.
    pub runtime_dir: RuntimeDir,
    /// The session's user namespace maps a range of subordinate group ids
    /// besides root and allows `setgroups`, as the one rootless podman or
    /// RootlessKit makes with newgidmap (the default maps root alone and
    /// denies `setgroups`, as `unshare --map-root-user` does). A daemon
    /// that drops to a group, such as dnsmasq to `dip`, needs it.
    pub subgids: bool,
}

/// Where the lab's subordinate gids start on the host (`subgids`): far above
/// any real user's range; the lab's processes all run as its uid.
const SUBGID_BASE: u32 = 3_500_000_000;
const SUBGID_COUNT: u32 = 65536;

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            var_lib_cni: true,
            host: Host::Pristine,
            runtime_dir: RuntimeDir::LabDir,
            subgids: false,
        }
    }
}

impl Lab {
    /// A new lab, or None (after saying why) when this machine cannot run it
    /// and CI is not set. With `CI=true` missing prerequisites fail the test.
    /// `binary` is our binary as the caller's crate was built with it:
    /// `lab::binary!()`.
    pub fn new(binary: &Path, name: &str) -> Option<Lab> {
        Lab::new_with(binary, name, LabOptions::default())
    }

    /// `new`, with conf-examples/rootless.conflist written as network NET:
    /// how most tests begin.
    pub fn with_example_net(binary: &Path, name: &str) -> Option<Lab> {
        let lab = Lab::new(binary, name)?;
        lab.write_netconf(NET, &example_conflist());
        Some(lab)
    }

    /// `new` with a session other than the default one.
    pub fn new_with(binary: &Path, name: &str, options: LabOptions) -> Option<Lab> {
        let missing = missing_prerequisites();
        if !missing.is_empty() {
            let list = missing.join(", ");
            if in_ci() {
                panic!("the rootless lab cannot run here (CI is set), missing: {list}");
            }
            eprintln!("skipping {name}: the rootless lab needs: {list}");
            return None;
        }
        match Lab::build(binary, name, options) {
            Ok(lab) => Some(lab),
            Err(e) => panic!("setting up the rootless lab for {name}: {e}"),
        }
    }

    fn build(binary: &Path, name: &str, options: LabOptions) -> Result<Lab, String> {
        let uid = fresh_uid();
        let dir = PathBuf::from(format!("/tmp/rootless-cni-lab.{name}.{uid}"));
        if dir.exists() {
            fs::remove_dir_all(&dir)
                .map_err(|e| format!("removing stale {}: {e}", dir.display()))?;
        }
        let mut lab = Lab {
            uid,
            dir: dir.clone(),
            holder: 0,
            built: binary.to_path_buf(),
            children: RefCell::new(Vec::new()),
            host_holder: None,
            options,
            session_mounts: RefCell::new(Vec::new()),
        };
        // From here on, Drop cleans up whatever was made.
        let sh = |args: &[&str]| -> Result<(), String> {
            let out = Command::new(args[0])
                .args(&args[1..])
                .output()
                .map_err(|e| format!("{args:?}: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "{args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        };
        let mkdir = |rel: &str, mode: u32, owned: bool| -> Result<PathBuf, String> {
            let p = dir.join(rel);
            fs::create_dir_all(&p).map_err(|e| format!("mkdir {}: {e}", p.display()))?;
            fs::set_permissions(&p, fs::Permissions::from_mode(mode))
                .map_err(|e| format!("chmod {}: {e}", p.display()))?;
            if owned {
                std::os::unix::fs::chown(&p, Some(uid), Some(uid))
                    .map_err(|e| format!("chown {}: {e}", p.display()))?;
            }
            Ok(p)
        };
        mkdir("", 0o755, true)?;
        mkdir("run", 0o700, true)?;
        mkdir("bin", 0o755, false)?;
        mkdir("tools", 0o755, false)?;
        mkdir("net.d", 0o755, false)?;
        mkdir("cni", 0o755, true)?; // bound onto /var/lib/cni in the session
        mkdir("varlib/upper", 0o755, true)?;
        mkdir("varlib/work", 0o755, true)?;

        let copy = |from: &Path, to: PathBuf| -> Result<(), String> {
            fs::copy(from, &to)
                .map_err(|e| format!("copy {} to {}: {e}", from.display(), to.display()))?;
            fs::set_permissions(&to, fs::Permissions::from_mode(0o755))
                .map_err(|e| format!("chmod {}: {e}", to.display()))
        };
        copy(binary, lab.bin().join("rootless-cni"))?;
        copy(&cnitool_path(), lab.dir.join("tools/cnitool"))?;

        let tun = dir.join("tun");
        sh(&[
            "mknod",
            "-m",
            "0666",
            &tun.to_string_lossy(),
            "c",
            "10",
            "200",
        ])?;

        let d = dir.to_string_lossy();
        let var_lib_cni = if options.var_lib_cni {
            format!(
                "mount -t overlay overlay -o 'lowerdir=/var/lib,upperdir={d}/varlib/upper,workdir={d}/varlib/work' /var/lib
                 mkdir -p /var/lib/cni
                 mount --bind '{d}/cni' /var/lib/cni"
            )
        } else {
            String::new()
        };
        let setup = format!(
            "set -e
             mount --bind '{d}/tun' /dev/net/tun
             {var_lib_cni}
             touch '{d}/ready'
             exec sleep infinity"
        );
        if options.host != Host::Pristine || options.runtime_dir != RuntimeDir::LabDir {
            lab.host_holder = Some(hosts::start_host_ns(
                &dir,
                uid,
                options.host,
                options.runtime_dir,
            )?);
        }
        let stderr =
            fs::File::create(dir.join("holder.err")).map_err(|e| format!("holder.err: {e}"))?;
        let u = uid.to_string();
        let mount_ns = ["unshare", "--mount", "--propagation", "private"];
        let mut holder = lab.host_command("/usr/bin/setpriv");
        holder.args(["--reuid", &u, "--regid", &u, "--clear-groups"]);
        if options.subgids {
            // The maps are written by us (root) once the user namespace
            // exists; the mount namespace is made after that, with the
            // capabilities root in the mapped namespace has.
            let wait = format!(
                "while [ ! -e '{d}/mapped' ]; do sleep 0.01; done; exec {} sh -c \"$0\"",
                mount_ns.join(" ")
            );
            holder.args(["unshare", "--user", "sh", "-c", &wait, &setup]);
        } else {
            holder
                .args(["unshare", "--user", "--map-root-user"])
                .args(&mount_ns[1..])
                .args(["sh", "-c", &setup]);
        }
        let child = holder
            .env_clear()
            .env("PATH", LAB_PATH)
            .env("LIBMOUNT_UTAB", crate::utab())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("starting the session holder: {e}"))?;
        lab.holder = child.id();
        lab.children.borrow_mut().push(child);
        if options.subgids {
            map_subgids(lab.holder, uid, &dir)?;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !dir.join("ready").exists() {
            let exited = lab.children.borrow_mut()[0].try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                let err = fs::read_to_string(dir.join("holder.err")).unwrap_or_default();
                return Err(format!(
                    "the session holder did not come up ({exited:?}): {err}"
                ));
            }
            thread::sleep(Duration::from_millis(10));
        }
        lab.session_mounts.replace(lab.session_mounts());
        Ok(lab)
    }

    // --- paths -------------------------------------------------------------

    /// XDG_RUNTIME_DIR, as the test (root, in the machine's mount
    /// namespace) reaches it: with a logind-style runtime dir, through the
    /// lab host holder's root.
    pub fn run_dir(&self) -> PathBuf {
        match (&self.host_holder, self.options.runtime_dir) {
            (Some(h), RuntimeDir::Logind) => PathBuf::from(format!("/proc/{}/root", h.id())).join(
                self.xdg_runtime_dir()
                    .strip_prefix("/")
                    .unwrap_or(Path::new("")),
            ),
            _ => self.dir.join("run"),
        }
    }
    /// XDG_RUNTIME_DIR as the lab user sees it.
    pub fn xdg_runtime_dir(&self) -> PathBuf {
        match self.options.runtime_dir {
            RuntimeDir::LabDir => self.dir.join("run"),
            RuntimeDir::Logind => hosts::logind_runtime_dir(self.uid),
        }
    }
    /// The root of the lab's host as the test reaches it: `/` of the
    /// machine, or the lab host holder's root.
    pub fn host_root(&self) -> PathBuf {
        match &self.host_holder {
            Some(h) => PathBuf::from(format!("/proc/{}/root", h.id())),
            None => PathBuf::from("/"),
        }
    }
    /// A command that runs `program` in the lab's host mount namespace
    /// (the machine's own when the lab has none), as the caller (root).
    pub fn host_command(&self, program: &str) -> Command {
        match &self.host_holder {
            Some(h) => {
                let mut cmd = Command::new("/usr/bin/nsenter");
                cmd.arg(format!("--mount=/proc/{}/ns/mnt", h.id()))
                    .args(["--", program]);
                cmd
            }
            None => Command::new(program),
        }
    }
    /// Our binary as the caller built it, which the lab copied to `bin()`.
    pub fn built_binary(&self) -> &Path {
        &self.built
    }
    /// The plugin's default state dir.
    pub fn state_dir(&self) -> PathBuf {
        self.run_dir().join(rootless_cni::state::DEFAULT_DIR_NAME)
    }
    /// NETCONFPATH for cnitool.
    pub fn netconf_dir(&self) -> PathBuf {
        self.dir.join("net.d")
    }
    /// The lab's CNI dir (our binary); CNI_PATH is this, then /usr/lib/cni.
    pub fn bin(&self) -> PathBuf {
        self.dir.join("bin")
    }
    pub fn cni_path(&self) -> String {
        format!("{}:/usr/lib/cni", self.bin().display())
    }
    /// What the session sees as /var/lib/cni (libcni's result cache).
    pub fn var_lib_cni(&self) -> PathBuf {
        self.dir.join("cni")
    }
    /// host-local's leases for an inner network, in the default state dir.
    pub fn lease_dir(&self, network: &str) -> PathBuf {
        self.state_dir().join("var-lib-cni/networks").join(network)
    }

    // --- commands in the session --------------------------------------------

    /// Runs `argv` inside the session as the lab user, with only PATH, HOME,
    /// XDG_RUNTIME_DIR and `env` set.
    pub fn exec(&self, env: &[(&str, &str)], stdin: Option<&[u8]>, argv: &[&str]) -> Out {
        let (cmd, what) = self.command(env, argv);
        run_command(cmd, what, stdin, COMMAND_TIMEOUT)
    }

    /// Runs `argv` as the lab user OUTSIDE the session (setpriv only: the
    /// initial user and mount namespaces), with the same clean environment
    /// as `exec`.
    pub fn exec_outside(&self, env: &[(&str, &str)], stdin: Option<&[u8]>, argv: &[&str]) -> Out {
        let cmd = self.user_command(false, env, argv);
        let what = format!("[outside the session] {}", argv.join(" "));
        run_command(cmd, what, stdin, COMMAND_TIMEOUT)
    }

    /// The command `exec` runs, and how to name it in messages.
    pub fn command(&self, env: &[(&str, &str)], argv: &[&str]) -> (Command, String) {
        let cmd = self.user_command(true, env, argv);
        let what = env
            .iter()
            .map(|(k, v)| format!("{k}={v} "))
            .collect::<String>()
            + &argv.join(" ");
        (cmd, what)
    }

    /// setpriv to the lab user (then nsenter into the session if
    /// `in_session`) and `env -i` with the clean environment: the one way
    /// `exec` and `exec_outside` build their commands.
    fn user_command(&self, in_session: bool, env: &[(&str, &str)], argv: &[&str]) -> Command {
        self.user_command_in(in_session.then_some(self.holder), env, argv)
    }

    /// `user_command` that enters the user and mount namespaces of `target`
    /// (the session's holder, or a process that holds a mount namespace of
    /// its own inside the session), or none.
    fn user_command_in(&self, target: Option<u32>, env: &[(&str, &str)], argv: &[&str]) -> Command {
        let u = self.uid.to_string();
        let mut cmd = if target.is_some() {
            Command::new("/usr/bin/setpriv")
        } else {
            self.host_command("/usr/bin/setpriv")
        };
        cmd.args(["--reuid", &u, "--regid", &u, "--clear-groups"]);
        if let Some(target) = target {
            cmd.args(["nsenter", "--preserve-credentials", "--user", "--mount"])
                .arg(format!("--target={target}"));
        }
        cmd.args(["--", "env", "-i"])
            .arg(format!("PATH={LAB_PATH}"))
            .arg(format!("HOME={}", self.dir.display()))
            .arg(format!(
                "XDG_RUNTIME_DIR={}",
                self.xdg_runtime_dir().display()
            ));
        for (k, v) in env {
            cmd.arg(format!("{k}={v}"));
        }
        cmd.args(argv)
            .env_clear()
            .env("PATH", LAB_PATH)
            .env("LIBMOUNT_UTAB", crate::utab());
        cmd
    }

    /// `argv` as `run` runs it, but in the mount namespace that `holder` (a
    /// process inside the session) made for itself.
    pub fn command_in_mounts_of(&self, holder: u32, argv: &[&str]) -> Command {
        let netconf = self.netconf_dir().display().to_string();
        let cni_path = self.cni_path();
        self.user_command_in(
            Some(holder),
            &[("NETCONFPATH", &netconf), ("CNI_PATH", &cni_path)],
            argv,
        )
    }

    /// Runs `argv` in the session with the lab's NETCONFPATH and CNI_PATH.
    pub fn run(&self, argv: &[&str]) -> Out {
        let netconf = self.netconf_dir().display().to_string();
        let cni_path = self.cni_path();
        self.exec(
            &[("NETCONFPATH", &netconf), ("CNI_PATH", &cni_path)],
            None,
            argv,
        )
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for mut child in self.children.borrow_mut().drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Everything else of the uid (infra, strays).
        let left = kill_processes_of(self.uid, Duration::from_secs(10));
        if !left.is_empty() {
            let left: Vec<String> = left.into_iter().map(describe_process).collect();
            eprintln!(
                "lab {}: processes of uid {} survive: {left:?}",
                self.dir.display(),
                self.uid
            );
        }
        // The lab host's mounts go with its holder (nothing else of the
        // lab's uid is left in its namespace).
        if let Some(mut h) = self.host_holder.take() {
            let _ = h.kill();
            let _ = h.wait();
        }
        if std::env::var_os("LAB_KEEP").is_some() {
            eprintln!("LAB_KEEP: leaving {}", self.dir.display());
            return;
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("lab: removing {}: {e}", self.dir.display());
        }
    }
}
