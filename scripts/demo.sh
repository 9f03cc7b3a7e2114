#!/usr/bin/env bash
# The main job on real input: installs (once) and starts a real Home Assistant on
# 127.0.0.1, builds hass-edge, runs it against that HA, and prints curl examples.
# Ctrl-C stops both.
#
#   scripts/demo.sh [HA_VERSION]     (2024.3.3 default; or 2026.11.0, 2025.4.4)
#
# 2024.3.3 is the default because it installs fast (42 s on a quiet machine, under 2 min on
# a busy one) into a plain venv.  2026.11.0, the current release, needs Python >= 3.14.2, so
# tests/ha-peer/install.sh runs it in a Debian root (debootstrap; needs root): its first
# install took 6 min (352 s at load 4.5, 365 s at load 11 on 2 cores); cached after that.
#
# Environment: DEMO_DIR (default /tmp/hass-edge-demo), HA_PORT (18123), EDGE_PORT (8124).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-2024.3.3}
DIR=${DEMO_DIR:-/tmp/hass-edge-demo}
HA_PORT=${HA_PORT:-18123}
EDGE_PORT=${EDGE_PORT:-8124}

bash tests/ha-peer/install.sh "$VERSION"
mkdir -p "$DIR"
bash tests/ha-peer/ha-peer.sh start "$VERSION" "$DIR/ha" "$HA_PORT" >/dev/null
trap 'bash tests/ha-peer/ha-peer.sh stop "$DIR/ha" || true' EXIT

cargo build --release --quiet
BIN=${CARGO_TARGET_DIR:-target}/release/hass-edge
cat > "$DIR/config.toml" <<TOML
[ha]
url = "http://127.0.0.1:$HA_PORT"
token_file = "$DIR/ha/token"
[http]
listen = "127.0.0.1:$EDGE_PORT"
[dbus]
bus = "none"
[cache]
state_file = "$DIR/states.json"
TOML
"$BIN" check-config --config "$DIR/config.toml" >/dev/null

cat <<MSG

Home Assistant $VERSION runs at http://127.0.0.1:$HA_PORT (token in $DIR/ha/token).
hass-edge serves it at http://127.0.0.1:$EDGE_PORT. Try, in another terminal:

  curl -s 127.0.0.1:$EDGE_PORT/health
  curl -si 127.0.0.1:$EDGE_PORT/api/states/light.kitchen          # X-Cache: hit, Age: 0
  curl -s 127.0.0.1:$EDGE_PORT/api/states | head -c 300
  curl -sN '127.0.0.1:$EDGE_PORT/api/stream?entity_id=light.,input_boolean.'   # push stream
  curl -s -X POST -H 'Content-Type: application/json' -d '{"entity_id":"input_boolean.kitchen"}' \\
       127.0.0.1:$EDGE_PORT/api/services/input_boolean/toggle      # light.kitchen follows
  curl -s 127.0.0.1:$EDGE_PORT/status
  curl -s 127.0.0.1:$EDGE_PORT/metrics | grep hass_edge_events

Ctrl-C stops hass-edge and Home Assistant.
MSG
RUST_LOG=${RUST_LOG:-info} "$BIN" --config "$DIR/config.toml"
