//! An ADD publishing a port, SIGKILLed while its inner chain runs (after
//! its forwards were opened): whatever comes next on that attachment takes
//! over and removes what the dead call left. A retried ADD succeeds and
//! serves the port to the container; a DEL or a GC frees the port, the
//! lease and the container's interface; CHECK says the ADD is gone, not
//! that it runs; a DEL that finds no record at all (removed by hand) still
//! closes the forwards under its key. Both port drivers; another
//! attachment keeps the infra up throughout, each step ends with the
//! no-leak checker against what it holds, and the last DEL leaves nothing.

use lab::net::http_get;
use lab::{example_conflist, free_tcp_port, outer, plugin_stdin, Container, Lab, Out};
use lab::{install_plugin, spawn, Call};
use serde_json::{json, Value};
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

/// Where the slow plugin goes in the inner chain.
#[derive(Clone, Copy)]
enum Slow {
    /// After every reference plugin: the interface, lease and rules exist.
    Last,
    /// Before them: the forwards are all the killed call made.
    First,
}

/// The example network with `driver`, the slow plugin at `slow`, and
/// 127.0.0.1:`port` published to the container's port 80.
fn stdin(driver: &str, slow: Slow, port: u16) -> Value {
    let mut conflist = example_conflist();
    let o = outer(&mut conflist);
    o.insert("portDriver".into(), driver.into());
    let plugins = o["delegate"]["plugins"]
        .as_array_mut()
        .expect("the example's inner plugins");
    match slow {
        Slow::Last => plugins.push(json!({"type": "slowadd"})),
        Slow::First => plugins.insert(0, json!({"type": "slowadd"})),
    }
    let mut stdin = plugin_stdin(&conflist);
    stdin["runtimeConfig"] = json!({"portMappings": [
        {"hostPort": port, "containerPort": 80, "protocol": "tcp", "hostIP": "127.0.0.1"}
    ]});
    stdin
}

fn call(lab: &Lab, verb: &str, id: &str, c: &Container, stdin: &Value) -> Out {
    lab.plugin(&lab.plugin_env(verb, id, &c.netns()), &stdin.to_string())
}

/// Starts an ADD, waits until the slow plugin runs, SIGKILLs the plugin
/// alone (what libcni does on its timeout: the inner plugin lives on).
fn kill_add_mid_chain(lab: &Lab, marks: &Path, id: &str, c: &Container, stdin: &Value) {
    let started = marks.join("started");
    let _ = fs::remove_file(&started);
    let env = lab.plugin_env("ADD", id, &c.netns());
    let add = spawn(lab, &Call::plugin(lab, &env, &stdin.to_string()));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !started.exists() {
        assert!(Instant::now() < deadline, "the ADD never reached slowadd");
        thread::sleep(Duration::from_millis(10));
    }
    lab::sigkill(add.pid);
    let out = add.wait(Duration::from_secs(10));
    assert!(out.status.is_none(), "the ADD was not killed: {out}");
    let port = stdin["runtimeConfig"]["portMappings"][0]["hostPort"]
        .as_u64()
        .expect("a published port") as u16;
    assert!(!port_free(port), "the killed ADD had not published {port}");
}

