//! Host tools the runtime tests need beyond the lab's own: finding them on
//! the lab's PATH, skipping (or, with CI=true, failing) without them, a
//! static busybox for images built without a registry, and the lab uid as
//! a named user with subordinate ids (for runtimes that make their own user
//! namespace).

use super::{run_command, Lab, LAB_PATH};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

/// `tool` on the lab's PATH, if it is there and executable.
pub fn which(tool: &str) -> Option<PathBuf> {
    LAB_PATH
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| {
            fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Whether to skip `test` for lack of `tools`: with CI=true a missing tool
/// fails the test instead.
pub fn skip_without(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| which(t).is_none())
        .collect();
    if missing.is_empty() {
        return false;
    }
    let list = missing.join(", ");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: missing {list} (CI=true); scripts/deps installs them");
    }
    eprintln!("skipping {test}: missing {list} (scripts/deps installs them)");
    true
}

/// `argv` as root with a clean environment, which must succeed.
fn run_root_ok(argv: &[&str], dir: &Path, timeout: Duration) {
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .env("PATH", LAB_PATH)
        .current_dir(dir);
    let out = run_command(cmd, argv.join(" "), None, timeout);
    assert!(out.ok(), "{out}");
}

/// busybox from Debian's busybox-static package (which conflicts with the
/// busybox package the lab uses, so it is unpacked, not installed),
/// downloaded once into the target dir. A dynamic busybox fails in an
/// image without a libc (`exec … no such file`).
pub fn busybox_static() -> PathBuf {
    // Tests of one binary run in parallel: one download at a time.
    static DOWNLOAD: Mutex<()> = Mutex::new(());
    let _one = DOWNLOAD.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("busybox-static");
    let bin = dir.join("unpacked/bin/busybox");
    if bin.is_file() {
        return bin;
    }
    fs::create_dir_all(&dir).expect("mkdir busybox-static");
    run_root_ok(
        &["apt-get", "download", "busybox-static"],
        &dir,
        Duration::from_secs(120),
    );
    let deb = Lab::list(&dir)
        .into_iter()
        .find(|n| n.ends_with(".deb"))
        .unwrap_or_else(|| panic!("no .deb in {} after apt-get download", dir.display()));
    run_root_ok(
        &["dpkg-deb", "-x", &deb, "unpacked"],
        &dir,
        Duration::from_secs(60),
    );
    assert!(bin.is_file(), "no bin/busybox in busybox-static");
    bin
}

/// The lab uid as user `user` (home: the lab dir) with a subordinate id
/// range, in copies of /etc/passwd, /etc/group, /etc/subuid and /etc/subgid
/// at `<lab>/etc-{passwd,group,subuid,subgid}`, to bind over the machine's in
/// a private mount namespace: newuidmap wants the caller in /etc/passwd and
/// a range in /etc/subuid, and the machine's files must stay as they are.
pub fn write_user_files(lab: &Lab, user: &str) {
    let d = lab.dir.display().to_string();
    let u = lab.uid;
    // Derived from the uid, so that labs of different uids get their own.
    let sub_start = 3_000_000_000u64 + u64::from(u % 10_000) * 65_536;
    let copy_with = |from: &str, to: &str, line: String| {
        let mut text = fs::read_to_string(from).unwrap_or_else(|e| panic!("reading {from}: {e}"));
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&line);
        lab.write_file(to, &text);
    };
    copy_with(
        "/etc/passwd",
        "etc-passwd",
        format!("{user}:x:{u}:{u}::{d}:/bin/sh\n"),
    );
    copy_with("/etc/group", "etc-group", format!("{user}:x:{u}:\n"));
    lab.write_file("etc-subuid", &format!("{user}:{sub_start}:65536\n"));
    lab.write_file("etc-subgid", &format!("{user}:{sub_start}:65536\n"));
}
