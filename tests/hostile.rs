//! Inner plugins that hang or print garbage,
//! hostile environment and config, and unsafe state dirs. Every one gives a
//! CNI error object with the right code naming the culprit, and leaves
//! nothing behind.

use lab::{
    example_conflist, outer, plugin_stdin, testdata, Container, Lab, Out, Snapshot, GATEWAY,
};
use lab::{panicked, supervisors};
use serde_json::{json, Value};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

/// Checks a refused call: non-zero exit (not a panic), an error object on
/// stdout with `code`, naming `culprit`. Err(why) otherwise.
fn refused(out: &Out, code: u64, culprit: &str) -> Result<(), String> {
    if panicked(out) {
        return Err(format!("panicked: {out}"));
    }
    if out.ok() {
        return Err(format!("succeeded: {out}"));
    }
    if out.status.is_none() {
        return Err(format!("no exit status: {out}"));
    }
    let Some(err) = out.cni_error() else {
        return Err(format!("no CNI error object on stdout: {out}"));
    };
    if err.code != code {
        return Err(format!("code {} instead of {code}: {out}", err.code));
    }
    if !err.mentions(culprit) {
        return Err(format!("{culprit:?} not named: {out}"));
    }
    Ok(())
}

/// Nothing of ours exists: no infra, no process, no record, and the state
/// dir is absent or holds nothing but the lock (and an empty attachments/).
fn assert_untouched(lab: &Lab, c: &Container, when: &str) {
    let state = lab.state_dir();
    let entries: Vec<String> = Lab::list(&state)
        .into_iter()
        .filter(|e| e != "rootless-cni-infra.lck" && e != "attachments")
        .collect();
    assert!(entries.is_empty(), "{when}: state dir holds {entries:?}");
    assert_eq!(
        lab.links(c),
        vec!["lo"],
        "{when}: the container got something"
    );
    assert_eq!(supervisors(lab), Vec::<String>::new(), "{when}: an infra");
    lab.assert_no_infra(when);
}

// ---------------------------------------------------------------------------
// Test 5: inner plugins that hang or print garbage

