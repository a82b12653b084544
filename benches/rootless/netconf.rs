//! The network configs the phases use: conf-examples/rootless.conflist
//! with the changes a phase asks for.

use lab::{example_conflist, outer, plugin_stdin};
use serde_json::{json, Value};

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Chain {
    /// bridge (+ host-local IPAM)
    Bridge,
    /// bridge, portmap, firewall, tuning: conf-examples/rootless.conflist
    Full,
}

/// How a config differs from the example's.
#[derive(Default, Clone)]
pub(crate) struct NetOpts {
    /// Outer `mtu` and the bridge's `mtu`.
    pub(crate) mtu: Option<u32>,
    pub(crate) state_dir: Option<String>,
    pub(crate) port_driver: Option<&'static str>,
    /// Outer `outbound`: the infra's way out.
    pub(crate) outbound: Option<&'static str>,
}

/// conf-examples/rootless.conflist with a /16 subnet, host loopback allowed,
/// and `o` applied.
pub(crate) fn conflist(chain: Chain, o: &NetOpts) -> Value {
    let mut c = example_conflist();
    {
        let inner = &mut c["plugins"][0]["delegate"];
        inner["plugins"][0]["ipam"]["ranges"] = json!([[{ "subnet": "10.89.0.0/16" }]]);
        if let Some(mtu) = o.mtu {
            inner["plugins"][0]["mtu"] = json!(mtu);
        }
        if chain == Chain::Bridge {
            let bridge = inner["plugins"][0].clone();
            inner["plugins"] = json!([bridge]);
        }
    }
    let out = outer(&mut c);
    out.insert("allowHostLoopback".into(), json!(true));
    if let Some(mtu) = o.mtu {
        out.insert("mtu".into(), json!(mtu));
    }
    if let Some(dir) = &o.state_dir {
        out.insert("stateDir".into(), json!(dir));
    }
    if let Some(driver) = o.port_driver {
        out.insert("portDriver".into(), json!(driver));
    }
    if let Some(engine) = o.outbound {
        out.insert("outbound".into(), json!(engine));
    }
    c
}

/// What a runtime feeds rootless-cni on stdin, with capability args.
pub(crate) fn stdin_conf(conflist: &Value, runtime_config: Option<Value>) -> Value {
    let mut conf = plugin_stdin(conflist);
    if let Some(rc) = runtime_config {
        conf["runtimeConfig"] = rc;
    }
    conf
}

/// The inner conflist as rootless-cni runs it.
pub(crate) fn inner_list(conflist: &Value) -> Value {
    conflist["plugins"][0]["delegate"].clone()
}
