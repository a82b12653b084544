//! The files of testdata/ (testdata/README.md says what each holds).

use serde_json::Value;
use std::path::PathBuf;

/// `rel` under testdata/.
pub fn path(rel: &str) -> PathBuf {
    crate::repo().join("testdata").join(rel)
}

/// The JSON file `rel` under testdata/.
pub fn json(rel: &str) -> Value {
    crate::read_json(&path(rel))
}

/// testdata/conflists/NAME.conflist.
pub fn conflist(name: &str) -> Value {
    json(&format!("conflists/{name}.conflist"))
}

/// The example network as a runtime at `version` sends it to its first
/// plugin: testdata/conflists/cni-VERSION.conflist.
pub fn outer_at(version: &str) -> Value {
    crate::plugin_stdin(&conflist(&format!("cni-{version}")))
}

/// The cases of the hostile-input corpus testdata/hostile/NAME.json.
pub fn hostile_cases(name: &str) -> Vec<Value> {
    let doc = json(&format!("hostile/{name}.json"));
    doc["cases"]
        .as_array()
        .cloned()
        .unwrap_or_else(|| panic!("hostile/{name}.json has no \"cases\""))
}

/// A case's value as a string: null is None, {"repeat": S, "times": N} is
/// S N times.
pub fn case_string(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        v => {
            let s = v["repeat"]
                .as_str()
                .unwrap_or_else(|| panic!("not a string: {v}"));
            let n = v["times"]
                .as_u64()
                .unwrap_or_else(|| panic!("no times: {v}"));
            Some(s.repeat(n as usize))
        }
    }
}

/// The code and culprit a hostile case must be refused with.
pub fn refusal(case: &Value) -> (u64, String) {
    let code = case["code"]
        .as_u64()
        .unwrap_or_else(|| panic!("no code: {case}"));
    let culprit = case["culprit"]
        .as_str()
        .unwrap_or_else(|| panic!("no culprit: {case}"));
    (code, culprit.to_string())
}
