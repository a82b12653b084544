//! The CNI spec from 0.3.0 to 1.1.0 as a runtime sees it is kept.
//!
//! - VERSION lists 0.3.0, 0.3.1, 0.4.0, 1.0.0 and 1.1.0.
//! - ADD over a 1.0.0 delegate answers at the runtime's version, converted
//!   by libcni's rules (`ips[].version` only for 0.x); a delegate too old to
//!   convert (0.2.0) is refused with code 1 before anything is made.
//! - CHECK needs 0.4.0; GC and STATUS need 1.1.0.
//! - GC (`cni.dev/valid-attachments`, or the older `cni.dev/attachments`)
//!   deletes what the runtime no longer lists and stops an empty infra.
//! - STATUS: success when an ADD would work, code 50 naming what is missing.
//! - disableCheck in the delegate; DEL without CNI_NETNS and prevResult.
//! - A static IP and MAC asked for by the runtime, through CNI_ARGS and
//!   through capability args, end up on the container's eth0.
//!
//! The 1.1.0 verbs are driven by calling our binary directly: Debian's
//! cnitool (libcni 1.1.x) cannot parse a 1.1.0 result. The configs are
//! testdata/conflists/: the example network at each version
//! (cni-VERSION.conflist), and static-ip-mac.conflist.

use lab::testdata::{self, outer_at};
use lab::{example_conflist, result_ipv4, Container, Lab, GATEWAY, NET};
use serde_json::{json, Value};
use std::io::Write;
use std::process::{Command, Stdio};

/// Every version the plugin must speak.
const ALL_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The example's outer config with `delegate` as the inner chain.
fn outer_with_delegate(version: &str, delegate: Value) -> Value {
    let mut conf = outer_at(version);
    conf["delegate"] = delegate;
    conf
}

/// A plugin call's environment with `key` removed.
fn without(mut env: Vec<(String, String)>, key: &str) -> Vec<(String, String)> {
    env.retain(|(k, _)| k != key);
    env
}

/// The environment of GC and STATUS: no container.
fn network_env(verb: &str, cni_path: &str) -> Vec<(String, String)> {
    vec![
        ("CNI_COMMAND".into(), verb.into()),
        ("CNI_PATH".into(), cni_path.into()),
    ]
}

/// ADD of `c` as `id` through our binary; the result.
fn add(lab: &Lab, conf: &Value, id: &str, c: &Container) -> Value {
    let out = lab.plugin(&lab.plugin_env("ADD", id, &c.netns()), &conf.to_string());
    assert!(out.ok(), "ADD {id}: {out}");
    out.json()
        .unwrap_or_else(|| panic!("ADD {id}: result is not JSON: {out}"))
}

/// DEL of `c` as `id` through our binary.
fn del(lab: &Lab, conf: &Value, id: &str, c: &Container) {
    let out = lab.plugin(&lab.plugin_env("DEL", id, &c.netns()), &conf.to_string());
    assert!(out.ok(), "DEL {id}: {out}");
}

/// The MAC address of `ifname` in a container (`ip -o link`).
fn mac(lab: &Lab, c: &Container, ifname: &str) -> Option<String> {
    let out = lab.in_netns(c, &["ip", "-o", "link", "show", "dev", ifname]);
    let fields: Vec<&str> = out.stdout.split_whitespace().collect();
    let i = fields.iter().position(|f| *f == "link/ether")?;
    fields.get(i + 1).map(|m| m.to_string())
}

#[test]
fn version_lists_all_five() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rootless-cni"))
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning rootless-cni");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(br#"{"cniVersion":"1.1.0"}"#)
        .expect("writing stdin");
    drop(stdin);
    let out = child.wait_with_output().expect("waiting for rootless-cni");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "VERSION: {}\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let mut listed: Vec<&str> = v["supportedVersions"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    listed.sort_unstable();
    assert_eq!(listed, ALL_VERSIONS, "supportedVersions: {v}");
    assert_eq!(
        v["cniVersion"], "1.1.0",
        "VERSION answers in the asked version: {v}"
    );
}

