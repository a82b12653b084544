//! An infra started from a PID namespace that has since gone (a runtime in
//! `unshare --pid`, rootlesskit `--pidns` or a container, restarted): the
//! namespace's end killed the supervisor, so nothing holds its lifetime
//! lock, and a call from another PID namespace cleans the dead infra up and
//! goes on (a new infra, the old attachment lost and deleted) instead of
//! refusing the state dir for good.

use lab::{Lab, GATEWAY, NET};

#[test]
fn an_infra_whose_pid_namespace_died_is_cleaned_up_from_another() {
    let Some(lab) = Lab::with_example_net(lab::binary!(), "dead_pidns") else {
        return;
    };
    let c = lab.container();
    // The container's netns as a file the other PID namespace can open
    // (its own /proc does not show the container's process).
    let nsfile = lab.dir.join("c1-netns").display().to_string();
    let bind = lab.exec(
        &[],
        None,
        &[
            "sh",
            "-c",
            &format!("touch {nsfile} && mount --bind {} {nsfile}", c.netns()),
        ],
    );
    assert!(bind.ok(), "binding the container's netns: {bind}");
    let netconf = lab.netconf_dir().display().to_string();
    let cni_path = lab.cni_path();
    let cnitool = lab.dir.join("tools/cnitool").display().to_string();
    // cnitool is the PID namespace's first process: when it exits, the
    // kernel kills all else in it, the infra it started among them.
    let add = lab.exec(
        &[("NETCONFPATH", &netconf), ("CNI_PATH", &cni_path)],
        None,
        &[
            "unshare",
            "--pid",
            "--fork",
            "--mount-proc",
            &cnitool,
            "add",
            NET,
            &nsfile,
        ],
    );
    add.add_result("ADD from a PID namespace that then ends");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !lab.processes_with_arg("__supervise").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the supervisor outlived its PID namespace: {:?}",
            lab.processes_with_arg("__supervise")
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    let status = lab.cli(&["status"]);
    assert!(
        status.ok(),
        "status after the PID namespace ended: {status}"
    );
    let c2 = lab.container();
    let ip = lab.attach(&c2);
    lab.assert_ping(&c2, GATEWAY, "container -> gateway in the new infra");
    assert!(!ip.is_empty());
    let del = lab.cnitool("del", NET, &nsfile);
    assert!(
        del.ok(),
        "DEL of the attachment lost with the dead infra: {del}"
    );
    lab.detach(&c2);
    lab.exec(&[], None, &["umount", &nsfile]);
    lab.assert_no_infra("after the DELs");
}
