#!/usr/bin/env bash
# WebSocket fan-out (issue 16): the same WebSocket clients against Home Assistant directly and
# through hass-edge's /api/websocket, in one run; prints a table. See measure/fanout/README.md and
# BENCHMARKS.md "WebSocket fan-out (issue 16)".
#
#   bash tests/ha-peer/ha-peer.sh start 2025.4.4 /tmp/h14-ha 18195
#   CARGO_TARGET_DIR=/work/target-h14 cargo build --release
#   HA_PEER_DIR=/tmp/h14-ha EDGE_BIN=/work/target-h14/release/hass-edge RENICE=-10 bash measure/fanout/run.sh
#   DURATION=3 RATES=200 CLIENTS="1 50" STORM_RUNS=1 ... bash measure/fanout/run.sh   # a smoke
#
# Knobs (environment): README.md.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
die() { printf 'fanout: FAIL: %s\n' "$*" >&2; exit 1; }

[[ -n ${HA_PEER_DIR:-} ]] || die "HA_PEER_DIR is not set (the DIR of 'tests/ha-peer/ha-peer.sh start VERSION DIR PORT')"
[[ -s $HA_PEER_DIR/url && -s $HA_PEER_DIR/token && -s $HA_PEER_DIR/venv ]] ||
	die "$HA_PEER_DIR has no url/token/venv: is the HA peer started?"
HA_PEER_DIR=$(cd "$HA_PEER_DIR" && pwd)
EDGE_BIN=${EDGE_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/hass-edge}
[[ $EDGE_BIN = /* ]] || EDGE_BIN=$ROOT/$EDGE_BIN
[[ -x $EDGE_BIN ]] || die "no hass-edge at $EDGE_BIN (cargo build --release, or set EDGE_BIN)"
HA_PY=$(cat "$HA_PEER_DIR/venv")/bin/python
[[ -x $HA_PY ]] || die "no Python in the peer's venv ($HA_PY)"
curl -fsS -o /dev/null --max-time 5 -H "Authorization: Bearer $(cat "$HA_PEER_DIR/token")" "$(cat "$HA_PEER_DIR/url")/api/" ||
	die "Home Assistant at $(cat "$HA_PEER_DIR/url") does not answer GET /api/ with its token"
EDGE_PORT=${EDGE_PORT:-18196}
if (exec 3<>"/dev/tcp/127.0.0.1/$EDGE_PORT") 2>/dev/null; then
	die "127.0.0.1:$EDGE_PORT is taken (EDGE_PORT=...)"
fi

export HA_PEER_DIR EDGE_BIN EDGE_PORT
export PYTHONPATH=$ROOT/measure${PYTHONPATH:+:$PYTHONPATH}
exec "$HA_PY" "$HERE/fanout.py"
