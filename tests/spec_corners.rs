//! The corners of the CNI spec a runtime rarely visits, each answered as the
//! spec (and libcni) says, and leaving nothing behind:
//!
//! - ADD chained after another plugin keeps that plugin's `prevResult`: its
//!   interfaces, addresses and DNS come first in our result.
//! - GC carries on past a failure (a stale attachment whose DEL fails, an
//!   inner plugin whose GC fails) and reports them all.
//! - STATUS needs no CNI_PATH and creates no state dir.
//! - CHECK over an inner chain older than 0.4.0 is code 1 naming both
//!   versions.
//! - An inner plugin's error object comes back at the runtime's version.
//! - pluginTimeout bounds an inner plugin's whole run, also after it closed
//!   its stdout.
//! - A legal 128-character container id of dots is attached and deleted.

use lab::testdata::outer_at;
use lab::{Lab, Out, GATEWAY, NET};
use serde_json::{json, Value};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// An outer config at `version` whose inner chain is `plugins` at
/// `inner_version`, with a 2 s pluginTimeout.
fn outer_over(version: &str, inner_version: &str, plugins: Value) -> Value {
    let mut conf = outer_at(version);
    conf["pluginTimeout"] = json!(2);
    conf["delegate"] = json!({"cniVersion": inner_version, "name": NET, "plugins": plugins});
    conf
}

/// Writes an executable script into the lab's CNI dir.
fn script_plugin(lab: &Lab, name: &str, body: &str) {
    let path = lab.bin().join(name);
    fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("writing a script plugin");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// A file the lab user can append to.
fn user_file(lab: &Lab, name: &str) -> std::path::PathBuf {
    let path = lab.dir.join(name);
    fs::write(&path, "").expect("creating a file");
    std::os::unix::fs::chown(&path, Some(lab.uid), Some(lab.uid)).expect("chown");
    path
}

fn call(lab: &Lab, verb: &str, id: &str, netns: &str, conf: &Value) -> Out {
    lab.plugin(&lab.plugin_env(verb, id, netns), &conf.to_string())
}

fn network_call(lab: &Lab, verb: &str, cni_path: Option<&str>, conf: &Value) -> Out {
    let mut env = vec![("CNI_COMMAND".to_string(), verb.to_string())];
    if let Some(path) = cni_path {
        env.push(("CNI_PATH".into(), path.into()));
    }
    lab.plugin(&env, &conf.to_string())
}

fn names(result: &Value) -> Vec<String> {
    result["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["name"].as_str().map(String::from))
        .collect()
}

#[test]
fn add_chained_after_another_plugin_keeps_its_prev_result() {
    let Some(lab) = Lab::new(lab::binary!(), "corners_prev_result") else {
        return;
    };
    let c = lab.container();
    let mut conf = outer_at("1.0.0");
    conf["prevResult"] = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "dummy0", "mac": "02:00:00:00:00:01", "sandbox": c.netns()}],
        "ips": [{"address": "192.0.2.5/24", "interface": 0}],
        "dns": {"nameservers": ["192.0.2.53"]}
    });
    let out = call(&lab, "ADD", "chained", &c.netns(), &conf);
    let result = out.add_result("ADD with a prevResult");
    let names = names(&result);
    assert_eq!(
        names.first().map(String::as_str),
        Some("dummy0"),
        "{result}"
    );
    let eth0 = names
        .iter()
        .position(|n| n == "eth0")
        .unwrap_or_else(|| panic!("no eth0 in {result}"));
    let ips = result["ips"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        ips.first().map(|ip| &ip["address"]),
        Some(&json!("192.0.2.5/24")),
        "{result}"
    );
    let ours = ips
        .iter()
        .find(|ip| {
            ip["address"]
                .as_str()
                .is_some_and(|a| a.starts_with("10.89.0."))
        })
        .unwrap_or_else(|| panic!("no address of ours in {result}"));
    assert_eq!(
        ours["interface"],
        json!(eth0),
        "our address names eth0: {result}"
    );
    let dns = &result["dns"]["nameservers"];
    assert!(
        dns.as_array()
            .is_some_and(|d| d.contains(&json!("192.0.2.53")) && d.contains(&json!("10.0.2.3"))),
        "DNS of both: {result}"
    );
    lab.assert_ping(&c, GATEWAY, "container -> gateway");

    // CHECK and DEL get the merged result as prevResult, as a runtime
    // sends them; ours is what the inner plugins check and delete.
    let mut with_result = outer_at("1.0.0");
    with_result["prevResult"] = result;
    let out = call(&lab, "CHECK", "chained", &c.netns(), &with_result);
    assert!(out.ok(), "CHECK: {out}");
    let out = call(&lab, "DEL", "chained", &c.netns(), &with_result);
    assert!(out.ok(), "DEL: {out}");
    lab.assert_no_infra("after DEL");
}

