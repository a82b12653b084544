//! perf: fork/exec/exit (and unshare) of every process, for the breakdowns of
//! the warm and cold phases.

use crate::cleanup;
use crate::stats::pids;
use crate::PLUGIN_DIR;
use lab::find_in_path;
use serde_json::Value;
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

pub(crate) struct Tracer {
    child: Child,
    file: PathBuf,
}

/// One process (one incarnation of a pid: pid_max may be small and
/// pids get reused within a trace).
#[derive(Default)]
pub(crate) struct Proc {
    /// The last exec: (time, filename).
    pub exec: Option<(f64, String)>,
    /// When the whole process exited.
    pub exit: Option<f64>,
    /// Children (processes and threads), in fork order.
    pub children: Vec<Id>,
    /// unshare(2) calls: (enter, exit).
    pub unshare: Vec<(f64, f64)>,
}

/// A process of a trace.
pub(crate) type Id = usize;

#[derive(Default)]
pub(crate) struct Trace {
    pub procs: Vec<Proc>,
    by_pid: HashMap<u32, Vec<Id>>,
}

impl Tracer {
    /// perf record of the scheduler's fork/exec/exit tracepoints,
    /// machine-wide; None when perf is missing or refuses.
    pub fn start(dir: &Path) -> Option<Tracer> {
        find_in_path("perf")?;
        // unshare(2) too, when the kernel has syscall tracepoints.
        Tracer::start_with(dir, true).or_else(|| Tracer::start_with(dir, false))
    }

