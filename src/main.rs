//! rootless-cni: with CNI_COMMAND set it is a plugin; without, a small CLI.

use rootless_cni::{cli, plugin};
use std::ffi::OsString;

fn main() {
    init_logging();
    // Decided before any parsing: a CNI call's arguments are never the
    // CLI's.
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let code = if plugin::is_plugin_call(&args) {
        plugin::main()
    } else {
        cli::main(args)
    };
    std::process::exit(code);
}

/// Logs go to stderr only: stdout belongs to the CNI result. The level is
/// ROOTLESS_CNI_LOG (default warn), lowered or raised by the config's
/// logLevel.
fn init_logging() {
    let level = std::env::var("ROOTLESS_CNI_LOG")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(log::LevelFilter::Warn);
    env_logger::Builder::new()
        .filter_level(log::LevelFilter::Trace)
        .target(env_logger::Target::Stderr)
        .format_target(false)
        .init();
    log::set_max_level(level);
}
