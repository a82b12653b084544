//! `stop`: stop the infra; refuses while attachments use it unless forced.

use super::open_state;
use crate::error::{Error, Result};
use crate::infra;
use std::path::PathBuf;

pub fn stop(state_dir: Option<PathBuf>, force: bool) -> Result<()> {
    let Some(state) = open_state(state_dir)? else {
        println!("no infra running");
        return Ok(());
    };
    let lock = state.lock()?;
    let Some(info) = infra::reap_and_join(&state, &lock)? else {
        println!("no infra running");
        return Ok(());
    };
    let count = state.list_attachments()?.len();
    if count > 0 && !force {
        return Err(Error::internal(format!(
            "{count} attachment(s) still use the infra; DEL them first, or stop --force (they are then lost)"
        )));
    }
    infra::stop(&state, &lock, &info)?;
    println!("stopped the infra (supervisor {})", info.supervisor.pid);
    Ok(())
}
