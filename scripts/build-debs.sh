#!/bin/bash
# Build hass-edge release binaries for x86_64 and aarch64 and package both
# .debs into target/debian/ (see packaging/README.md).
#
#   scripts/build-debs.sh              # build + package amd64 and arm64
#   scripts/build-debs.sh --no-build   # package the binaries already built
#   scripts/build-debs.sh --bullseye   # also an arm64 .deb for glibc 2.31
#                                      # (cargo-zigbuild + ziglang), in
#                                      # target/debian/bullseye/
#
# Honours CARGO_TARGET_DIR for the binaries; the .debs always go to
# <repo>/target/debian/. Prerequisites: scripts/packaging-deps.sh.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT="$REPO/target/debian"
AARCH64=aarch64-unknown-linux-gnu
BUILD=1
BULLSEYE=0
for arg in "$@"; do
    case "$arg" in
        --no-build) BUILD=0 ;;
        --bullseye) BULLSEYE=1 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "build-debs: unknown argument $arg" >&2; exit 2 ;;
    esac
done

TARGET_DIR=$(cargo metadata --no-deps --format-version 1 \
    | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
BIN_AMD64="$TARGET_DIR/release/hass-edge"
BIN_ARM64="$TARGET_DIR/$AARCH64/release/hass-edge"

for f in README.md packaging/systemd/hass-edge.service packaging/debian/config.toml; do
    [ -f "$f" ] || { echo "build-debs: $f is missing (it is a package asset)" >&2; exit 1; }
done
command -v cargo-deb >/dev/null || { echo "build-debs: run scripts/packaging-deps.sh first" >&2; exit 1; }

if [ "$BUILD" -eq 1 ]; then
    echo "== cargo build --release (x86_64)"
    cargo build --release --locked --bin hass-edge
    echo "== cargo build --release --target $AARCH64"
    cargo build --release --locked --bin hass-edge --target "$AARCH64"
fi

mkdir -p "$OUT"
echo "== cargo deb (amd64)"
cargo deb --no-build --output "$OUT/"
echo "== cargo deb --variant arm64 --target $AARCH64"
cargo deb --no-build --variant arm64 --target "$AARCH64" --output "$OUT/"

glibc_floor() {  # highest GLIBC_x.y symbol version an ELF file needs
    "$1" -T "$2" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n1
}

if [ "$BULLSEYE" -eq 1 ]; then
    if ! command -v cargo-zigbuild >/dev/null || ! python3 -m ziglang version >/dev/null 2>&1; then
        echo "build-debs: --bullseye needs HASS_EDGE_ZIGBUILD=1 scripts/packaging-deps.sh" >&2
        exit 1
    fi
    ZIG_TARGET_DIR="$TARGET_DIR/zig"
    echo "== cargo zigbuild --release --target $AARCH64.2.31"
    CARGO_TARGET_DIR="$ZIG_TARGET_DIR" cargo zigbuild --release --locked --bin hass-edge \
        --target "$AARCH64.2.31"
    floor=$(glibc_floor aarch64-linux-gnu-objdump "$ZIG_TARGET_DIR/$AARCH64/release/hass-edge")
    mkdir -p "$OUT/bullseye"
    CARGO_TARGET_DIR="$ZIG_TARGET_DIR" cargo deb --no-build --variant arm64-bullseye \
        --target "$AARCH64" --output "$OUT/bullseye/"
    echo "bullseye arm64 binary needs GLIBC_$floor (its Depends: libc6 (>= 2.31))"
fi

VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
echo
echo "== sizes (bytes)"
printf '%-46s %10s\n' "binary x86_64 (stripped)" "$(stat -c %s "$BIN_AMD64")"
printf '%-46s %10s\n' "binary aarch64 (stripped)" "$(stat -c %s "$BIN_ARM64")"
for deb in "$OUT"/hass-edge_"$VERSION"-*_amd64.deb "$OUT"/hass-edge_"$VERSION"-*_arm64.deb; do
    printf '%-46s %10s\n' "$(basename "$deb")" "$(stat -c %s "$deb")"
done
echo "== glibc floor"
echo "x86_64:  GLIBC_$(glibc_floor objdump "$BIN_AMD64")"
echo "aarch64: GLIBC_$(glibc_floor aarch64-linux-gnu-objdump "$BIN_ARM64") (arm64 Depends: libc6 (>= 2.34))"
file "$BIN_ARM64" | sed "s|$TARGET_DIR/||"