/// A 1.1.0 plugin that logs each call to `log`; with `stuck` present it
/// fails the DEL of gc-stuck and, when it is `gcfirst`, its GC.
fn gc_plugin(lab: &Lab, name: &str, log: &Path, stuck: &Path) {
    let body = format!(
        r#"cat >/dev/null
echo "{name} $CNI_COMMAND $CNI_CONTAINERID" >> '{log}'
fail() {{ echo "{{\"cniVersion\":\"1.1.0\",\"code\":999,\"msg\":\"{name}: $1\"}}"; exit 1; }}
case "$CNI_COMMAND" in
ADD) echo '{{"cniVersion":"1.1.0"}}' ;;
DEL) if [ "$CNI_CONTAINERID" = gc-stuck ] && [ -e '{stuck}' ]; then fail "cannot delete gc-stuck"; fi ;;
GC) if [ {name} = gcfirst ] && [ -e '{stuck}' ]; then fail "GC failed"; fi ;;
VERSION) echo '{{"cniVersion":"1.1.0","supportedVersions":["1.1.0"]}}' ;;
esac
exit 0"#,
        log = log.display(),
        stuck = stuck.display()
    );
    script_plugin(lab, name, &body);
}

#[test]
fn gc_carries_on_past_failures_and_reports_them_all() {
    let Some(lab) = Lab::new(lab::binary!(), "corners_gc_carries_on") else {
        return;
    };
    let log = user_file(&lab, "gc.log");
    let stuck = lab.dir.join("stuck");
    fs::write(&stuck, "").expect("the stuck marker");
    gc_plugin(&lab, "gcfirst", &log, &stuck);
    gc_plugin(&lab, "gcsecond", &log, &stuck);
    let conf = outer_over(
        "1.1.0",
        "1.1.0",
        json!([{"type": "gcfirst"}, {"type": "gcsecond"}]),
    );
    let (c1, c2) = (lab.container(), lab.container());
    for (id, c) in [("gc-stuck", &c1), ("gc-gone", &c2)] {
        let out = call(&lab, "ADD", id, &c.netns(), &conf);
        assert!(out.ok(), "ADD {id}: {out}");
    }

    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([]);
    let out = network_call(&lab, "GC", Some(&lab.cni_path()), &gc);
    let ran = fs::read_to_string(&log).unwrap_or_default();
    let err = out
        .cni_error()
        .unwrap_or_else(|| panic!("GC with a failing DEL: no error object: {out}\n{ran}"));
    assert!(
        err.mentions("gc-stuck") && err.mentions("GC failed"),
        "GC reports both failures: {out}"
    );
    for name in ["gcfirst", "gcsecond"] {
        assert!(
            ran.contains(&format!("{name} GC")),
            "{name} got no GC after a stale attachment failed:\n{ran}\n{out}"
        );
    }
    let records = lab.attachment_records();
    let ids: Vec<&str> = records
        .iter()
        .filter_map(|r| r["containerId"].as_str())
        .collect();
    assert_eq!(ids, ["gc-stuck"], "records after GC: {records:?}");

    // Unstuck, the next GC finishes the job and stops the infra.
    fs::remove_file(&stuck).expect("removing the marker");
    let out = network_call(&lab, "GC", Some(&lab.cni_path()), &gc);
    assert!(out.ok(), "second GC: {out}");
    lab.assert_no_infra("after the second GC");
}

#[test]
fn status_needs_no_cni_path_and_creates_nothing() {
    let Some(lab) = Lab::new(lab::binary!(), "corners_status") else {
        return;
    };
    let conf = outer_at("1.1.0");
    assert!(!lab.state_dir().exists(), "a state dir before anything ran");
    let out = network_call(&lab, "STATUS", None, &conf);
    assert!(out.ok(), "STATUS without CNI_PATH: {out}");
    let out = network_call(&lab, "STATUS", Some(&lab.cni_path()), &conf);
    assert!(out.ok(), "STATUS: {out}");
    assert!(
        !lab.state_dir().exists(),
        "STATUS created the state dir {}",
        lab.state_dir().display()
    );

    // With the infra running, too.
    let c = lab.container();
    let out = call(&lab, "ADD", "status", &c.netns(), &outer_at("1.0.0"));
    assert!(out.ok(), "ADD: {out}");
    let out = network_call(&lab, "STATUS", None, &conf);
    assert!(out.ok(), "STATUS without CNI_PATH, infra running: {out}");
    let out = call(&lab, "DEL", "status", &c.netns(), &outer_at("1.0.0"));
    assert!(out.ok(), "DEL: {out}");
    lab.assert_no_infra("after DEL");
}

