//! The sandbox SIGKILLed under live attachments: CHECK answers 103, DEL
//! forgets them, and the next ADD gets a fresh infra that works.

use lab::{example_conflist, plugin_stdin, result_ipv4, Lab, GATEWAY, NET};
use std::time::{Duration, Instant};

#[test]
fn killed_sandbox_is_reported_and_replaced() {
    let Some(lab) = Lab::with_example_net(lab::binary!(), "killed_sandbox") else {
        return;
    };
    let c = lab.container();
    let add = lab.cnitool("add", NET, &c.netns());
    let result = add.add_result("ADD");
    assert!(result_ipv4(&result).is_some(), "no IPv4 in result: {add}");
    let status = lab.status();
    let container_id = status["attachments"][0]["containerId"]
        .as_str()
        .unwrap_or_else(|| panic!("no attachment in status: {status}"))
        .to_string();
    let sandbox = lab
        .sandbox_pid()
        .unwrap_or_else(|| panic!("no sandbox pid in status or infra.json: {status}"));

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sandbox as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap_or_else(|e| panic!("killing sandbox {sandbox}: {e}"));
    // SIGKILL is delivered asynchronously: on a loaded machine the sandbox
    // can still look alive to a CHECK made at once.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while lab.is_running(sandbox) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(
        !lab.is_running(sandbox),
        "sandbox {sandbox} survives SIGKILL"
    );
    // CHECK through cnitool fails, and says so.
    let check = lab.cnitool("check", NET, &c.netns());
    assert!(!check.ok(), "CHECK of a lost attachment succeeded: {check}");
    assert!(
        !check.stderr.trim().is_empty(),
        "CHECK failed silently: {check}"
    );
    // The same CHECK as the runtime sends it: one of our own codes.
    let mut stdin = plugin_stdin(&example_conflist());
    stdin["prevResult"] = result.clone();
    let env = lab.plugin_env("CHECK", &container_id, &c.netns());
    let out = lab.plugin(&env, &stdin.to_string());
    assert!(
        !out.ok(),
        "direct CHECK of a lost attachment succeeded: {out}"
    );
    let err = out
        .cni_error()
        .unwrap_or_else(|| panic!("no CNI error object on stdout: {out}"));
    assert_eq!(err.code, 103, "CHECK of a lost attachment: {out}");

    // DEL of the lost attachment succeeds and forgets it.
    let del = lab.cnitool("del", NET, &c.netns());
    assert!(del.ok(), "DEL of a lost attachment: {del}");
    assert!(
        lab.attachment_files().is_empty(),
        "records: {:?}",
        lab.attachment_files()
    );

    // With the infra's netns gone, so is the container's end of the veth.
    let deadline = Instant::now() + Duration::from_secs(5);
    while lab.links(&c) != vec!["lo"] {
        assert!(
            Instant::now() < deadline,
            "c still has {:?} 5 s after the DEL of its lost attachment",
            lab.links(&c)
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The next ADD gets a fresh infra that works.
    let c2 = lab.container();
    for c in [&c, &c2] {
        let add = lab.cnitool("add", NET, &c.netns());
        assert!(add.ok(), "ADD after the sandbox died: {add}");
        lab.assert_ping(c, GATEWAY, "container -> gateway on the fresh infra");
    }
    let fresh = lab.sandbox_pid();
    assert!(
        fresh.is_some() && fresh != Some(sandbox),
        "sandbox {fresh:?}, killed was {sandbox}"
    );
    for c in [&c, &c2] {
        lab.detach(c);
    }
    lab.assert_no_infra("after the last DEL");
}
