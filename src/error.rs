//! One error type for the whole binary. Every error knows the CNI code it is
//! reported with, so the plugin entry point can always answer with a spec
//! error object, whatever layer the failure came from.

use std::fmt;

/// Codes from the CNI spec ("Error" section) and our own, 100 and up.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot serve ADDs now.
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// STATUS: as 50, and existing containers may have limited connectivity
    /// (the infra's way out is down).
    pub const LIMITED_CONNECTIVITY: u32 = 51;
    /// An I/O or system call failure of our own.
    pub const INTERNAL: u32 = 100;
    /// The infra (supervisor, sandbox, slirp4netns) could not be started.
    pub const INFRA_START: u32 = 101;
    /// An inner plugin could not be run, or failed without a valid error object.
    pub const INNER_PLUGIN: u32 = 102;
    /// CHECK of an attachment that is unknown, or that died with its infra.
    pub const ATTACHMENT_LOST: u32 = 103;
    /// ADD of an attachment that already exists.
    pub const ALREADY_ATTACHED: u32 = 104;
    /// The state dir is not safe to use (owner, mode, symlink).
    pub const UNSAFE_STATE_DIR: u32 = 105;
    /// A published host port cannot be had (in use, privileged, no such address).
    pub const HOST_PORT: u32 = 107;
    /// CHECK: the infra's way out (slirp4netns) is down; the supervisor
    /// keeps restarting it.
    pub const OUTBOUND_DOWN: u32 = 108;
    /// The state dir holds a file of a newer format than this binary reads
    /// (another release wrote it); it is left as it is.
    pub const NEWER_STATE: u32 = 109;
}

#[derive(Debug)]
pub struct Error {
    pub code: u32,
    pub msg: String,
    pub details: String,
    /// An inner plugin's own error object, printed unchanged.
    pub passthrough: Option<Vec<u8>>,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Error {
            code,
            msg: msg.into(),
            details: String::new(),
            passthrough: None,
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    pub fn env(msg: impl Into<String>) -> Self {
        Self::new(code::INVALID_ENV, msg)
    }

    pub fn config(msg: impl Into<String>) -> Self {
        Self::new(code::INVALID_CONFIG, msg)
    }

    pub fn internal(msg: impl Into<String>) -> Self {
        Self::new(code::INTERNAL, msg)
    }

    /// Prefixes the message with what we were doing, keeping the code.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.msg = format!("{what}: {}", self.msg);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::internal(e.to_string())
    }
}

impl From<nix::Error> for Error {
    fn from(e: nix::Error) -> Self {
        Error::internal(e.desc())
    }
}

/// `.context(..)` on any result whose error converts into ours.
pub trait Context<T> {
    fn context(self, what: impl fmt::Display) -> Result<T>;
    fn with_context<D: fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl fmt::Display) -> Result<T> {
        self.map_err(|e| e.into().context(what))
    }

    fn with_context<D: fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T> {
        self.map_err(|e| e.into().context(what()))
    }
}

/// Errors met during best-effort teardown: every step is tried, the first
/// failure is reported with the others as details.
#[derive(Default)]
pub struct ErrorList(Vec<Error>);

impl ErrorList {
    pub fn push_if_err<T>(&mut self, r: Result<T>) {
        if let Err(e) = r {
            self.0.push(e);
        }
    }

    pub fn into_result(self) -> Result<()> {
        let mut errors = self.0.into_iter();
        match errors.next() {
            None => Ok(()),
            Some(mut first) => {
                let rest: Vec<String> = errors.map(|e| e.to_string()).collect();
                if rest.is_empty() {
                    return Err(first);
                }
                // An inner plugin's own object would be printed as it is,
                // without the others: ours, with its code, names them all.
                first.passthrough = None;
                let details = std::iter::once(std::mem::take(&mut first.details))
                    .filter(|d| !d.is_empty())
                    .chain(rest)
                    .collect::<Vec<_>>()
                    .join("; ");
                Err(first.with_details(details))
            }
        }
    }
}
