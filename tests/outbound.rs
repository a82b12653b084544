//! The infra's way out (slirp4netns or pasta) down: the supervisor keeps
//! restarting it with a growing pause; while it is down the STATUS verb
//! answers 51, CHECK fails naming the engine, and `status` (human and JSON)
//! says "down" with the failed restarts; once a restart works again,
//! published ports are forwarded again and the container reaches the host.
//! Run for both engines (pasta with the builtin port driver, slirp4netns
//! with both drivers).
//!
//! Restarts fail for real: the supervisor finds the engine's program first
//! in its PATH (inherited from the ADD that started the infra) as a script
//! that runs the real one, unless the test has created a "broken" flag
//! file, in which case it exits 1 as an engine that cannot start would.

use lab::net::http_get;
use lab::outbound;
use lab::{example_conflist, outer, plugin_stdin, HostServer, Lab, Out, Server, LAB_PATH, NET};
use serde_json::{json, Value};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

/// Polls `f` every 50 ms until it is Ok or `limit` has passed.
fn eventually<T>(limit: Duration, mut f: impl FnMut() -> Result<T, String>) -> Result<T, String> {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() >= limit => {
                return Err(format!("still failing after {limit:?}: {e}"))
            }
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// `<lab>/wrap/PROGRAM`: the real one, or exit 1 while `flag` exists.
fn engine_wrapper(lab: &Lab, program: &str, flag: &Path) -> PathBuf {
    let real = LAB_PATH
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{program} in the lab's PATH"));
    lab.write_file(
        &format!("wrap/{program}"),
        &format!(
            "#!/bin/sh\nif [ -e '{}' ]; then echo '{program}: broken on purpose' >&2; exit 1; fi\nexec '{}' \"$@\"\n",
            flag.display(),
            real.display()
        ),
    );
    let wrapper = lab.dir.join(format!("wrap/{program}"));
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))
        .expect("chmod the wrapper");
    lab.dir.join("wrap")
}

/// busybox httpd on port 80 in the container, serving `body`.
fn httpd(lab: &Lab, c: &lab::Container, body: &str) -> Server {
    lab.write_file(&format!("www-{}/index.html", c.pid), body);
    let dir = lab.dir.join(format!("www-{}", c.pid)).display().to_string();
    let out = lab.in_netns(
        c,
        &[
            "sh",
            "-c",
            r#""$@" </dev/null >/dev/null 2>&1 & echo $!"#,
            "sh",
            "busybox",
            "httpd",
            "-f",
            "-p",
            "80",
            "-h",
            &dir,
        ],
    );
    assert!(out.ok(), "starting httpd: {out}");
    Server {
        pid: out.stdout.trim().parse().expect("the pid of httpd"),
    }
}

/// The STATUS verb (spec 1.1.0) as a runtime would call it.
fn status_verb(lab: &Lab, conf: &Value) -> Out {
    let mut conf = conf.clone();
    conf["cniVersion"] = "1.1.0".into();
    let env = vec![
        ("CNI_COMMAND".to_string(), "STATUS".to_string()),
        ("CNI_PATH".to_string(), lab.cni_path()),
    ];
    lab.plugin(&env, &plugin_stdin(&conf).to_string())
}

fn outbound(lab: &Lab) -> Value {
    lab.status()["infra"]["outbound"].clone()
}

