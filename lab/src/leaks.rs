//! The no-leak checker every test shares: what a lab holds at one moment,
//! and the difference between two such moments.
//!
//! A snapshot covers what rootless-cni or the inner plugins could leave
//! behind: processes of the lab uid (other than the lab's own holder and
//! containers, each with its start time, so a restarted one differs), the
//! namespaces they or a bind mount hold, every mount of the session that
//! was not there when the lab was ready (and every lab mount gone),
//! host-local leases of every inner network, attachment records and
//! temporary files in the state dir, the infra's own files, the rest of
//! the state dir (warm markers, `run/`, the overlay dirs), whether a lock
//! file is held, a panic in `infra.log`, and, while an infra runs, its
//! iptables and ip6tables rules (a failed read is a difference, never "no
//! rules"). `Lab::assert_no_leaks` compares a snapshot with an earlier one,
//! both ways: what is new and what is gone; `Lab::assert_no_infra` compares
//! with the empty lab.

use crate::process::{describe_process, pids_of_uid, proc_cmdline, proc_state, start_time};
use crate::Lab;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Child;
use std::thread;
use std::time::{Duration, Instant};

/// What a process left by a call has this long to go away before it counts
/// (the machine's PID 1 reaps orphans late).
const PROCESS_GRACE: Duration = Duration::from_secs(3);

/// The infra's files in the state dir: present only while it runs.
const INFRA_FILES: &[&str] = &["infra.json", "control.sock", "slirp.sock"];

/// The state dir's lock files: a call that died must not leave one held.
const LOCK_FILES: &[&str] = &["rootless-cni-infra.lck", "first-chain.lck"];

/// What the other kinds cover, or what lives as long as the state dir.
const STATE_SKIPPED: &[&str] = &["attachments", "var-lib-cni", "infra.log"];

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Live processes of the lab uid but the lab's own, described.
    pub processes: BTreeSet<String>,
    /// Namespaces (`net:[N]`, `mnt:[N]`, `user:[N]`) held by those
    /// processes, as their own or as an open fd, or bound by an nsfs mount.
    pub namespaces: BTreeSet<String>,
    /// Mounts in the session under XDG_RUNTIME_DIR, and nsfs mounts.
    pub mounts: BTreeSet<String>,
    /// `network/ip` of every host-local lease in the state dir.
    pub leases: BTreeSet<String>,
    /// Attachment records, and temporary files (dot files) of the state dir.
    pub records: BTreeSet<String>,
    /// The infra's files in the state dir (infra.json, sockets).
    pub infra_files: BTreeSet<String>,
    /// The rest of the state dir, walked: warm markers, `run/` (the
    /// infra's /run), `var-lib-overlay/`. With no infra running, what a
    /// stopped infra keeps until the next start empties it is left out.
    pub state_files: BTreeSet<String>,
    /// Lock files held by someone right now, and panics in infra.log.
    pub held: BTreeSet<String>,
    /// iptables-save and ip6tables-save inside the infra, counters and
    /// comments dropped; None when no infra runs.
    pub infra_rules: Option<BTreeSet<String>>,
}

impl Snapshot {
    /// What is in `self` but was not in `before`, and what was in `before`
    /// but is gone, by kind; empty when nothing changed. A call must not
    /// take what is not its own any more than leave what is: a "recovery"
    /// that stops a live infra shows as its processes, files and rules gone.
    pub fn leaks_since(&self, before: &Snapshot) -> String {
        let mut report = String::new();
        let mut diff = |kind: &str, now: &BTreeSet<String>, then: &BTreeSet<String>| {
            for item in now.difference(then) {
                let _ = writeln!(report, "{kind}: {item}");
            }
            for item in then.difference(now) {
                let _ = writeln!(report, "{kind} gone: {item}");
            }
        };
        diff("process", &self.processes, &before.processes);
        diff("namespace", &self.namespaces, &before.namespaces);
        diff("mount", &self.mounts, &before.mounts);
        diff("lease", &self.leases, &before.leases);
        diff("record", &self.records, &before.records);
        diff("infra file", &self.infra_files, &before.infra_files);
        diff("state file", &self.state_files, &before.state_files);
        diff("held", &self.held, &before.held);
        match (&self.infra_rules, &before.infra_rules) {
            (Some(now), Some(then)) => diff("iptables rule", now, then),
            (None, None) => {}
            // The infra files and processes say more; this says the rules
            // went (or came) with it.
            (now, _) => {
                let _ = writeln!(
                    report,
                    "iptables rules: {} then, {} now",
                    if before.infra_rules.is_some() {
                        "an infra"
                    } else {
                        "no infra"
                    },
                    if now.is_some() {
                        "an infra"
                    } else {
                        "no infra"
                    }
                );
            }
        }
        report
    }
}

