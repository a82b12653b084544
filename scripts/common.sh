# Helpers shared by the scripts in this directory; sourced, not run.
# shellcheck shell=bash

# shellcheck disable=SC2034 # used by the scripts that source this file
# The repository root (the parent of scripts/), whatever the caller's cwd.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$REPO/.tools"
CNITOOL_BIN="$TOOLS/bin/cnitool"
GOCNI_CLIENT_BIN="$TOOLS/bin/gocni-client"

# say MSG... : progress on stderr, prefixed with the running script's name.
say() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
die() { say "error: $*"; exit 1; }

is_root() { [[ "$(id -u)" -eq 0 ]]; }

# rustup installs into ~/.cargo/bin, which non-login shells (CI, sudo) often
# do not have on PATH.
if ! command -v cargo >/dev/null 2>&1 && [[ -x "${CARGO_HOME:-${HOME:-}/.cargo}/bin/cargo" ]]; then
    PATH="${CARGO_HOME:-${HOME:-}/.cargo}/bin:$PATH"
    export PATH
fi
