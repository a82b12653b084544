//! VERSION: which spec versions we speak.

pub fn version(cni_version: &crate::cni::version::CniVersion) -> String {
    crate::cni::version_reply(cni_version)
}
