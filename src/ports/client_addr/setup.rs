//! Making the client-address rules inside the infra when it starts: the
//! commands (iptables-restore, ip rule, ip route) run at once in the infra's
//! namespaces, within one deadline; what they made is `Kept`.

use super::{ClientAddresses, Kept, MARK_REPLY, MARK_SOCKET, RULE_PRIORITY, TABLE};
use crate::exec::join_namespaces;
use crate::sys;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the setup's commands, run at once, may take in all (iptables
/// waits for its lock). Well within the plugin's wait for the whole infra
/// (`START_TIMEOUT`, 10 s, sandbox and way out included): a command that
/// hangs costs the clients' addresses, not the infra's start.
const SETUP_TIMEOUT: Duration = Duration::from_secs(4);

/// The setup's commands, started; `finish` waits for them.
pub struct Setup {
    steps: Vec<Step>,
    /// When the commands that still run are given up.
    deadline: Instant,
}

struct Step {
    ipv6: bool,
    what: String,
    /// The command, and the error of writing its input if that failed.
    child: io::Result<(Child, Option<io::Error>)>,
}

/// Starts the commands that make the rules inside the infra of
/// `sandbox_pid` (IPv6 too when `ipv6`), all at once: they run while
/// the way out (slirp4netns or pasta) starts.
pub fn start_setup(sandbox_pid: i32, ipv6: bool) -> Setup {
    let ns = |kind: &str| -> io::Result<OwnedFd> {
        Ok(OwnedFd::from(std::fs::File::open(format!(
            "/proc/{sandbox_pid}/ns/{kind}"
        ))?))
    };
    let deadline = Instant::now() + SETUP_TIMEOUT;
    let ns = ns("mnt").and_then(|mnt| Ok((mnt, ns("net")?)));
    let mut steps = Vec::new();
    for v6 in [false, true] {
        if v6 && !ipv6 {
            continue;
        }
        for argv in commands(v6) {
            let what = argv.join(" ");
            let child = match &ns {
                Ok((mnt, net)) => spawn_inside(mnt, net, &argv),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            };
            steps.push(Step {
                ipv6: v6,
                what,
                child,
            });
        }
    }
    Setup { steps, deadline }
}

/// The commands for one family. They run at once, in any order: the
/// forwarder uses none of it before all have succeeded.
fn commands(ipv6: bool) -> Vec<Vec<String>> {
    let (family, any, restore) = if ipv6 {
        ("-6", "::/0", "ip6tables-restore")
    } else {
        ("-4", "0.0.0.0/0", "iptables-restore")
    };
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let reply = format!("{MARK_REPLY:#x}/{MARK_REPLY:#x}");
    let (table, pref) = (TABLE.to_string(), RULE_PRIORITY.to_string());
    vec![
        s(&[
            "ip", family, "route", "add", "local", any, "dev", "lo", "table", &table,
        ]),
        s(&[
            "ip", family, "rule", "add", "pref", &pref, "fwmark", &reply, "lookup", &table,
        ]),
        // --noflush: the table is added to, nothing else in it is touched.
        s(&[restore, "-w", "5", "--noflush"]),
    ]
}

/// What iptables-restore reads: the two mark rules.
fn mangle_rules() -> String {
    let socket = format!("{MARK_SOCKET:#x}/{MARK_SOCKET:#x}");
    let reply = format!("{MARK_REPLY:#x}/{MARK_REPLY:#x}");
    let comment = "-m comment --comment \"rootless-cni: replies to the published ports' clients\"";
    format!(
        "*mangle\n\
         -A OUTPUT -m mark --mark {socket} {comment} -j CONNMARK --set-xmark {socket}\n\
         -A PREROUTING -m connmark --mark {socket} {comment} -j MARK --set-xmark {reply}\n\
         -A OUTPUT -m connmark --mark {socket} -m mark ! --mark {socket} {comment} -j MARK --set-xmark {reply}\n\
         COMMIT\n"
    )
}

fn spawn_inside(
    mnt: &OwnedFd,
    net: &OwnedFd,
    argv: &[String],
) -> io::Result<(Child, Option<io::Error>)> {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env("PATH", crate::exec::path_with_sbin())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let restore = argv[0].ends_with("-restore");
    cmd.stdin(if restore {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let (mnt, net) = (mnt.as_raw_fd(), net.as_raw_fd());
    // SAFETY: runs between fork and exec in the single-threaded child;
    // join_namespaces and close_range are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            // SAFETY: both fds are borrowed for this whole function, so they
            // are open when `cmd.spawn()` below forks.
            let (mnt, net) = (BorrowedFd::borrow_raw(mnt), BorrowedFd::borrow_raw(net));
            join_namespaces(mnt, net)?;
            sys::cloexec_inherited_fds()
        });
    }
    let mut child = cmd.spawn()?;
    let mut input_error = None;
    if restore {
        if let Some(mut stdin) = child.stdin.take() {
            // A few hundred bytes: the pipe takes them without blocking. A
            // command that exits first (EPIPE) is waited for all the same:
            // its own error says more.
            input_error = stdin.write_all(mangle_rules().as_bytes()).err();
        }
    }
    Ok((child, input_error))
}

impl Setup {
    /// Waits for the commands; what the infra can do.
    pub fn finish(self) -> ClientAddresses {
        let mut kept = Kept {
            ipv4: true,
            ipv6: self.steps.iter().any(|s| s.ipv6),
        };
        let mut errors = Vec::new();
        for step in self.steps {
            if let Err(e) = wait_step(step.child, self.deadline) {
                errors.push(format!("{}: {e}", step.what));
                if step.ipv6 {
                    kept.ipv6 = false;
                } else {
                    kept.ipv4 = false;
                }
            }
        }
        // Without IPv4's rules, IPv6's alone would keep the address of
        // some clients only: none is simpler to explain, and to test.
        if !kept.ipv4 {
            kept.ipv6 = false;
        }
        ClientAddresses {
            kept,
            error: (!errors.is_empty()).then(|| errors.join("; ")),
        }
    }
}

fn wait_step(
    child: io::Result<(Child, Option<io::Error>)>,
    deadline: Instant,
) -> std::result::Result<(), String> {
    let (mut child, input_error) = child.map_err(|e| format!("cannot run it: {e}"))?;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("still running after {}s", SETUP_TIMEOUT.as_secs()));
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    if status.success() {
        return match input_error {
            None => Ok(()),
            Some(e) => Err(format!("writing its input: {e}")),
        };
    }
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    Err(format!("{status}: {}", stderr.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules_use_the_marks() {
        let rules = mangle_rules();
        assert!(rules.contains("--mark 0x10000000/0x10000000"), "{rules}");
        assert!(
            rules.contains("--set-xmark 0x20000000/0x20000000"),
            "{rules}"
        );
        assert_eq!(MARK_SOCKET & MARK_REPLY, 0);
        assert_eq!(MARK_SOCKET & 0x2000, 0, "portmap's masquerade mark");
        let v4 = commands(false);
        assert_eq!(
            v4[1].join(" "),
            "ip -4 rule add pref 100 fwmark 0x20000000/0x20000000 lookup 100"
        );
    }
}
