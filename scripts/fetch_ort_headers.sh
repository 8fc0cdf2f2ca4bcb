#!/usr/bin/env bash
# fetch_ort_headers.sh — the ONNX Runtime C API headers for `make ort-ops` (the pip wheel ships none).
#
#   bash scripts/fetch_ort_headers.sh     -> last stdout line: the folder holding onnxruntime_c_api.h
#
# Route: Debian 13 (trixie) `libonnxruntime-dev` (ONNX Runtime 1.21, ORT_API_VERSION 21), fetched with a
# private APT_CONFIG (own sources.list, lists, cache and status under the cache folder: /etc/apt and
# /var/lib/apt are untouched, nothing is installed, no sudo) and unpacked with `dpkg-deb -x`.
# Cached: a second run prints the folder without touching the network. Needs apt-get, dpkg-deb and the Debian
# archive keyring (package debian-archive-keyring). The amd64 package is taken on every host: the headers
# are the same for every architecture. On failure: one line on stderr naming what failed, exit 1; the manual
# alternative is `make ort-ops ORT_INCLUDE=<include/ of an ONNX Runtime >= 1.16 release>`.
#
# Environment (defaults in brackets):
#   EDGEAD_ORT_HEADERS_DIR  cache folder [<repo>/build/ort-headers]
#   EDGEAD_DEBIAN_MIRROR    Debian archive [http://deb.debian.org/debian]
#   EDGEAD_DEBIAN_SUITE     [trixie]
#   EDGEAD_DEBIAN_KEYRING   [/usr/share/keyrings/debian-archive-keyring.gpg]
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${EDGEAD_ORT_HEADERS_DIR:-$REPO/build/ort-headers}
MIRROR=${EDGEAD_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=${EDGEAD_DEBIAN_SUITE:-trixie}
KEYRING=${EDGEAD_DEBIAN_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}
PACKAGE=libonnxruntime-dev
MIN_API=16   # cpp_bindings/ort/padim_mahalanobis_ort.cpp: #if ORT_API_VERSION < 16 -> #error
INC=$CACHE/root/usr/include/onnxruntime

fail() {
    echo "fetch_ort_headers: $*; or give the headers yourself: make ort-ops ORT_INCLUDE=<include/ of an ONNX Runtime >= 1.16 release>" >&2
    exit 1
}

check_api() {  # $1 = folder with onnxruntime_c_api.h
    local v
    v=$(sed -n 's/^#define ORT_API_VERSION \([0-9][0-9]*\).*/\1/p' "$1/onnxruntime_c_api.h" | head -n1)
    [ -n "$v" ] || fail "$1/onnxruntime_c_api.h has no ORT_API_VERSION"
    [ "$v" -ge "$MIN_API" ] || fail "$1/onnxruntime_c_api.h has ORT_API_VERSION $v, edgead's op needs >= $MIN_API (ONNX Runtime >= 1.16)"
}

if [ -f "$CACHE/root/.complete" ] && [ -f "$INC/onnxruntime_c_api.h" ]; then
    check_api "$INC"
    echo "$INC"
    exit 0
fi

for tool in apt-get dpkg-deb; do
    command -v "$tool" >/dev/null 2>&1 || fail "$tool not found (this route needs a Debian/Ubuntu-like system)"
done
[ -r "$KEYRING" ] || fail "no Debian archive keyring at $KEYRING (install debian-archive-keyring, or set EDGEAD_DEBIAN_KEYRING)"

mkdir -p "$CACHE" || fail "cannot create $CACHE"
WORK=$CACHE/tmp.$$
LOG=$CACHE/fetch.log
trap 'rm -rf "$WORK"' EXIT
rm -rf "$WORK"
mkdir -p "$WORK"/apt/{lists/partial,cache/archives/partial,etc/sources.list.d,etc/preferences.d} "$WORK/deb" "$WORK/root" ||
    fail "cannot write under $CACHE"
: > "$WORK/apt/status"
echo "deb [signed-by=$KEYRING] $MIRROR $SUITE main" > "$WORK/apt/etc/sources.list"
cat > "$WORK/apt/apt.conf" <<EOF
Dir::Etc::SourceList "$WORK/apt/etc/sources.list";
Dir::Etc::SourceParts "$WORK/apt/etc/sources.list.d";
Dir::Etc::Preferences "$WORK/apt/etc/preferences";
Dir::Etc::PreferencesParts "$WORK/apt/etc/preferences.d";
Dir::State::Lists "$WORK/apt/lists";
Dir::State::status "$WORK/apt/status";
Dir::Cache "$WORK/apt/cache";
EOF
export APT_CONFIG=$WORK/apt/apt.conf
# -o beats the host's apt.conf.d (kept: it may hold the proxy): one small index, fail fast when unreachable
OPTS=(-q -o APT::Architecture=amd64 -o APT::Architectures::=amd64 -o Acquire::Languages=none
      -o Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false -o Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false
      -o Acquire::Retries=1 -o Acquire::http::Timeout=30 -o Acquire::https::Timeout=30)
[ "$(id -u)" = 0 ] && OPTS+=(-o APT::Sandbox::User=root)   # root: the _apt user could not write under build/

first_error() {  # the first apt error or failed fetch, with its reason
    grep -m1 -E '^(E: |W: Failed to fetch)' "$LOG" | sed -E 's/^[EW]: //; s/  +/: /' | cut -c1-200 || true
}
echo "== $(date -u +%FT%TZ) apt-get update ($MIRROR $SUITE)" > "$LOG"
apt-get "${OPTS[@]}" update >> "$LOG" 2>&1 && ls "$WORK"/apt/lists/*_Packages* >/dev/null 2>&1 ||
    fail "apt-get update from $MIRROR $SUITE failed ($(first_error); log: $LOG)"
echo "== apt-get download $PACKAGE" >> "$LOG"
(cd "$WORK/deb" && apt-get "${OPTS[@]}" download "$PACKAGE") >> "$LOG" 2>&1 ||
    fail "apt-get download $PACKAGE ($MIRROR $SUITE) failed ($(first_error); log: $LOG)"
DEB=$(ls "$WORK"/deb/"$PACKAGE"_*.deb 2>/dev/null | head -n1)
[ -n "$DEB" ] || fail "apt-get download $PACKAGE left no .deb (log: $LOG)"
dpkg-deb -x "$DEB" "$WORK/root" >> "$LOG" 2>&1 || fail "dpkg-deb -x $(basename "$DEB") failed (log: $LOG)"
[ -f "$WORK/root/usr/include/onnxruntime/onnxruntime_c_api.h" ] ||
    fail "$(basename "$DEB") has no usr/include/onnxruntime/onnxruntime_c_api.h"
check_api "$WORK/root/usr/include/onnxruntime"
basename "$DEB" > "$WORK/root/.complete"
rm -rf "$CACHE/root" "$CACHE/deb" && mv "$WORK/root" "$CACHE/root" && mv "$WORK/deb" "$CACHE/deb" ||
    fail "cannot move the headers into $CACHE"
echo "fetch_ort_headers: $(cat "$CACHE/root/.complete") -> $INC" >&2
echo "$INC"
