//! rootless-cni: a CNI plugin that runs the reference plugins inside a
//! per-user infra namespace, so an unprivileged user's containers get a
//! real bridge network.
//!
//! The binary is `src/main.rs`; this library holds everything else, so the
//! parsing of a plugin call can be property-tested in-process
//! (tests/parse_props.rs).

pub mod chain;
pub mod cli;
pub mod cni;
pub mod commands;
pub mod error;
pub mod exec;
pub mod infra;
pub mod ports;
pub mod procfs;
pub mod state;
pub mod sys;
pub mod userns;

pub mod plugin;
