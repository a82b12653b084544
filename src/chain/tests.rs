//! The chain's semantics with a fake executor: no infra, no plugins, no
//! lab. What a real plugin does with each call is the lab tests' business;
//! here only what the chain hands it and what it makes of the answers.

use super::*;
use crate::cni::version::CniVersion;
use crate::exec::ContainerNetns;
use serde_json::json;
use std::cell::RefCell;
use std::path::Path;
use std::time::Duration;

/// Plays every plugin: an ADD prints its prevResult (or an empty result)
/// with one more interface, named after the plugin and put in CNI_NETNS;
/// the other verbs print nothing. `fails` fail with code 11.
#[derive(Default)]
struct Fake {
    /// Every call: the verb, the plugin and the config it got.
    calls: RefCell<Vec<(Verb, String, Value)>>,
    fails: Vec<(Verb, &'static str)>,
    /// What the last ADD prints instead, byte for byte.
    prints: Option<Vec<u8>>,
}

impl Exec for Fake {
    type Plugin = String;

    fn find(plugin_type: &str, _cni_path: &[PathBuf]) -> Result<String> {
        match plugin_type {
            "missing" => Err(Error::new(Kind::InnerPlugin, "missing: not found")),
            t => Ok(t.to_string()),
        }
    }

    fn exec(&self, plugin: &String, verb: Verb, rt: &RuntimeConf, stdin: &[u8]) -> Result<Vec<u8>> {
        let config: Value = serde_json::from_slice(stdin).expect("the chain writes JSON");
        self.calls
            .borrow_mut()
            .push((verb, plugin.clone(), config.clone()));
        if self.fails.contains(&(verb, plugin.as_str())) {
            return Err(Error::new(Kind::TryAgainLater, format!("{plugin} failed")));
        }
        if verb != Verb::Add {
            return Ok(Vec::new());
        }
        if let (Some(bytes), "last") = (&self.prints, plugin.as_str()) {
            return Ok(bytes.clone());
        }
        let mut result = config
            .get("prevResult")
            .cloned()
            .unwrap_or_else(|| json!({"cniVersion": config["cniVersion"], "interfaces": []}));
        let iface = json!({"name": plugin, "sandbox": rt.netns.inner_path()});
        result["interfaces"].as_array_mut().unwrap().push(iface);
        Ok(serde_json::to_vec_pretty(&result).unwrap())
    }
}

impl Fake {
    fn failing(fails: &[(Verb, &'static str)]) -> Self {
        Fake {
            fails: fails.to_vec(),
            ..Fake::default()
        }
    }

    /// (verb, plugin) of every call, in order.
    fn order(&self) -> Vec<(Verb, String)> {
        let calls = self.calls.borrow();
        calls.iter().map(|(v, p, _)| (*v, p.clone())).collect()
    }

    /// The config the `n`th call got.
    fn config(&self, n: usize) -> Value {
        self.calls.borrow()[n].2.clone()
    }
}

fn list(version: &str, plugins: Value) -> InnerList {
    let conflist = json!({"cniVersion": version, "name": "inner", "plugins": plugins});
    InnerList::from_value(&conflist, None, "").unwrap()
}

fn types(names: &[&str]) -> Value {
    names.iter().map(|t| json!({"type": t})).collect()
}

/// Our own netns stands for the container's: a real nsfs file, so the
/// inner plugins know it as /proc/self/fd/N and the runtime by its path.
fn runtime_conf(capability_args: Value) -> RuntimeConf {
    let netns = ContainerNetns::open_if_present(Some(Path::new("/proc/self/ns/net")), None);
    assert!(netns.inner_path().starts_with("/proc/self/fd/"));
    RuntimeConf {
        container_id: "c1".into(),
        ifname: "eth0".into(),
        args: String::new(),
        cni_path: Vec::new(),
        netns,
        capability_args: capability_args.as_object().cloned().unwrap_or_default(),
        timeout: Duration::from_secs(1),
    }
}

fn chain<'a>(list: InnerList, rt: &'a RuntimeConf, fake: Fake) -> Chain<'a, Fake> {
    Chain::new(Plugins::find::<Fake>(list, &[]).unwrap(), rt, fake)
}

fn verbs(v: Verb, plugins: &[&str]) -> Vec<(Verb, String)> {
    plugins.iter().map(|p| (v, p.to_string())).collect()
}

fn names(result: &Value) -> Vec<&str> {
    let ifaces = result["interfaces"].as_array().unwrap();
    ifaces.iter().map(|i| i["name"].as_str().unwrap()).collect()
}

#[test]
fn a_plugin_missing_from_cni_path_stops_the_chain_before_it_runs() {
    let found = Plugins::find::<Fake>(list("1.0.0", types(&["a", "missing"])), &[]);
    assert_eq!(found.err().unwrap().kind, Kind::InnerPlugin);
}

#[test]
fn add_runs_the_plugins_in_order_each_with_the_previous_result() {
    let rt = runtime_conf(json!({}));
    let c = chain(list("1.0.0", types(&["a", "b", "c"])), &rt, Fake::default());
    let result = c.add(|_| {}).ok().unwrap();
    assert_eq!(c.exec.order(), verbs(Verb::Add, &["a", "b", "c"]));
    assert!(c.exec.config(0).get("prevResult").is_none());
    for n in 0..3 {
        let config = c.exec.config(n);
        assert_eq!(
            (&config["name"], &config["cniVersion"]),
            (&json!("inner"), &json!("1.0.0"))
        );
    }
    assert_eq!(names(&c.exec.config(1)["prevResult"]), ["a"]);
    assert_eq!(names(&c.exec.config(2)["prevResult"]), ["a", "b"]);
    assert_eq!(names(&result.value), ["a", "b", "c"]);
}

#[test]
fn progress_gets_every_result_but_the_last_as_the_runtime_names_the_netns() {
    let rt = runtime_conf(json!({}));
    let c = chain(list("1.0.0", types(&["a", "b", "c"])), &rt, Fake::default());
    let mut seen = Vec::new();
    c.add(|partial| seen.push(partial)).ok().unwrap();
    assert_eq!(seen.len(), 2);
    assert_eq!(names(&seen[1]), ["a", "b"]);
    assert_eq!(seen[1]["interfaces"][1]["sandbox"], "/proc/self/ns/net");
}

#[test]
fn each_plugin_gets_the_capability_args_it_declares_without_host_ip() {
    let mapping = json!({"hostPort": 8080, "containerPort": 80, "hostIP": "127.0.0.1"});
    let rt = runtime_conf(json!({"portMappings": [mapping], "aliases": ["web"]}));
    let plugins = json!([
        {"type": "bridge"},
        {"type": "portmap", "capabilities": {"portMappings": true}},
        {"type": "dnsname", "capabilities": {"aliases": true, "portMappings": false}},
    ]);
    let c = chain(list("1.0.0", plugins), &rt, Fake::default());
    c.add(|_| {}).ok().unwrap();
    assert!(c.exec.config(0).get("runtimeConfig").is_none());
    assert_eq!(
        c.exec.config(1)["runtimeConfig"],
        json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]})
    );
    assert_eq!(
        c.exec.config(2)["runtimeConfig"],
        json!({"aliases": ["web"]})
    );
}