    fn start_with(dir: &Path, syscalls: bool) -> Option<Tracer> {
        let file = dir.join("sched.perf");
        let _ = fs::remove_file(&file);
        let mut events = vec![
            "sched:sched_process_fork",
            "sched:sched_process_exec",
            "sched:sched_process_exit",
        ];
        if syscalls {
            events.extend(["syscalls:sys_enter_unshare", "syscalls:sys_exit_unshare"]);
        }
        let mut cmd = Command::new("perf");
        // -B -N: no build-id collection at the end, which takes tens
        // of seconds machine-wide and is useless for tracepoints.
        cmd.args(["record", "-q", "-a", "-B", "-N", "-o"])
            .arg(&file);
        for e in events {
            cmd.args(["-e", e]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        cleanup::with(|l| l.pids.push(child.id()));
        let mut t = Tracer { child, file };
        // perf writes its header once it is recording.
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::metadata(&t.file).map(|m| m.len()).unwrap_or(0) == 0 {
            if Instant::now() > deadline || t.child.try_wait().ok().flatten().is_some() {
                t.kill();
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
        thread::sleep(Duration::from_millis(300));
        if t.child.try_wait().ok().flatten().is_some() {
            t.kill();
            return None;
        }
        Some(t)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let pid = self.child.id();
        cleanup::with(|l| l.pids.retain(|p| *p != pid));
    }

    /// Stops recording and reads the events back.
    pub fn stop(mut self) -> Option<Trace> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        let out = Command::new("perf")
            .args(["script", "-F", "pid,time,event,trace", "-i"])
            .arg(&self.file)
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let _ = fs::remove_file(&self.file);
        Some(Trace::parse(&String::from_utf8_lossy(&out.stdout)))
    }
}

/// "  PID  TIME: EVENT: FIELDS" (EVENT like sched:sched_process_exec).
pub(crate) fn parse_line(line: &str) -> Option<(u32, f64, &str, &str)> {
    let (head, rest) = line.split_once(": ")?;
    let mut head = head.split_whitespace();
    let pid = head.next()?.parse().ok()?;
    let time = head.next()?.parse().ok()?;
    let (event, fields) = rest.trim_start().split_once(": ")?;
    Some((pid, time, event, fields))
}

impl Trace {
    pub fn parse(text: &str) -> Trace {
        let mut t = Trace::default();
        // pid -> its current incarnation
        let mut current: HashMap<u32, Id> = HashMap::new();
        let mut entered: HashMap<u32, f64> = HashMap::new();
        for line in text.lines() {
            let Some((pid, time, event, fields)) = parse_line(line) else {
                continue;
            };
            let kv: HashMap<&str, &str> = fields
                .split_whitespace()
                .filter_map(|f| f.split_once('='))
                .collect();
            match event {
                "sched:sched_process_fork" => {
                    let parent = t.current(&mut current, pid);
                    if let Some(child) = kv.get("child_pid").and_then(|c| c.parse().ok()) {
                        let id = t.new_proc(child);
                        current.insert(child, id);
                        t.procs[parent].children.push(id);
                    }
                }
                "sched:sched_process_exec" => {
                    let id = t.current(&mut current, pid);
                    let file = kv.get("filename").copied().unwrap_or("").to_string();
                    t.procs[id].exec = Some((time, file));
                }
                "sched:sched_process_exit" => {
                    let tid = kv.get("pid").and_then(|p| p.parse::<u32>().ok());
                    let whole = kv
                        .get("group_dead")
                        .map_or(tid == Some(pid), |g| *g == "true");
                    if whole {
                        let id = t.current(&mut current, pid);
                        t.procs[id].exit = Some(time);
                        current.remove(&pid);
                    }
                    if let Some(tid) = tid.filter(|tid| *tid != pid) {
                        current.remove(&tid);
                    }
                }
                "syscalls:sys_enter_unshare" => {
                    entered.insert(pid, time);
                }
                "syscalls:sys_exit_unshare" => {
                    if let Some(start) = entered.remove(&pid) {
                        let id = t.current(&mut current, pid);
                        t.procs[id].unshare.push((start, time));
                    }
                }
                _ => {}
            }
        }
        t
    }

    fn new_proc(&mut self, pid: u32) -> Id {
        self.procs.push(Proc::default());
        let id = self.procs.len() - 1;
        self.by_pid.entry(pid).or_default().push(id);
        id
    }

    /// The current incarnation of `pid`; a process that was there
    /// before the trace started gets one on first sight.
    fn current(&mut self, current: &mut HashMap<u32, Id>, pid: u32) -> Id {
        if let Some(id) = current.get(&pid) {
            return *id;
        }
        let id = self.new_proc(pid);
        current.insert(pid, id);
        id
    }

    /// The processes the worker reported, by pid and in the order it
    /// ran them: each is the first incarnation of its pid that exec'd
    /// a file ending in `suffix` after the previous one's exec.
    pub fn resolve(&self, pids: &[u32], suffix: &str) -> Vec<Option<Id>> {
        let mut after = f64::NEG_INFINITY;
        pids.iter()
            .map(|pid| {
                let id = self.by_pid.get(pid)?.iter().copied().find(|id| {
                    matches!(&self.procs[*id].exec, Some((t, f)) if *t >= after && f.ends_with(suffix))
                })?;
                after = self.exec_time(id)?;
                Some(id)
            })
            .collect()
    }

    /// `resolve` for the worker's lists of directly run plugins (a JSON
    /// list of lists of pids, in the order run).
    pub fn resolve_groups(&self, groups: &Value) -> Vec<Option<Vec<Id>>> {
        let groups: Vec<Vec<u32>> = groups
            .as_array()
            .map(|a| a.iter().map(pids).collect())
            .unwrap_or_default();
        let flat: Vec<u32> = groups.iter().flatten().copied().collect();
        let mut ids = self.resolve(&flat, "").into_iter();
        groups
            .iter()
            .map(|g| ids.by_ref().take(g.len()).collect())
            .collect()
    }

    pub fn exec_time(&self, id: Id) -> Option<f64> {
        self.procs[id].exec.as_ref().map(|e| e.0)
    }

    pub fn exit_time(&self, id: Id) -> Option<f64> {
        self.procs[id].exit
    }

    /// Children of `id` that exec'd, by exec time, with their file.
    pub fn exec_children(&self, id: Id) -> Vec<(Id, f64, &str)> {
        let mut v: Vec<(Id, f64, &str)> = self.procs[id]
            .children
            .iter()
            .filter_map(|c| {
                let (t, f) = self.procs[*c].exec.as_ref()?;
                Some((*c, *t, f.as_str()))
            })
            .collect();
        v.sort_by(|a, b| a.1.total_cmp(&b.1));
        v
    }
}

/// The inner plugins rootless-cni (pid `p`) exec'd, in order.
pub(crate) fn inner_of(t: &Trace, p: Id) -> Vec<Id> {
    t.exec_children(p)
        .into_iter()
        .filter(|(_, _, f)| f.starts_with(PLUGIN_DIR))
        .map(|(c, _, _)| c)
        .collect()
}

/// A chain of plugins run one after the other: from the first one's
/// exec to the last one's exit, and the gaps between one's exit and the
/// next one's exec (spawning them). In ms.
pub(crate) fn span_and_gaps(t: &Trace, plugins: &[Id]) -> Option<(f64, f64)> {
    let first = t.exec_time(*plugins.first()?)?;
    let last = t.exit_time(*plugins.last()?)?;
    let mut gaps = 0.0;
    for w in plugins.windows(2) {
        gaps += t.exec_time(w[1])? - t.exit_time(w[0])?;
    }
    Some(((last - first) * 1e3, gaps * 1e3))
}

/// Where an ADD or DEL through rootless-cni (pid `p`) spends its time,
/// in ms: before the first inner plugin's exec, the inner plugins'
/// span and the gaps in it, after the last one's exit.
pub(crate) struct Phases {
    pub before: f64,
    pub span: f64,
    pub gaps: f64,
    pub after: f64,
}

pub(crate) fn plugin_phases(t: &Trace, p: Id) -> Option<Phases> {
    let start = t.exec_time(p)?;
    let end = t.exit_time(p)?;
    let inner = inner_of(t, p);
    let first = t.exec_time(*inner.first()?)?;
    let last = t.exit_time(*inner.last()?)?;
    let (span, gaps) = span_and_gaps(t, &inner)?;
    Some(Phases {
        before: (first - start) * 1e3,
        span,
        gaps,
        after: (end - last) * 1e3,
    })
}

/// Every process below `p` (transitively) that exec'd, by binary name:
/// (how many, their exec-to-exit time summed, in ms). A process's time
/// includes its children's.
pub(crate) fn descendants_by_binary(t: &Trace, p: Id) -> HashMap<String, (usize, f64)> {
    let mut by: HashMap<String, (usize, f64)> = HashMap::new();
    let mut todo = t.procs[p].children.clone();
    while let Some(q) = todo.pop() {
        todo.extend(t.procs[q].children.iter().copied());
        if let (Some((start, file)), Some(end)) = (&t.procs[q].exec, t.procs[q].exit) {
            let name = file.rsplit('/').next().unwrap_or(file).to_string();
            let e = by.entry(name).or_default();
            e.0 += 1;
            e.1 += (end - start) * 1e3;
        }
    }
    by
}

/// A cold ADD (pid `p`): timestamps of the plugin's exec, the
/// supervisor's exec, the sandbox's exec, slirp4netns's exec, the first
/// inner plugin's exec, the last inner plugin's exit and the plugin's
/// exit, as ms since the plugin's exec.
pub(crate) fn cold_steps(t: &Trace, p: Id) -> Option<[f64; 7]> {
    let t0 = t.exec_time(p)?;
    let kids = t.exec_children(p);
    let (sup, t1, _) = *kids.iter().find(|(_, _, f)| f.ends_with("/rootless-cni"))?;
    let sup_kids = t.exec_children(sup);
    let (_, t2, _) = *sup_kids
        .iter()
        .find(|(_, _, f)| f.ends_with("/rootless-cni"))?;
    let (_, t3, _) = *sup_kids
        .iter()
        .find(|(_, _, f)| f.ends_with("/slirp4netns"))?;
    let inner: Vec<&(Id, f64, &str)> = kids
        .iter()
        .filter(|(_, _, f)| f.starts_with(PLUGIN_DIR))
        .collect();
    let t4 = inner.first()?.1;
    let t5 = inner
        .iter()
        .filter_map(|(c, _, _)| t.exit_time(*c))
        .fold(f64::NAN, f64::max);
    let t6 = t.exit_time(p)?;
    let ms = |x: f64| (x - t0) * 1e3;
    Some([0.0, ms(t1), ms(t2), ms(t3), ms(t4), ms(t5), ms(t6)])
}

/// Time a cold ADD's sandbox spent in unshare(2) (the new network and
/// mount namespaces), in ms.
pub(crate) fn sandbox_unshare(t: &Trace, p: Id) -> Option<f64> {
    let sup = t
        .exec_children(p)
        .into_iter()
        .find(|(_, _, f)| f.ends_with("/rootless-cni"))?
        .0;
    let sandbox = t
        .exec_children(sup)
        .into_iter()
        .find(|(_, _, f)| f.ends_with("/rootless-cni"))?
        .0;
    let calls = &t.procs[sandbox].unshare;
    if calls.is_empty() {
        return None;
    }
    Some(calls.iter().map(|(a, b)| (b - a) * 1e3).sum())
}
