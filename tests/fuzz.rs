//! Plugin mode never panics: random and mutated configs, environments and state
//! files fed to our binary in plugin mode. CNI_PATH never exists, so no
//! inner plugin and no infra ever runs; what is tested is that every input
//! gets an answer: success, or a CNI error object with a numeric code and a
//! message, and never a panic, a signal or a hang; and that the inputs
//! reach every layer (successes, and codes 1, 4, 6 and 7, each at least 1%
//! of the answers).
//!
//! FUZZ_ITERATIONS (default 500), FUZZ_SECONDS (a bound on the run, default
//! 25), FUZZ_SEED (default fixed) and FUZZ_OUT (a dir for failing inputs)
//! tune it; scripts/fuzz runs it long. As root the binary runs as an unused
//! uid (nothing it does can touch another user's files); otherwise as the
//! caller.

use lab::pids_of_uid;
use lab::Rng;
use rootless_cni::cni::config::{OWN_KEYS, SPEC_KEYS};
use serde_json::{json, Map, Value};
use std::ffi::OsString;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// A call that takes longer than this hangs.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Where a CNI_PATH points: never a dir that exists.
const NO_CNI_PATH: &str = "/nonexistent/rootless-cni-fuzz/bin";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------
// Where the binary runs

/// A private dir (XDG_RUNTIME_DIR, a state dir, and odd things to point
/// stateDir at), and the uid the binary runs as. Dropping it kills what is
/// left of that uid and removes what it made.
struct Place {
    dir: PathBuf,
    uid: Option<u32>,
}