/// A 1.0.0 delegate; the runtime asks at 0.3.1, 0.4.0, 1.0.0 and 1.1.0.
#[test]
fn add_result_is_converted_to_the_runtime_version() {
    let Some(lab) = Lab::new(lab::binary!(), "spec_convert") else {
        return;
    };
    let versions = ["0.3.1", "0.4.0", "1.0.0", "1.1.0"];
    for version in versions {
        assert_eq!(outer_at(version)["delegate"]["cniVersion"], "1.0.0");
    }
    let mut attached = Vec::new();
    for (i, version) in versions.iter().enumerate() {
        let c = lab.container();
        let id = format!("convert-{i}");
        let conf = outer_at(version);
        let result = add(&lab, &conf, &id, &c);
        assert_eq!(
            result["cniVersion"], *version,
            "result of an ADD at {version}: {result}"
        );
        let ips = result["ips"].as_array().cloned().unwrap_or_default();
        assert!(!ips.is_empty(), "no ips in the {version} result: {result}");
        for ip in &ips {
            if version.starts_with("0.") {
                assert_eq!(
                    ip["version"], "4",
                    "a {version} result needs ips[].version: {result}"
                );
            } else {
                assert!(
                    ip.get("version").is_none(),
                    "a {version} result has no ips[].version: {result}"
                );
            }
        }
        let ip = result_ipv4(&result).unwrap_or_else(|| panic!("no IPv4: {result}"));
        assert_eq!(lab.ipv4(&c, "eth0").as_deref(), Some(ip.as_str()));
        attached.push((conf, id, c));
    }
    for (conf, id, c) in &attached {
        del(&lab, conf, id, c);
    }
    lab.assert_no_infra("after DEL at every version");
}

#[test]
fn delegate_too_old_to_convert_is_refused() {
    let Some(lab) = Lab::new(lab::binary!(), "spec_old_delegate") else {
        return;
    };
    let mut delegate = example_conflist()["plugins"][0]["delegate"].clone();
    delegate["cniVersion"] = json!("0.2.0");
    let conf = outer_with_delegate("1.0.0", delegate);
    let c = lab.container();
    let out = lab.plugin(&lab.plugin_env("ADD", "old", &c.netns()), &conf.to_string());
    let err = out
        .cni_error()
        .unwrap_or_else(|| panic!("no CNI error object: {out}"));
    assert!(!out.ok(), "ADD over a 0.2.0 delegate succeeded: {out}");
    assert_eq!(err.code, 1, "{out}");
    assert!(
        err.mentions("0.2.0") && err.mentions("1.0.0"),
        "the error names neither version: {out}"
    );
    assert_eq!(lab.links(&c), ["lo"], "the container was touched");
    lab.assert_no_infra("after the refused ADD");
}

#[test]
fn check_needs_0_4_0() {
    let Some(lab) = Lab::new(lab::binary!(), "spec_check_version") else {
        return;
    };
    let c = lab.container();
    let conf = outer_at("1.0.0");
    let result = add(&lab, &conf, "chk", &c);

    let mut old = outer_at("0.3.1");
    old["prevResult"] = result.clone();
    let out = lab.plugin(
        &lab.plugin_env("CHECK", "chk", &c.netns()),
        &old.to_string(),
    );
    let err = out
        .cni_error()
        .unwrap_or_else(|| panic!("CHECK at 0.3.1: no CNI error object: {out}"));
    assert_eq!(err.code, 1, "CHECK at 0.3.1: {out}");
    assert!(err.mentions("0.3.1"), "CHECK at 0.3.1: {out}");

    let mut ok = outer_at("0.4.0");
    ok["prevResult"] = result;
    let out = lab.plugin(&lab.plugin_env("CHECK", "chk", &c.netns()), &ok.to_string());
    assert!(out.ok(), "CHECK at 0.4.0: {out}");

    del(&lab, &conf, "chk", &c);
    lab.assert_no_infra("after DEL");
}

