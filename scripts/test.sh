#!/usr/bin/env bash
# Runs every test of hass-edge. Each stage needs what .ci/run installs (Rust, the real
# Home Assistant peers, dbus-daemon, promtool, Chromium, the aarch64 toolchain, qemu,
# debootstrap/systemd-nspawn); a missing prerequisite fails its stage, it is never skipped.
#
#   scripts/test.sh            all stages
#   scripts/test.sh STAGE...   some: unit e2e-2024.3.3 e2e-2025.4.4 e2e-2026.11.0 browser
#                              clients-2024.3.3 clients-2025.4.4 wsclients-2024.3.3
#                              wsclients-2025.4.4 wsclients-2026.11.0 frontend
#                              frontend-2026.11.0 aarch64 armhf
#                              packaging bench reliability fuzz; and, outside the default
#                              set, packaging-arm64 packaging-bullseye (slow, see packaging/)
#
# The last three are short smokes of the measuring suites (issue #6): the benchmarks
# (measure/bench.sh --smoke), the reliability suite (measure/reliability.sh --short) and 8 s of
# each fuzz target; their reports go to $TEST_WORK_DIR, the committed figures stay.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${TEST_WORK_DIR:-/tmp/hass-edge-test}
mkdir -p "$WORK"
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
# Our own test knobs must not leak into the daemon's HASS_EDGE_* config overrides.
for v in $(env | grep -o '^HASS_EDGE_[A-Z_]*' || true); do unset "$v"; done

declare -a RESULTS=()
FAILED=0
stage() {
	local name=$1; shift
	printf '\n=== stage %s === (disk free: %s)\n' "$name" "$(df -h --output=avail "$ROOT" | tail -n 1 | tr -d ' ')"
	local t0=$SECONDS
	if "$@"; then RESULTS+=("PASS  $name ($((SECONDS - t0)) s)")
	else RESULTS+=("FAIL  $name ($((SECONDS - t0)) s)"); FAILED=1; fi
}

unit() {
	cargo test --all-targets -- --test-threads=2
}

# start_peer VERSION DIR PORT: a fresh real HA peer (installed once, cached).
start_peer() {
	bash tests/ha-peer/install.sh "$1" || return 1
	bash tests/ha-peer/ha-peer.sh stop "$2" >/dev/null 2>&1 || true
	rm -rf "$2"
	bash tests/ha-peer/ha-peer.sh start "$1" "$2" "$3" >/dev/null
}

# Starts the real HA peer VERSION on PORT and runs the e2e suite.
e2e() {
	local version=$1 port=$2 dir="$WORK/ha-$1"
	start_peer "$version" "$dir" "$port" || return 1
	HA_PEER_DIR=$dir HA_PEER_SCRIPT=$ROOT/tests/ha-peer/ha-peer.sh \
		cargo test --features e2e --test e2e_real_ha -- --test-threads=1
	local rc=$?
	bash tests/ha-peer/ha-peer.sh stop "$dir" >/dev/null 2>&1 || true
	return $rc
}

browser() {
	local dir="$WORK/ha-browser"
	start_peer 2024.3.3 "$dir" 18127 || return 1
	cargo build --quiet || return 1
	HA_PEER_DIR=$dir OUT_DIR="$WORK/browser" EDGE_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/hass-edge" \
		bash tests/browser/run.sh
	local rc=$?
	bash tests/ha-peer/ha-peer.sh stop "$dir" >/dev/null 2>&1 || true
	return $rc
}

# HA's own client libraries against HA VERSION and through hass-edge, results compared
# (issue 15; tests/clients).
clients() {
	local version=$1 port=$2 dir="$WORK/ha-clients-$1"
	bash tests/clients/install.sh || return 1
	cargo build --quiet || return 1
	start_peer "$version" "$dir" "$port" || return 1
	HA_PEER_DIR=$dir OUT_DIR="$WORK/clients-$version" EDGE_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/hass-edge" \
		bash tests/clients/run.sh
	local rc=$?
	bash tests/ha-peer/ha-peer.sh stop "$dir" >/dev/null 2>&1 || true
	return $rc
}