impl Lab {
    /// What the lab holds now (see the module doc).
    pub fn snapshot(&self) -> Snapshot {
        let own = self.own_pids();
        let strays: Vec<u32> = pids_of_uid(self.uid)
            .into_iter()
            .filter(|p| !own.contains(p))
            .filter(|&p| !proc_state(p).unwrap_or_default().starts_with('Z'))
            .collect();
        let mounts: BTreeSet<String> = self.session_mount_leftovers().into_iter().collect();
        let mut namespaces: BTreeSet<String> =
            strays.iter().flat_map(|&p| held_namespaces(p)).collect();
        namespaces.extend(
            mounts
                .iter()
                .filter(|m| m.split(' ').nth(1) == Some("nsfs"))
                .cloned(),
        );
        let state = self.state_dir();
        let leases = Lab::list(&state.join("var-lib-cni/networks"))
            .into_iter()
            .flat_map(|net| {
                self.lease_files(&net)
                    .into_iter()
                    .map(move |ip| format!("{net}/{ip}"))
            })
            .collect();
        let mut records: BTreeSet<String> = Lab::list(&state.join("attachments"))
            .into_iter()
            .map(|r| format!("attachments/{r}"))
            .collect();
        records.extend(dot_files(&state, &state));
        let infra_files = INFRA_FILES
            .iter()
            .filter(|f| state.join(f).exists())
            .map(|f| f.to_string())
            .collect();
        let running = self.infra_running();
        let state_files = state_files(&state, running);
        let mut held: BTreeSet<String> = LOCK_FILES
            .iter()
            .filter(|f| lock_held(&state.join(f)))
            .map(|f| format!("lock {f}"))
            .collect();
        let log = fs::read_to_string(state.join("infra.log")).unwrap_or_default();
        held.extend(
            log.lines()
                .filter(|l| l.contains("panicked"))
                .map(|l| format!("infra.log: {l}")),
        );
        let infra_rules = if running { self.infra_rules() } else { None };
        Snapshot {
            processes: strays.into_iter().map(identify_process).collect(),
            namespaces,
            mounts,
            leases,
            records,
            infra_files,
            state_files,
            held,
            infra_rules,
        }
    }

    /// What leaked since `before` (see `Snapshot::leaks_since`), after
    /// giving processes a call left PROCESS_GRACE to exit.
    pub fn leaks_since(&self, before: &Snapshot) -> String {
        let deadline = Instant::now() + PROCESS_GRACE;
        loop {
            let report = self.snapshot().leaks_since(before);
            if report.is_empty() || Instant::now() >= deadline {
                return report;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Asserts that nothing leaked since `before` (`when` names the moment).
    pub fn assert_no_leaks(&self, before: &Snapshot, when: &str) {
        let report = self.leaks_since(before);
        assert!(report.is_empty(), "{when}: leaked:\n{report}");
    }

    /// Whether the state dir says an infra runs (infra.json is there),
    /// without asking it: a snapshot must not start one.
    fn infra_running(&self) -> bool {
        self.state_dir().join("infra.json").exists()
    }

    /// The infra's rule set, counters and comment lines dropped so two
    /// snapshots compare by content; None when the infra stopped before it
    /// could be read. A read that fails while the infra runs is a rule of
    /// its own ("cannot read"), so it never passes for an empty set.
    fn infra_rules(&self) -> Option<BTreeSet<String>> {
        let out = self.cli(&["exec", "--", "sh", "-c", "iptables-save && ip6tables-save"]);
        if !out.ok() {
            if !self.infra_running() {
                return None;
            }
            return Some(BTreeSet::from([format!("cannot read the rules: {out}")]));
        }
        let rules = out
            .stdout
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| match l.rfind(" [") {
                // ":CHAIN POLICY [packets:bytes]"
                Some(i) if l.starts_with(':') => l[..i].to_string(),
                _ => l.to_string(),
            })
            .collect();
        Some(rules)
    }

    /// The lab's own processes: the session holder and the containers.
    fn own_pids(&self) -> Vec<u32> {
        self.children.borrow().iter().map(Child::id).collect()
    }
}

/// The namespaces `pid` is in and holds open fds of.
fn held_namespaces(pid: u32) -> Vec<String> {
    let mut held = Vec::new();
    for kind in ["net", "mnt", "user"] {
        if let Ok(link) = fs::read_link(format!("/proc/{pid}/ns/{kind}")) {
            held.push(link.display().to_string());
        }
    }
    if let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(link) = fs::read_link(fd.path()) {
                let link = link.display().to_string();
                if ["net:[", "mnt:[", "user:["]
                    .iter()
                    .any(|k| link.starts_with(k))
                {
                    held.push(link);
                }
            }
        }
    }
    held
}

/// Dot files under `dir` (a write killed between create and rename leaves
/// one), relative to `root`; the infra's overlay and /run are not walked.
fn dot_files(root: &Path, dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for name in Lab::list(dir) {
        let path = dir.join(&name);
        if name.starts_with('.') {
            found.push(
                path.strip_prefix(root)
                    .unwrap_or(&path)
                    .display()
                    .to_string(),
            );
        } else if path.is_dir()
            && !path.is_symlink()
            && !["var-lib-overlay", "run"].contains(&name.as_str())
        {
            found.extend(dot_files(root, &path));
        }
    }
    found
}

