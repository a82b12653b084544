//! VERSION: which spec versions we speak.

pub fn version(cni_version: &str) -> String {
    crate::cni::version_reply(cni_version)
}
