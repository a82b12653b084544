# Helpers shared by the scripts in this directory; sourced, not run.
# shellcheck shell=bash

# shellcheck disable=SC2034 # used by the scripts that source this file
# The repository root (the parent of scripts/), whatever the caller's cwd.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$REPO/.tools"
CNITOOL_BIN="$TOOLS/bin/cnitool"
GOCNI_CLIENT_BIN="$TOOLS/bin/gocni-client"
CRI_CLIENT_BIN="$TOOLS/bin/cri-client"
CRI_IMAGES="$TOOLS/cri-images" # OCI archives of the CRI tests (scripts/build-cri-images)

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

# Print "URI<TAB>COMPONENTS<TAB>SIGNED-BY" for the first enabled archive that
# the machine's apt sources use for its release (deb822 and one-line files).
find_mirror() {
    local codename
    codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
    [[ -n "$codename" ]] || die "no VERSION_CODENAME in /etc/os-release"
    {
        # deb822 stanzas (*.sources), separated by blank lines
        for f in /etc/apt/sources.list.d/*.sources; do
            [[ -r "$f" ]] || continue
            awk -v want="$codename" '
                function flush() {
                    if (types ~ /(^| )deb(-src)?( |$)/ && enabled != "no" &&
                        (" " suites " ") ~ (" " want " ") && uris != "") {
                        split(uris, u, " "); print u[1] "\t" comps "\t" signed
                    }
                    types = uris = suites = comps = signed = enabled = ""
                }
                /^[ \t]*#/ { next }
                /^[ \t]*$/ { flush(); next }
                /^[^ \t]/ {
                    key = tolower($1); sub(/:$/, "", key)
                    val = $0; sub(/^[^:]*:[ \t]*/, "", val)
                    if (key == "types") types = val
                    else if (key == "uris") uris = val
                    else if (key == "suites") suites = val
                    else if (key == "components") comps = val
                    else if (key == "signed-by") signed = val
                    else if (key == "enabled") enabled = tolower(val)
                }
                END { flush() }' "$f"
        done
        # one-line format: deb [options] URI SUITE COMPONENT...
        for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
            [[ -r "$f" ]] || continue
            awk -v want="$codename" '
                $1 != "deb" && $1 != "deb-src" { next }
                {
                    signed = ""; i = 2
                    if ($2 ~ /^\[/) {
                        while (i <= NF) {
                            if ($i ~ /^\[?signed-by=/) { signed = $i; sub(/^\[?signed-by=/, "", signed); sub(/\]$/, "", signed) }
                            if ($i ~ /\]$/) { i++; break }
                            i++
                        }
                    }
                    if ($(i + 1) != want) next
                    comps = ""; for (j = i + 2; j <= NF; j++) comps = comps (comps == "" ? "" : " ") $j
                    print $i "\t" comps "\t" signed
                }' "$f"
        done
    } | head -n1
}


# debian_source_orig SRCPKG DIR: the path of the upstream ("orig") tarball of
# the Debian source package SRCPKG, downloaded once into DIR/src through a
# private deb-src list of the machine's own mirror (the system's apt
# configuration is left untouched); later calls are offline.
debian_source_orig() {
    local srcpkg="$1" dir="$2" uri comps signed codename orig
    local -a found apt_opts
    mkdir -p "$dir/src"
    found=("$dir"/src/"$srcpkg"_*.orig.tar.*)
    if [[ -e "${found[0]}" ]]; then
        say "using the cached source ${found[0]##*/}"
        printf '%s\n' "${found[0]}"
        return 0
    fi
    IFS=$'\t' read -r uri comps signed < <(find_mirror) ||
        die "found no apt source for this release in /etc/apt/sources.list{,.d/}"
    codename="$(. /etc/os-release && echo "$VERSION_CODENAME")"
    say "using the machine's mirror $uri ($codename: $comps) for the source package $srcpkg"

    mkdir -p "$dir/apt/lists/partial" "$dir/apt/cache/archives/partial" "$dir/apt/parts"
    {
        printf 'Types: deb-src\nURIs: %s\nSuites: %s\nComponents: %s\n' "$uri" "$codename" "${comps:-main}"
        # A key file path is reused; otherwise apt's default keyrings apply.
        if [[ -f "$signed" ]]; then printf 'Signed-By: %s\n' "$signed"; fi
    } >"$dir/apt/parts/src.sources"
    apt_opts=(
        -o Dir::Etc::SourceList=/dev/null
        -o Dir::Etc::SourceParts="$dir/apt/parts"
        -o Dir::State::Lists="$dir/apt/lists"
        -o Dir::Cache="$dir/apt/cache"
    )
    # apt drops to the _apt user to download, which cannot write into the repo.
    if is_root; then apt_opts+=(-o APT::Sandbox::User=root); fi
    say "fetching the deb-src index into $dir/apt (private apt lists; system apt config untouched)"
    apt-get "${apt_opts[@]}" -q update >&2
    say "downloading the source package $srcpkg"
    rm -rf "$dir/download" && mkdir -p "$dir/download"
    (cd "$dir/download" && apt-get "${apt_opts[@]}" -q source --download-only "$srcpkg" >&2)
    found=("$dir"/download/"$srcpkg"_*.orig.tar.*)
    [[ -e "${found[0]}" ]] || die "apt-get source did not leave an orig tarball in $dir/download"
    # Keep only the (verified) tarball; the apt index is not needed again.
    orig="$dir/src/${found[0]##*/}"
    mv "${found[0]}" "$orig" && rm -rf "$dir/download" "$dir/apt"
    printf '%s\n' "$orig"
}
