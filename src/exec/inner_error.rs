//! What an inner plugin that failed said: its own error object, passed
//! through, or ours naming it.

use crate::cni::env::Verb;
use crate::error::{Error, Kind};
use serde_json::Value;

/// The plugin's own error object when it printed one, else ours naming it.
pub(super) fn inner_error(
    name: &str,
    verb: Verb,
    stdout: &[u8],
    status: std::process::ExitStatus,
) -> Error {
    if let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(stdout) {
        if let Some(c) = obj.get("code").and_then(Value::as_u64) {
            let msg = obj
                .get("msg")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let details = obj
                .get("details")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let mut e = Error::new(Kind::from_code(c as u32), format!("{name}: {msg}"))
                .with_details(details);
            e.passthrough = Some(stdout.to_vec());
            return e;
        }
    }
    let text = String::from_utf8_lossy(stdout);
    Error::new(
        Kind::InnerPlugin,
        format!(
            "inner plugin {name} {} failed ({status}) without an error object",
            verb.as_str()
        ),
    )
    .with_details(crate::cni::env::shorten(text.trim()))
}
