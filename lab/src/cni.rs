//! CNI as the tests speak it: the example network config, cnitool and
//! our binary in plugin and CLI mode inside the lab, ADD results and CNI
//! error objects.

use crate::session::COMMAND_TIMEOUT;
use crate::{run_command, Container, Lab, Out, NET};
use serde_json::Value;
use std::fs;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::thread;

impl Out {
    /// stdout as a CNI error object.
    pub fn cni_error(&self) -> Option<CniError> {
        let v = self.json()?;
        let code = v.get("code")?.as_u64()?;
        let text = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        Some(CniError {
            code,
            msg: text("msg"),
            details: text("details"),
        })
    }
}

impl Out {
    /// The parsed result of an ADD that must have succeeded (`what` names
    /// it): the check every attaching test makes.
    pub fn add_result(&self, what: &str) -> Value {
        assert!(self.ok(), "{what}: {self}");
        self.json()
            .unwrap_or_else(|| panic!("ADD result is not JSON: {self}"))
    }

    /// The IPv4 address in the result of an ADD that must have succeeded.
    pub fn added_ipv4(&self, what: &str) -> String {
        let result = self.add_result(what);
        result_ipv4(&result).unwrap_or_else(|| panic!("no IPv4 in result: {self}"))
    }
}

/// A CNI error object (`{"code":..,"msg":..,"details":..}`).
#[derive(Debug, Clone)]
pub struct CniError {
    pub code: u64,
    pub msg: String,
    pub details: String,
}

impl CniError {
    /// Whether msg or details names `what`.
    pub fn mentions(&self, what: &str) -> bool {
        self.msg.contains(what) || self.details.contains(what)
    }
}

/// The JSON file at `path`; panics naming it when it cannot be read or
/// parsed.
pub fn read_json(path: &Path) -> Value {
    let text =
        fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("parsing {}: {e}: {text}", path.display()))
}

/// conf-examples/`rel`, parsed: a config as the repository ships it.
pub fn conf_example(rel: &str) -> Value {
    read_json(&crate::repo().join("conf-examples").join(rel))
}

/// conf-examples/rootless.conflist.
pub fn example_conflist() -> Value {
    conf_example("rootless.conflist")
}

/// The rootless-cni plugin entry of a conflist, mutable.
pub fn outer(conflist: &mut Value) -> &mut serde_json::Map<String, Value> {
    conflist["plugins"][0]
        .as_object_mut()
        .expect("conflist has plugins[0] as an object")
}

/// What a runtime feeds the first plugin of `conflist` on stdin: its entry
/// with `cniVersion` and `name` of the list.
pub fn plugin_stdin(conflist: &Value) -> Value {
    let mut conf = conflist["plugins"][0].clone();
    conf["cniVersion"] = conflist["cniVersion"].clone();
    conf["name"] = conflist["name"].clone();
    conf
}

/// The first IPv4 address (without prefix) of a CNI result.
pub fn result_ipv4(result: &Value) -> Option<String> {
    result["ips"].as_array()?.iter().find_map(|ip| {
        let a = ip["address"].as_str()?;
        let addr = a.split('/').next()?;
        addr.contains('.').then(|| addr.to_string())
    })
}

impl Lab {
    /// `cnitool CMD NET NETNS` (add, check, del) with the lab's config dir.
    pub fn cnitool(&self, cmd: &str, net: &str, netns: &str) -> Out {
        self.cnitool_env(&[], cmd, net, netns)
    }

    /// `cnitool CMD NET NETNS` for every netns at once: one process each,
    /// all started together (after a barrier), then all waited for. The
    /// outputs are in the order of `netns`.
    pub fn cnitool_parallel(&self, cmd: &str, net: &str, netns: &[String]) -> Vec<Out> {
        let netconf = self.netconf_dir().display().to_string();
        let cni_path = self.cni_path();
        let cnitool = self.dir.join("tools/cnitool").display().to_string();
        let env = [("NETCONFPATH", netconf.as_str()), ("CNI_PATH", &cni_path)];
        let barrier = Arc::new(Barrier::new(netns.len()));
        let threads: Vec<thread::JoinHandle<Out>> = netns
            .iter()
            .map(|ns| {
                let (command, what) = self.command(&env, &[&cnitool, cmd, net, ns]);
                let barrier = barrier.clone();
                thread::spawn(move || {
                    barrier.wait();
                    run_command(command, what, None, COMMAND_TIMEOUT)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("a cnitool thread panicked"))
            .collect()
    }

    /// `cnitool` with extra environment (CNI_IFNAME, CAP_ARGS, CNI_PATH, ...).
    pub fn cnitool_env(&self, extra: &[(&str, &str)], cmd: &str, net: &str, netns: &str) -> Out {
        let netconf = self.netconf_dir().display().to_string();
        let cni_path = self.cni_path();
        let mut env: Vec<(&str, &str)> = vec![("NETCONFPATH", &netconf), ("CNI_PATH", &cni_path)];
        for (k, v) in extra {
            env.retain(|(key, _)| key != k);
            env.push((k, v));
        }
        let cnitool = self.dir.join("tools/cnitool").display().to_string();
        self.exec(&env, None, &[&cnitool, cmd, net, netns])
    }

    /// Our binary in plugin mode: `env` is the whole CNI environment (plus
    /// PATH, HOME, XDG_RUNTIME_DIR), `stdin` the network config.
    pub fn plugin<K: AsRef<str>, V: AsRef<str>>(&self, env: &[(K, V)], stdin: &str) -> Out {
        let bin = self.bin().join("rootless-cni").display().to_string();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_ref(), v.as_ref())).collect();
        self.exec(&env, Some(stdin.as_bytes()), &[&bin])
    }

    /// The usual environment of a plugin call on `netns`, to adjust in tests.
    pub fn plugin_env(
        &self,
        command: &str,
        container_id: &str,
        netns: &str,
    ) -> Vec<(String, String)> {
        vec![
            ("CNI_COMMAND".into(), command.into()),
            ("CNI_CONTAINERID".into(), container_id.into()),
            ("CNI_NETNS".into(), netns.into()),
            ("CNI_IFNAME".into(), "eth0".into()),
            ("CNI_PATH".into(), self.cni_path()),
        ]
    }

    // --- containers ----------------------------------------------------------

    /// `cnitool add` of `c` to the example network, which must succeed: the
    /// IPv4 address it got (the ADD most tests start with).
    pub fn attach(&self, c: &Container) -> String {
        let add = self.cnitool("add", NET, &c.netns());
        add.added_ipv4(&format!("ADD {}", c.netns()))
    }

    /// `cnitool del` of `c` from the example network, which must succeed.
    pub fn detach(&self, c: &Container) {
        let del = self.cnitool("del", NET, &c.netns());
        assert!(del.ok(), "DEL {}: {del}", c.netns());
    }

    /// Asserts that `ip`, from an ADD result, is in the example network and
    /// is what `c`'s eth0 really has.
    pub fn assert_attached(&self, c: &Container, ip: &str) {
        assert!(
            ip.starts_with("10.89.0."),
            "address {ip} not in 10.89.0.0/24"
        );
        assert_eq!(self.ipv4(c, "eth0").as_deref(), Some(ip), "eth0 of {c:?}");
    }
}
