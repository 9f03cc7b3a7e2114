#!/bin/bash
# Regenerate packaging/debian/LICENSES.crates (installed as
# /usr/share/doc/hass-edge/LICENSES.crates): every crate compiled into hass-edge, from
# Cargo.lock, with its licence and the licence texts, made by cargo-about.
#
#   scripts/packaging-licenses.sh           # regenerate (scripts/build-debs.sh runs this)
#   scripts/packaging-licenses.sh --check   # also fail if the committed file is out of date
#
# The allow-list is `accepted` in packaging/licenses/about.toml: a crate under any other
# licence makes cargo-about fail, and this script with it (and so the package build and
# CI's packaging stage). Prerequisite: cargo-about (scripts/packaging-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

CHECK=0
case "${1:-}" in
    --check) CHECK=1 ;;
    "") ;;
    *) echo "packaging-licenses: unknown argument $1" >&2; exit 2 ;;
esac
command -v cargo-about >/dev/null ||
    { echo "packaging-licenses: cargo-about missing (scripts/packaging-deps.sh)" >&2; exit 1; }

OUT=packaging/debian/LICENSES.crates
# cargo-about takes a minute or two; skip it when nothing it reads has changed since the
# last successful run (the stamp lives in the cargo target directory).
TARGET_DIR=$(cargo metadata --no-deps --format-version 1 |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
STAMP="$TARGET_DIR/packaging-licenses.stamp"
inputs=$( { cargo about --version; cat Cargo.lock packaging/licenses/about.toml \
    packaging/licenses/LICENSES.crates.hbs "$OUT" 2>/dev/null; } | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" = "$inputs" ]; then
    echo "packaging-licenses: $OUT is current (Cargo.lock and the allow-list unchanged since the last check)"
    exit 0
fi
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
cargo fetch --locked --quiet
# --offline: licence files come from the crates as published (no git fetches), so the
# output depends on Cargo.lock alone.
if ! cargo about generate --locked --offline --fail -c packaging/licenses/about.toml \
        packaging/licenses/LICENSES.crates.hbs -o "$tmp" 2>"$tmp.err"; then
    grep -Ev '^\s*$' "$tmp.err" | tail -n 30 >&2
    rm -f "$tmp.err"
    echo "packaging-licenses: FAILED: a crate's licence is not in the allow-list" \
        "(packaging/licenses/about.toml) or could not be read" >&2
    exit 1
fi
rm -f "$tmp.err"
crates=$(grep -E '^  [a-zA-Z0-9_-]+ [0-9]' "$tmp" | sort -u | wc -l)
if [ "$CHECK" -eq 1 ] && ! cmp -s "$tmp" "$OUT"; then
    diff -u "$OUT" "$tmp" | head -n 20 >&2
    echo "packaging-licenses: $OUT is out of date: run scripts/packaging-licenses.sh and commit it" >&2
    exit 1
fi
cp "$tmp" "$OUT"
chmod 644 "$OUT"
mkdir -p "$TARGET_DIR"
{ cargo about --version; cat Cargo.lock packaging/licenses/about.toml \
    packaging/licenses/LICENSES.crates.hbs "$OUT"; } | sha256sum | cut -d' ' -f1 >"$STAMP"
echo "packaging-licenses: $OUT: $crates crates, every licence in the allow-list"