/// Writes an executable script into the lab's CNI dir.
fn script_plugin(lab: &Lab, name: &str, body: &str) {
    let path = lab.bin().join(name);
    fs::write(&path, format!("#!/bin/sh\n{body}\n"))
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// The example chain with `plugin` appended, and a 2 s pluginTimeout.
fn chain_ending_in(plugin: &str) -> String {
    let mut conf = example_conflist();
    let o = outer(&mut conf);
    o.insert("pluginTimeout".into(), 2.into());
    o["delegate"]["plugins"]
        .as_array_mut()
        .expect("the example delegate has plugins")
        .push(json!({ "type": plugin }));
    plugin_stdin(&conf).to_string()
}

/// The ADD through a chain ending in `plugin` fails with code 102 naming
/// it (and `also`), within `bound`; the container keeps nothing, and after
/// the runtime's DEL nothing is left: no lease, record, infra or process; a
/// good ADD after it works on the same bridge.
fn bad_inner_plugin(lab: &Lab, plugin: &str, also: &str, bound: Duration) {
    let c = lab.container();
    let env = lab.plugin_env("ADD", &format!("bad-{plugin}"), &c.netns());
    let started = Instant::now();
    let out = lab.plugin(&env, &chain_ending_in(plugin));
    let took = started.elapsed();
    eprintln!("ADD through {plugin}: failed after {took:?}");
    let mut problems = Vec::new();
    match out.cni_error() {
        None => problems.push(format!("no CNI error object: {out}")),
        Some(e) if e.code != 102 || !e.mentions(plugin) || !e.mentions(also) => problems.push(
            format!("not code 102 naming {plugin:?} and {also:?}: {out}"),
        ),
        Some(_) => {}
    }
    if out.status != Some(1) || panicked(&out) {
        problems.push(format!("exit status: {out}"));
    }
    if took >= bound {
        problems.push(format!("took {took:?}: {out}"));
    }
    if lab.links(&c) != vec!["lo"] {
        problems.push(format!("the container kept {:?}", lab.links(&c)));
    }
    // The plugin fails its DEL too, so the rollback cannot be sure it undid
    // everything: the record stays, failed, for the DEL a runtime sends
    // after a failed ADD, which must succeed and leave nothing.
    let records = lab.attachment_records();
    if !records.iter().all(lab::is_failed_record) {
        problems.push(format!("records after the failed ADD: {records:?}"));
    }
    let del = lab.plugin(
        &lab.plugin_env("DEL", &format!("bad-{plugin}"), &c.netns()),
        &chain_ending_in(plugin),
    );
    if !del.ok() {
        problems.push(format!("the runtime's DEL after the failed ADD: {del}"));
    }
    if !lab.status()["infra"].is_null() {
        problems.push(format!("an infra runs: {}", lab.status()));
    }
    // Leases, records, processes, namespaces, mounts: the no-leak checker.
    let leaked = lab.leaks_since(&Snapshot::default());
    if !leaked.is_empty() {
        problems.push(format!("left behind:\n{leaked}"));
    }
    let when = format!("after the ADD through {plugin}");
    assert!(problems.is_empty(), "{when}:\n{}", problems.join("\n"));

    // The bridge is not left broken (plugins#620).
    let good = plugin_stdin(&example_conflist()).to_string();
    let env = lab.plugin_env("ADD", "good-1", &c.netns());
    let out = lab.plugin(&env, &good);
    assert!(out.ok(), "{when}: good ADD: {out}");
    lab.assert_ping(&c, GATEWAY, &format!("{when}: container -> gateway"));
    let env = lab.plugin_env("DEL", "good-1", &c.netns());
    let out = lab.plugin(&env, &good);
    assert!(out.ok(), "{when}: good DEL: {out}");
    lab.assert_no_infra(&format!("{when}, good ADD and DEL"));
}

/// An inner plugin that never answers: killed after pluginTimeout, the ADD
/// rolled back, nothing of it left running.
#[test]
fn hanging_inner_plugin_times_out_and_rolls_back() {
    let Some(lab) = Lab::new(lab::binary!(), "hang") else {
        return;
    };
    script_plugin(&lab, "hang", "cat >/dev/null; sleep 600");
    // Its own ADD and its DEL in the rollback hang: two timeouts.
    bad_inner_plugin(&lab, "hang", "pluginTimeout", Duration::from_secs(15));
}

/// An inner plugin that prints garbage and exits 1 without an error object.
#[test]
fn garbage_and_failure_from_an_inner_plugin() {
    let Some(lab) = Lab::new(lab::binary!(), "garbage_exit1") else {
        return;
    };
    script_plugin(
        &lab,
        "garbage1",
        "cat >/dev/null; echo 'not JSON {'; exit 1",
    );
    bad_inner_plugin(&lab, "garbage1", "not JSON", Duration::from_secs(15));
}

/// An inner plugin that prints garbage and exits 0: not a result.
#[test]
fn garbage_and_success_from_an_inner_plugin() {
    let Some(lab) = Lab::new(lab::binary!(), "garbage_exit0") else {
        return;
    };
    script_plugin(
        &lab,
        "garbage0",
        "cat >/dev/null; echo 'not JSON {'; exit 0",
    );
    bad_inner_plugin(&lab, "garbage0", "JSON", Duration::from_secs(15));
}

// ---------------------------------------------------------------------------
// Test 6: hostile input, the corpus of testdata/hostile/

/// A call that must be refused: a case of the corpus in testdata/hostile/.
struct Case {
    name: String,
    env: Vec<(String, String)>,
    stdin: Vec<u8>,
    code: u64,
    culprit: String,
}

/// Runs every case, asserts that each was refused as it should be, then that
/// `c` and the lab were left untouched (`when` names the moment).
fn assert_all_refused(lab: &Lab, c: &Container, cases: &[Case], when: &str) {
    let failures = run_cases(lab, cases);
    assert!(
        failures.is_empty(),
        "{} of {} cases:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
    assert_untouched(lab, c, when);
}

/// Runs every case (our binary in plugin mode); a case that succeeded is
/// undone with a DEL so the next ones start clean.
fn run_cases(lab: &Lab, cases: &[Case]) -> Vec<String> {
    let bin = lab.bin().join("rootless-cni").display().to_string();
    let mut failures = Vec::new();
    for case in cases {
        let env: Vec<(&str, &str)> = case
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let out = lab.exec(&env, Some(&case.stdin), &[&bin]);
        if let Err(why) = refused(&out, case.code, &case.culprit) {
            failures.push(format!("{}: {why}", case.name));
        }
        if out.ok() {
            let del: Vec<(&str, &str)> = env
                .iter()
                .map(|&(k, v)| {
                    if k == "CNI_COMMAND" {
                        (k, "DEL")
                    } else {
                        (k, v)
                    }
                })
                .collect();
            let _ = lab.exec(&del, Some(&case.stdin), &[&bin]);
        }
    }
    failures
}

/// Every case of testdata/hostile/env.json: a CNI_* variable missing,
/// empty or invalid, refused with code 4 naming it.
#[test]
fn hostile_environment_is_refused() {
    let Some(lab) = Lab::new(lab::binary!(), "hostile_env") else {
        return;
    };
    let c = lab.container();
    let good = plugin_stdin(&example_conflist()).to_string().into_bytes();
    let base = lab.plugin_env("ADD", "hostile-1", &c.netns());
    let cases: Vec<Case> = testdata::hostile_cases("env")
        .iter()
        .map(|case| {
            let verb = case["verb"].as_str().expect("a case has a verb");
            let var = case["var"].as_str().expect("a case has a var");
            let value = testdata::case_string(&case["value"]);
            let mut env: Vec<(String, String)> = base
                .iter()
                .filter(|(k, _)| k != var)
                .map(|(k, v)| {
                    let v = if k == "CNI_COMMAND" { verb } else { v };
                    (k.clone(), v.to_string())
                })
                .collect();
            if let Some(v) = &value {
                env.push((var.to_string(), v.clone()));
            }
            let shown = match &value {
                Some(v) => format!(
                    "{:?} ({} bytes)",
                    v.chars().take(16).collect::<String>(),
                    v.len()
                ),
                None => "unset".into(),
            };
            let (code, culprit) = testdata::refusal(case);
            Case {
                name: format!("{verb} {var} {shown}"),
                env,
                stdin: good.clone(),
                code,
                culprit,
            }
        })
        .collect();
    eprintln!("{} environment cases", cases.len());
    assert_all_refused(&lab, &c, &cases, "after the hostile environments");
}

/// Every case of testdata/hostile/stdin.json: malformed or oversized
/// stdin, refused with code 6.
#[test]
fn malformed_stdin_is_refused() {
    let Some(lab) = Lab::new(lab::binary!(), "hostile_stdin") else {
        return;
    };
    let c = lab.container();
    let env = lab.plugin_env("ADD", "hostile-1", &c.netns());
    let cases: Vec<Case> = testdata::hostile_cases("stdin")
        .iter()
        .map(|case| {
            let file = case["file"].as_str();
            let stdin = match (file, case["nested"].as_u64(), case["padded"].as_u64()) {
                (Some(file), _, _) => {
                    let path = testdata::path(&format!("hostile/{file}"));
                    fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
                }
                (None, Some(n), _) => {
                    let n = n as usize;
                    format!("{}{}", "[".repeat(n), "]".repeat(n)).into_bytes()
                }
                (None, None, Some(n)) => {
                    let mut huge = plugin_stdin(&example_conflist());
                    huge["args"] = json!({ "padding": "x".repeat(n as usize) });
                    huge.to_string().into_bytes()
                }
                (None, None, None) => panic!("a stdin case without file, nested or padded: {case}"),
            };
            let (code, culprit) = testdata::refusal(case);
            Case {
                name: case["name"].as_str().unwrap_or("unnamed").to_string(),
                env: env.clone(),
                stdin,
                code,
                culprit,
            }
        })
        .collect();
    assert_all_refused(&lab, &c, &cases, "after the malformed configs");
}

/// Every case of testdata/hostile/config.json: a wrong type or value for a
/// key of our config, or a wrong shape, refused with code 7 naming it.
#[test]
fn wrong_config_values_are_refused() {
    let Some(lab) = Lab::new(lab::binary!(), "hostile_config") else {
        return;
    };
    let c = lab.container();
    let env = lab.plugin_env("ADD", "hostile-1", &c.netns());
    let empty_dir = lab.dir.join("no-networks");
    fs::create_dir_all(&empty_dir).expect("mkdir");
    let empty_dir = empty_dir.display().to_string();
    let good = plugin_stdin(&example_conflist());
    let cases: Vec<Case> = testdata::hostile_cases("config")
        .iter()
        .map(|case| {
            let mut stdin = good.clone();
            let o = stdin
                .as_object_mut()
                .expect("the example config is an object");
            for key in case["remove"].as_array().into_iter().flatten() {
                o.remove(key.as_str().expect("keys to remove are strings"));
            }
            for (key, value) in case["set"].as_object().into_iter().flatten() {
                let value = match value.as_str() {
                    Some("$EMPTY_DIR") => json!(empty_dir),
                    _ => value.clone(),
                };
                o.insert(key.clone(), value);
            }
            let (code, culprit) = testdata::refusal(case);
            Case {
                name: match &case["remove"] {
                    Value::Null => format!("set {}", case["set"]),
                    removed => format!("remove {removed} set {}", case["set"]),
                },
                env: env.clone(),
                stdin: stdin.to_string().into_bytes(),
                code,
                culprit,
            }
        })
        .collect();
    eprintln!("{} config cases", cases.len());
    assert_all_refused(&lab, &c, &cases, "after the wrong configs");
}

// ---------------------------------------------------------------------------
// Test 7: unsafe state dirs

/// A state dir that is a symlink, not a dir, owned by another uid, or
/// writable by others: ADD, CHECK and DEL refuse it with code 105 naming
/// it, and nothing is started or written.
#[test]
fn unsafe_state_dirs_are_refused() {
    let Some(lab) = Lab::new(lab::binary!(), "unsafe_state_dir") else {
        return;
    };
    let c = lab.container();
    let mine = |rel: &str, mode: u32, owner: u32| -> String {
        let p = lab.dir.join(rel);
        fs::create_dir_all(&p).expect("mkdir");
        std::os::unix::fs::chown(&p, Some(owner), Some(owner)).expect("chown");
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod");
        p.display().to_string()
    };
    let real = mine("state-real", 0o700, lab.uid);
    let link = lab.dir.join("state-link");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    std::os::unix::fs::lchown(&link, Some(lab.uid), Some(lab.uid)).expect("lchown");
    let file = lab.dir.join("state-file");
    fs::write(&file, "").expect("write");
    std::os::unix::fs::chown(&file, Some(lab.uid), Some(lab.uid)).expect("chown");

    let dirs: Vec<(&str, String)> = vec![
        ("a symlink to a good dir", link.display().to_string()),
        ("a regular file", file.display().to_string()),
        ("owned by root", mine("state-root", 0o700, 0)),
        ("owned by root, 0755", mine("state-root-755", 0o755, 0)),
        (
            "owned by another uid",
            mine("state-other", 0o700, lab.uid + 1),
        ),
        ("group-writable", mine("state-g+w", 0o770, lab.uid)),
        ("world-writable", mine("state-o+w", 0o777, lab.uid)),
        (
            "world-writable, sticky",
            mine("state-sticky", 0o1777, lab.uid),
        ),
    ];
    let mut failures = Vec::new();
    for (what, dir) in &dirs {
        let mut conf = example_conflist();
        outer(&mut conf).insert("stateDir".into(), dir.clone().into());
        let stdin = plugin_stdin(&conf).to_string();
        for verb in ["ADD", "CHECK", "DEL"] {
            let env = lab.plugin_env(verb, "unsafe-1", &c.netns());
            let out = lab.plugin(&env, &stdin);
            if let Err(why) = refused(&out, 105, dir) {
                failures.push(format!("{verb} with a state dir {what}: {why}"));
            }
            if verb == "ADD" && out.ok() {
                let env = lab.plugin_env("DEL", "unsafe-1", &c.netns());
                let _ = lab.plugin(&env, &stdin);
            }
        }
    }
    // The default state dir ($XDG_RUNTIME_DIR/rootless-cni-plugin) as a symlink.
    std::os::unix::fs::symlink(&real, lab.state_dir()).expect("symlink");
    std::os::unix::fs::lchown(lab.state_dir(), Some(lab.uid), Some(lab.uid)).expect("lchown");
    let stdin = plugin_stdin(&example_conflist()).to_string();
    let default = lab.state_dir().display().to_string();
    for verb in ["ADD", "CHECK", "DEL"] {
        let env = lab.plugin_env(verb, "unsafe-1", &c.netns());
        let out = lab.plugin(&env, &stdin);
        if let Err(why) = refused(&out, 105, &default) {
            failures.push(format!(
                "{verb} with the default state dir a symlink: {why}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    for (what, dir) in &dirs {
        let entries = Lab::list(std::path::Path::new(dir));
        assert!(
            entries.is_empty(),
            "the state dir {what} ({dir}) was written to: {entries:?}"
        );
    }
    let entries = Lab::list(std::path::Path::new(&real));
    assert!(entries.is_empty(), "the symlink's target got {entries:?}");
    assert_eq!(lab.links(&c), vec!["lo"], "the container got something");
    assert_eq!(supervisors(&lab), Vec::<String>::new(), "an infra started");
    let left = lab.leftovers_after(Duration::from_secs(3));
    assert!(left.is_empty(), "processes left:\n{}", left.join("\n"));
    fs::remove_file(lab.state_dir()).expect("removing the symlink");
}
