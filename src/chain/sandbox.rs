//! The container netns under two names: inner plugins know it as
//! /proc/self/fd/N, the runtime by its own path. Results cross between
//! them with `interfaces[].sandbox` rewritten.

use serde_json::Value;

/// Replaces `interfaces[].sandbox` equal to `from` by `to`: inner plugins
/// know the container netns as /proc/self/fd/N, the runtime by its own path.
pub fn rewrite_sandbox(result: &mut Value, from: &str, to: &str) {
    let Some(ifaces) = result.get_mut("interfaces").and_then(Value::as_array_mut) else {
        return;
    };
    for iface in ifaces {
        if let Some(sandbox) = iface.get_mut("sandbox") {
            if sandbox.as_str() == Some(from) {
                *sandbox = Value::String(to.to_string());
            }
        }
    }
}

/// The same replacement on the result as a plugin printed it, so the
/// runtime gets the inner result byte for byte but for the sandbox path.
/// The inner path is a JSON string token that only `sandbox` can hold.
pub fn rewrite_sandbox_raw(raw: &[u8], from: &str, to: &str) -> Vec<u8> {
    let (Ok(from), Ok(to)) = (serde_json::to_vec(from), serde_json::to_vec(to)) else {
        return raw.to_vec();
    };
    let mut out = Vec::with_capacity(raw.len() + to.len());
    let mut rest = raw;
    while let Some(pos) = rest.windows(from.len()).position(|w| w == from.as_slice()) {
        out.extend_from_slice(&rest[..pos]);
        out.extend_from_slice(&to);
        rest = &rest[pos + from.len()..];
    }
    out.extend_from_slice(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sandbox_is_rewritten_only_where_it_matches() {
        let mut r = json!({"interfaces":[
            {"name":"rcni0","mac":"aa"},
            {"name":"veth1","mac":"bb"},
            {"name":"eth0","mac":"cc","sandbox":"/proc/self/fd/5"}]});
        rewrite_sandbox(&mut r, "/proc/self/fd/5", "/run/netns/c1");
        assert_eq!(r["interfaces"][2]["sandbox"], "/run/netns/c1");
        assert!(r["interfaces"][0].get("sandbox").is_none());
    }

    #[test]
    fn raw_result_keeps_its_bytes() {
        let raw = b"{\n    \"interfaces\": [{\"sandbox\": \"/proc/self/fd/5\"}],\n    \"x\": \"/proc/self/fd/55\"\n}";
        let out = rewrite_sandbox_raw(raw, "/proc/self/fd/5", "/run/netns/a\"b");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\n    \"interfaces\": [{\"sandbox\": \"/run/netns/a\\\"b\"}],\n    \"x\": \"/proc/self/fd/55\"\n}"
        );
    }
}
