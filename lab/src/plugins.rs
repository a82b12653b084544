//! Inner plugins of a test's own: scripts written into the lab's CNI dir
//! as the lab user, and the config that delegates to one of them.

use crate::{example_conflist, outer, plugin_stdin, Lab};
use std::fs;

/// Writes `contents` to `path` as the lab user would have (owner uid, 0600).
pub fn write_as_user(lab: &Lab, path: &std::path::Path, contents: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
    }
    fs::write(path, contents).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    std::os::unix::fs::chown(path, Some(lab.uid), Some(lab.uid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// Writes an inner plugin of the test's own (a whole script, shebang
/// included) into the lab's CNI dir, executable, owned by the lab user.
pub fn install_plugin(lab: &Lab, name: &str, script: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = lab.bin().join(name);
    write_as_user(lab, &path, script.as_bytes());
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// A plugin (python3) that marks that its ADD started (`DIR/started`, DIR
/// replaced by the caller), sleeps 2 s through it and passes the result on:
/// a kill or a lock timeout lands while it runs.
pub const SLOWADD: &str = r#"#!/usr/bin/python3
import json, os, sys, time
conf = json.load(sys.stdin)
if os.environ.get("CNI_COMMAND") == "ADD":
    open("DIR/started", "w").close()
    time.sleep(2)
print(json.dumps(conf.get("prevResult") or {"cniVersion": conf["cniVersion"]}))
"#;

/// The plugin's stdin for the example config whose delegated chain is the
/// one plugin `plugin_type` (installed by the test), in a network "slow".
pub fn one_plugin_delegate_stdin(plugin_type: &str) -> serde_json::Value {
    let mut conf = example_conflist();
    outer(&mut conf).insert(
        "delegate".into(),
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "slow",
            "plugins": [{ "type": plugin_type }]
        }),
    );
    plugin_stdin(&conf)
}