# Real WebSocket clients (home-assistant-js-websocket, hass-client) against HA VERSION and through
# hass-edge's /api/websocket at once, results compared (issue 16; tests/wsclients).
wsclients() {
	local version=$1 port=$2 dir="$WORK/ha-wsclients-$1"
	bash tests/wsclients/install.sh >/dev/null || return 1
	cargo build --quiet || return 1
	start_peer "$version" "$dir" "$port" || return 1
	HA_PEER_DIR=$dir OUT_DIR="$WORK/wsclients-$version" EDGE_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/hass-edge" \
		bash tests/wsclients/run.sh
	local rc=$?
	bash tests/ha-peer/ha-peer.sh stop "$dir" >/dev/null 2>&1 || true
	return $rc
}

# HA's own frontend in Chromium through hass-edge (issue 15; tests/frontend): `frontend` with HA
# 2024.3.3's, `frontend-2026.11.0` with the frontend of the HA users run now. The latter runs
# the scenarios that drive the page (login, dashboard and allowlist, the read-only rule); the
# trusted-proxy ones (trusted, no-xff: hass-edge's X-Forwarded-For, 27 s) run with 2024.3.3
# only, for CI's time (all pass on 2026.11.0: SCENARIOS=... bash tests/frontend/run.sh).
frontend() {
	local version=${1:-2024.3.3} port=${2:-18136} dir="$WORK/ha-frontend" out="$WORK/frontend"
	local scenarios=${3:-}
	[[ $version == 2024.3.3 ]] || dir+=-$version out+=-$version
	cargo build --quiet || return 1
	start_peer "$version" "$dir" "$port" || return 1
	HA_PEER_DIR=$dir OUT_DIR=$out EDGE_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/hass-edge" \
		SCENARIOS=${scenarios:-${SCENARIOS:-}} bash tests/frontend/run.sh
	local rc=$?
	bash tests/ha-peer/ha-peer.sh stop "$dir" >/dev/null 2>&1 || true
	return $rc
}

# The integration test targets (tests/*.rs) that need no cargo feature, as `--test NAME`
# arguments, one a line: the ones with required-features (e2e_real_ha: `e2e`) need a real
# HA peer and run in their own stage.
peerless_tests() {
	cargo metadata --no-deps --format-version 1 | python3 -c '
import json, os, sys
root = os.path.realpath("Cargo.toml")
for package in json.load(sys.stdin)["packages"]:
    if os.path.realpath(package["manifest_path"]) != root:
        continue
    for target in package["targets"]:
        if "test" in target["kind"] and not target.get("required-features"):
            print("--test", target["name"], sep="\n")
'
}

aarch64() {
	# The tests that need no external peer, built for aarch64 and run under qemu-user.
	local tests
	tests=$(peerless_tests) && [[ -n $tests ]] || { echo "found no integration tests" >&2; return 1; }
	# shellcheck disable=SC2086 # one word a line: --test NAME
	EDGE_TEST_RUNNER="qemu-aarch64-static -L /usr/aarch64-linux-gnu" \
		cargo test --target aarch64-unknown-linux-gnu --lib --bins $tests -- --test-threads=2
}

armhf() {
	# The unit tests built for ARMv7 (the armhf package) and run under qemu-arm.
	cargo test --target armv7-unknown-linux-gnueabihf --lib --bins -- --test-threads=2
}

# packaging_with_peer PORT BUILD_ARGS TEST_SECTIONS: build the .debs, then
# scripts/test-packaging.sh against a fresh real HA 2024.3.3.
packaging_with_peer() {
	local dir="$WORK/ha-packaging-$1"
	start_peer 2024.3.3 "$dir" "$1" || return 1
	bash scripts/build-debs.sh $2 &&
		HASS_EDGE_TEST_HA_URL=$(cat "$dir/url") HASS_EDGE_TEST_HA_TOKEN_FILE=$dir/token bash scripts/test-packaging.sh $3
	local rc=$?
	bash tests/ha-peer/ha-peer.sh stop "$dir" >/dev/null 2>&1 || true
	return $rc
}
packaging() { packaging_with_peer 18128 "" ""; }
# Not in the default set (slow): arm64 booted under systemd through binfmt_misc + qemu,
# and the bullseye builds (cargo-zigbuild) installed under bullseye's systemd 247.
packaging_arm64() { packaging_with_peer 18132 "" nspawn-arm64; }
packaging_bullseye() {
	HASS_EDGE_ZIGBUILD=1 bash scripts/packaging-deps.sh >/dev/null &&
		packaging_with_peer 18133 --only-bullseye nspawn-bullseye
}

