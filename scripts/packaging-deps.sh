#!/bin/sh
# Install everything hass-edge's packaging needs on a fresh Debian bookworm (amd64) machine:
# the aarch64 cross toolchain and qemu (for running the arm64 binary without binfmt_misc),
# debootstrap + systemd-container (the nspawn test), lintian, file, and cargo-deb.
# Idempotent: every step checks first and does nothing when already satisfied.
# Run as root (or with sudo available for the apt step).
set -eu

APT_PACKAGES="gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static debootstrap \
systemd-container lintian file binutils-aarch64-linux-gnu dpkg-dev curl ca-certificates"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=""
for p in $APT_PACKAGES; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done
if [ -n "$missing" ]; then
    echo "packaging-deps: apt-get install$missing"
    $SUDO apt-get update -qq
    # shellcheck disable=SC2086 # word splitting of the package list is intended
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
else
    echo "packaging-deps: apt packages already installed"
fi

if ! command -v rustup >/dev/null 2>&1; then
    echo "packaging-deps: rustup not found; install the Rust toolchain first" >&2
    exit 1
fi
if rustup target list --installed | grep -qx aarch64-unknown-linux-gnu; then
    echo "packaging-deps: rust target aarch64-unknown-linux-gnu already installed"
else
    rustup target add aarch64-unknown-linux-gnu
fi

# cargo-deb >= 3 (the metadata uses `systemd-units` as a table and variants).
need_deb=1
if command -v cargo-deb >/dev/null 2>&1; then
    v=$(cargo-deb --version 2>/dev/null | awk '{print $NF}')
    case "$v" in
        [3-9].*|[1-9][0-9]*) need_deb=0 ;;
    esac
fi
if [ "$need_deb" -eq 1 ]; then
    echo "packaging-deps: cargo install cargo-deb --locked"
    cargo install cargo-deb --locked
else
    echo "packaging-deps: cargo-deb $v already installed"
fi

# Optional: a bullseye-compatible (glibc 2.31) aarch64 build with cargo-zigbuild + ziglang.
# Only when asked for, because it downloads ~50 MB and compiles cargo-zigbuild.
if [ "${HASS_EDGE_ZIGBUILD:-0}" = "1" ]; then
    if ! command -v cargo-zigbuild >/dev/null 2>&1; then
        cargo install cargo-zigbuild --locked
    fi
    if ! python3 -m ziglang version >/dev/null 2>&1; then
        python3 -m pip install --quiet ziglang
    fi
fi
echo "packaging-deps: done"
