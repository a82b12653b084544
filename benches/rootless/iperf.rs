//! iperf3 servers and clients, shared by the data plane, outbound and ports
//! phases.

use crate::driver::Cx;
use crate::procs::Background;
use crate::Res;
use lab::Container;
use serde_json::Value;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

/// The port iperf3 servers listen on inside containers.
pub(crate) const IPERF_PORT: u16 = 5201;

/// An iperf3 server, up when this returns.
pub(crate) fn iperf_server(mut cmd: Command, what: &str) -> Res<Background> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::null());
    let mut bg = Background::spawn(cmd, what)?;
    bg.wait_for_line("Server listening", Duration::from_secs(10))?;
    Ok(bg)
}

/// Runs an iperf3 client (`-J`), returns what the server received. A
/// server still finishing the previous test refuses the next ("busy"):
/// on a loaded machine that takes a moment, so that is tried again.
pub(crate) fn iperf_client(mut cmd: Command, what: &str) -> Res<f64> {
    let mut tries = 0;
    loop {
        match iperf_client_once(&mut cmd, what) {
            Err(e) if e.contains("the server is busy") && tries < 5 => {
                tries += 1;
                thread::sleep(Duration::from_millis(500));
            }
            other => return other,
        }
    }
}

pub(crate) fn iperf_client_once(cmd: &mut Command, what: &str) -> Res<f64> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: {e}"))?;
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "{what}: no JSON from iperf3 ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(err) = v["error"].as_str() {
        return Err(format!("{what}: iperf3: {err}"));
    }
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .ok_or_else(|| format!("{what}: no end.sum_received in {v}"))
}

pub(crate) fn client_args(ip: &str, port: u16, secs: u32) -> Vec<String> {
    [
        "iperf3",
        "-c",
        ip,
        "-p",
        &port.to_string(),
        "-t",
        &secs.to_string(),
        "-J",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// iperf3 in a container's netns, inside the session.
pub(crate) fn in_container(cx: &Cx, c: &Container, argv: &[String]) -> Command {
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    cx.lab.in_netns_command(c, &argv)
}

pub(crate) fn container_server(cx: &Cx, c: &Container, what: &str) -> Res<Background> {
    let argv: Vec<String> = [
        "iperf3",
        "-s",
        "-p",
        &IPERF_PORT.to_string(),
        "--forceflush",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    iperf_server(in_container(cx, c, &argv), what)
}
