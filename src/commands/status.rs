//! STATUS (spec 1.1.0): success when an ADD would work now; otherwise code
//! 50 saying what is missing.

use crate::chain;
use crate::cni::config::NetConf;
use crate::cni::env::CniEnv;
use crate::error::{Error, Kind, Result};
use crate::infra;

pub fn status(env: &CniEnv, conf: &NetConf) -> Result<()> {
    let unavailable = |e: Error| e.with_kind(Kind::PluginNotAvailable);
    let list = conf.inner_list().map_err(unavailable)?;
    // Without CNI_PATH the inner plugins can be neither found nor asked.
    let binaries = match env.path.is_empty() {
        true => None,
        false => Some(chain::find_binaries(list, &env.path).map_err(unavailable)?),
    };
    // A question changes nothing: no state dir is made for it.
    let state = super::state_dir(conf, false).map_err(unavailable)?;
    let running = match &state {
        Some(state) => infra::reap_and_join(state, &state.lock()?)?,
        None => None,
    };
    if let Some(why) = running.as_ref().and_then(infra::outbound::outbound_down) {
        return Err(Error::new(Kind::LimitedConnectivity, why));
    }
    match (running, binaries) {
        (Some(info), Some(plugins)) => {
            super::network_verb(plugins, &info, env, conf, |chain| chain.status())
        }
        (Some(_), None) => Ok(()),
        (None, _) => infra::prereq::can_start_infra(conf.outbound)
            .map_err(|msg| Error::new(Kind::PluginNotAvailable, msg)),
    }
}
