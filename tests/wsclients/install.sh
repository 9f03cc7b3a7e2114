#!/usr/bin/env bash
# install.sh — install the real Home Assistant WebSocket clients of tests/wsclients into caches:
#
#   node:   ${HASS_EDGE_WSCLIENTS_NODE:-${HASS_EDGE_PEER_CACHE:-~/.cache/hass-edge}/wsclients-node}/node_modules
#           home-assistant-js-websocket + ws, exactly as package-lock.json pins them (npm ci)
#   python: ${HASS_EDGE_WSCLIENTS_VENV:-${HASS_EDGE_PEER_CACHE:-~/.cache/hass-edge}/wsclients-venv}
#           hass-client and its dependencies, exactly as requirements.txt pins them
#
# Idempotent and offline-safe once installed: each cache holds a stamp with the hash of its pins
# (and the Node / Python version); a run whose stamps match exits at once without the network.
# Runs take turns (flock). HASS_EDGE_WSCLIENTS_FORCE=1 rebuilds both. Prints two lines on stdout:
# `node_modules=PATH` and `venv=PATH`; npm's and pip's output go to CACHE/wsclients-*.install.log.
#
# Python: 3.11+ (HASS_EDGE_WSCLIENTS_PYTHON, pyenv's 3.11.*, python3.11 or python3); Node 18+ and npm.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
say() { printf '[wsclients/install.sh] %s\n' "$*" >&2; }
die() { printf '[wsclients/install.sh] error: %s\n' "$*" >&2; exit 1; }

CACHE=${HASS_EDGE_PEER_CACHE:-$HOME/.cache/hass-edge}
NODE_DIR=${HASS_EDGE_WSCLIENTS_NODE:-$CACHE/wsclients-node}
VENV=${HASS_EDGE_WSCLIENTS_VENV:-$CACHE/wsclients-venv}
REQ=$HERE/requirements.txt
FORCE=${HASS_EDGE_WSCLIENTS_FORCE:-0}
for f in "$REQ" "$HERE/package.json" "$HERE/package-lock.json"; do [[ -s $f ]] || die "no $f"; done
command -v node >/dev/null || die "node is not installed (Debian: nodejs)"
command -v npm >/dev/null || die "npm is not installed"

node_want() { printf 'node=%s lock=%s\n' "$(node --version)" "$(cat "$HERE/package.json" "$HERE/package-lock.json" | sha256sum | cut -c1-16)"; }
venv_want() { venv_stamp "$VENV" "$REQ"; }
node_ok() { [[ $FORCE != 1 && -f $NODE_DIR/.hass-edge-wsclients-complete && "$(cat "$NODE_DIR/.hass-edge-wsclients-complete")" == "$(node_want)" ]]; }
venv_ok() { [[ $FORCE != 1 && -f $VENV/.hass-edge-wsclients-complete && "$(cat "$VENV/.hass-edge-wsclients-complete")" == "$(venv_want)" ]]; }
done_() { printf 'node_modules=%s\nvenv=%s\n' "$NODE_DIR/node_modules" "$VENV"; exit 0; }

# Fast path: nothing to do (no lock, no network).
if node_ok && venv_ok; then done_; fi

mkdir -p "$CACHE"
exec 9>"$CACHE/wsclients.lock"
flock 9
# Another run may have finished the job while we waited for the lock.
if node_ok && venv_ok; then done_; fi

t0=$SECONDS
if ! node_ok; then
	LOG=$CACHE/wsclients-node.install.log
	rm -rf "$NODE_DIR"
	mkdir -p "$NODE_DIR"
	cp "$HERE/package.json" "$HERE/package-lock.json" "$NODE_DIR/"
	say "npm ci (home-assistant-js-websocket, ws) in $NODE_DIR — log: $LOG"
	if ! (cd "$NODE_DIR" && npm ci --no-audit --no-fund --loglevel=error) >"$LOG" 2>&1; then
		tail -n 30 "$LOG" >&2
		die "npm ci failed"
	fi
	# What the tests use must be there, at the pinned versions.
	# shellcheck disable=SC2016 # JavaScript: ${n} is its template literal
	(cd "$NODE_DIR" && node -e '
		const want = require("./package.json").dependencies;
		for (const [n, v] of Object.entries(want)) {
			const got = require(`./node_modules/${n}/package.json`).version;
			if (got !== v) { console.error(`${n} ${got} != ${v}`); process.exit(1); }
		}') || die "the installed Node packages do not match package.json"
	node_want >"$NODE_DIR/.hass-edge-wsclients-complete"
fi

if ! venv_ok; then
	LOG=$CACHE/wsclients-venv.install.log
	PY=$(pick_python311 "${HASS_EDGE_WSCLIENTS_PYTHON:-}") || die "no Python >= 3.11 found (set HASS_EDGE_WSCLIENTS_PYTHON)"
	venv_create "$VENV" "$PY" "$FORCE"
	rm -f "$VENV/.hass-edge-wsclients-complete"
	say "pip install -r requirements.txt (hass-client) — log: $LOG"
	pip_install_pinned "$VENV" "$REQ" "$LOG" hass_client "Python packages"
	venv_want >"$VENV/.hass-edge-wsclients-complete"
fi
say "installed in $((SECONDS - t0)) s: home-assistant-js-websocket $(node -p "require('$NODE_DIR/node_modules/home-assistant-js-websocket/package.json').version"), ws $(node -p "require('$NODE_DIR/node_modules/ws/package.json').version"), hass-client $("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("hass_client"))')"
done_