bench() {
	# Fails when a figure cannot be measured (a goal missed is reported, not a failure).
	BENCH_WORK="$WORK/bench" bash measure/bench.sh --smoke
}

reliability() {
	REL_WORK="$WORK/rel" REL_RESULTS="$WORK/rel/results" REL_REPORT="$WORK/rel/RELIABILITY.smoke.md" \
		bash measure/reliability.sh --short
}

fuzz() {
	# A crash, hang or OOM of any target fails the stage; the input is left in fuzz/artifacts/.
	bash fuzz/run.sh 8
}

# build_output STAGE: the build directories STAGE builds and reads, one a line.
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
build_output() {
	case $1 in
		unit | e2e-* | browser | clients-* | wsclients-* | frontend | frontend-*) echo "$TARGET/debug" ;;
		aarch64) echo "$TARGET/aarch64-unknown-linux-gnu/debug" ;;
		armhf) echo "$TARGET/armv7-unknown-linux-gnueabihf/debug" ;;
		packaging*) printf '%s\n' "$TARGET/release" "$TARGET"/{aarch64-unknown-linux-gnu,armv7-unknown-linux-gnueabihf}/release ;;
		bench) printf '%s\n' "$TARGET/release" "$TARGET/aarch64-unknown-linux-gnu/release" ;;
		reliability) echo "$TARGET/fast" ;;
		fuzz) echo "$ROOT/fuzz/target" ;;
	esac
}

# TEST_PRUNE=1 (.ci/run sets it): after each stage, the build output no later stage reads is
# deleted, so the disk holds about one build at a time (the whole run left ~10 GB of builds
# behind, and CI ran out of disk in the armhf stage). The built .debs stay.
prune_after() {
	[[ ${TEST_PRUNE:-0} == 1 ]] || return 0
	local i=$1 d s keep
	for d in $(build_output "${STAGES[$i]}"); do
		keep=0
		for s in "${STAGES[@]:i+1}"; do
			build_output "$s" | grep -qxF "$d" && keep=1
		done
		((keep)) || rm -rf "$d"
	done
}

STAGES=("$@")
[[ ${#STAGES[@]} -gt 0 ]] || STAGES=(unit e2e-2024.3.3 e2e-2025.4.4 e2e-2026.11.0 browser clients-2024.3.3 clients-2025.4.4 wsclients-2024.3.3 wsclients-2025.4.4 wsclients-2026.11.0 frontend frontend-2026.11.0 aarch64 armhf packaging bench reliability fuzz)
for i in "${!STAGES[@]}"; do
	s=${STAGES[$i]}
	case $s in
		unit) stage unit unit ;;
		e2e-2024.3.3) stage "$s" e2e 2024.3.3 18125 ;;
		e2e-2025.4.4) stage "$s" e2e 2025.4.4 18126 ;;
		e2e-2026.11.0) stage "$s" e2e 2026.11.0 18134 ;;
		browser) stage browser browser ;;
		clients-2024.3.3) stage "$s" clients 2024.3.3 18137 ;;
		clients-2025.4.4) stage "$s" clients 2025.4.4 18138 ;;
		wsclients-2024.3.3) stage "$s" wsclients 2024.3.3 18139 ;;
		wsclients-2025.4.4) stage "$s" wsclients 2025.4.4 18140 ;;
		wsclients-2026.11.0) stage "$s" wsclients 2026.11.0 18142 ;;
		frontend) stage frontend frontend ;;
		frontend-2026.11.0) stage "$s" frontend 2026.11.0 18141 "password api-token dashboard read-only" ;;
		aarch64) stage aarch64 aarch64 ;;
		armhf) stage armhf armhf ;;
		packaging) stage packaging packaging ;;
		packaging-arm64) stage "$s" packaging_arm64 ;;
		packaging-bullseye) stage "$s" packaging_bullseye ;;
		bench) stage bench bench ;;
		reliability) stage reliability reliability ;;
		fuzz) stage fuzz fuzz ;;
		*) echo "unknown stage $s" >&2; exit 2 ;;
	esac
	prune_after "$i"
done
printf '\n=== summary ===\n'
printf '%s\n' "${RESULTS[@]}"
exit $FAILED
