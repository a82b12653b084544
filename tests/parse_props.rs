//! Property tests (proptest) over the parsing of a plugin call,
//! in-process: `plugin::parse_call` with generated CNI_* environments and
//! generated or mutated network configs. Whatever the input, it never
//! panics, a failure carries the spec's code for its kind and names the
//! culprit, and what it accepts is safe to act on (ids and interface names
//! that can become file names, an absolute netns path).
//!
//! CI runs the default 256 cases a property; PROPTEST_CASES raises that
//! (scripts/fuzz runs it long). tests/fuzz.rs does the same through the
//! binary, with state files too.
//!
//! Also in-process: every conflist of testdata/conflists/ is a config the
//! plugin accepts, and cni-VERSION.conflist is the example network at
//! VERSION and nothing else.

use lab::{example_conflist, testdata};
use proptest::prelude::*;
use rootless_cni::cni::config::{OWN_KEYS, SPEC_KEYS};
use rootless_cni::cni::gojson;
use rootless_cni::error::Kind;
use rootless_cni::plugin::{parse_call, Call};
use rootless_cni::ports;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

const VARS: [&str; 6] = [
    "CNI_COMMAND",
    "CNI_CONTAINERID",
    "CNI_NETNS",
    "CNI_IFNAME",
    "CNI_PATH",
    "CNI_ARGS",
];

/// A config that parses: the example network's outer config at 1.1.0,
/// which knows every verb.
fn valid_config() -> Value {
    testdata::outer_at("1.1.0")
}

fn valid_env() -> BTreeMap<String, String> {
    [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c0ffee"),
        ("CNI_NETNS", "/proc/1/ns/net"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/usr/lib/cni"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Strings a runtime, or an attacker, could put in a variable or a key:
/// valid ones, path tricks, control characters, huge ones, anything.
fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("..".to_string()),
        Just("../../x".to_string()),
        Just("a/b".to_string()),
        Just("/".to_string()),
        Just("eth0".to_string()),
        Just("0123456789abcdef".to_string()),
        Just("x\0y".to_string()),
        Just("-rf".to_string()),
        Just(" ".to_string()),
        Just("ADD".to_string()),
        Just("VERSION".to_string()),
        Just("1.1.0".to_string()),
        Just("0.3.1".to_string()),
        "[a-zA-Z0-9_.-]{1,20}",
        "/[a-z/.]{0,40}",
        "\\PC{0,64}",
        any::<String>(),
        (1usize..6000).prop_map(|n| "a".repeat(n)),
    ]
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        (0u64..100_000).prop_map(Value::from),
        hostile_string().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(hostile_string(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// The keys the parser reads: ours and the spec's.
fn known_keys() -> Vec<&'static str> {
    OWN_KEYS.iter().chain(SPEC_KEYS).copied().collect()
}

/// A key of ours or the spec's, or any other.
fn config_key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(known_keys()).prop_map(String::from),
        1 => hostile_string(),
    ]
}

fn lookup(env: &BTreeMap<String, String>) -> impl Fn(&str) -> Option<String> + '_ {
    |k| env.get(k).cloned()
}

/// The checks every outcome must pass; `culprit` is a word the message of
/// a failure must contain, when one is known.
fn check(outcome: &rootless_cni::error::Result<Call>, allowed: &[Kind], culprit: Option<&str>) {
    match outcome {
        Ok(call) => {
            let env = &call.env;
            let id = &env.container_id;
            assert!(
                id.len() <= 128,
                "accepted a container id of {} bytes",
                id.len()
            );
            assert!(
                !id.contains('/') && !id.contains('\0') && id != "." && id != "..",
                "accepted container id {id:?}"
            );
            let ifname = &env.ifname;
            assert!(ifname.len() <= 15, "accepted ifname {ifname:?}");
            assert!(
                !ifname.contains('/') && ifname != "." && ifname != "..",
                "accepted ifname {ifname:?}"
            );
            if let Some(netns) = &env.netns {
                assert!(netns.is_absolute(), "accepted relative netns {netns:?}");
            }
            if let Some(conf) = &call.conf {
                // Reading a `network` from a dir that does not exist may
                // fail, but never panic.
                let _ = conf.inner_list();
            }
        }
        Err(e) => {
            assert!(
                allowed.contains(&e.kind),
                "{:?} not one of {allowed:?}: {e}",
                e.kind
            );
            assert!(!e.msg.trim().is_empty(), "an error without a message");
            if let Some(word) = culprit {
                // Named as it is, or quoted with escapes ({:?}).
                let quoted = format!("{word:?}");
                assert!(
                    e.msg.contains(word) || e.msg.contains(&quoted),
                    "the message does not name {word:?}: {e}"
                );
            }
        }
    }
}

