//! The supervisor's control socket: how a plugin call asks the running
//! infra to open or close an attachment's published ports. One JSON
//! request, one JSON answer, per connection.
//!
//! # Protocol versions
//!
//! The supervisor may be another release than the caller: the binary was
//! upgraded (or rolled back) under a running infra. Each request and each
//! answer carries `version`, the protocol its sender speaks; none means 1
//! (151877a, which neither sends nor checks it, and ignores it as any
//! field it does not know).
//!
//! - Version 1: `addPorts`, `removePorts`. Version 2 adds `info`.
//! - A supervisor serves every request of a version up to its own. One of a
//!   newer version is refused with code `NEWER_STATE` naming both versions
//!   (the caller may ask again as that older version speaks), and an op it
//!   does not know is refused with the same code: never guessed at.
//! - The version is raised when an op is added or changes meaning; a field
//!   is added only where an older peer may ignore it, never renamed.
//! - A caller sends an op only to a supervisor that speaks it: `info` is
//!   asked only of a supervisor holding `infra.lck`, which 151877a's never
//!   takes; `addPorts` and `removePorts` mean the same as in version 1.

use crate::error::{Error, Kind, Result};
use crate::ports::{Driver, PortMapping};
use crate::state::StateDir;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

pub const SOCKET: &str = "control.sock";
/// The protocol this binary speaks (see the module doc).
pub const PROTOCOL_VERSION: u32 = 2;
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum Request {
    AddPorts {
        key: String,
        mappings: Vec<PortMapping>,
    },
    RemovePorts {
        key: String,
    },
    /// What the supervisor knows of its infra: how a caller that finds
    /// infra.json unreadable learns it, instead of starting a second infra.
    Info,
}

/// A request as it goes on the wire: with the sender's protocol version.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope<R> {
    #[serde(default = "version_1")]
    version: u32,
    #[serde(flatten)]
    request: R,
}

fn version_1() -> u32 {
    1
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    /// The answering supervisor's protocol version.
    #[serde(default = "version_1")]
    pub version: u32,
    pub error: Option<String>,
    pub code: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<super::InfraInfo>,
}

impl Default for Response {
    fn default() -> Self {
        Response {
            version: PROTOCOL_VERSION,
            error: None,
            code: None,
            info: None,
        }
    }
}

/// Sends `req` to the supervisor of the infra in `state`.
pub fn call(state: &StateDir, req: &Request) -> Result<()> {
    exchange(state, req).map(drop)
}

/// The running supervisor's own record of its infra.
pub fn info(state: &StateDir) -> Result<super::InfraInfo> {
    exchange(state, &Request::Info)?
        .info
        .ok_or_else(|| Error::internal("the supervisor did not say what its infra is"))
}

fn exchange(state: &StateDir, req: &Request) -> Result<Response> {
    let path = state.file(SOCKET);
    let fail = |e: std::io::Error| {
        Error::from(e).context(format!("infra control socket {}", path.display()))
    };
    // Through the state dir's fd: no name above it is looked up again.
    let mut conn = UnixStream::connect(state.fd_path(SOCKET)).map_err(fail)?;
    conn.set_read_timeout(Some(TIMEOUT)).map_err(fail)?;
    let envelope = Envelope {
        version: PROTOCOL_VERSION,
        request: req,
    };
    let mut line = serde_json::to_vec(&envelope).map_err(|e| Error::internal(e.to_string()))?;
    line.push(b'\n');
    conn.write_all(&line).map_err(fail)?;
    let mut answer = String::new();
    BufReader::new(&conn).read_line(&mut answer).map_err(fail)?;
    let resp: Response = serde_json::from_str(&answer).map_err(|e| {
        Error::internal(format!("infra control socket: bad answer {answer:?}: {e}"))
    })?;
    match resp.error {
        None => Ok(resp),
        Some(msg) => Err(Error::new(
            resp.code.map_or(Kind::Internal, Kind::from_code),
            msg,
        )),
    }
}

