//! One error type for the whole binary. Every error knows the CNI code it is
//! reported with, so the plugin entry point can always answer with a spec
//! error object, whatever layer the failure came from; and it keeps the
//! error it came from, so a caller can ask for the errno after `?`.

use std::fmt;

/// What went wrong, as the CNI spec ("Error" section) and we number it.
/// Codes below 100 are the spec's, 100 and up our own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// 1: a CNI version this plugin (or its chain) does not speak.
    IncompatibleVersion,
    /// 4: a CNI_* variable missing or invalid.
    InvalidEnv,
    /// 6: the network config on stdin is not JSON.
    Decode,
    /// 7: the network config is JSON but not valid.
    InvalidConfig,
    /// 11: a transient failure; the runtime may retry.
    TryAgainLater,
    /// 50, STATUS: the plugin cannot serve ADDs now.
    PluginNotAvailable,
    /// 51, STATUS: as 50, and existing containers may have limited
    /// connectivity (the infra's way out is down).
    LimitedConnectivity,
    /// 100: an I/O or system call failure of our own.
    Internal,
    /// 101: the infra (supervisor, sandbox, slirp4netns) could not be started.
    InfraStart,
    /// 102: an inner plugin could not be run, or failed without a valid
    /// error object.
    InnerPlugin,
    /// 103: CHECK of an attachment that is unknown, or that died with its infra.
    AttachmentLost,
    /// 104: ADD of an attachment that already exists.
    AlreadyAttached,
    /// 105: the state dir is not safe to use (owner, mode, symlink).
    UnsafeStateDir,
    /// 107: a published host port cannot be had (in use, privileged, no
    /// such address).
    HostPort,
    /// 108, CHECK: the infra's way out (slirp4netns) is down; the supervisor
    /// keeps restarting it.
    OutboundDown,
    /// 109: the state dir holds a file of a newer format than this binary
    /// reads (another release wrote it); it is left as it is.
    NewerState,
    /// Any other code: an inner plugin's, or the supervisor's, carried as
    /// it was given.
    Other(u32),
}

/// Every kind with a number of its own, for `from_code`.
const NAMED: [Kind; 16] = [
    Kind::IncompatibleVersion,
    Kind::InvalidEnv,
    Kind::Decode,
    Kind::InvalidConfig,
    Kind::TryAgainLater,
    Kind::PluginNotAvailable,
    Kind::LimitedConnectivity,
    Kind::Internal,
    Kind::InfraStart,
    Kind::InnerPlugin,
    Kind::AttachmentLost,
    Kind::AlreadyAttached,
    Kind::UnsafeStateDir,
    Kind::HostPort,
    Kind::OutboundDown,
    Kind::NewerState,
];

impl Kind {
    /// The number the error object carries.
    pub fn code(self) -> u32 {
        match self {
            Kind::IncompatibleVersion => 1,
            Kind::InvalidEnv => 4,
            Kind::Decode => 6,
            Kind::InvalidConfig => 7,
            Kind::TryAgainLater => 11,
            Kind::PluginNotAvailable => 50,
            Kind::LimitedConnectivity => 51,
            Kind::Internal => 100,
            Kind::InfraStart => 101,
            Kind::InnerPlugin => 102,
            Kind::AttachmentLost => 103,
            Kind::AlreadyAttached => 104,
            Kind::UnsafeStateDir => 105,
            Kind::HostPort => 107,
            Kind::OutboundDown => 108,
            Kind::NewerState => 109,
            Kind::Other(n) => n,
        }
    }

