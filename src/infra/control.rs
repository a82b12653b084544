//! The supervisor's control socket: how a plugin call asks the running
//! infra to open or close an attachment's published ports. One JSON
//! request, one JSON answer, per connection.

use crate::error::{code, Error, Result};
use crate::ports::{Driver, PortMapping};
use crate::state::StateDir;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

pub const SOCKET: &str = "control.sock";
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

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Response {
    pub error: Option<String>,
    pub code: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<super::InfraInfo>,
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
        Error::internal(format!("infra control socket {}: {e}", path.display()))
    };
    // Through the state dir's fd: no name above it is looked up again.
    let mut conn = UnixStream::connect(state.fd_path(SOCKET)).map_err(fail)?;
    conn.set_read_timeout(Some(TIMEOUT)).map_err(fail)?;
    let mut line = serde_json::to_vec(req).map_err(|e| Error::internal(e.to_string()))?;
    line.push(b'\n');
    conn.write_all(&line).map_err(fail)?;
    let mut answer = String::new();
    BufReader::new(&conn).read_line(&mut answer).map_err(fail)?;
    let resp: Response = serde_json::from_str(&answer).map_err(|e| {
        Error::internal(format!("infra control socket: bad answer {answer:?}: {e}"))
    })?;
    match resp.error {
        None => Ok(resp),
        Some(msg) => Err(Error::new(resp.code.unwrap_or(code::INTERNAL), msg)),
    }
}

/// The supervisor's end. The socket lives in the 0700 state dir, so only
/// the user can reach it, and is made under umask 077 (see main), so it is
/// 0600 itself.
pub fn listen(state: &StateDir) -> Result<UnixListener> {
    let path = state.file(SOCKET);
    state.remove(SOCKET)?;
    let listener = UnixListener::bind(state.fd_path(SOCKET))
        .map_err(|e| Error::internal(format!("binding {}: {e}", path.display())))?;
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
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            Err(e) => Response {
                error: Some(format!("bad request: {e}")),
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

fn handle(req: Request, driver: &mut dyn Driver) -> Response {
    let outcome = match req {
        Request::AddPorts { key, mappings } => driver.add(&key, &mappings),
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
            code: Some(e.code),
            info: None,
        },
    }
}
