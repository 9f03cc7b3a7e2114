#!/usr/bin/env bash
# install.sh — install the real Home Assistant clients of tests/clients (HomeAssistant-API and
# homeassistant-cli, every package pinned in requirements.txt) into a cached venv:
#
#   ${HASS_EDGE_CLIENTS_VENV:-${HASS_EDGE_PEER_CACHE:-~/.cache/hass-edge}/clients-venv}
#
# Idempotent: a complete venv holds a marker with the hash of requirements.txt and the Python
# version; a later run whose marker matches exits at once (a few ms). A changed requirements.txt
# reinstalls into the same venv; HASS_EDGE_CLIENTS_FORCE=1 rebuilds it from scratch. Runs take
# turns (flock). Prints the venv's path on stdout; pip's output goes to VENV.install.log.
#
# Python: 3.11 (HomeAssistant-API 6.1 needs >= 3.11), from HASS_EDGE_CLIENTS_PYTHON, pyenv's
# 3.11.*, or python3.11 / python3 on PATH when that is 3.11+.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
say() { printf '[clients/install.sh] %s\n' "$*" >&2; }
die() { printf '[clients/install.sh] error: %s\n' "$*" >&2; exit 1; }

CACHE=${HASS_EDGE_PEER_CACHE:-$HOME/.cache/hass-edge}
VENV=${HASS_EDGE_CLIENTS_VENV:-$CACHE/clients-venv}
REQ=$HERE/requirements.txt
MARKER=$VENV/.hass-edge-clients-complete
[[ -s $REQ ]] || die "no $REQ"

want_marker() { venv_stamp "$VENV" "$REQ"; } # the Python of the venv + the pins

# Fast path: nothing to do (no lock, no Python started but the venv's own).
if [[ ${HASS_EDGE_CLIENTS_FORCE:-0} != 1 && -f $MARKER && "$(cat "$MARKER")" == "$(want_marker)" ]]; then
	echo "$VENV"
	exit 0
fi

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9
# Another run may have finished the job while we waited for the lock.
if [[ ${HASS_EDGE_CLIENTS_FORCE:-0} != 1 && -f $MARKER && "$(cat "$MARKER")" == "$(want_marker)" ]]; then
	echo "$VENV"
	exit 0
fi

t0=$SECONDS
PY=$(pick_python311 "${HASS_EDGE_CLIENTS_PYTHON:-}") || die "no Python >= 3.11 found (set HASS_EDGE_CLIENTS_PYTHON)"
LOG=$VENV.install.log
venv_create "$VENV" "$PY" "${HASS_EDGE_CLIENTS_FORCE:-0}"
rm -f "$MARKER"
say "installing the pinned clients (requirements.txt) — log: $LOG"
# What the tests use must be there, at the pinned versions.
pip_install_pinned "$VENV" "$REQ" "$LOG" homeassistant_api,homeassistant_cli clients
[[ -x $VENV/bin/hass-cli ]] || die "no hass-cli in $VENV/bin"
want_marker >"$MARKER"
say "installed in $((SECONDS - t0)) s: HomeAssistant-API $("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("HomeAssistant-API"))'), homeassistant-cli $("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("homeassistant-cli"))')"
echo "$VENV"