fn port_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// The forwards are closed at the end of the call that frees them, but a
/// listener thread may take a moment to let go.
fn assert_port_freed(port: u16, when: &str) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while !port_free(port) {
        assert!(
            Instant::now() < deadline,
            "{when}: port {port} is still held"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// busybox httpd on port 80 in `c`, as the lab user, serving `body`; its pid.
fn httpd(lab: &Lab, c: &Container, body: &str) -> u32 {
    let rel = format!("www-{}", c.pid);
    lab.write_file(&format!("{rel}/index.html"), body);
    let dir = lab.dir.join(&rel).display().to_string();
    let out = lab.in_netns(
        c,
        &[
            "sh",
            "-c",
            r#"busybox httpd -f -p 80 -h "$1" </dev/null >/dev/null 2>&1 & echo $!"#,
            "sh",
            &dir,
        ],
    );
    assert!(out.ok(), "starting httpd: {out}");
    out.stdout.trim().parse().expect("httpd's pid")
}

/// Kills the server by pid and waits until it is gone (a process of the
/// lab uid counts as a leftover).
fn stop(pid: u32) {
    lab::sigkill(pid);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
}

/// GET through the published port answers `body` (the server may need a
/// moment to listen).
fn assert_serves(port: u16, body: &str, when: &str) {
    let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match http_get(addr) {
            Ok(got) if got == body => return,
            got => assert!(
                Instant::now() < deadline,
                "{when}: GET http://{addr}/: {got:?}"
            ),
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn record_path(lab: &Lab, id: &str) -> PathBuf {
    lab.state_dir()
        .join(format!("attachments/rootless+{id}+eth0.json"))
}

fn killed_add_is_taken_over(driver: &str) {
    let Some(lab) = Lab::new(lab::binary!(), &format!("killed_ports_{driver}")) else {
        return;
    };
    let t0 = Instant::now();
    let marks = lab.dir.join("plugin-marks");
    fs::create_dir_all(&marks).expect("mkdir plugin-marks");
    std::os::unix::fs::chown(&marks, Some(lab.uid), Some(lab.uid)).expect("chown plugin-marks");
    install_plugin(
        &lab,
        "slowadd",
        &lab::SLOWADD.replace("DIR", &marks.display().to_string()),
    );
    let c = lab.container();
    // Another attachment keeps the infra up: its stopping would close
    // every forward and hide what a call left. Its port makes portmap's
    // shared chains, which stay until the infra stops.
    let witness = lab.container();
    let plain = stdin(driver, Slow::Last, free_tcp_port());
    let out = call(&lab, "ADD", "witness", &witness, &plain);
    assert!(out.ok(), "{driver}: ADD of the witness: {out}");
    let baseline = lab.snapshot();

    // A retried ADD takes the attachment over and serves the port.
    let when = format!("{driver}: ADD retried after the killed ADD");
    let port = free_tcp_port();
    let conf = stdin(driver, Slow::Last, port);
    kill_add_mid_chain(&lab, &marks, "retried", &c, &conf);
    let out = call(&lab, "ADD", "retried", &c, &conf);
    assert!(out.ok(), "{when}: {out}");
    assert!(
        lab.links(&c).contains(&"eth0".to_string()),
        "{when}: no eth0: {:?}",
        lab.links(&c)
    );
    let server = httpd(&lab, &c, "taken over\n");
    assert_serves(port, "taken over\n", &when);
    stop(server);
    let out = call(&lab, "DEL", "retried", &c, &conf);
    assert!(out.ok(), "{when}: DEL: {out}");
    assert_port_freed(port, &when);
    assert_eq!(lab.links(&c), vec!["lo"], "{when}: after the DEL");
    lab.assert_no_leaks(&baseline, &when);

    // CHECK says the ADD is gone; the DEL frees everything.
    let when = format!("{driver}: DEL after the killed ADD");
    let port = free_tcp_port();
    let conf = stdin(driver, Slow::Last, port);
    kill_add_mid_chain(&lab, &marks, "deleted", &c, &conf);
    let out = call(&lab, "CHECK", "deleted", &c, &conf);
    let err = out
        .cni_error()
        .unwrap_or_else(|| panic!("{when}: CHECK: no error: {out}"));
    assert_eq!(err.code, 103, "{when}: CHECK of a killed ADD: {out}");
    let out = call(&lab, "DEL", "deleted", &c, &conf);
    assert!(out.ok(), "{when}: {out}");
    assert_port_freed(port, &when);
    assert_eq!(lab.links(&c), vec!["lo"], "{when}");
    lab.assert_no_leaks(&baseline, &when);

    // GC of it, as of any attachment the runtime no longer lists.
    let when = format!("{driver}: GC after the killed ADD");
    let port = free_tcp_port();
    let conf = stdin(driver, Slow::Last, port);
    kill_add_mid_chain(&lab, &marks, "collected", &c, &conf);
    let mut gc = conf.clone();
    gc["cniVersion"] = "1.1.0".into();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "witness", "ifname": "eth0"}]);
    let env = vec![
        ("CNI_COMMAND".to_string(), "GC".to_string()),
        ("CNI_PATH".to_string(), lab.cni_path()),
    ];
    let out = lab.plugin(&env, &gc.to_string());
    assert!(out.ok(), "{when}: {out}");
    assert_port_freed(port, &when);
    assert_eq!(lab.links(&c), vec!["lo"], "{when}");
    lab.assert_no_leaks(&baseline, &when);

    // No record at all: the DEL still closes the forwards under its key.
    let when = format!("{driver}: DEL with the killed ADD's record removed");
    let port = free_tcp_port();
    let conf = stdin(driver, Slow::First, port);
    kill_add_mid_chain(&lab, &marks, "recordless", &c, &conf);
    let record = record_path(&lab, "recordless");
    fs::remove_file(&record).unwrap_or_else(|e| panic!("{}: {e}", record.display()));
    let out = call(&lab, "DEL", "recordless", &c, &conf);
    assert!(out.ok(), "{when}: {out}");
    assert_port_freed(port, &when);
    lab.assert_no_leaks(&baseline, &when);

    let out = call(&lab, "DEL", "witness", &witness, &plain);
    assert!(out.ok(), "{driver}: DEL of the witness: {out}");
    lab.assert_no_infra(&format!("{driver}: after the last DEL"));
    eprintln!(
        "[timing] killed ADD taken over ({driver}): {:?}",
        t0.elapsed()
    );
}

#[test]
fn killed_add_is_taken_over_builtin() {
    killed_add_is_taken_over("builtin");
}

#[test]
fn killed_add_is_taken_over_slirp4netns() {
    killed_add_is_taken_over("slirp4netns");
}
