//! The state dir is the user's alone and is trusted only after a check of
//! every dir above it: made 0700 and its sockets and files private whatever
//! the runtime's umask; a state dir others can reach, or one below a dir
//! others can write to, refused with code 105 naming it; and a symlink put
//! in the state dir between calls is never followed.

use lab::{example_conflist, outer, plugin_stdin, Lab, Out};
use lab::{panicked, supervisors};
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Checks a refused call: non-zero exit (not a panic), an error object with
/// `code` naming every one of `culprits`. Err(why) otherwise.
fn refused(out: &Out, code: u64, culprits: &[&str]) -> Result<(), String> {
    if panicked(out) {
        return Err(format!("panicked: {out}"));
    }
    if out.ok() {
        return Err(format!("succeeded: {out}"));
    }
    let Some(err) = out.cni_error() else {
        return Err(format!("no CNI error object on stdout: {out}"));
    };
    if err.code != code {
        return Err(format!("code {} instead of {code}: {out}", err.code));
    }
    if let Some(c) = culprits.iter().find(|c| !err.mentions(c)) {
        return Err(format!("{c:?} not named: {out}"));
    }
    Ok(())
}

/// A dir in the lab, made by root then given `owner` and `mode`.
fn dir(path: &Path, mode: u32, owner: u32) -> String {
    fs::create_dir_all(path).expect("mkdir");
    std::os::unix::fs::chown(path, Some(owner), Some(owner)).expect("chown");
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
    path.display().to_string()
}

/// The example network's plugin stdin with `stateDir` set (default dir
/// when None).
fn stdin_with(state_dir: Option<&str>) -> String {
    let mut conf = example_conflist();
    if let Some(d) = state_dir {
        outer(&mut conf).insert("stateDir".into(), d.into());
    }
    plugin_stdin(&conf).to_string()
}

/// Our binary in plugin mode started under umask 000, as a careless
/// runtime (or a service manager's UMask=0000) would start it.
fn plugin_umask_000(lab: &Lab, env: &[(String, String)], stdin: &str) -> Out {
    let bin = lab.bin().join("rootless-cni").display().to_string();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    lab.exec(
        &env,
        Some(stdin.as_bytes()),
        &["/bin/sh", "-c", "umask 000; exec \"$0\"", &bin],
    )
}

/// Every entry of the state dir and of its dirs of ours (not what the
/// inner plugins keep in `run/` and `var-lib-cni/`) with its mode, and
/// whether it is a socket.
fn modes(state: &Path) -> Vec<(PathBuf, u32, bool)> {
    let mut out = Vec::new();
    let meta = fs::symlink_metadata(state).expect("state dir");
    out.push((state.to_path_buf(), meta.mode() & 0o7777, false));
    for entry in fs::read_dir(state)
        .expect("reading the state dir")
        .flatten()
    {
        let meta = entry.metadata().expect("metadata");
        out.push((
            entry.path(),
            meta.mode() & 0o7777,
            meta.file_type().is_socket(),
        ));
        let name = entry.file_name();
        if meta.is_dir() && (name == "attachments" || name == "warm") {
            for inner in fs::read_dir(entry.path()).expect("reading").flatten() {
                let m = inner.metadata().expect("metadata");
                out.push((inner.path(), m.mode() & 0o7777, false));
            }
        }
    }
    out
}