#[test]
fn del_runs_in_reverse_with_the_cached_result() {
    let rt = runtime_conf(json!({}));
    let c = chain(list("1.0.0", types(&["a", "b", "c"])), &rt, Fake::default());
    let cached = json!({"cniVersion": "1.0.0", "interfaces": [{"name": "x"}]});
    c.del(Some(&cached)).unwrap();
    assert_eq!(c.exec.order(), verbs(Verb::Del, &["c", "b", "a"]));
    for n in 0..3 {
        assert_eq!(c.exec.config(n)["prevResult"], cached);
    }
}

#[test]
fn del_before_0_4_0_gets_no_cached_result() {
    let rt = runtime_conf(json!({}));
    let c = chain(list("0.3.1", types(&["a", "b"])), &rt, Fake::default());
    c.del(Some(&json!({"interfaces": []}))).unwrap();
    assert!(c.exec.config(0).get("prevResult").is_none());
}

#[test]
fn del_tries_every_plugin_and_reports_each_failure() {
    let rt = runtime_conf(json!({}));
    let fake = Fake::failing(&[(Verb::Del, "c"), (Verb::Del, "a")]);
    let c = chain(list("1.0.0", types(&["a", "b", "c"])), &rt, fake);
    let e = c.del(None).unwrap_err();
    assert_eq!(c.exec.order(), verbs(Verb::Del, &["c", "b", "a"]));
    assert!(
        e.msg.contains("c failed") && e.details.contains("a failed"),
        "{e}"
    );
}

#[test]
fn a_failing_add_step_is_rolled_back_in_reverse_with_what_ran() {
    let rt = runtime_conf(json!({}));
    let fake = Fake::failing(&[(Verb::Add, "b")]);
    let c = chain(list("1.0.0", types(&["a", "b", "c"])), &rt, fake);
    let failure = c.add(|_| {}).err().unwrap();
    assert!(failure.undone);
    assert!(failure.error.msg.contains("b failed"));
    let mut want = verbs(Verb::Add, &["a", "b"]);
    want.extend(verbs(Verb::Del, &["c", "b", "a"]));
    assert_eq!(c.exec.order(), want);
    for n in 2..5 {
        assert_eq!(names(&c.exec.config(n)["prevResult"]), ["a"]);
    }
}

