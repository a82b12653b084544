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
//! caller. The inputs are made in fuzz/inputs.rs, the place the binary
//! runs in is fuzz/place.rs.

#[path = "fuzz/inputs.rs"]
mod inputs;
#[path = "fuzz/place.rs"]
mod place;

use inputs::{input, scribble_state, Input};
use place::Place;

use lab::Rng;
use serde_json::Value;
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

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
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