/// ADD under umask 000 into a state dir it creates: the dir is 0700, and
/// its sockets (ours, and slirp4netns's API socket, through which anyone
/// could open host ports as the user), records, locks and logs give group
/// and others nothing.
#[test]
fn umask_000_leaves_nothing_for_other_users() {
    let Some(lab) = Lab::new(lab::binary!(), "state_dir_umask") else {
        return;
    };
    let c = lab.container();
    let state = lab.dir.join("state-umask");
    let stdin = stdin_with(Some(&state.display().to_string()));
    let add = plugin_umask_000(&lab, &lab.plugin_env("ADD", "umask-1", &c.netns()), &stdin);
    assert!(add.ok(), "ADD under umask 000: {add}");

    let seen = modes(&state);
    let open: Vec<String> = seen
        .iter()
        .filter(|(_, mode, _)| mode & 0o077 != 0)
        .map(|(p, mode, _)| format!("{} {mode:o}", p.display()))
        .collect();
    let sockets: Vec<String> = seen
        .iter()
        .filter(|(_, _, socket)| *socket)
        .filter_map(|(p, _, _)| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    let del = plugin_umask_000(&lab, &lab.plugin_env("DEL", "umask-1", &c.netns()), &stdin);
    assert!(del.ok(), "DEL under umask 000: {del}");
    lab.assert_no_infra("after the DEL");
    assert!(
        open.is_empty(),
        "open to group or others after an ADD under umask 000:\n{}",
        open.join("\n")
    );
    for socket in ["control.sock", "slirp.sock"] {
        assert!(
            sockets.iter().any(|s| s == socket),
            "{socket} not seen among {sockets:?} (the mode check missed it)"
        );
    }
}

/// A state dir of ours that group or others can read or enter (0755, 0750,
/// 0711) is refused by every verb, with code 105 naming it, its mode and
/// the fix; nothing is written to it and no infra starts.
#[test]
fn state_dir_open_to_others_is_refused() {
    let Some(lab) = Lab::new(lab::binary!(), "state_dir_mode") else {
        return;
    };
    let c = lab.container();
    let mut failures = Vec::new();
    for mode in [0o755, 0o750, 0o711, 0o701] {
        let path = dir(&lab.dir.join(format!("state-{mode:o}")), mode, lab.uid);
        let stdin = stdin_with(Some(&path));
        for verb in ["ADD", "CHECK", "DEL"] {
            let out = lab.plugin(&lab.plugin_env(verb, "mode-1", &c.netns()), &stdin);
            let mode = format!("{mode:o}");
            let fix = format!("chmod 700 {path}");
            if let Err(why) = refused(&out, 105, &[&path, &mode, &fix]) {
                failures.push(format!("{verb} with a {mode} state dir: {why}"));
            }
            if verb == "ADD" && out.ok() {
                let del = lab.plugin(&lab.plugin_env("DEL", "mode-1", &c.netns()), &stdin);
                assert!(del.ok(), "DEL after the ADD that should have failed: {del}");
            }
        }
        let written = Lab::list(Path::new(&path));
        if !written.is_empty() {
            failures.push(format!("the {mode:o} state dir got {written:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert_eq!(lab.links(&c), vec!["lo"], "the container got something");
    assert_eq!(supervisors(&lab), Vec::<String>::new(), "an infra started");
    lab.assert_no_infra("after the refused calls");
}

/// A 0700 state dir of ours below a dir others could rename it in (group-
/// or world-writable without the sticky bit) is refused with code 105
/// naming that dir; below a sticky one (as /tmp) it is used. Outside any
/// user namespace, where owners can be told apart, a dir above it owned
/// by another user is refused too.
#[test]
fn state_dir_below_a_dir_others_can_write_is_refused() {
    let Some(lab) = Lab::new(lab::binary!(), "state_dir_ancestor") else {
        return;
    };
    let c = lab.container();
    let mut failures = Vec::new();
    for (what, mode) in [("group-writable", 0o775), ("world-writable", 0o777)] {
        let above = dir(&lab.dir.join(format!("shared-{mode:o}")), mode, lab.uid);
        let state = dir(&Path::new(&above).join("state"), 0o700, lab.uid);
        let stdin = stdin_with(Some(&state));
        for verb in ["ADD", "CHECK", "DEL"] {
            let out = lab.plugin(&lab.plugin_env(verb, "anc-1", &c.netns()), &stdin);
            if let Err(why) = refused(&out, 105, &[&state, &above]) {
                failures.push(format!("{verb} below a {what} dir: {why}"));
            }
            if verb == "ADD" && out.ok() {
                let del = lab.plugin(&lab.plugin_env("DEL", "anc-1", &c.netns()), &stdin);
                assert!(del.ok(), "DEL after the ADD that should have failed: {del}");
            }
        }
        let written = Lab::list(Path::new(&state));
        if !written.is_empty() {
            failures.push(format!("the state dir below a {what} dir got {written:?}"));
        }
    }
    // Another user's dir above it, seen from the initial user namespace
    // (from inside one, every unmapped owner shows as the same overflow uid).
    let theirs = dir(&lab.dir.join("theirs"), 0o755, lab.uid + 1);
    let state = dir(&Path::new(&theirs).join("state"), 0o700, lab.uid);
    let stdin = stdin_with(Some(&state));
    let bin = lab.bin().join("rootless-cni").display().to_string();
    for verb in ["CHECK", "DEL"] {
        let env = lab.plugin_env(verb, "anc-2", &c.netns());
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let out = lab.exec_outside(&env, Some(stdin.as_bytes()), &[&bin]);
        if let Err(why) = refused(&out, 105, &[&state, &theirs]) {
            failures.push(format!("{verb} below another user's dir: {why}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert_eq!(lab.links(&c), vec!["lo"], "the container got something");
    lab.assert_no_infra("after the refused calls");

    // Sticky and world-writable above, as /tmp: used.
    let sticky = dir(&lab.dir.join("sticky"), 0o1777, lab.uid);
    let state = Path::new(&sticky).join("state").display().to_string();
    let stdin = stdin_with(Some(&state));
    let add = lab.plugin(&lab.plugin_env("ADD", "anc-3", &c.netns()), &stdin);
    assert!(add.ok(), "ADD below a sticky dir: {add}");
    let del = lab.plugin(&lab.plugin_env("DEL", "anc-3", &c.netns()), &stdin);
    assert!(del.ok(), "DEL below a sticky dir: {del}");
    lab.assert_no_infra("after the DEL below a sticky dir");
}

/// A symlink put in the state dir between calls, in place of the lock file
/// or of the attachments dir, is not followed: the call fails with code
/// 105 naming it, the symlink's target is neither created nor read, and
/// the running infra is left alone; once the dir is put back, DEL works.
#[test]
fn symlinks_swapped_into_the_state_dir_are_not_followed() {
    let Some(lab) = Lab::with_example_net(lab::binary!(), "state_dir_symlinks") else {
        return;
    };
    let c = lab.container();
    let stdin = stdin_with(None);
    let add = lab.plugin(&lab.plugin_env("ADD", "swap-1", &c.netns()), &stdin);
    assert!(add.ok(), "ADD: {add}");
    let state = lab.state_dir();
    let symlink = |target: &Path, at: &Path| {
        std::os::unix::fs::symlink(target, at).expect("symlink");
        std::os::unix::fs::lchown(at, Some(lab.uid), Some(lab.uid)).expect("lchown");
    };
    let mut failures = Vec::new();

    // The lock file: a symlink to where the user never meant to write.
    let lock = state.join("rootless-cni-infra.lck");
    let victim = lab.dir.join("victim.lck");
    fs::remove_file(&lock).expect("removing the lock file");
    symlink(&victim, &lock);
    for verb in ["CHECK", "DEL"] {
        let out = lab.plugin(&lab.plugin_env(verb, "swap-1", &c.netns()), &stdin);
        if let Err(why) = refused(&out, 105, &["rootless-cni-infra.lck"]) {
            failures.push(format!("{verb} with the lock file a symlink: {why}"));
        }
    }
    if victim.exists() {
        failures.push("the lock file's symlink was followed: its target was created".into());
    }
    fs::remove_file(&lock).expect("removing the symlink");

    // The attachments dir: a symlink to an empty dir of the user's. A DEL
    // that followed it would find no record there, take the infra for idle
    // and stop it under the attached container.
    let attachments = state.join("attachments");
    let kept = state.join("attachments.kept");
    let decoy = PathBuf::from(dir(&lab.dir.join("decoy"), 0o700, lab.uid));
    fs::rename(&attachments, &kept).expect("moving attachments away");
    symlink(&decoy, &attachments);
    let infra_before = supervisors(&lab);
    for verb in ["CHECK", "DEL"] {
        let out = lab.plugin(&lab.plugin_env(verb, "swap-1", &c.netns()), &stdin);
        if let Err(why) = refused(&out, 105, &["attachments"]) {
            failures.push(format!("{verb} with attachments/ a symlink: {why}"));
        }
    }
    let in_decoy = Lab::list(&decoy);
    if !in_decoy.is_empty() {
        failures.push(format!("the symlinked dir got {in_decoy:?}"));
    }
    if supervisors(&lab) != infra_before || infra_before.is_empty() {
        failures.push(format!(
            "the infra changed under the attached container: {infra_before:?} then {:?}",
            supervisors(&lab)
        ));
    }
    fs::remove_file(&attachments).expect("removing the symlink");
    fs::rename(&kept, &attachments).expect("putting attachments back");

    let del = lab.plugin(&lab.plugin_env("DEL", "swap-1", &c.netns()), &stdin);
    assert!(del.ok(), "DEL once the state dir is put back: {del}");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert_eq!(lab.links(&c), vec!["lo"], "the container kept something");
    lab.assert_no_infra("after the DEL");
}

/// The first ADD starts the infra, then cannot write its record (its
/// `attachments` is a symlink someone put there): code 105, and the infra
/// it started for nothing is stopped, not left running with no record.
#[test]
fn an_add_that_cannot_record_stops_the_infra_it_started() {
    let Some(lab) = Lab::with_example_net(lab::binary!(), "state_dir_first_record") else {
        return;
    };
    let state = lab.state_dir();
    dir(&state, 0o700, lab.uid);
    let decoy = PathBuf::from(dir(&lab.dir.join("decoy"), 0o700, lab.uid));
    let attachments = state.join("attachments");
    std::os::unix::fs::symlink(&decoy, &attachments).expect("symlink");
    std::os::unix::fs::lchown(&attachments, Some(lab.uid), Some(lab.uid)).expect("lchown");
    let c = lab.container();
    let before = lab.snapshot();

    let out = lab.plugin(
        &lab.plugin_env("ADD", "no-record", &c.netns()),
        &stdin_with(None),
    );
    assert!(!panicked(&out), "{out}");
    if let Err(why) = refused(&out, 105, &["attachments"]) {
        panic!("ADD with attachments a symlink: {why}");
    }
    assert_eq!(supervisors(&lab), Vec::<String>::new(), "the infra stayed");
    assert_eq!(
        fs::read_dir(&decoy).expect("decoy").count(),
        0,
        "written through the symlink"
    );
    let leaks = lab.leaks_since(&before);
    assert!(leaks.is_empty(), "left behind:\n{leaks}");
}
