//! Bad `portMappings` entries are refused with the spec's code, naming the
//! culprit, and leave nothing behind.

use lab::ports::{
    add, assert_serves, at, cni_error, del, free_port, httpd, lab_for, mapping, plugin_add,
    stop_all, tcp, LOCALHOST,
};
use lab::NET;
use serde_json::Value;
use std::time::Instant;

// ---------------------------------------------------------------------------
// 6: bad portMappings

#[test]
fn bad_port_mappings_are_refused() {
    let Some(lab) = lab_for(lab::binary!(), "p_bad", "builtin") else {
        return;
    };
    let t0 = Instant::now();
    let (c1, c2) = (lab.container(), lab.container());
    let good = || tcp(free_port(), 80);
    let bad: Vec<(Value, &str)> = vec![
        (mapping("tcp", 0, 80, None), "hostPort"),
        (mapping("sctp", free_port(), 80, None), "sctp"),
        (mapping("tcp", free_port(), 80, Some("nope")), "nope"),
    ];
    let try_all = |when: &str| {
        for (m, culprit) in &bad {
            let out = plugin_add(&lab, "builtin", "bad-mapping", &c1, &[good(), m.clone()]);
            let err = cni_error(&out, &format!("{when}: ADD with {m}"));
            assert_eq!(err.code, 7, "{when}: {m}: {out}");
            assert!(
                err.mentions(culprit) && err.mentions("portMappings[1]"),
                "{when}: the error does not name {culprit} in portMappings[1]: {out}"
            );
        }
    };

    try_all("no infra");
    lab.assert_no_infra("after the refused ADDs");
    assert!(
        lab.lease_files(NET).is_empty(),
        "leases after the refused ADDs"
    );

    let p2 = free_port();
    add(&lab, &c2, &[tcp(p2, 80)]);
    let web2 = httpd(&lab, &c2, 80, "unaffected\n");
    let sandbox = lab.sandbox_pid();
    try_all("live infra");
    assert_eq!(lab.sandbox_pid(), sandbox, "the infra was replaced");
    assert_eq!(
        lab.attachment_files().len(),
        1,
        "records: {:?}",
        lab.attachment_files()
    );
    assert_eq!(
        lab.lease_files(NET).len(),
        1,
        "leases: {:?}",
        lab.lease_files(NET)
    );
    assert_eq!(lab.links(&c1), vec!["lo"], "links of the refused container");
    assert_serves(
        at(LOCALHOST, p2),
        "unaffected\n",
        "c2 after the refused ADDs",
    );

    del(&lab, &c2);
    stop_all(&lab, vec![web2]);
    lab.assert_no_infra("after the DEL");
    eprintln!("[timing] ports bad mappings: {:?}", t0.elapsed());
}