#[test]
fn a_rollback_that_fails_says_what_is_left() {
    let rt = runtime_conf(json!({}));
    let fake = Fake::failing(&[(Verb::Add, "b"), (Verb::Del, "a")]);
    let c = chain(list("1.0.0", types(&["a", "b"])), &rt, fake);
    let failure = c.add(|_| {}).err().unwrap();
    assert!(!failure.undone);
    assert!(failure.error.msg.contains("b failed"), "{}", failure.error);
}

#[test]
fn a_result_that_is_not_json_fails_the_add_and_is_rolled_back() {
    let rt = runtime_conf(json!({}));
    let fake = Fake {
        prints: Some(b"not json".to_vec()),
        ..Fake::default()
    };
    let c = chain(list("1.0.0", types(&["a", "last"])), &rt, fake);
    let failure = c.add(|_| {}).err().unwrap();
    assert_eq!(failure.error.kind, Kind::InnerPlugin);
    assert!(failure.error.msg.contains("last"), "{}", failure.error);
    assert_eq!(c.exec.order().last(), Some(&(Verb::Del, "a".to_string())));
}

#[test]
fn check_runs_in_order_with_the_cached_result_and_stops_at_a_failure() {
    let rt = runtime_conf(json!({}));
    let fake = Fake::failing(&[(Verb::Check, "b")]);
    let c = chain(list("1.0.0", types(&["a", "b", "c"])), &rt, fake);
    let cached = json!({"cniVersion": "1.0.0"});
    assert!(c.check(&cached).unwrap_err().msg.contains("b failed"));
    assert_eq!(c.exec.order(), verbs(Verb::Check, &["a", "b"]));
    assert_eq!(c.exec.config(1)["prevResult"], cached);
}

#[test]
fn gc_tells_every_plugin_the_attachments_to_keep_and_carries_on_past_failures() {
    let rt = runtime_conf(json!({}));
    let fake = Fake::failing(&[(Verb::Gc, "a"), (Verb::Gc, "b")]);
    let c = chain(list("1.1.0", types(&["a", "b", "c"])), &rt, fake);
    let e = c.gc(&[("c1".into(), "eth0".into())]).unwrap_err();
    assert!(
        e.msg.contains("a failed") && e.details.contains("b failed"),
        "{e}"
    );
    assert_eq!(c.exec.order(), verbs(Verb::Gc, &["a", "b", "c"]));
    let keep = json!([{"containerID": "c1", "ifname": "eth0"}]);
    assert_eq!(c.exec.config(2)["cni.dev/valid-attachments"], keep);
    assert!(c.exec.config(2).get("prevResult").is_none());
}

#[test]
fn status_stops_at_the_first_plugin_not_available() {
    let rt = runtime_conf(json!({}));
    let fake = Fake::failing(&[(Verb::Status, "b")]);
    let c = chain(list("1.1.0", types(&["a", "b", "c"])), &rt, fake);
    assert!(c.status().is_err());
    assert_eq!(c.exec.order(), verbs(Verb::Status, &["a", "b"]));
    assert!(c.exec.config(0).get("cni.dev/valid-attachments").is_none());
}

#[test]
fn gc_and_status_pass_over_an_inner_chain_before_1_1_0() {
    let rt = runtime_conf(json!({}));
    let fake = Fake::failing(&[(Verb::Gc, "a"), (Verb::Status, "a")]);
    let c = chain(list("1.0.0", types(&["a"])), &rt, fake);
    c.gc(&[]).unwrap();
    c.status().unwrap();
    assert!(c.exec.order().is_empty());
}

#[test]
fn the_cached_result_names_the_netns_as_this_call_gives_it() {
    let rt = runtime_conf(json!({}));
    let c = chain(list("1.0.0", types(&["a"])), &rt, Fake::default());
    let result = json!({"interfaces": [{"name": "eth0", "sandbox": "/run/netns/c1"}]});
    let rec = Attachment {
        state: crate::state::AttachmentState::Ready,
        network: "outer".into(),
        container_id: "c1".into(),
        ifname: "eth0".into(),
        netns: Some("/run/netns/c1".into()),
        netns_inode: None,
        infra: crate::procfs::ProcessId {
            pid: 1,
            start_time: 1,
        },
        owner: None,
        config: Value::Null,
        cni_args: String::new(),
        capability_args: Map::new(),
        result: Some(result),
        created: 1,
        created_nanos: 0,
    };
    let cached = c.cached_result(&rec).unwrap();
    assert_eq!(cached["interfaces"][0]["sandbox"], rt.netns.inner_path());
}

