//! Reading runtime-supplied JSON the way Go's `encoding/json` decodes it
//! into a struct. Runtimes and the reference plugins are written in Go, and
//! some runtimes write structs without JSON tags: containerd's go-cni sends
//! `{"HostPort":8080,"ContainerPort":80,"Protocol":"tcp","HostIP":""}`.
//! A Go plugin reads that as `hostPort`, so must we.
//!
//! Go's rules for a field named `name`: a key matches when it equals the
//! name or equals it under Unicode simple case folding; keys are decoded in
//! document order, so the last matching key wins; a JSON `null` leaves a
//! non-pointer field untouched. `serde_json`'s `preserve_order` keeps the
//! document order this needs.

use serde_json::{Map, Value};

/// Whether Go's `encoding/json` decodes `key` into the field called `name`
/// (`name` being ASCII, as every field we read is).
pub fn key_matches(key: &str, name: &str) -> bool {
    key == name || fold(key).eq(name.chars().map(|c| c.to_ascii_lowercase()))
}

/// Case folding as far as it can meet an ASCII name: ASCII letters, and the
/// two non-ASCII runes whose simple folding orbit holds one (`ſ` folds to
/// `s`, the Kelvin sign `K` to `k`).
fn fold(key: &str) -> impl Iterator<Item = char> + '_ {
    key.chars().map(|c| match c {
        '\u{17F}' => 's',
        '\u{212A}' => 'k',
        c => c.to_ascii_lowercase(),
    })
}

/// The value Go would decode into the field `name`: the last matching key
/// whose value is not `null`.
pub fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.iter()
        .rev()
        .find(|(k, v)| !v.is_null() && key_matches(k, name))
        .map(|(_, v)| v)
}

/// Removes every key Go would decode into the field `name`.
pub fn remove_field(obj: &mut Map<String, Value>, name: &str) {
    obj.retain(|k, _| !key_matches(k, name));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn exact_and_folded_keys_match() {
        for key in ["hostPort", "HostPort", "HOSTPORT", "hostport", "hoſtPort"] {
            assert!(key_matches(key, "hostPort"), "{key}");
        }
        assert!(key_matches("\u{212A}8S", "k8s"));
        for key in ["host_port", "hostPorts", "", "hostPor", "hostPórt"] {
            assert!(!key_matches(key, "hostPort"), "{key}");
        }
    }

    #[test]
    fn last_non_null_key_wins() {
        let o = obj(json!({"hostPort": 1, "HostPort": 2, "HOSTPORT": null}));
        assert_eq!(field(&o, "hostPort"), Some(&json!(2)));
        assert_eq!(field(&obj(json!({"HostIP": null})), "hostIP"), None);
        assert_eq!(field(&obj(json!({"other": 1})), "hostIP"), None);
    }

    #[test]
    fn remove_takes_every_spelling() {
        let mut o = obj(json!({"hostIP": "a", "HostIP": "b", "HOSTip": null, "hostPort": 1}));
        remove_field(&mut o, "hostIP");
        assert_eq!(Value::Object(o), json!({"hostPort": 1}));
    }
}
