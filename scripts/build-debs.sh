#!/bin/bash
# Build hass-edge release binaries and package the .debs (see packaging/README.md).
#
#   scripts/build-debs.sh                 # bookworm: amd64, arm64, armhf -> target/debian/
#   scripts/build-debs.sh --bullseye      # + bullseye (glibc 2.31, cargo-zigbuild):
#                                         #   amd64, arm64, armhf -> target/debian/bullseye/
#   scripts/build-debs.sh --only-bullseye # just the bullseye ones
#   scripts/build-debs.sh --no-build      # package the binaries already built
#   scripts/build-debs.sh --revision N    # Debian revision (default 1)
#
# Versions: <upstream>-<revision>~deb12 (bookworm) and ~deb11 (bullseye), so one apt
# repository holds both builds, a dist-upgrade from bullseye to bookworm upgrades the
# package (~deb11 < ~deb12), and a plain <upstream>-<revision> sorts above both.
# Every .deb then gets an md5sums file and a one-line synopsis (cargo-deb writes neither).
# The crate licences are regenerated first (scripts/packaging-licenses.sh, cargo-about):
# a dependency under a licence outside the allow-list stops the build.
#
# Honours CARGO_TARGET_DIR for the binaries; the .debs always go to <repo>/target/debian/.
# Prerequisites: scripts/packaging-deps.sh (HASS_EDGE_ZIGBUILD=1 for --bullseye).
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT="$REPO/target/debian"
REVISION=1
BUILD=1
BOOKWORM=1
BULLSEYE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --no-build) BUILD=0 ;;
        --bullseye) BULLSEYE=1 ;;
        --only-bullseye) BULLSEYE=1; BOOKWORM=0 ;;
        --revision) REVISION=$2; shift ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "build-debs: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

# Short description for `apt show` / `apt search` (Debian policy 3.4.1: one line, no
# full stop, under 80 characters). cargo-deb cuts Cargo.toml's longer description at
# 79 characters, mid-sentence, and puts the rest on the first extended line.
SYNOPSIS="Home Assistant state mirror for local programs (HTTP, SSE, D-Bus)"

# Rust target, Debian architecture and cargo-deb variant, per release.
TARGETS="x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf"
deb_arch() {
    case "$1" in
        x86_64-*) echo amd64 ;;
        aarch64-*) echo arm64 ;;
        armv7-*) echo armhf ;;
    esac
}