/// The supervisor's end. The socket lives in the 0700 state dir, so only
/// the user can reach it, and is made under umask 077 (see main), so it is
/// 0600 itself.
pub fn listen(state: &StateDir) -> Result<UnixListener> {
    let path = state.file(SOCKET);
    state.remove(SOCKET)?;
    let listener = UnixListener::bind(state.fd_path(SOCKET))
        .map_err(|e| Error::from(e).context(format!("binding {}", path.display())))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Answers one waiting request, if any.
pub fn serve_one(listener: &UnixListener, driver: &mut dyn Driver, info: &super::InfraInfo) {
    let conn = match listener.accept() {
        Ok((conn, _)) => conn,
        Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
            // The request waits in the queue: pause rather than spin on a
            // socket that stays readable. The forwarder leaves a reserve of
            // fds, so this is rare and short.
            static LAST: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
            if let Ok(mut last) = LAST.lock() {
                if last.map_or(true, |l| l.elapsed() > Duration::from_secs(5)) {
                    log::warn!("control socket: accept: {e}; waiting");
                    *last = Some(std::time::Instant::now());
                }
            }
            std::thread::sleep(Duration::from_millis(100));
            return;
        }
        Err(_) => return,
    };
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(TIMEOUT));
    let mut line = String::new();
    let response = match BufReader::new(&conn).read_line(&mut line) {
        Err(e) => Response {
            error: Some(format!("reading the request: {e}")),
            ..Response::default()
        },
        Ok(_) => match read_request(&line) {
            Err(refusal) => Response {
                error: Some(refusal.error),
                code: refusal.kind.map(Kind::code),
                ..Response::default()
            },
            Ok(Request::Info) => Response {
                info: Some(info.clone()),
                ..Response::default()
            },
            Ok(req) => handle(req, driver),
        },
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    let _ = (&conn).write_all(&out);
}

/// Why a request is not served, and with which code.
#[derive(Debug)]
struct Refusal {
    error: String,
    kind: Option<Kind>,
}

/// The request in `line`, or why it is refused: one of a newer
/// protocol, or an op we do not know, is refused by version, never guessed.
fn read_request(line: &str) -> std::result::Result<Request, Refusal> {
    let version = serde_json::from_str::<serde_json::Value>(line)
        .ok()
        .and_then(|v| v.get("version").and_then(serde_json::Value::as_u64))
        .unwrap_or(1);
    let refuse = |why: String| Refusal {
        error: why,
        kind: Some(Kind::NewerState),
    };
    if version > u64::from(PROTOCOL_VERSION) {
        return Err(refuse(format!(
            "request of control protocol {version}; this infra's supervisor speaks up to {PROTOCOL_VERSION} (an older rootless-cni started it)"
        )));
    }
    match serde_json::from_str::<Envelope<Request>>(line) {
        Ok(envelope) => Ok(envelope.request),
        Err(e) if e.to_string().contains("unknown variant") => Err(refuse(format!(
            "unknown request of control protocol {version} (this supervisor speaks {PROTOCOL_VERSION}): {e}"
        ))),
        Err(e) => Err(Refusal {
            error: format!("bad request: {e}"),
            kind: None,
        }),
    }
}

fn handle(req: Request, driver: &mut dyn Driver) -> Response {
    let outcome = match req {
        // Only the ADD holding the attachment's record publishes under its
        // key: forwards still there were left by a call that died.
        Request::AddPorts { key, mappings } => {
            driver.remove(&key);
            driver.add(&key, &mappings)
        }
        Request::RemovePorts { key } => {
            driver.remove(&key);
            Ok(())
        }
        Request::Info => Ok(()),
    };
    match outcome {
        Ok(()) => Response::default(),
        Err(e) => Response {
            error: Some(e.to_string()),
            code: Some(e.code()),
            ..Response::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_their_version_and_older_ones_are_served() {
        let req = Request::RemovePorts { key: "k".into() };
        let wire = serde_json::to_string(&Envelope {
            version: PROTOCOL_VERSION,
            request: &req,
        })
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&wire).unwrap();
        assert_eq!(v["version"], PROTOCOL_VERSION);
        assert_eq!(v["op"], "removePorts");
        assert!(matches!(read_request(&wire), Ok(Request::RemovePorts { key }) if key == "k"));
        // 151877a's requests have no version.
        let old = r#"{"op":"addPorts","key":"k","mappings":[]}"#;
        assert!(matches!(read_request(old), Ok(Request::AddPorts { .. })));
    }

    #[test]
    fn newer_requests_and_unknown_ops_are_refused_by_version() {
        let newer = format!(
            r#"{{"version":{},"op":"removePorts","key":"k"}}"#,
            PROTOCOL_VERSION + 1
        );
        let refused = read_request(&newer).unwrap_err();
        assert_eq!(refused.kind, Some(Kind::NewerState), "{refused:?}");
        let unknown = read_request(r#"{"version":2,"op":"drain"}"#).unwrap_err();
        assert_eq!(unknown.kind, Some(Kind::NewerState), "{unknown:?}");
        // An answer of 151877a's supervisor: version 1.
        let old: Response = serde_json::from_str(r#"{"error":null,"code":null}"#).unwrap();
        assert_eq!(old.version, 1);
    }
}
