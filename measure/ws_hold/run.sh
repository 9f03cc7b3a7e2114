#!/usr/bin/env bash
# Memory of hass-edge while WebSocket clients ask for many states and never read (a client
# that stalls, or one that means harm): prints VmRSS/VmHWM before, and 3 s and 7 s into the
# hold (the write timeout is 10 s). Figures: BENCHMARKS.md "WebSocket clients that ask and never read".
#
#   bash tests/ha-peer/ha-peer.sh start 2025.4.4 /tmp/ws-hold-ha 18172
#   cargo build
#   HA_PEER_DIR=/tmp/ws-hold-ha EDGE_BINS="target/debug/hass-edge" bash measure/ws_hold/run.sh
#
# Knobs (environment): EDGE_BINS (one or more binaries, compared in one run), ENTITIES (5000:
# sensor.mem_* made in HA over REST when missing, 0.5 KB of attributes each), CLIENTS (64),
# KINDS ("get_states subscribe_entities"), EDGE_PORT (18390).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
die() { printf 'ws_hold: FAIL: %s\n' "$*" >&2; exit 1; }

[[ -n ${HA_PEER_DIR:-} ]] || die "HA_PEER_DIR is not set (the DIR of 'tests/ha-peer/ha-peer.sh start VERSION DIR PORT')"
[[ -s $HA_PEER_DIR/url && -s $HA_PEER_DIR/token ]] || die "$HA_PEER_DIR has no url/token: is the HA peer started?"
HA_PEER_DIR=$(cd "$HA_PEER_DIR" && pwd)
bins=()
for b in ${EDGE_BINS:-$ROOT/target/debug/hass-edge}; do
	[[ $b = /* ]] || b=$ROOT/$b
	[[ -x $b ]] || die "no hass-edge at $b (cargo build, or set EDGE_BINS)"
	bins+=("$b")
done
EDGE_PORT=${EDGE_PORT:-18390}
if (exec 3<>"/dev/tcp/127.0.0.1/$EDGE_PORT") 2>/dev/null; then
	die "127.0.0.1:$EDGE_PORT is taken (EDGE_PORT=...)"
fi
export HA_PEER_DIR EDGE_PORT
exec python3 "$HERE/hold.py" "${bins[@]}"
