//! containerd's CNI library in the lab: our go-cni client
//! (tools/gocni-client, built by scripts/build-gocni-client) run as the lab
//! user inside the session, driving a pod's netns the way containerd's CRI
//! plugin drives go-cni (same options on setup, check and remove).

use crate::net::http_get;
use crate::{Container, Lab, Out};
use serde_json::Value;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// The client: `$GOCNI_CLIENT`, else `<manifest>/.tools/bin/gocni-client`.
fn gocni_client_path() -> PathBuf {
    match std::env::var_os("GOCNI_CLIENT").filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => crate::repo().join(".tools/bin/gocni-client"),
    }
}

/// conf-examples/kubernetes/10-rootless.conflist: what kubelet-through-
/// containerd loads from its `conf_dir`.
pub fn kubernetes_conflist() -> Value {
    crate::conf_example("kubernetes/10-rootless.conflist")
}

/// A pod as the client sees it: a sandbox id (64 hex digits, as
/// containerd's), a name for the labels, its netns, and the client options
/// that describe it (ports, bandwidth, ...), the same on every verb.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub id: String,
    pub container: Container,
    pub flags: Vec<String>,
}

impl Pod {
    pub fn new(name: &str, container: Container) -> Pod {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!(
            "{:016x}{:016x}{:032x}",
            std::process::id(),
            container.pid,
            n
        );
        Pod {
            name: name.to_string(),
            id,
            container,
            flags: Vec::new(),
        }
    }

    /// Adds a client option (`-ports`, `-ingress-rate`, ...) and its value.
    pub fn with(mut self, flag: &str, value: &str) -> Pod {
        self.flags.push(format!("{flag}={value}"));
        self
    }
}

/// The go-cni client of one lab, with its own CNI config dir holding one
/// network (containerd loads the first file of `conf_dir`).
pub struct GoCni<'a> {
    lab: &'a Lab,
    client: String,
    conf_dir: String,
}

impl<'a> GoCni<'a> {
    /// The client set up in `lab` with `conflist` as the pod network; None
    /// (after saying why) when it is not built and CI is not set.
    pub fn new(lab: &'a Lab, conflist: &Value) -> Option<GoCni<'a>> {
        let built = gocni_client_path();
        if !built.is_file() {
            let why = format!(
                "no go-cni client at {} (run scripts/build-gocni-client or set GOCNI_CLIENT)",
                built.display()
            );
            assert!(!crate::in_ci(), "{why} (CI=true)");
            eprintln!("skipping: {why}");
            return None;
        }
        // The lab user cannot be assumed to reach the build tree.
        let client = lab.dir.join("tools/gocni-client");
        fs::copy(&built, &client)
            .and_then(|_| fs::set_permissions(&client, fs::Permissions::from_mode(0o755)))
            .unwrap_or_else(|e| panic!("copying {} into the lab: {e}", built.display()));
        lab.write_file("gocni.d/10-rootless.conflist", &conflist.to_string());
        Some(GoCni {
            lab,
            client: client.display().to_string(),
            conf_dir: lab.dir.join("gocni.d").display().to_string(),
        })
    }

    /// `gocni-client OPTIONS VERB ID NETNS` in the session, as the lab user.
    pub fn run(&self, verb: &str, pod: &Pod) -> Out {
        let netns = pod.container.netns();
        let mut argv = vec![
            self.client.as_str(),
            "-conf-dir",
            &self.conf_dir,
            "-plugin-dirs",
        ];
        let plugin_dirs = self.lab.cni_path();
        argv.push(&plugin_dirs);
        argv.extend(["-pod-name", &pod.name, "-pod-namespace", "default"]);
        argv.extend(pod.flags.iter().map(String::as_str));
        argv.extend([verb, &pod.id, &netns]);
        self.lab.exec(&[], None, &argv)
    }

    /// Setup, which must succeed: the go-cni Result.
    pub fn setup(&self, pod: &Pod) -> Value {
        let out = self.run("setup", pod);
        assert!(out.ok(), "go-cni setup of {}: {out}", pod.name);
        out.json()
            .unwrap_or_else(|| panic!("go-cni setup of {}: no JSON result: {out}", pod.name))
    }

    /// Check, which must succeed.
    pub fn check(&self, pod: &Pod) {
        let out = self.run("check", pod);
        assert!(out.ok(), "go-cni check of {}: {out}", pod.name);
    }

    /// Remove, which must succeed.
    pub fn remove(&self, pod: &Pod) {
        let out = self.run("remove", pod);
        assert!(out.ok(), "go-cni remove of {}: {out}", pod.name);
    }

    /// What libcni cached for the pod's ADD on `network`/eth0: the config,
    /// CNI_ARGS (`cniArgs`) and every capability arg go-cni handed it
    /// (`capabilityArgs`), as containerd would have passed them.
    pub fn cached(&self, network: &str, pod: &Pod) -> Value {
        let p = self
            .lab
            .var_lib_cni()
            .join("results")
            .join(format!("{network}-{}-eth0", pod.id));
        let text = fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }
}

/// The pod address containerd would take: the first IP of the default
/// interface (`Interfaces.eth0.IPConfigs[0].IP`) of a go-cni Result.
pub fn pod_ipv4(result: &Value) -> Option<String> {
    result["Interfaces"]["eth0"]["IPConfigs"]
        .as_array()?
        .iter()
        .filter_map(|c| c["IP"].as_str())
        .find(|ip| ip.parse::<Ipv4Addr>().is_ok())
        .map(str::to_string)
}

/// `busybox httpd` serving `body` on port 80 of a container's netns, as the
/// lab user; killed and reaped on drop (before the no-leak check).
pub struct WebServer {
    child: Child,
}

impl WebServer {
    pub fn start(lab: &Lab, c: &Container, body: &str) -> WebServer {
        let rel = format!("www-{}", c.pid);
        lab.write_file(&format!("{rel}/index.html"), body);
        let dir = lab.dir.join(&rel).display().to_string();
        let net = format!("--net={}", c.netns());
        let argv = [
            "nsenter", &net, "--", "busybox", "httpd", "-f", "-p", "80", "-h", &dir,
        ];
        let (mut cmd, what) = lab.command(&[], &argv);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        WebServer { child }
    }
}

impl Drop for WebServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts that the host's 127.0.0.1:`port` serves `body` within 10 s (the
/// server in the pod may still be starting).
pub fn assert_page_on_loopback(port: u16, body: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match http_get(SocketAddr::from((Ipv4Addr::LOCALHOST, port))) {
            Ok(got) => {
                assert_eq!(got, body, "{what}: GET http://127.0.0.1:{port}/");
                return;
            }
            Err(e) if Instant::now() >= deadline => panic!("{what}: {e}"),
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}