#[test]
fn reply_at_the_inner_version_is_what_the_plugin_printed_but_the_netns() {
    let rt = runtime_conf(json!({}));
    let c = chain(list("1.0.0", types(&["a"])), &rt, Fake::default());
    let result = c.add(|_| {}).ok().unwrap();
    let reply = c.reply(&result, &CniVersion::V1_0_0, None).unwrap();
    let want = String::from_utf8(result.raw.clone())
        .unwrap()
        .replace(&rt.netns.inner_path(), "/proc/self/ns/net");
    assert_eq!(String::from_utf8(reply).unwrap(), want);
}

#[test]
fn reply_after_other_plugins_follows_their_result_at_the_runtime_version() {
    let rt = runtime_conf(json!({}));
    let c = chain(list("1.0.0", types(&["a"])), &rt, Fake::default());
    let result = c.add(|_| {}).ok().unwrap();
    let prev = json!({"cniVersion": "1.1.0", "interfaces": [{"name": "before"}]});
    let reply: Value =
        serde_json::from_slice(&c.reply(&result, &CniVersion::V1_1_0, Some(&prev)).unwrap())
            .unwrap();
    assert_eq!(reply["cniVersion"], "1.1.0");
    assert_eq!(names(&reply), ["before", "a"]);
    assert_eq!(reply["interfaces"][1]["sandbox"], "/proc/self/ns/net");
}

#[test]
fn undo_deletes_with_the_whole_result() {
    let rt = runtime_conf(json!({}));
    let c = chain(list("1.0.0", types(&["a", "b"])), &rt, Fake::default());
    let result = c.add(|_| {}).ok().unwrap();
    c.undo(&result).unwrap();
    assert_eq!(&c.exec.order()[2..], verbs(Verb::Del, &["b", "a"]));
    assert_eq!(names(&c.exec.config(2)["prevResult"]), ["a", "b"]);
}

/// testdata/results/: what the last inner plugin printed at each version
/// (`inner-V.json`), and what the runtime gets for it at each version
/// (`V-as-W.json`), byte for byte. With ROOTLESS_CNI_BLESS set, the
/// expected files are written from what the chain answers instead (then
/// read them: they are the contract); never in CI, see `bless`.
#[test]
fn results_convert_to_every_runtime_version_as_the_golden_files_say() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/results");
    let bless = bless();
    let mut wrong = Vec::new();
    for inner in version::SUPPORTED {
        let printed = std::fs::read(dir.join(format!("inner-{inner}.json"))).unwrap();
        // No netns: the sandbox paths are left as the plugin printed them.
        let rt = RuntimeConf {
            netns: ContainerNetns::open_if_present(None, None),
            ..runtime_conf(json!({}))
        };
        let fake = Fake {
            prints: Some(printed),
            ..Fake::default()
        };
        let c = chain(list(inner, types(&["last"])), &rt, fake);
        let result = c.add(|_| {}).ok().unwrap();
        for runtime in version::SUPPORTED {
            let golden = dir.join(format!("{inner}-as-{runtime}.json"));
            let reply = c.reply(&result, &CniVersion::new(*runtime), None).unwrap();
            if bless {
                std::fs::write(&golden, &reply).unwrap();
            } else if std::fs::read(&golden).ok() != Some(reply.clone()) {
                let reply = String::from_utf8_lossy(&reply);
                wrong.push(format!("{}:\n{reply}", golden.display()));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "not as the golden files say:\n{}",
        wrong.join("\n")
    );
}

/// Whether the golden files are to be rewritten: ROOTLESS_CNI_BLESS set to
/// anything but empty, `0`, `false`, `no` or `off` (the rule CI follows in
/// the lab crate, lab/). Refused when CI is set so: there a blessing run would
/// write whatever the code answers and pass, checking nothing.
fn bless() -> bool {
    let set = |name: &str| {
        std::env::var(name).is_ok_and(|v| {
            !matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "" | "0" | "false" | "no" | "off"
            )
        })
    };
    let bless = set("ROOTLESS_CNI_BLESS");
    assert!(
        !(bless && set("CI")),
        "ROOTLESS_CNI_BLESS is set in a CI run: CI compares the golden files, it never rewrites them"
    );
    bless
}

/// In CI the golden files are the contract being checked: a blessing run
/// there would rewrite them from whatever the code answers and pass. With
/// CI set, ROOTLESS_CNI_BLESS fails the golden test instead (run here as
/// its own process, so this run's environment is left alone).
#[test]
fn blessing_the_golden_files_fails_under_ci() {
    let golden = "chain::tests::results_convert_to_every_runtime_version_as_the_golden_files_say";
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([golden, "--exact", "--test-threads=1"])
        .env("CI", "true")
        .env("ROOTLESS_CNI_BLESS", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("running 1 test"), "{stdout}");
    assert!(!out.status.success(), "blessed under CI:\n{stdout}");
    assert!(stdout.contains("ROOTLESS_CNI_BLESS"), "{stdout}");
}