proptest! {
    // A failing case is printed, minimised, with the seed; no regression
    // file is written into the source tree.
    #![proptest_config(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Each CNI_* variable absent or set to anything, with a valid config:
    /// accepted, or code 4 naming a CNI_ variable.
    #[test]
    fn any_environment(
        vars in prop::collection::btree_map(
            prop::sample::select(VARS.to_vec()),
            prop::option::of(hostile_string()),
            0..7,
        ),
        verb in prop::sample::select(vec!["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION"]),
    ) {
        let mut env = valid_env();
        env.insert("CNI_COMMAND".into(), verb.into());
        for (k, v) in vars {
            match v {
                Some(v) => env.insert(k.to_string(), v),
                None => env.remove(k),
            };
        }
        let stdin = valid_config().to_string();
        check(&parse_call(lookup(&env), stdin.as_bytes()), &[Kind::InvalidEnv], Some("CNI_"));
    }

    /// Any JSON document as the config: accepted, or a decode, config or
    /// version error.
    #[test]
    fn any_json_config(conf in json_value()) {
        let stdin = conf.to_string();
        let allowed = [Kind::Decode, Kind::InvalidConfig, Kind::IncompatibleVersion];
        check(&parse_call(lookup(&valid_env()), stdin.as_bytes()), &allowed, None);
    }

    /// Any bytes as stdin, up to a few KiB.
    #[test]
    fn any_bytes(stdin in prop::collection::vec(any::<u8>(), 0..4096)) {
        check(&parse_call(lookup(&valid_env()), &stdin), &[Kind::Decode], None);
    }

    /// A valid config with one key set to anything: accepted, or an error
    /// whose message names that key (or, for cniVersion, the version).
    #[test]
    fn one_key_changed(key in config_key(), value in json_value()) {
        let mut conf = valid_config();
        conf.as_object_mut().expect("an object").insert(key.clone(), value.clone());
        let stdin = conf.to_string();
        let outcome = parse_call(lookup(&valid_env()), stdin.as_bytes());
        let culprit = match (key.as_str(), &value) {
            ("cniVersion", Value::String(v)) => v.clone(),
            _ => key.clone(),
        };
        let allowed = [Kind::Decode, Kind::InvalidConfig, Kind::IncompatibleVersion];
        check(&outcome, &allowed, Some(&culprit));
    }

    /// A valid config with one key removed: accepted, or an error naming it.
    #[test]
    fn one_key_removed(key in prop::sample::select(known_keys())) {
        let mut conf = valid_config();
        conf.as_object_mut().expect("an object").remove(key);
        let stdin = conf.to_string();
        let outcome = parse_call(lookup(&valid_env()), stdin.as_bytes());
        check(&outcome, &[Kind::InvalidConfig], Some(key));
    }

    /// A valid port mapping whose keys are spelt in any case (as Go's
    /// encoding/json would accept them; go-cni writes `HostPort`): read as
    /// the mapping it is, and handed to the inner plugins with the same
    /// ports and no `hostIP` in any spelling (the forward honours it).
    #[test]
    fn any_case_of_a_port_mapping(
        host_port in 1u16..,
        container_port in 1u16..,
        udp in any::<bool>(),
        host_ip in prop::sample::select(vec!["127.0.0.1", "", "0.0.0.0", "::", "::1"]),
        spellings in prop::collection::vec(any::<u32>(), 4),
    ) {
        let names = ["hostPort", "containerPort", "protocol", "hostIP"];
        let keys: Vec<String> = names.iter().zip(&spellings).map(|(n, bits)| go_spelling(n, *bits)).collect();
        let protocol = if udp { "udp" } else { "tcp" };
        let mapping: Map<String, Value> = keys
            .iter()
            .cloned()
            .zip([json!(host_port), json!(container_port), json!(protocol), json!(host_ip)])
            .collect();
        let rc = json!({ "portMappings": [mapping] });
        let rc = rc.as_object().expect("an object");

        let read = ports::from_runtime_config(rc);
        prop_assert!(read.is_ok(), "{keys:?}: {read:?}");
        let read = read.expect("checked");
        prop_assert_eq!(read.len(), 1);
        prop_assert_eq!(read[0].host_port, host_port);
        prop_assert_eq!(read[0].container_port, container_port);
        prop_assert_eq!(read[0].protocol == ports::Protocol::Udp, udp);
        prop_assert_eq!(read[0].host_ip, host_ip.parse().ok());

        let inner = ports::inner_capability_args(rc);
        let inner_mapping = &inner["portMappings"][0];
        let inner_mapping = inner_mapping.as_object().expect("an object");
        prop_assert!(
            !inner_mapping.keys().any(|k| gojson::key_matches(k, "hostIP")),
            "hostIP left for the inner plugins: {inner_mapping:?}"
        );
        prop_assert_eq!(gojson::field(inner_mapping, "hostPort"), Some(&json!(host_port)));
        prop_assert_eq!(gojson::field(inner_mapping, "containerPort"), Some(&json!(container_port)));
        prop_assert_eq!(gojson::field(inner_mapping, "protocol"), Some(&json!(protocol)));
    }
}

/// `name` spelt as `bits` say: each ASCII letter upper or lower case, and
/// `s`/`k` sometimes as the runes Go folds onto them (`ſ`, the Kelvin sign).
fn go_spelling(name: &str, bits: u32) -> String {
    name.chars()
        .enumerate()
        .map(|(i, c)| {
            let bit = |n: usize| bits >> ((i * 2 + n) % 32) & 1 == 1;
            match (c.to_ascii_lowercase(), bit(0), bit(1)) {
                ('s', true, true) => '\u{17F}',
                ('k', true, true) => '\u{212A}',
                (c, true, _) => c.to_ascii_uppercase(),
                (c, false, _) => c,
            }
        })
        .collect()
}

#[test]
fn every_conflist_of_testdata_is_a_config_the_plugin_accepts() {
    let dir = testdata::path("conflists");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .expect("testdata/conflists")
        .map(|e| e.expect("an entry").path())
        .collect();
    names.sort();
    assert!(names.len() >= 5, "{names:?}");
    for path in names {
        let name = path.file_stem().and_then(|n| n.to_str()).expect("a name");
        let stdin = lab::plugin_stdin(&testdata::conflist(name)).to_string();
        if let Err(e) = parse_call(lookup(&valid_env()), stdin.as_bytes()) {
            panic!("{}: {e}", path.display());
        }
    }
}

#[test]
fn the_conflist_of_each_version_is_the_example_at_that_version() {
    for version in rootless_cni::cni::version::SUPPORTED {
        let mut example = example_conflist();
        example["cniVersion"] = json!(version);
        assert_eq!(
            testdata::conflist(&format!("cni-{version}")),
            example,
            "{version}"
        );
    }
}
