#!/usr/bin/env bash
# Kiosk load: HA's own dashboard in a fresh Chromium, directly against Home Assistant and through
# hass-edge. Prints a table; see BENCHMARKS.md "Kiosk load (HA's frontend through hass-edge)".
#
#   bash tests/ha-peer/ha-peer.sh start 2024.3.3 /tmp/kiosk-ha 18165
#   CARGO_TARGET_DIR=/tmp/target-kiosk cargo build --profile fast
#   HA_PEER_DIR=/tmp/kiosk-ha nice -n 10 bash measure/kiosk/run.sh            # issue 15: assets (measure.mjs)
#   HA_PEER_DIR=/tmp/kiosk-ha nice -n 10 bash measure/kiosk/run.sh entities   # issue 16: entity data (entities.mjs)
#
# Optional: EDGE_BIN (default /tmp/target-kiosk/fast/hass-edge), DELAY_MS (200, the HA-slow relay's
# delay per answer), OUT_DIR (default /tmp/kiosk-out), CHROMIUM (/usr/bin/chromium), EDGE_NOTE (a
# word on the binary, printed with the figures).
# measure.mjs: RUNS (5), SCENARIOS (default "ha edge-cold edge-warm ha-slow edge-slow-cold
# edge-slow-warm"); kiosk.md, kiosk.json.
# entities.mjs: RUNS (3), ENTITY_COUNTS ("1000 5000"), TARGETS ("ha edge edge-dash", each also
# NAME-slow), CPU_THROTTLE (1; N = each page's CPU N times slower), KEEP_ENTITIES=1 (leave the
# sensors and the default dashboard in HA);
# kiosk-entities.md, kiosk-entities.json. It sets HA's default dashboard (`lovelace`) and
# sensor.kiosk_bench_* in the peer, and removes them at the end.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# shellcheck source-path=SCRIPTDIR source=../../tests/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../../tests/lib.sh"
MODE=${1:-assets}
case $MODE in assets) SCRIPT=measure.mjs ;; entities) SCRIPT=entities.mjs ;; *) printf 'kiosk: unknown mode %s (assets, entities)\n' "$MODE" >&2; exit 2 ;; esac
die() { printf 'kiosk: FAIL: %s\n' "$*" >&2; exit 1; }

[[ -n ${HA_PEER_DIR:-} ]] || die "HA_PEER_DIR is not set (the DIR of 'tests/ha-peer/ha-peer.sh start VERSION DIR PORT')"
[[ -s $HA_PEER_DIR/url && -s $HA_PEER_DIR/token && -s $HA_PEER_DIR/version && -s $HA_PEER_DIR/venv ]] ||
	die "$HA_PEER_DIR has no url/token/version/venv: is the HA peer started?"
HA_PEER_DIR=$(cd "$HA_PEER_DIR" && pwd)
EDGE_BIN=${EDGE_BIN:-/tmp/target-kiosk/fast/hass-edge}
[[ $EDGE_BIN = /* ]] || EDGE_BIN=$ROOT/$EDGE_BIN
[[ -x $EDGE_BIN ]] || die "no hass-edge at $EDGE_BIN (CARGO_TARGET_DIR=/tmp/target-kiosk cargo build --profile fast, or set EDGE_BIN)"
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
[[ -x $CHROMIUM ]] || die "no Chromium at $CHROMIUM (Debian package chromium)"
for tool in node npm python3 curl; do command -v "$tool" >/dev/null || die "$tool is not installed"; done
OUT_DIR=${OUT_DIR:-/tmp/kiosk-out}
mkdir -p "$OUT_DIR"
HA_URL=$(cat "$HA_PEER_DIR/url")
HA_PY=$(cat "$HA_PEER_DIR/venv")/bin/python
python_lib # ha_helper.py and entities.py import tests/lib/ha_ws.py
curl -fsS -o /dev/null --max-time 5 -H "Authorization: Bearer $(cat "$HA_PEER_DIR/token")" "$HA_URL/api/" ||
	die "Home Assistant at $HA_URL does not answer GET /api/ with its token"

# playwright-core 1.65.1 (no browser download: Debian's Chromium): tests/frontend's copy when it is
# that version, otherwise our own (npm ci only when package.json/package-lock.json change)
want=$(node -p "require('$HERE/package.json').devDependencies['playwright-core']")
if [[ "$(node -p "require('$ROOT/tests/frontend/node_modules/playwright-core/package.json').version" 2>/dev/null)" == "$want" ]]; then
	PW_REQUIRE_FROM=$ROOT/tests/frontend/package.json
else
	npm_ci_stamped "$HERE" playwright-core || die "npm ci in measure/kiosk failed"
	PW_REQUIRE_FROM=$HERE/package.json
fi

# HA: onboarding finished and the dashboard edge-test (tests/frontend's helper, directly against HA)
"$HA_PY" "$ROOT/tests/frontend/ha_helper.py" setup --url "$HA_URL" --token-file "$HA_PEER_DIR/token" >/dev/null ||
	die "could not prepare Home Assistant (tests/frontend/ha_helper.py setup)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hass-edge-kiosk.XXXXXX")
NODE_PID=''
cleanup() {
	if [[ -n $NODE_PID ]] && kill -0 "$NODE_PID" 2>/dev/null; then
		kill -TERM "$NODE_PID" 2>/dev/null || true
		wait "$NODE_PID" 2>/dev/null || true
	fi
	kill_chromiums "$WORK/profile-" # one that outlived its driver: ours have their profiles in WORK
	rm -rf "$WORK"
}
on_exit cleanup

HA_VERSION=$(cat "$HA_PEER_DIR/version")
export HA_URL HA_TOKEN_FILE=$HA_PEER_DIR/token HA_PY HA_VERSION EDGE_BIN WORK OUT_DIR CHROMIUM PW_REQUIRE_FROM
export XDG_CONFIG_HOME=$WORK/xdg # Chromium's crash-report database
node "$HERE/$SCRIPT" &
NODE_PID=$!
wait "$NODE_PID"
