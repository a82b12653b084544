//! GC forgets the record of an ADD that failed and could not roll back (or
//! was killed half-way) as DEL does: the runtime never lists it as valid,
//! and a record kept because its inner DEL fails again would keep the
//! infra forever.

use lab::Lab;
use serde_json::json;

/// Fails every ADD and every DEL.
const BROKEN: &str = r#"#!/usr/bin/python3
import json, os, sys
conf = json.load(sys.stdin)
if os.environ.get("CNI_COMMAND") in ("ADD", "DEL"):
    print(json.dumps({"cniVersion": conf["cniVersion"], "code": 999, "msg": "broken " + os.environ.get("CNI_COMMAND")}))
    sys.exit(1)
"#;

#[test]
fn gc_forgets_a_failed_record_as_del_does() {
    let Some(lab) = Lab::new(lab::binary!(), "gc_failed_record") else {
        return;
    };
    lab::install_plugin(&lab, "broken", BROKEN);
    let mut conflist = lab::example_conflist();
    lab::outer(&mut conflist)["delegate"]["plugins"]
        .as_array_mut()
        .expect("the example's inner plugins")
        .push(json!({"type": "broken"}));
    let conf = lab::plugin_stdin(&conflist);
    let c = lab.container();
    let out = lab.plugin(&lab.plugin_env("ADD", "b-1", &c.netns()), &conf.to_string());
    assert!(!out.ok(), "the broken ADD succeeded: {out}");
    let records = lab.attachment_records();
    assert!(
        records.len() == 1 && lab::is_failed_record(&records[0]),
        "records after the failed ADD: {records:?}"
    );

    let mut gc = conf.clone();
    gc["cniVersion"] = json!("1.1.0");
    gc["cni.dev/valid-attachments"] = json!([]);
    let env = [
        ("CNI_COMMAND", "GC".to_string()),
        ("CNI_PATH", lab.cni_path()),
    ];
    let out = lab.plugin(&env, &gc.to_string());
    assert!(out.ok(), "GC: {out}");
    let records = lab.attachment_records();
    assert!(records.is_empty(), "GC kept {records:?}");
    lab.assert_no_infra("after GC");
}