fn outbound_down_then_back(engine: &str, driver: &str) {
    let test = format!("outbound_{engine}_{driver}");
    if !outbound::available(engine, &test) {
        return;
    }
    let Some(lab) = Lab::new(lab::binary!(), &test) else {
        return;
    };
    let t0 = Instant::now();
    let mut conf = example_conflist();
    outer(&mut conf).insert("portDriver".into(), driver.into());
    outbound::with_engine(&mut conf, engine);
    lab.write_netconf(NET, &conf);
    let program = outbound::program(engine);
    let flag = lab.dir.join("engine-broken");
    let wrap = engine_wrapper(&lab, program, &flag);
    let path = format!("{}:{LAB_PATH}", wrap.display());
    let host = HostServer::start("127.0.0.1");
    let host_url = format!("http://{}:{}/", lab::SLIRP_HOST, host.port);

    let c = lab.container();
    let port = lab::free_tcp_port();
    let cap_args =
        json!({"portMappings": [{"hostPort": port, "containerPort": 80, "protocol": "tcp", "hostIP": "127.0.0.1"}]})
            .to_string();
    let add = lab.cnitool_env(
        &[("PATH", &path), ("CAP_ARGS", &cap_args)],
        "add",
        NET,
        &c.netns(),
    );
    add.add_result("ADD publishing a port");
    let server = httpd(&lab, &c, "served\n");
    // CHECK runs on a second container without ports: portmap 1.1.1's own
    // CHECK of a 127.0.0.1 mapping fails on an IPv6 chain it never made.
    let c2 = lab.container();
    let add2 = lab.cnitool_env(&[("PATH", &path)], "add", NET, &c2.netns());
    add2.add_result("ADD of a second container");
    eventually(Duration::from_secs(5), || {
        http_get(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
    })
    .unwrap_or_else(|e| panic!("the published port before the kill: {e}"));
    let st = status_verb(&lab, &conf);
    assert!(st.ok(), "STATUS with the infra up: {st}");
    let check = lab.cnitool("check", NET, &c2.netns());
    assert!(check.ok(), "CHECK with the infra up: {check}");

    // The engine dies, and every restart fails until the flag goes.
    std::fs::write(&flag, "").expect("creating the flag");
    let old = outbound::engine_pid(&lab.status(), engine).expect("the engine's pid in status");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap_or_else(|e| panic!("killing {engine} {old}: {e}"));
    let killed = Instant::now();
    // The runtime's view first: STATUS answers 51 while the way out is down.
    let st = eventually(Duration::from_secs(5), || {
        let st = status_verb(&lab, &conf);
        match st.cni_error() {
            Some(e) if e.code == 51 => Ok(st),
            _ => Err(format!(
                "STATUS with {engine} killed and failing to restart: {st}"
            )),
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let err = st.cni_error().expect("an error object");
    assert!(err.mentions(engine), "STATUS while down: {st}");
    let down = eventually(Duration::from_secs(10), || {
        let o = outbound(&lab);
        if o["up"] == false && o["failedRestarts"].as_u64().unwrap_or(0) >= 3 {
            Ok(o)
        } else {
            Err(format!("outbound: {o}"))
        }
    })
    .unwrap_or_else(|e| panic!("status never said the way out is down and retried: {e}"));
    eprintln!("down after {:?}: {down}", killed.elapsed());
    assert!(
        down["error"].as_str().unwrap_or("").contains(engine),
        "the reason names {engine}: {down}"
    );
    let human = lab.cli(&["status"]);
    assert!(
        human.ok() && human.stdout.contains("outbound:    DOWN"),
        "human status while down: {human}"
    );
    let check = lab.cnitool("check", NET, &c2.netns());
    assert!(!check.ok(), "CHECK succeeded while the way out is down");
    assert!(
        check.to_string().contains(engine),
        "CHECK while down names {engine}: {check}"
    );
    // Still down a while later: the supervisor keeps trying, never gives up.
    let failed_before = down["failedRestarts"].as_u64().unwrap_or(0);
    thread::sleep(Duration::from_millis(1500));
    let later = outbound(&lab);
    assert!(
        later["failedRestarts"].as_u64().unwrap_or(0) > failed_before,
        "no restart tried since: {later}"
    );

    // Restarts work again: back within the longest pause (5 s) and a start.
    std::fs::remove_file(&flag).expect("removing the flag");
    let fixed = Instant::now();
    eventually(Duration::from_secs(12), || {
        let o = outbound(&lab);
        if o["up"] == true {
            Ok(())
        } else {
            Err(format!("outbound: {o}"))
        }
    })
    .unwrap_or_else(|e| panic!("the way out never came back: {e}"));
    eprintln!("up again {:?} after the fix", fixed.elapsed());
    let back = outbound(&lab);
    assert_eq!(back["restarts"], 1, "restarts after recovery: {back}");
    let new = outbound::engine_pid(&lab.status(), engine).expect("the engine's pid after recovery");
    assert_ne!(new, old, "status still shows the killed {engine}");
    eventually(Duration::from_secs(5), || {
        http_get(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
    })
    .unwrap_or_else(|e| panic!("{engine}, {driver}: the published port after recovery: {e}"));
    eventually(Duration::from_secs(5), || {
        let got = lab.curl(&c, &host_url);
        got.ok().then_some(()).ok_or_else(|| got.to_string())
    })
    .unwrap_or_else(|e| panic!("{engine}, {driver}: container -> host after recovery: {e}"));
    let st = status_verb(&lab, &conf);
    assert!(st.ok(), "STATUS after recovery: {st}");
    let check = lab.cnitool("check", NET, &c2.netns());
    assert!(check.ok(), "CHECK after recovery: {check}");
    let human = lab.cli(&["status"]);
    assert!(
        human
            .stdout
            .contains(&format!("outbound:    up ({engine} restarted 1 time(s))")),
        "human status after recovery: {human}"
    );

    for x in [&c, &c2] {
        let del = lab.cnitool("del", NET, &x.netns());
        assert!(del.ok(), "DEL: {del}");
    }
    drop(server);
    lab.kill_container(&c);
    lab.kill_container(&c2);
    lab.assert_no_infra("after the DEL");
    eprintln!(
        "[timing] outbound down and back ({engine}, {driver}): {:?}",
        t0.elapsed()
    );
}

#[test]
fn outbound_down_is_reported_and_recovers_slirp4netns() {
    outbound_down_then_back(outbound::SLIRP4NETNS, "builtin");
}

#[test]
fn outbound_down_is_reported_and_recovers_slirp4netns_with_its_port_driver() {
    outbound_down_then_back(outbound::SLIRP4NETNS, "slirp4netns");
}

#[test]
fn outbound_down_is_reported_and_recovers_pasta() {
    outbound_down_then_back(outbound::PASTA, "builtin");
}
