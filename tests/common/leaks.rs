//! The no-leak checker every test shares: what a lab holds at one moment,
//! and the difference between two such moments.
//!
//! A snapshot covers what rootless-cni or the inner plugins could leave
//! behind: processes of the lab uid (other than the lab's own holder and
//! containers), the namespaces they or a bind mount hold, mounts in the
//! session, host-local leases of every inner network, attachment records
//! and temporary files in the state dir, the infra's own files, and, while
//! an infra runs, its iptables and ip6tables rules. `Lab::assert_no_leaks`
//! compares a snapshot with an earlier one; `Lab::assert_no_infra` compares
//! with the one taken when the lab was built, before anything ran.

use super::{describe_process, pids_of_uid, proc_state, Lab};
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::Child;
use std::thread;
use std::time::{Duration, Instant};

/// What a process left by a call has this long to go away before it counts
/// (the machine's PID 1 reaps orphans late).
const PROCESS_GRACE: Duration = Duration::from_secs(3);

/// The infra's files in the state dir: present only while it runs.
const INFRA_FILES: &[&str] = &["infra.json", "control.sock", "slirp.sock"];

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
    /// iptables-save and ip6tables-save inside the infra, counters and
    /// comments dropped; None when no infra runs.
    pub infra_rules: Option<BTreeSet<String>>,
}

impl Snapshot {
    /// What is in `self` but was not in `before`, by kind; empty when
    /// nothing leaked. A rule gone since `before` is listed too: a DEL must
    /// not take what is not its own.
    pub fn leaks_since(&self, before: &Snapshot) -> String {
        let mut report = String::new();
        let mut new = |kind: &str, now: &BTreeSet<String>, then: &BTreeSet<String>| {
            for item in now.difference(then) {
                let _ = writeln!(report, "{kind}: {item}");
            }
        };
        new("process", &self.processes, &before.processes);
        new("namespace", &self.namespaces, &before.namespaces);
        new("mount", &self.mounts, &before.mounts);
        new("lease", &self.leases, &before.leases);
        new("record", &self.records, &before.records);
        new("infra file", &self.infra_files, &before.infra_files);
        if let (Some(now), Some(then)) = (&self.infra_rules, &before.infra_rules) {
            new("iptables rule added", now, then);
            new("iptables rule removed", then, now);
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
        namespaces.extend(mounts.iter().filter(|m| m.ends_with(" nsfs")).cloned());
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
        let infra_rules = self.infra_running().then(|| self.infra_rules());
        Snapshot {
            processes: strays.into_iter().map(describe_process).collect(),
            namespaces,
            mounts,
            leases,
            records,
            infra_files,
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
    /// snapshots compare by content.
    fn infra_rules(&self) -> BTreeSet<String> {
        let out = self.cli(&["exec", "--", "sh", "-c", "iptables-save; ip6tables-save"]);
        if !out.ok() {
            // The infra stopped between the check and the exec: no rules.
            return BTreeSet::new();
        }
        out.stdout
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| match l.rfind(" [") {
                // ":CHAIN POLICY [packets:bytes]"
                Some(i) if l.starts_with(':') => l[..i].to_string(),
                _ => l.to_string(),
            })
            .collect()
    }

    /// The lab's own processes: the session holder and the containers.
    pub(super) fn own_pids(&self) -> Vec<u32> {
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