#[test]
fn check_over_an_inner_chain_older_than_0_4_0_is_code_1() {
    let Some(lab) = Lab::new(lab::binary!(), "corners_check_old_inner") else {
        return;
    };
    let c = lab.container();
    let mut conf = outer_at("1.0.0");
    conf["delegate"]["cniVersion"] = json!("0.3.1");
    // The reference firewall speaks 0.4.0 and later only.
    conf["delegate"]["plugins"]
        .as_array_mut()
        .expect("the example delegate has plugins")
        .retain(|p| p["type"] != "firewall");
    let out = call(&lab, "ADD", "old-inner", &c.netns(), &conf);
    let result = out.add_result("ADD over a 0.3.1 chain");
    let mut check = conf.clone();
    check["prevResult"] = result;
    let out = call(&lab, "CHECK", "old-inner", &c.netns(), &check);
    let err = out
        .cni_error()
        .unwrap_or_else(|| panic!("CHECK: no CNI error object: {out}"));
    assert_eq!(err.code, 1, "CHECK over a 0.3.1 chain: {out}");
    assert!(
        err.mentions("0.3.1") && err.mentions("0.4.0") && err.mentions("1.0.0"),
        "CHECK names the versions: {out}"
    );
    let out = call(&lab, "DEL", "old-inner", &c.netns(), &check);
    assert!(out.ok(), "DEL: {out}");
    lab.assert_no_infra("after DEL");
}

#[test]
fn inner_error_objects_come_back_at_the_runtime_version() {
    let Some(lab) = Lab::new(lab::binary!(), "corners_error_version") else {
        return;
    };
    script_plugin(
        &lab,
        "refuses",
        r#"cat >/dev/null
case "$CNI_COMMAND" in
ADD) echo '{"cniVersion":"0.4.0","code":7,"msg":"refuses: no"}'; exit 1 ;;
esac
exit 0"#,
    );
    let conf = outer_over("1.0.0", "0.4.0", json!([{"type": "refuses"}]));
    let c = lab.container();
    let out = call(&lab, "ADD", "refused", &c.netns(), &conf);
    let err = out
        .cni_error()
        .unwrap_or_else(|| panic!("no error object: {out}"));
    assert_eq!(err.code, 7, "{out}");
    assert_eq!(out.json().unwrap()["cniVersion"], "1.0.0", "{out}");
    let out = call(&lab, "DEL", "refused", &c.netns(), &conf);
    assert!(out.ok(), "DEL: {out}");
    lab.assert_no_infra("after DEL");
}

#[test]
fn plugin_timeout_bounds_a_plugin_that_closed_its_stdout() {
    let Some(lab) = Lab::new(lab::binary!(), "corners_closed_stdout") else {
        return;
    };
    // It answers, closes stdout, and does not exit.
    script_plugin(
        &lab,
        "lingers",
        r#"cat >/dev/null
case "$CNI_COMMAND" in
ADD) echo '{"cniVersion":"1.0.0"}'; exec >&-; sleep 40 ;;
esac
exit 0"#,
    );
    let conf = outer_over("1.0.0", "1.0.0", json!([{"type": "lingers"}]));
    let c = lab.container();
    let started = Instant::now();
    let out = call(&lab, "ADD", "lingers", &c.netns(), &conf);
    let took = started.elapsed();
    let err = out
        .cni_error()
        .unwrap_or_else(|| panic!("after {took:?}: no error object: {out}"));
    assert!(
        err.code == 102 && err.mentions("lingers") && err.mentions("pluginTimeout"),
        "after {took:?}: {out}"
    );
    assert!(took < Duration::from_secs(15), "took {took:?}: {out}");
    let out = call(&lab, "DEL", "lingers", &c.netns(), &conf);
    assert!(out.ok(), "DEL: {out}");
    lab.assert_no_infra("after DEL");
}

#[test]
fn a_128_character_container_id_of_dots_is_attached() {
    let Some(lab) = Lab::new(lab::binary!(), "corners_long_id") else {
        return;
    };
    let id = format!("a{}", ".".repeat(127));
    let c = lab.container();
    let conf = outer_at("1.0.0");
    let out = call(&lab, "ADD", &id, &c.netns(), &conf);
    let result = out.add_result("ADD of a 128-character id of dots");
    lab.assert_ping(&c, GATEWAY, "container -> gateway");
    let mut check = conf.clone();
    check["prevResult"] = result;
    let out = call(&lab, "CHECK", &id, &c.netns(), &check);
    assert!(out.ok(), "CHECK: {out}");
    let out = call(&lab, "DEL", &id, &c.netns(), &check);
    assert!(out.ok(), "DEL: {out}");
    lab.assert_no_infra("after DEL");
}
