//! The fuzzer's inputs: random and mutated configs, environments and state
//! files. CNI_PATH never exists, so no inner plugin and no infra ever runs.

use super::place::Place;
use lab::Rng;
use rootless_cni::cni::config::{OWN_KEYS, SPEC_KEYS};
use serde_json::{json, Map, Value};
use std::fs;
use std::path::PathBuf;

/// Where a CNI_PATH points: never a dir that exists.
const NO_CNI_PATH: &str = "/nonexistent/rootless-cni-fuzz/bin";

/// One call: the environment (None: variable unset) and stdin.
#[derive(Debug, Clone)]
pub struct Input {
    pub env: Vec<(&'static str, Option<Vec<u8>>)>,
    pub stdin: Vec<u8>,
}

impl Input {
    pub fn describe(&self) -> String {
        let env: Vec<String> = self
            .env
            .iter()
            .map(|(k, v)| match v {
                None => format!("{k} unset"),
                Some(v) => format!("{k}={:?}", String::from_utf8_lossy(v)),
            })
            .collect();
        let stdin = String::from_utf8_lossy(&self.stdin);
        let stdin: String = stdin.chars().take(2000).collect();
        format!("env: {}\nstdin: {stdin}", env.join(" "))
    }
}

const STRINGS: &[&str] = &[
    "",
    "x",
    "0",
    "30",
    "5s",
    "5m",
    "1h",
    "0s",
    "-1s",
    "1.5s",
    "18446744073709551615",
    "18446744073709551615s",
    "5124095576030431h",
    "9999999999999h",
    "builtin",
    "slirp4netns",
    "off",
    "error",
    "trace",
    "0.3.0",
    "0.4.0",
    "1.0.0",
    "1.1.0",
    "2.0.0",
    "rootless",
    "inner",
    "broken",
    "bridge",
    "../x",
    "a/b",
    "/",
    ".",
    "..",
    "tcp",
    "udp",
    "127.0.0.1",
    "::1",
    "10.89.0.0/24",
    "\u{0}",
    "é\u{202e}",
];
const VERSIONS: &[&str] = &[
    "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0", "0.2.0", "1.0", "x",
];

fn number(rng: &mut Rng) -> Value {
    match rng.below(12) {
        0 => json!(0),
        1 => json!(1),
        2 => json!(-1),
        3 => json!(u64::MAX),
        4 => json!(i64::MIN),
        5 => json!(i64::MAX),
        6 => json!(1u64 << 32),
        7 => json!(65520),
        8 => json!(576),
        9 => json!(1e300),
        10 => json!(0.5),
        _ => json!(rng.below(100_000)),
    }
}

fn string(rng: &mut Rng) -> String {
    match rng.below(5) {
        0 => {
            let len = rng.below(40) as usize;
            (0..len)
                .map(|_| char::from_u32(rng.below(0x3000) as u32).unwrap_or('?'))
                .collect()
        }
        1 => "y".repeat(rng.below(5000) as usize),
        _ => rng.pick(STRINGS).to_string(),
    }
}

fn value(rng: &mut Rng, depth: u32) -> Value {
    let kinds = if depth > 3 { 5 } else { 7 };
    match rng.below(kinds) {
        0 => Value::Null,
        1 => json!(rng.chance(50)),
        2 | 3 => number(rng),
        4 => Value::String(string(rng)),
        5 => Value::Array((0..rng.below(4)).map(|_| value(rng, depth + 1)).collect()),
        _ => {
            let mut m = Map::new();
            for _ in 0..rng.below(4) {
                let key = if rng.chance(50) {
                    rng.pick(SPEC_KEYS).to_string()
                } else {
                    string(rng)
                };
                m.insert(key, value(rng, depth + 1));
            }
            Value::Object(m)
        }
    }
}

/// A plugin config of the inner chain, sometimes broken.
fn inner_plugin(rng: &mut Rng) -> Value {
    let mut p = json!({ "type": rng.pick(&["bridge", "portmap", "host-local", "tuning", "x"]) });
    if rng.chance(30) {
        p["capabilities"] = json!({ "portMappings": rng.chance(70) });
    }
    if rng.chance(20) {
        p["type"] = value(rng, 2);
    }
    if rng.chance(20) {
        p["ipam"] = json!({ "type": "host-local", "ranges": [[{ "subnet": "10.89.0.0/24" }]] });
    }
    p
}

fn delegate(rng: &mut Rng) -> Value {
    match rng.below(6) {
        0 => inner_plugin(rng),
        1 => value(rng, 1),
        _ => {
            let mut d = json!({
                "cniVersion": rng.pick(VERSIONS),
                "name": rng.pick(&["rootless", "inner", "../x", ""]),
                "plugins": (0..rng.below(4)).map(|_| inner_plugin(rng)).collect::<Vec<_>>(),
            });
            for key in ["cniVersion", "name", "disableCheck", "disableGC"] {
                if rng.chance(15) {
                    d[key] = value(rng, 2);
                }
            }
            d
        }
    }
}

fn port_mappings(rng: &mut Rng) -> Value {
    let one = |rng: &mut Rng| {
        let mut m = json!({
            "hostPort": number(rng),
            "containerPort": number(rng),
            "protocol": rng.pick(&["tcp", "udp", "sctp", ""]),
        });
        if rng.chance(30) {
            m["hostIP"] = json!(rng.pick(&["127.0.0.1", "::1", "x", "0.0.0.0"]));
        }
        m
    };
    if rng.chance(10) {
        return value(rng, 1);
    }
    Value::Array((0..rng.below(3)).map(|_| one(rng)).collect())
}

/// A value of the right type for `key`, often at the edge of its range.
fn plausible(rng: &mut Rng, key: &str) -> Value {
    match key {
        "mtu" => json!(*rng.pick(&[575u64, 576, 1500, 65520, 65521, u64::MAX])),
        "allowHostLoopback" | "ipv6" => json!(rng.chance(50)),
        "portDriver" => json!(*rng.pick(&["builtin", "slirp4netns", "Builtin", ""])),
        "logLevel" => json!(*rng.pick(&["off", "error", "warn", "info", "debug", "trace", "WARN"])),
        "network" => json!(*rng.pick(&["inner", "broken", "absent", "rootless", "x.y-z_0"])),
        // The three durations.
        _ => match rng.below(10) {
            0 => json!(0),
            1 => json!(1),
            2 => json!(u64::MAX),
            3 => json!(u64::MAX / 2),
            4 => json!("0s"),
            5 => json!("5124095576030431h"),
            6 => json!("307445734561825860m"),
            7 => json!("18446744073709551615s"),
            8 => json!("9999999999999h"),
            _ => json!(format!("{}s", rng.below(100))),
        },
    }
}

/// Our config: a valid one, then keys changed, added and removed.
fn config(rng: &mut Rng, place: &Place) -> Value {
    let mut c = json!({
        "cniVersion": rng.pick(VERSIONS),
        "name": "rootless",
        "type": "rootless-cni",
    });
    if rng.chance(75) {
        c["delegate"] = delegate(rng);
    } else {
        c["network"] = json!(rng.pick(&["inner", "broken", "absent", "../../x"]));
        if rng.chance(70) {
            c["confDir"] = json!(place.dir.join("conf").display().to_string());
        }
    }
    for _ in 0..rng.below(5) {
        let key = *rng.pick(OWN_KEYS);
        let v = match key {
            // Never a state dir outside the place.
            "stateDir" => rng.pick(&place.state_dirs()).clone(),
            "confDir" if rng.chance(50) => {
                json!(place.dir.join("conf").display().to_string())
            }
            "delegate" => delegate(rng),
            _ if rng.chance(50) => plausible(rng, key),
            _ if rng.chance(40) => Value::String(string(rng)),
            _ if rng.chance(50) => number(rng),
            _ => value(rng, 1),
        };
        c[key] = v;
    }
    if rng.chance(20) {
        c["runtimeConfig"] = if rng.chance(80) {
            json!({ "portMappings": port_mappings(rng) })
        } else {
            value(rng, 1)
        };
    }
    if rng.chance(15) {
        c["cni.dev/valid-attachments"] = if rng.chance(70) {
            json!([{ "containerID": "c1", "ifname": "eth0" }])
        } else {
            value(rng, 1)
        };
    }
    if rng.chance(10) {
        c["prevResult"] = value(rng, 1);
    }
    if rng.chance(10) {
        let key = if rng.chance(50) {
            rng.pick(SPEC_KEYS).to_string()
        } else {
            string(rng)
        };
        if key != "stateDir" {
            c[key.as_str()] = value(rng, 1);
        }
    }
    if rng.chance(10) {
        let key = *rng.pick(&["cniVersion", "name", "delegate", "type"]);
        if let Some(o) = c.as_object_mut() {
            o.remove(key);
        }
    }
    c
}

/// Byte-level damage: flips, cuts, inserts, repeats.
fn mutate_bytes(rng: &mut Rng, mut bytes: Vec<u8>) -> Vec<u8> {
    for _ in 0..1 + rng.below(4) {
        if bytes.is_empty() {
            bytes.push(b'{');
        }
        let at = rng.below(bytes.len() as u64) as usize;
        match rng.below(5) {
            0 => bytes[at] ^= 1 << rng.below(8),
            1 => bytes.truncate(at),
            2 => bytes.insert(at, *rng.pick(b"{}[]\",:\\0\xff\x00 ")),
            3 => {
                let end = (at + 1 + rng.below(16) as usize).min(bytes.len());
                let piece = bytes[at..end].to_vec();
                bytes.splice(at..at, piece);
            }
            _ => bytes[at] = rng.below(256) as u8,
        }
    }
    bytes
}

fn env_value(rng: &mut Rng, pool: &[&str]) -> Option<Vec<u8>> {
    match rng.below(20) {
        0 => None,
        1 => Some(Vec::new()),
        2 => Some(
            (0..rng.below(20))
                .map(|_| 1 + rng.below(255) as u8)
                .collect(),
        ),
        3 => Some(vec![b'a'; rng.below(5000) as usize + 1]),
        _ => Some(rng.pick(pool).as_bytes().to_vec()),
    }
}

/// One call's input: a config (often broken) and an environment.
pub fn input(rng: &mut Rng, place: &Place) -> Input {
    fn some(s: impl AsRef<str>) -> Option<Vec<u8>> {
        Some(s.as_ref().as_bytes().to_vec())
    }
    // Mostly a valid environment, so that the config is what is tested.
    let mut env = vec![
        (
            "CNI_COMMAND",
            some(rng.pick(&["ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS"])),
        ),
        ("CNI_CONTAINERID", some(rng.pick(&["c1", "c2"]))),
        (
            "CNI_NETNS",
            some(rng.pick(&["/proc/self/ns/net", "/nonexistent/netns"])),
        ),
        ("CNI_IFNAME", some("eth0")),
        (
            "CNI_ARGS",
            some(rng.pick(&["", "IgnoreUnknown=1;K8S_POD_NAME=x"])),
        ),
        ("CNI_PATH", some(NO_CNI_PATH)),
    ];
    // Then one or two variables made hostile.
    if rng.chance(35) {
        for _ in 0..1 + rng.below(2) {
            let i = rng.below(env.len() as u64) as usize;
            env[i].1 = match env[i].0 {
                "CNI_COMMAND" => env_value(rng, &["ADD", "DEL", "add", "FOO", "VERSION "]),
                "CNI_CONTAINERID" => env_value(rng, &["a/b", "..", "-x", "c1.eth0_x"]),
                "CNI_NETNS" => env_value(rng, &["rel/ns", "/dev/null", "/", ""]),
                "CNI_IFNAME" => env_value(rng, &["abcdefghijklmnop", "..", "a/b", "net1"]),
                "CNI_ARGS" => env_value(rng, &["a=b;;=", "x", "=;="]),
                // CNI_PATH: never a dir that exists.
                _ => match rng.below(4) {
                    0 => None,
                    1 => Some(Vec::new()),
                    2 => some(format!("{NO_CNI_PATH}:/nonexistent/also")),
                    _ => some(":::"),
                },
            };
        }
    }
    if env.iter().all(|(_, v)| v.is_none()) {
        // Without any CNI_* variable it is the CLI, not a plugin.
        env.push(("CNI_PATH", Some(NO_CNI_PATH.as_bytes().to_vec())));
    }
    let conf = config(rng, place);
    let has_state_dir = conf.get("stateDir").is_some_and(Value::is_string);
    let mut stdin = if rng.chance(50) {
        serde_json::to_vec_pretty(&conf).expect("json")
    } else {
        serde_json::to_vec(&conf).expect("json")
    };
    // Byte damage could turn a state dir path into one outside the place.
    if !has_state_dir && rng.chance(25) {
        stdin = mutate_bytes(rng, stdin);
    }
    if rng.chance(2) {
        stdin = (0..rng.below(3000)).map(|_| rng.below(256) as u8).collect();
    }
    Input { env, stdin }
}

/// A record for container c1 or c2 (or garbage), and an infra.json whose
/// processes are never alive: what DEL, CHECK and GC read.
pub fn scribble_state(rng: &mut Rng, place: &Place) {
    let state = place.state();
    let write = |path: PathBuf, bytes: Vec<u8>| {
        if fs::write(&path, bytes).is_ok() {
            place.own(&path);
        }
    };
    let dead = |rng: &mut Rng| {
        json!({ "pid": *rng.pick(&[0i64, -1, 4_194_304_000, i32::MAX as i64]),
                "start_time": number(rng) })
    };
    if rng.chance(30) {
        let id = *rng.pick(&["c1", "c2"]);
        let mut rec = json!({
            "state": rng.pick(&["ready", "pending", "gone"]),
            "network": "rootless", "containerId": id, "ifname": "eth0",
            "netns": "/nonexistent/netns", "netnsInode": number(rng),
            "infra": dead(rng), "owner": dead(rng),
            "config": delegate(rng), "cniArgs": "",
            "capabilityArgs": { "portMappings": port_mappings(rng) },
            "result": value(rng, 1), "created": number(rng),
        });
        if rng.chance(30) {
            let key = *rng.pick(&["state", "infra", "config", "capabilityArgs", "result"]);
            rec[key] = value(rng, 1);
        }
        let mut bytes = serde_json::to_vec(&rec).expect("json");
        if rng.chance(20) {
            bytes = mutate_bytes(rng, bytes);
        }
        write(
            state.join(format!("attachments/rootless+{id}+eth0.json")),
            bytes,
        );
    }
    if rng.chance(20) {
        let mut info = json!({
            "supervisor": dead(rng), "sandbox": dead(rng), "slirp4netns": dead(rng),
            "netns": number(rng), "mntns": number(rng), "userns": number(rng),
            "started": number(rng),
            "settings": { "mtu": 65520, "allowHostLoopback": false, "ipv6": false,
                          "portDriver": "builtin", "idleTimeoutSecs": null, "logLevel": "warn" },
        });
        if rng.chance(30) {
            info["settings"] = value(rng, 1);
        }
        let mut bytes = serde_json::to_vec(&info).expect("json");
        if rng.chance(20) {
            bytes = mutate_bytes(rng, bytes);
        }
        write(state.join("infra.json"), bytes);
    }
}