/// Two attachments, gc-a and gc-b; then GC through our binary with `key`
/// listing gc-a (`keep_first`) or nothing.
fn gc_case(name: &str, key: &str, keep_first: bool) {
    let Some(lab) = Lab::new(lab::binary!(), name) else {
        return;
    };
    let conf = outer_at("1.0.0");
    let (c1, c2) = (lab.container(), lab.container());
    let ip1 = result_ipv4(&add(&lab, &conf, "gc-a", &c1)).expect("IPv4 of gc-a");
    let ip2 = result_ipv4(&add(&lab, &conf, "gc-b", &c2)).expect("IPv4 of gc-b");
    let mut leases = lab.lease_files(NET);
    leases.sort();
    let mut both = vec![ip1.clone(), ip2.clone()];
    both.sort();
    assert_eq!(leases, both, "leases before GC");

    let valid = if keep_first {
        json!([{"containerID": "gc-a", "ifname": "eth0"}])
    } else {
        json!([])
    };
    let mut gc = outer_at("1.1.0");
    gc[key] = valid;
    let out = lab.plugin(&network_env("GC", &lab.cni_path()), &gc.to_string());
    assert!(out.ok(), "GC with {key}: {out}");

    assert!(
        !lab.links(&c2).contains(&"eth0".to_string()),
        "gc-b's eth0 survived GC: {:?}",
        lab.links(&c2)
    );
    if keep_first {
        assert_eq!(
            lab.lease_files(NET),
            std::slice::from_ref(&ip1),
            "leases after GC"
        );
        let records = lab.attachment_records();
        let ids: Vec<&str> = records
            .iter()
            .filter_map(|r| r["containerId"].as_str())
            .collect();
        assert_eq!(ids, ["gc-a"], "records after GC: {records:?}");
        assert_eq!(lab.ipv4(&c1, "eth0").as_deref(), Some(ip1.as_str()));
        lab.assert_ping(&c1, GATEWAY, "the listed attachment lost its network");
        assert!(lab.status()["infra"].is_object(), "the infra stopped");
        del(&lab, &conf, "gc-a", &c1);
    } else {
        assert!(
            !lab.links(&c1).contains(&"eth0".to_string()),
            "gc-a's eth0 survived GC"
        );
        assert_eq!(lab.lease_files(NET), Vec::<String>::new(), "leases");
    }
    lab.assert_no_infra("at the end");
}

#[test]
fn gc_deletes_attachments_not_listed() {
    gc_case("spec_gc_one", "cni.dev/valid-attachments", true);
}

#[test]
fn gc_with_an_empty_list_deletes_everything_and_stops_the_infra() {
    gc_case("spec_gc_empty", "cni.dev/valid-attachments", false);
}

#[test]
fn gc_takes_the_older_key_name() {
    gc_case("spec_gc_old_key", "cni.dev/attachments", true);
}

#[test]
fn gc_and_status_need_1_1_0() {
    let Some(lab) = Lab::new(lab::binary!(), "spec_gc_version") else {
        return;
    };
    for verb in ["GC", "STATUS"] {
        let mut conf = outer_at("1.0.0");
        if verb == "GC" {
            conf["cni.dev/valid-attachments"] = json!([]);
        }
        let out = lab.plugin(&network_env(verb, &lab.cni_path()), &conf.to_string());
        let err = out
            .cni_error()
            .unwrap_or_else(|| panic!("{verb} at 1.0.0: no CNI error object: {out}"));
        assert_eq!(err.code, 1, "{verb} at 1.0.0: {out}");
    }
    lab.assert_no_infra("after the refused verbs");
}

#[test]
fn status_succeeds_when_an_add_would() {
    let Some(lab) = Lab::new(lab::binary!(), "spec_status") else {
        return;
    };
    let conf = outer_at("1.1.0");
    let out = lab.plugin(&network_env("STATUS", &lab.cni_path()), &conf.to_string());
    assert!(out.ok(), "STATUS: {out}");
    assert!(out.stdout.trim().is_empty(), "STATUS printed: {out}");
    lab.assert_no_infra("STATUS starts nothing");

    // And with the infra running.
    let c = lab.container();
    add(&lab, &outer_at("1.0.0"), "st", &c);
    let out = lab.plugin(&network_env("STATUS", &lab.cni_path()), &conf.to_string());
    assert!(out.ok(), "STATUS with the infra running: {out}");
    del(&lab, &outer_at("1.0.0"), "st", &c);
    lab.assert_no_infra("after DEL");
}

#[test]
fn status_without_bridge_in_cni_path_is_code_50() {
    let Some(lab) = Lab::new(lab::binary!(), "spec_status_50") else {
        return;
    };
    // CNI_PATH with every plugin of the example but bridge.
    let dir = lab.dir.join("no-bridge");
    std::fs::create_dir_all(&dir).expect("mkdir no-bridge");
    for p in ["host-local", "portmap", "firewall", "tuning"] {
        std::os::unix::fs::symlink(format!("/usr/lib/cni/{p}"), dir.join(p))
            .expect("symlink a plugin");
    }
    let cni_path = format!("{}:{}", lab.bin().display(), dir.display());
    let out = lab.plugin(
        &network_env("STATUS", &cni_path),
        &outer_at("1.1.0").to_string(),
    );
    let err = out
        .cni_error()
        .unwrap_or_else(|| panic!("STATUS: no CNI error object: {out}"));
    assert_eq!(err.code, 50, "{out}");
    assert!(
        err.mentions("bridge"),
        "the error does not name bridge: {out}"
    );
    lab.assert_no_infra("after STATUS");
}