impl Place {
    fn new() -> Place {
        let uid = nix::unistd::geteuid().is_root().then(unused_uid);
        let dir = PathBuf::from(format!("/tmp/rootless-cni-fuzz.{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let place = Place { dir, uid };
        for (rel, mode) in [
            ("", 0o755),
            ("run", 0o700),
            ("run/rootless-cni-plugin", 0o700),
            ("run/rootless-cni-plugin/attachments", 0o700),
            ("conf", 0o755),
            ("other-state", 0o700),
        ] {
            let p = place.dir.join(rel);
            fs::create_dir_all(&p).expect("mkdir");
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod");
            place.own(&p);
        }
        fs::write(place.dir.join("a-file"), "").expect("write");
        std::os::unix::fs::symlink(place.dir.join("other-state"), place.dir.join("a-link"))
            .expect("symlink");
        // A conflist for `network`, and a broken one.
        fs::write(
            place.dir.join("conf/inner.conflist"),
            json!({"cniVersion": "1.0.0", "name": "inner",
                   "plugins": [{"type": "bridge"}]})
            .to_string(),
        )
        .expect("write");
        fs::write(place.dir.join("conf/broken.conf"), "{\"name\": \"broken\"").expect("write");
        place
    }

    fn own(&self, p: &Path) {
        if let Some(uid) = self.uid {
            std::os::unix::fs::chown(p, Some(uid), Some(uid)).expect("chown");
        }
    }

    fn state(&self) -> PathBuf {
        self.dir.join("run/rootless-cni-plugin")
    }

    /// Values `stateDir` may take: never a path outside this place.
    fn state_dirs(&self) -> Vec<Value> {
        let p = |rel: &str| Value::String(self.dir.join(rel).display().to_string());
        vec![
            p("run/rootless-cni-plugin"),
            p("other-state"),
            p("absent-state"),
            p("a-file"),
            p("a-link"),
            json!("relative/state"),
            json!(""),
            json!(5),
            json!(null),
        ]
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Some(uid) = self.uid {
            // Nothing should run, but nothing may outlive the test either.
            for pid in pids_of_uid(uid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A uid no one uses: not in /etc/passwd, no process.
fn unused_uid() -> u32 {
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let taken: Vec<u32> = passwd
        .lines()
        .filter_map(|l| l.split(':').nth(2)?.parse().ok())
        .collect();
    (0..1000)
        .map(|n| 1_700_000_000 + (std::process::id() % 100_000) * 1000 + n)
        .find(|uid| !taken.contains(uid) && pids_of_uid(*uid).is_empty())
        .expect("an unused uid")
}

// ---------------------------------------------------------------------------
// Inputs

/// One call: the environment (None: variable unset) and stdin.
#[derive(Debug, Clone)]
struct Input {
    env: Vec<(&'static str, Option<Vec<u8>>)>,
    stdin: Vec<u8>,
}

impl Input {
    fn describe(&self) -> String {
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

fn input(rng: &mut Rng, place: &Place) -> Input {
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
fn scribble_state(rng: &mut Rng, place: &Place) {
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

// ---------------------------------------------------------------------------
// Running and judging

struct Outcome {
    status: Option<i32>,
    signal: Option<i32>,
    hung: bool,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

fn run(bin: &Path, place: &Place, input: &Input) -> Outcome {
    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .env("PATH", lab::LAB_PATH)
        .env("HOME", &place.dir)
        .env("XDG_RUNTIME_DIR", place.dir.join("run"))
        .current_dir(&place.dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for (k, v) in &input.env {
        if let Some(v) = v {
            let v: Vec<u8> = v.iter().copied().filter(|&b| b != 0).collect();
            cmd.env(k, OsString::from_vec(v));
        }
    }
    if let Some(uid) = place.uid {
        cmd.uid(uid).gid(uid);
    }
    let mut child = cmd.spawn().expect("spawning rootless-cni");
    let mut pipe = child.stdin.take().expect("stdin");
    let stdin = input.stdin.clone();
    let writer = thread::spawn(move || {
        let _ = pipe.write_all(&stdin);
    });
    let mut out_pipe = child.stdout.take().expect("stdout");
    let mut err_pipe = child.stderr.take().expect("stderr");
    let out_reader = thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out_pipe.read_to_end(&mut b);
        b
    });
    let err_reader = thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err_pipe.read_to_end(&mut b);
        b
    });
    let deadline = Instant::now() + CALL_TIMEOUT;
    let mut hung = false;
    let status = loop {
        match child.try_wait().expect("wait") {
            Some(st) => break st,
            None if Instant::now() >= deadline => {
                hung = true;
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(child.id() as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                break child.wait().expect("wait");
            }
            None => thread::sleep(Duration::from_millis(1)),
        }
    };
    let _ = writer.join();
    use std::os::unix::process::ExitStatusExt;
    Outcome {
        status: status.code(),
        signal: status.signal(),
        hung,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    }
}

/// Ok, or why the answer breaks the contract.
fn judge(o: &Outcome) -> Result<(), String> {
    let stderr = String::from_utf8_lossy(&o.stderr);
    if o.hung {
        return Err(format!("no answer within {CALL_TIMEOUT:?}"));
    }
    if let Some(sig) = o.signal {
        return Err(format!("killed by signal {sig}"));
    }
    if o.status == Some(101) || stderr.contains("panicked") {
        return Err(format!("panic (exit {:?}): {stderr}", o.status));
    }
    if o.status == Some(0) {
        return Ok(());
    }
    match serde_json::from_slice::<Value>(&o.stdout) {
        Ok(v)
            if v.get("code").is_some_and(Value::is_u64)
                && v.get("msg")
                    .and_then(Value::as_str)
                    .is_some_and(|m| !m.is_empty()) =>
        {
            Ok(())
        }
        _ => Err(format!(
            "exit {:?} without a CNI error object (code and msg) on stdout: {:?}",
            o.status,
            String::from_utf8_lossy(&o.stdout)
        )),
    }
}

/// Random configs, environments and state files; every answer is success
/// or an error object, never a panic.
#[test]
fn plugin_mode_never_panics() {
    let iterations = env_u64("FUZZ_ITERATIONS", 500);
    let bound = Duration::from_secs(env_u64("FUZZ_SECONDS", 25));
    let seed = env_u64("FUZZ_SEED", 0x5EED_4CA1);
    let out_dir = std::env::var_os("FUZZ_OUT").map(PathBuf::from);
    let place = Place::new();
    let bin = Path::new(env!("CARGO_BIN_EXE_rootless-cni"));
    // Another user must be able to run it: copy it into the place.
    let bin = {
        let copy = place.dir.join("rootless-cni");
        fs::copy(bin, &copy).expect("copying the binary");
        fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).expect("chmod");
        copy
    };
    let mut rng = Rng::new(seed);
    let started = Instant::now();
    let (mut done, mut failures) = (0u64, Vec::new());
    let mut codes = std::collections::BTreeMap::<String, u64>::new();
    while done < iterations && started.elapsed() < bound {
        scribble_state(&mut rng, &place);
        let input = input(&mut rng, &place);
        let outcome = run(&bin, &place, &input);
        let key = match serde_json::from_slice::<Value>(&outcome.stdout)
            .ok()
            .and_then(|v| v.get("code").and_then(Value::as_u64))
        {
            Some(code) => format!("code {code}"),
            None => format!("exit {:?}", outcome.status),
        };
        *codes.entry(key).or_default() += 1;
        if let Err(why) = judge(&outcome) {
            if let Some(dir) = &out_dir {
                let _ = fs::create_dir_all(dir);
                let _ = fs::write(dir.join(format!("{done}.stdin")), &input.stdin);
                let _ = fs::write(dir.join(format!("{done}.txt")), input.describe());
            }
            failures.push(format!("iteration {done}: {why}\n{}", input.describe()));
        }
        done += 1;
    }
    let elapsed = started.elapsed();
    eprintln!("fuzz: answers {codes:?}");
    println!(
        "fuzz: iterations={done} failures={} elapsed={:.1}s seed={seed}",
        failures.len(),
        elapsed.as_secs_f64()
    );
    // It must have run, and its inputs must reach every layer: successes,
    // and the error of each check an input meets first (variables 4,
    // stdin 6, config 7, version 1). A generator that only made garbage
    // would pass the contract check without testing much.
    let least = iterations.min(100);
    assert!(
        done >= least,
        "only {done} of {iterations} iterations ran in {bound:?} (at least {least} must)"
    );
    if done >= 100 {
        for key in ["exit Some(0)", "code 1", "code 4", "code 6", "code 7"] {
            assert!(
                codes.get(key).is_some_and(|&n| n * 100 >= done),
                "under 1% of the answers were {key}: {codes:?}"
            );
        }
    }
    let shown: Vec<&String> = failures.iter().take(10).collect();
    assert!(
        failures.is_empty(),
        "{} of {done} inputs broke the contract (seed {seed}); the first {}:\n\n{}",
        failures.len(),
        shown.len(),
        shown
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n\n")
    );
}