/// A process as the checker names it: pid, start time, command line (its
/// run state left out: it changes by itself).
fn identify_process(pid: u32) -> String {
    let start = start_time(pid).unwrap_or_default();
    let cmdline = proc_cmdline(pid);
    format!("pid {pid} started {start}: {cmdline}")
}

/// Whether someone holds `path`'s flock (tried without waiting, and let go
/// at once); a missing file is not held.
fn lock_held(path: &Path) -> bool {
    let Ok(file) = fs::File::open(path) else {
        return false;
    };
    let how = nix::fcntl::FlockArg::LockExclusiveNonblock;
    #[allow(deprecated)] // nix's Flock wrapper takes the file by value
    let held = nix::fcntl::flock(file.as_raw_fd(), how).is_err();
    held
}

/// The state dir's files the other kinds do not cover, relative. With an
/// infra running, everything (a call must not change them behind the
/// infra's back); without, stray files only: `run/` (inner plugins' files,
/// e.g. dnsname's), the warm markers and the overlay's upper and work dirs
/// are what a stopped infra keeps, emptied at the next start.
fn state_files(state: &Path, running: bool) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    walk(state, state, &mut found);
    found
        .into_iter()
        .filter(|f| {
            let top = f.split('/').next().unwrap_or_default();
            !STATE_SKIPPED.contains(&top)
                && !LOCK_FILES.contains(&top)
                && !INFRA_FILES.contains(&top)
                && !f.starts_with('.')
                && !f.contains("/.")
        })
        .filter(|f| {
            running
                || !(["run", "warm", "var-lib-overlay"].contains(&f.as_str())
                    || f.starts_with("run/")
                    || f.starts_with("warm/")
                    || f.starts_with("var-lib-overlay/"))
        })
        .collect()
}

fn walk(root: &Path, dir: &Path, found: &mut BTreeSet<String>) {
    for name in Lab::list(dir) {
        let path = dir.join(&name);
        let rel = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .display()
            .to_string();
        let is_dir = path.is_dir() && !path.is_symlink();
        found.insert(rel);
        if is_dir {
            walk(root, &path, found);
        }
    }
}

impl Lab {
    // --- leaks -----------------------------------------------------------------

    /// Processes of the lab uid other than the lab's own (session holder and
    /// containers), described.
    pub fn leftovers(&self) -> Vec<String> {
        let own = self.own_pids();
        pids_of_uid(self.uid)
            .into_iter()
            .filter(|p| !own.contains(p))
            .map(describe_process)
            .collect()
    }

    /// `leftovers()`, after giving them up to `grace` to go away.
    pub fn leftovers_after(&self, grace: Duration) -> Vec<String> {
        let deadline = Instant::now() + grace;
        loop {
            let left = self.leftovers();
            if left.is_empty() || Instant::now() >= deadline {
                return left;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every mount of the session's mount namespace (the caller's, where
    /// the plugin runs), as `TARGET FSTYPE SOURCE`: a bind's source names
    /// the bound dir, so a leaked bind over `/run` differs from `/run`.
    pub(crate) fn session_mounts(&self) -> Vec<String> {
        let out = self.exec(&[], None, &["findmnt", "-rn", "-o", "TARGET,FSTYPE,SOURCE"]);
        assert!(out.ok(), "findmnt in the session: {out}");
        out.stdout.lines().map(str::to_string).collect()
    }

    /// Mounts in the session's mount namespace that were not there when the
    /// lab was ready, and those gone since: anywhere (a `/var/lib` overlay or a `/run` bind left
    /// in the caller's namespace as much as a bound netns), counted, so a
    /// second mount on the same target shows too.
    fn session_mount_leftovers(&self) -> Vec<String> {
        let mut before = self.session_mounts.borrow().clone();
        let mut left = Vec::new();
        for m in self.session_mounts() {
            match before.iter().position(|b| *b == m) {
                Some(i) => {
                    before.swap_remove(i);
                }
                None => left.push(m),
            }
        }
        // A lab mount taken away (a slirp4netns sandbox once unmounted the
        // caller's netns mounts) is as much a change.
        left.extend(before.into_iter().map(|m| format!("unmounted: {m}")));
        left
    }

    /// Asserts that nothing of an infra is left: status says no infra, and
    /// the no-leak checker finds nothing the lab did not hold when it was
    /// built (no process, namespace, mount, lease, record or infra file).
    pub fn assert_no_infra(&self, when: &str) {
        let status = self.status();
        assert!(
            status["infra"].is_null(),
            "{when}: infra still running: {status}"
        );
        self.assert_no_leaks(&Snapshot::default(), when);
    }
}