#[test]
fn disable_check_in_the_delegate_is_honoured() {
    let Some(lab) = Lab::new(lab::binary!(), "spec_disable_check") else {
        return;
    };
    for disable in [false, true] {
        let mut delegate = example_conflist()["plugins"][0]["delegate"].clone();
        delegate["disableCheck"] = json!(disable);
        let conf = outer_with_delegate("1.0.0", delegate);
        let c = lab.container();
        let id = format!("dc-{disable}");
        let result = add(&lab, &conf, &id, &c);
        let gone = lab.in_netns(&c, &["ip", "link", "del", "eth0"]);
        assert!(gone.ok(), "deleting eth0 by hand: {gone}");

        let mut check = conf.clone();
        check["prevResult"] = result;
        let out = lab.plugin(
            &lab.plugin_env("CHECK", &id, &c.netns()),
            &check.to_string(),
        );
        if disable {
            assert!(out.ok(), "CHECK with disableCheck: {out}");
        } else {
            assert!(!out.ok(), "CHECK passed although eth0 is gone: {out}");
            assert!(out.cni_error().is_some(), "no CNI error object: {out}");
        }
        del(&lab, &conf, &id, &c);
    }
    lab.assert_no_infra("at the end");
}

#[test]
fn del_without_netns_and_prev_result() {
    let Some(lab) = Lab::new(lab::binary!(), "spec_del_no_netns") else {
        return;
    };
    let conf = outer_at("1.0.0");
    let c = lab.container();
    let ip = result_ipv4(&add(&lab, &conf, "nons", &c)).expect("IPv4");
    assert_eq!(lab.lease_files(NET), [ip]);

    assert!(conf.get("prevResult").is_none());
    let env = without(lab.plugin_env("DEL", "nons", &c.netns()), "CNI_NETNS");
    let out = lab.plugin(&env, &conf.to_string());
    assert!(out.ok(), "DEL without CNI_NETNS: {out}");
    assert_eq!(
        lab.lease_files(NET),
        Vec::<String>::new(),
        "leases after DEL"
    );
    lab.assert_no_infra("after DEL");
    // The infra's end of the veth went with the infra, and so does eth0:
    // the kernel tears a dead netns down in the background, a little later.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while lab.links(&c) != ["lo"] && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(lab.links(&c), ["lo"], "links left in the container");
}

#[test]
fn static_ip_and_mac_from_the_runtime() {
    let Some(lab) = Lab::new(lab::binary!(), "spec_static") else {
        return;
    };
    // The inner chain for a static IP and MAC: bridge (host-local inside)
    // and tuning, declaring the capabilities that carry them.
    lab.write_netconf(NET, &testdata::conflist("static-ip-mac"));
    let cases = [
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;IP=10.89.0.77;MAC=02:42:0a:59:00:77".to_string(),
            "10.89.0.77",
            "02:42:0a:59:00:77",
        ),
        (
            "CAP_ARGS",
            json!({"ips": ["10.89.0.78/24"], "mac": "02:42:0a:59:00:78"}).to_string(),
            "10.89.0.78",
            "02:42:0a:59:00:78",
        ),
    ];
    let mut attached = Vec::new();
    for (var, value, ip, want_mac) in &cases {
        let c = lab.container();
        let add = lab.cnitool_env(&[(var, value)], "add", NET, &c.netns());
        assert!(add.ok(), "ADD with {var}={value}: {add}");
        assert_eq!(
            lab.ipv4(&c, "eth0").as_deref(),
            Some(*ip),
            "eth0's address with {var}={value} (result: {})",
            add.stdout
        );
        assert_eq!(
            mac(&lab, &c, "eth0").as_deref(),
            Some(*want_mac),
            "eth0's MAC with {var}={value} (result: {})",
            add.stdout
        );
        attached.push((c, *var, value.clone()));
    }
    lab.assert_ping(&attached[0].0, cases[1].2, "static .77 -> static .78");
    for (c, var, value) in &attached {
        let del = lab.cnitool_env(&[(var, value)], "del", NET, &c.netns());
        assert!(del.ok(), "DEL with {var}: {del}");
    }
    lab.assert_no_infra("at the end");
}