TARGET_DIR=$(cargo metadata --no-deps --format-version 1 \
    | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
ZIG_TARGET_DIR="$TARGET_DIR/zig"
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
DESCRIPTION=$(sed -n 's/^description = "\(.*\)"/\1/p' Cargo.toml | head -n1)

for f in README.md packaging/systemd/hass-edge.service packaging/debian/config.toml; do
    [ -f "$f" ] || { echo "build-debs: $f is missing (it is a package asset)" >&2; exit 1; }
done
command -v cargo-deb >/dev/null || { echo "build-debs: run scripts/packaging-deps.sh first" >&2; exit 1; }
if [ "$BULLSEYE" -eq 1 ] && { ! command -v cargo-zigbuild >/dev/null || ! python3 -m ziglang version >/dev/null 2>&1; }; then
    echo "build-debs: --bullseye needs HASS_EDGE_ZIGBUILD=1 scripts/packaging-deps.sh" >&2
    exit 1
fi

echo "== crate licences (cargo-about, allow-list in packaging/licenses/about.toml)"
bash scripts/packaging-licenses.sh

# finish_deb DEB: add DEBIAN/md5sums (as dh_md5sums does) and replace the cut
# synopsis, then rebuild the archive in place.
finish_deb() {
    local deb=$1 tmp
    tmp=$(mktemp -d)
    dpkg-deb -R "$deb" "$tmp/pkg"
    (cd "$tmp/pkg" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z |
        xargs -0r md5sum >DEBIAN/md5sums)
    chmod 644 "$tmp/pkg/DEBIAN/md5sums"
    # cargo-deb wrote "Description: <first 79 chars>" + the rest of Cargo.toml's
    # description as continuation lines, then the extended description: keep the latter.
    awk -v syn="$SYNOPSIS" -v desc="$DESCRIPTION" '
        BEGIN { want = desc; gsub(/ /, "", want) }
        /^Description:/ { print "Description: " syn
                          acc = $0; sub(/^Description:/, "", acc); gsub(/ /, "", acc)
                          rest = (acc != want); next }
        rest { t = $0; gsub(/ /, "", t); acc = acc t; if (acc == want) rest = 0; next }
        { print }' "$tmp/pkg/DEBIAN/control" >"$tmp/control"
    cat "$tmp/control" >"$tmp/pkg/DEBIAN/control"
    dpkg-deb --root-owner-group -Zxz -b "$tmp/pkg" "$deb" >/dev/null
    rm -rf "$tmp"
}

glibc_floor() {  # highest GLIBC_x.y symbol version an ELF file needs (readelf reads any arch)
    readelf -W --version-info "$1" | grep -o 'Name: GLIBC_[0-9][0-9.]*' | sed 's/.*GLIBC_//' | sort -uV | tail -n1
}

# bin_dir TARGET_DIR TARGET: where cargo put the release binary. The bookworm amd64
# build is the host's plain `cargo build --release` (target/release, shared with
# the benchmarks); everything else was built with --target.
bin_dir() {
    if [ "$1" = "$TARGET_DIR" ] && [ "$2" = x86_64-unknown-linux-gnu ]; then echo "$1/release"
    else echo "$1/$2/release"; fi
}

# package RELEASE_TAG OUT_DIR TARGET_DIR VARIANT_SUFFIX
package() {
    local tag=$1 out=$2 tdir=$3 suffix=$4 target arch variant deb bin
    local -a target_arg
    mkdir -p "$out"
    rm -f "$out"/hass-edge_*.deb
    for target in $TARGETS; do
        arch=$(deb_arch "$target")
        variant="$arch$suffix"
        [ "$variant" = amd64 ] && variant=""   # the default [package.metadata.deb]
        bin=$(bin_dir "$tdir" "$target")/hass-edge
        target_arg=(--target "$target")
        [ "$bin" = "$tdir/release/hass-edge" ] && target_arg=()
        echo "== cargo deb ${variant:+--variant $variant }${target_arg[*]} ($VERSION-$REVISION~$tag)"
        CARGO_TARGET_DIR="$tdir" cargo deb --no-build "${target_arg[@]}" ${variant:+--variant "$variant"} \
            --deb-version "$VERSION-$REVISION~$tag" --output "$out/" >/dev/null
        deb="$out/hass-edge_${VERSION}-${REVISION}~${tag}_${arch}.deb"
        finish_deb "$deb"
        printf '   %-44s %9s bytes, binary %s bytes, needs GLIBC_%s\n' "$(basename "$deb")" \
            "$(stat -c %s "$deb")" "$(stat -c %s "$bin")" "$(glibc_floor "$bin")"
    done
}

if [ "$BOOKWORM" -eq 1 ]; then
    if [ "$BUILD" -eq 1 ]; then
        echo "== cargo build --release (x86_64, the host)"
        cargo build --release --locked --bin hass-edge
        for target in aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf; do
            echo "== cargo build --release --target $target"
            cargo build --release --locked --bin hass-edge --target "$target"
        done
    fi
    package deb12 "$OUT" "$TARGET_DIR" ""
fi

if [ "$BULLSEYE" -eq 1 ]; then
    # zig links against a glibc 2.31 stub, so the binaries run on bullseye (and later).
    if [ "$BUILD" -eq 1 ]; then
        for target in $TARGETS; do
            echo "== cargo zigbuild --release --target $target.2.31"
            CARGO_TARGET_DIR="$ZIG_TARGET_DIR" cargo zigbuild --release --locked --bin hass-edge \
                --target "$target.2.31"
        done
    fi
    package deb11 "$OUT/bullseye" "$ZIG_TARGET_DIR" "-bullseye"
fi
