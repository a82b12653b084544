//! slirp4netns killed under published ports, with both port drivers: the
//! supervisor restarts it and re-applies the forwards, and the ports serve
//! again.

use lab::net::http_get;
use lab::ports::{
    add, assert_echoes, assert_port_free, assert_serves, at, conf, del, free_port, httpd, lab_for,
    lab_process, stop_all, tcp, udp, udp_echo_server, udp_roundtrip, LOCALHOST,
};
use lab::{HostServer, Lab, SLIRP_HOST};
use std::thread;
use std::time::{Duration, Instant};

fn slirp_pid(lab: &Lab) -> Option<u32> {
    lab.status()["infra"]["slirp4netns"]["pid"]
        .as_u64()
        .map(|p| p as u32)
}

/// Polls `f` every 50 ms until it is Ok or `limit` has passed; the time it took.
fn eventually<T>(
    limit: Duration,
    mut f: impl FnMut() -> Result<T, String>,
) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        match f() {
            Ok(_) => return Ok(start.elapsed()),
            Err(e) if start.elapsed() >= limit => {
                return Err(format!("still failing after {limit:?}: {e}"))
            }
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

// ---------------------------------------------------------------------------
// 5: slirp4netns killed: the supervisor restarts it and re-applies forwards

fn slirp_restart(driver: &str) {
    let Some(lab) = lab_for(lab::binary!(), "p_restart", driver) else {
        return;
    };
    let t0 = Instant::now();
    let with_udp = lab::have_python3("the UDP tests");
    let host = HostServer::start("127.0.0.1");
    assert_eq!(conf(driver)["plugins"][0]["allowHostLoopback"], true);
    let c = lab.container();
    let (p_web, p_udp) = (free_port(), free_port());
    let mut mappings = vec![tcp(p_web, 80)];
    if with_udp {
        mappings.push(udp(p_udp, 5353));
    }
    add(&lab, &c, &mappings);
    let mut servers = vec![httpd(&lab, &c, 80, "still here\n")];
    servers.extend(with_udp.then(|| udp_echo_server(&lab, &c, 5353, "echo:")));
    let host_url = format!("http://{SLIRP_HOST}:{}/", host.port);
    let got = lab.curl(&c, &host_url);
    assert!(
        got.ok(),
        "container -> host loopback before the kill: {got}"
    );
    assert_serves(at(LOCALHOST, p_web), "still here\n", "before the kill");
    if with_udp {
        assert_echoes(at(LOCALHOST, p_udp), "echo:", "before the kill");
    }

    let old = slirp_pid(&lab).unwrap_or_else(|| panic!("no slirp4netns pid: {}", lab.status()));
    assert!(lab_process(&lab, old), "slirp4netns {old} is not running");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap_or_else(|e| panic!("killing slirp4netns {old}: {e}"));
    let killed = Instant::now();
    let limit = Duration::from_secs(5);

    // No CNI call from here on: the supervisor alone repairs it.
    let new_pid = eventually(limit, || match slirp_pid(&lab) {
        Some(p) if p != old && lab_process(&lab, p) => Ok(p),
        other => Err(format!("slirp4netns pid in status: {other:?}")),
    });
    let t_pid = killed.elapsed();
    new_pid.unwrap_or_else(|e| panic!("no new slirp4netns: {e}\n{}", lab.status()));
    let outbound = eventually(limit, || {
        let got = lab.curl(&c, &host_url);
        if got.ok() {
            Ok(())
        } else {
            Err(got.to_string())
        }
    });
    let t_out = killed.elapsed();
    outbound.unwrap_or_else(|e| panic!("{driver}: container -> host loopback after the kill: {e}"));
    let published = eventually(limit, || http_get(at(LOCALHOST, p_web)));
    let t_pub = killed.elapsed();
    published.unwrap_or_else(|e| panic!("{driver}: published TCP port after the kill: {e}"));
    assert_serves(at(LOCALHOST, p_web), "still here\n", "after the kill");
    if with_udp {
        let udp = eventually(limit, || udp_roundtrip(at(LOCALHOST, p_udp), "again"));
        udp.unwrap_or_else(|e| panic!("{driver}: published UDP port after the kill: {e}"));
        assert_echoes(at(LOCALHOST, p_udp), "echo:", "after the kill");
    }
    let new = slirp_pid(&lab).expect("a slirp4netns pid");
    assert_ne!(new, old, "status still shows the killed slirp4netns");
    eprintln!(
        "[timing] slirp4netns restart ({driver}): new pid in status after {t_pid:?}, \
         outbound after {t_out:?}, published port after {t_pub:?}"
    );

    del(&lab, &c);
    assert_port_free(p_web, with_udp, &format!("{driver}: after DEL"));
    if with_udp {
        assert_port_free(p_udp, true, &format!("{driver}: after DEL"));
    }
    stop_all(&lab, servers);
    lab.assert_no_infra(&format!("{driver}: after DEL"));
    eprintln!(
        "[timing] ports slirp restart ({driver}): {:?}",
        t0.elapsed()
    );
}

#[test]
fn slirp4netns_restart_builtin() {
    slirp_restart("builtin");
}

#[test]
fn slirp4netns_restart_slirp4netns() {
    slirp_restart("slirp4netns");
}