    /// The kind of a number another program reported (an inner plugin, the
    /// supervisor); `code()` gives the same number back.
    pub fn from_code(code: u32) -> Kind {
        NAMED
            .into_iter()
            .find(|k| k.code() == code)
            .unwrap_or(Kind::Other(code))
    }
}

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug)]
pub struct Error {
    pub kind: Kind,
    pub msg: String,
    pub details: String,
    /// An inner plugin's own error object, printed unchanged.
    pub passthrough: Option<Vec<u8>>,
    /// The error this one was made from (an io or nix error), kept so the
    /// errno can be asked for after `?`.
    source: Option<Source>,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(kind: Kind, msg: impl Into<String>) -> Self {
        Error {
            kind,
            msg: msg.into(),
            details: String::new(),
            passthrough: None,
            source: None,
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The same failure reported under another kind: message, details and
    /// source are kept. An inner plugin's own object is dropped, since it
    /// would be printed with its own code.
    pub fn with_kind(mut self, kind: Kind) -> Self {
        self.kind = kind;
        self.passthrough = None;
        self
    }

    /// Keeps `source` as the cause; the message is left as it is.
    pub fn with_source(mut self, source: impl Into<Source>) -> Self {
        self.source = Some(source.into());
        self
    }

    pub fn env(msg: impl Into<String>) -> Self {
        Self::new(Kind::InvalidEnv, msg)
    }

    pub fn config(msg: impl Into<String>) -> Self {
        Self::new(Kind::InvalidConfig, msg)
    }

    pub fn internal(msg: impl Into<String>) -> Self {
        Self::new(Kind::Internal, msg)
    }

    /// The number the error object carries.
    pub fn code(&self) -> u32 {
        self.kind.code()
    }

    /// Prefixes the message with what we were doing, keeping the kind and
    /// the source.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.msg = format!("{what}: {}", self.msg);
        self
    }

    /// The errno of the system call this error came from, if it did.
    pub fn errno(&self) -> Option<nix::errno::Errno> {
        let mut cause = self
            .source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static));
        while let Some(e) = cause {
            if let Some(errno) = e.downcast_ref::<nix::errno::Errno>() {
                return Some(*errno);
            }
            if let Some(n) = e
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.raw_os_error())
            {
                return Some(nix::errno::Errno::from_raw(n));
            }
            cause = e.source();
        }
        None
    }

    /// `errno()` as the number `std::io::Error::raw_os_error` gives.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.errno().map(|e| e as i32)
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

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|s| s as _)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::internal(e.to_string()).with_source(e)
    }
}

impl From<nix::Error> for Error {
    fn from(e: nix::Error) -> Self {
        Error::internal(e.desc()).with_source(e)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_maps_to_its_code_and_back() {
        let codes = [
            1, 4, 6, 7, 11, 50, 51, 100, 101, 102, 103, 104, 105, 107, 108, 109,
        ];
        for (kind, code) in NAMED.into_iter().zip(codes) {
            assert_eq!(kind.code(), code, "{kind:?}");
            assert_eq!(Kind::from_code(code), kind);
        }
        assert_eq!(Kind::from_code(42), Kind::Other(42));
        assert_eq!(Kind::Other(42).code(), 42);
    }

    #[test]
    fn a_context_keeps_the_kind_and_the_errno() {
        let io = std::io::Error::from_raw_os_error(libc::ENOENT);
        let e = Err::<(), _>(io).context("opening x").unwrap_err();
        assert_eq!(e.kind, Kind::Internal);
        assert!(e.msg.starts_with("opening x: "), "{}", e.msg);
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        assert!(std::error::Error::source(&e).is_some());
        let nix = Err::<(), _>(nix::errno::Errno::EPERM)
            .context("joining")
            .unwrap_err();
        assert_eq!(nix.errno(), Some(nix::errno::Errno::EPERM));
        assert_eq!(nix.msg, "joining: Operation not permitted");
        assert_eq!(Error::internal("plain").errno(), None);
    }

    #[test]
    fn with_kind_keeps_the_message_and_source() {
        let e = Error::from(nix::errno::Errno::EACCES)
            .with_details("d")
            .with_kind(Kind::PluginNotAvailable);
        assert_eq!(e.code(), 50);
        assert_eq!(e.to_string(), "Permission denied (d)");
        assert_eq!(e.errno(), Some(nix::errno::Errno::EACCES));
    }
}
