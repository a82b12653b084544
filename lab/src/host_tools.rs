//! Host tools the runtime tests need beyond the lab's own: finding them on
//! the lab's PATH, skipping (or, with CI=true, failing) without them, a
//! static busybox for images built without a registry (a build script's,
//! never fetched by a test), and the lab uid as
//! a named user with subordinate ids (for runtimes that make their own user
//! namespace).

use crate::{find_in_path, Lab};
use std::fs;
use std::path::{Path, PathBuf};

/// Whether to skip `test` for lack of `tools`: with CI=true a missing tool
/// fails the test instead.
pub fn skip_without(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| find_in_path(t).is_none())
        .collect();
    if missing.is_empty() {
        return false;
    }
    let list = missing.join(", ");
    if crate::in_ci() {
        panic!("{test}: missing {list} (CI=true); scripts/deps installs them");
    }
    eprintln!("skipping {test}: missing {list} (scripts/deps installs them)");
    true
}

/// A static busybox for a container image: the machine's own when it is
/// static (Debian's busybox-static package), else `$BUSYBOX_STATIC`, else
/// the one `scripts/build-cri-images` unpacks from that package into
/// `.tools/` (not installed: it conflicts with the dynamic busybox package
/// the user may have). A test fetches nothing itself: the download is the
/// build script's, which `scripts/test` runs first. A dynamic busybox fails
/// in an image without a libc (`exec … no such file`).
pub fn busybox_static() -> PathBuf {
    if let Some(installed) = find_in_path("busybox").filter(|p| is_static_elf(p)) {
        return installed;
    }
    let unpacked = crate::repo().join(".tools/cri-images-build/busybox-static/bin/busybox");
    let candidates = std::env::var_os("BUSYBOX_STATIC")
        .map(PathBuf::from)
        .into_iter()
        .chain([unpacked.clone()]);
    for bin in candidates {
        if is_static_elf(&bin) {
            return bin;
        }
    }
    panic!(
        "no static busybox: the installed one is dynamic and {} is missing (scripts/build-cri-images \
         unpacks Debian's busybox-static there; or set BUSYBOX_STATIC)",
        unpacked.display()
    );
}

/// Whether `path` is an ELF executable without an interpreter (a dynamic
/// one names its loader in a PT_INTERP program header, and fails in an
/// image that has no /lib).
pub fn is_static_elf(path: &Path) -> bool {
    const PT_INTERP: u32 = 3;
    let Ok(elf) = fs::read(path) else {
        return false;
    };
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
    };
    // 64-bit little-endian ELF only: what the machines we test on run.
    if !elf.starts_with(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..usize::from(phnum)).all(|i| {
        let at = phoff as usize + i * usize::from(phentsize);
        u32_at(at).is_some_and(|t| t != PT_INTERP)
    })
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
