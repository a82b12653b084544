//! `exec -- CMD`: a command inside the infra, like `podman unshare
//! --rootless-netns`, for looking at the bridge, routes and rules.

use super::open_state;
use crate::error::{Error, Result};
use crate::exec::InfraNs;
use crate::infra;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;

/// `command`: the program and its arguments (clap makes sure of one).
pub fn exec(state_dir: Option<PathBuf>, command: &[OsString]) -> Result<i32> {
    let Some((program, rest)) = command.split_first() else {
        return Err(Error::internal(
            "exec needs a command: rootless-cni exec -- ip addr",
        ));
    };
    let no_infra = || Error::internal("no infra is running (the first ADD starts it)");
    let state = open_state(state_dir)?.ok_or_else(no_infra)?;
    let info = infra::reap_and_join(&state, &state.lock()?)?.ok_or_else(no_infra)?;
    let infra_ns = InfraNs::open(&info)?;
    let mut cmd = Command::new(program);
    cmd.args(rest).env("PATH", crate::exec::path_with_sbin());
    infra_ns.enter(&mut cmd, [None, None]);
    let status = cmd
        .status()
        .map_err(|e| Error::internal(format!("running {program:?} in the infra: {e}")))?;
    Ok(status.code().unwrap_or(1))
}
