#!/usr/bin/env bash
# measure/bench.sh [--smoke] [--ha VERSION] [--out FILE] — hass-edge benchmarks against a real
# Home Assistant (issue #6). Builds the release binary and benches/ingest.rs, starts the HA
# test peer (tests/ha-peer) on 127.0.0.1:18221, runs `python -m hass_edge_tools.bench`
# (measure/hass_edge_tools/bench/), prints the table and writes the generated part of
# BENCHMARKS.md (text outside its markers is kept).
#
#   --smoke        a few seconds per measurement (CI); writes WORK/BENCHMARKS.smoke.md
#                  unless --out is given, so the committed figures stay untouched
#   --ha VERSION   Home Assistant version of the peer (default 2025.4.4; 2024.3.3 also works)
#   --out FILE     where to write the report (default: BENCHMARKS.md at the repository root)
#   --no-build     use the binaries already built
#   --only LIST    run only these sections (development): ingest,reads,freshness,
#                  ha_load,ingest_e2e,idle,memory
#
# Environment: CARGO_TARGET_DIR (default target), BENCH_WORK (default /tmp/hass-edge-bench),
# BENCH_PORT (first port, default 18221; the run uses up to BENCH_PORT+19).
# Needs: wrk, valgrind, taskset, strip; the peer's venv (tests/ha-peer/install.sh); nginx
# (Debian nginx-light) for the reads floor reference, skipped without it.
# Every process started here (HA peer, daemons) is stopped on exit, also on failure.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SMOKE=0 HA=2025.4.4 OUT="" BUILD=1 ONLY=""
while (($#)); do
	case $1 in
	--smoke) SMOKE=1 ;;
	--ha) HA=${2:?--ha needs a version}; shift ;;
	--out) OUT=${2:?--out needs a file}; shift ;;
	--no-build) BUILD=0 ;;
	--only) ONLY=${2:?--only needs a list}; shift ;;
	-h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
	*) echo "measure/bench.sh: unknown argument $1" >&2; exit 2 ;;
	esac
	shift
done

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
WORK=${BENCH_WORK:-/tmp/hass-edge-bench}
PORT=${BENCH_PORT:-18221}
PEER_DIR=$WORK/ha-$HA
RUN_DIR=$WORK/run-$(date +%Y%m%d-%H%M%S)
mkdir -p "$RUN_DIR"
if [[ -z $OUT ]]; then
	if ((SMOKE)); then OUT=$RUN_DIR/BENCHMARKS.smoke.md; else OUT=$ROOT/BENCHMARKS.md; fi
fi
say() { printf '[bench] %s\n' "$*" >&2; }

for tool in wrk valgrind callgrind_annotate taskset strip; do
	command -v "$tool" >/dev/null || { say "missing $tool (apt-get install wrk valgrind util-linux binutils)"; exit 1; }
done

T0=$(date +%s)
# --------------------------------------------------------------------------- build
# Symbols are kept (strip=false) so callgrind can name functions; the size row strips a copy.
export CARGO_PROFILE_RELEASE_STRIP=false
export CARGO_TARGET_DIR=$TARGET
BIN=$TARGET/release/hass-edge
if ((BUILD)); then
	say "building the release binary and the ingest bench ($TARGET)"
	(cd "$ROOT" && cargo build --release --bin hass-edge --bench ingest --message-format=json-render-diagnostics) >"$RUN_DIR/build.json"
	INGEST=$(python3 - "$RUN_DIR/build.json" <<'PY'
import json, sys
exe = ""
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "ingest" and m.get("executable"):
        exe = m["executable"]
print(exe)
PY
)
else
	# the newest ingest bench binary already built
	INGEST=$(ls -t "$TARGET"/release/deps/ingest-* 2>/dev/null | grep -v '\.d$' | head -n1 || true)
fi
[[ -x $BIN ]] || { say "no $BIN"; exit 1; }
[[ -n $INGEST && -x $INGEST ]] || { say "could not find the ingest bench binary"; exit 1; }

# aarch64 (Raspberry Pi): in a full run, build it when the cross linker is there (a no-op when
# up to date); otherwise report a build that exists.
ARM_ARGS=()
ARM=$TARGET/aarch64-unknown-linux-gnu/release/hass-edge
if ((!SMOKE && BUILD)) && command -v aarch64-linux-gnu-gcc >/dev/null \
	&& rustup target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-gnu; then
	say "building for aarch64-unknown-linux-gnu"
	if ! (cd "$ROOT" && CARGO_PROFILE_RELEASE_STRIP=true cargo build --release --bin hass-edge --target aarch64-unknown-linux-gnu -q); then
		say "aarch64 build failed; the size row is left out"
		ARM=""
	fi
fi
for p in $ARM "$ROOT/target/aarch64-unknown-linux-gnu/release/hass-edge"; do
	[[ -x $p ]] && { ARM_ARGS+=(--aarch64 "$p"); break; }
done
DEB_ARGS=()
for d in "$TARGET/debian" "$ROOT/target/debian"; do
	# once: the two are the same directory unless CARGO_TARGET_DIR points elsewhere
	[[ -d $d && " ${DEB_ARGS[*]} " != *" $(realpath "$d") "* ]] && DEB_ARGS+=(--deb-dir "$(realpath "$d")")
done
BUILD_S=$(($(date +%s) - T0))

# --------------------------------------------------------------------------- HA peer
PEER=$ROOT/tests/ha-peer/ha-peer.sh
cleanup() {
	local rc=$?
	if [[ -f $RUN_DIR/pids ]]; then
		while read -r pid; do
			# only our own daemons: the pid must still run our binary
			if [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$RUN_DIR/"; then
				kill "$pid" 2>/dev/null || true
			fi
		done <"$RUN_DIR/pids"
	fi
	if [[ -d $PEER_DIR ]]; then
		bash "$PEER" stop "$PEER_DIR" >/dev/null 2>&1 || say "could not stop the HA peer in $PEER_DIR"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$PEER_DIR"
say "starting Home Assistant $HA on 127.0.0.1:$PORT ($PEER_DIR)"
bash "$PEER" start "$HA" "$PEER_DIR" "$PORT" >/dev/null
VENV=$(cat "$PEER_DIR/venv")

# --------------------------------------------------------------------------- measure
ARGS=(--work "$RUN_DIR" --peer "$PEER_DIR" --bin "$BIN" --ingest "$INGEST" --repo "$ROOT" --out "$OUT"
	--port-base "$PORT" --port-max $((PORT + 19)) --build-seconds "$BUILD_S")
((SMOKE)) && ARGS+=(--smoke)
[[ -n $ONLY ]] && ARGS+=(--only "$ONLY")
PYTHONPATH=$ROOT/measure${PYTHONPATH:+:$PYTHONPATH} \
	"$VENV/bin/python" -m hass_edge_tools.bench "${ARGS[@]}" "${ARM_ARGS[@]}" "${DEB_ARGS[@]}"
say "done in $(($(date +%s) - T0)) s; work files in $RUN_DIR"
