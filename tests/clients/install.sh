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
say() { printf '[clients/install.sh] %s\n' "$*" >&2; }
die() { printf '[clients/install.sh] error: %s\n' "$*" >&2; exit 1; }

CACHE=${HASS_EDGE_PEER_CACHE:-$HOME/.cache/hass-edge}
VENV=${HASS_EDGE_CLIENTS_VENV:-$CACHE/clients-venv}
REQ=$HERE/requirements.txt
MARKER=$VENV/.hass-edge-clients-complete
[[ -s $REQ ]] || die "no $REQ"

want_marker() { # the Python of the venv + the pins
	printf 'python=%s req=%s\n' "$("$VENV/bin/python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null || echo none)" \
		"$(sha256sum "$REQ" | cut -c1-16)"
}

# Fast path: nothing to do (no lock, no Python started but the venv's own).
if [[ ${HASS_EDGE_CLIENTS_FORCE:-0} != 1 && -f $MARKER && "$(cat "$MARKER")" == "$(want_marker)" ]]; then
	echo "$VENV"
	exit 0
fi

pick_python() {
	local p
	if [[ -n ${HASS_EDGE_CLIENTS_PYTHON:-} ]]; then echo "$HASS_EDGE_CLIENTS_PYTHON"; return; fi
	if command -v pyenv >/dev/null 2>&1; then
		for p in "$(pyenv root)"/versions/3.11.*/bin/python3.11; do
			[[ -x $p ]] && { echo "$p"; return; }
		done
	fi
	for p in python3.11 python3; do
		if command -v "$p" >/dev/null 2>&1 &&
			"$p" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
			command -v "$p"
			return
		fi
	done
	return 1
}

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9
# Another run may have finished the job while we waited for the lock.
if [[ ${HASS_EDGE_CLIENTS_FORCE:-0} != 1 && -f $MARKER && "$(cat "$MARKER")" == "$(want_marker)" ]]; then
	echo "$VENV"
	exit 0
fi

t0=$SECONDS
PY=$(pick_python) || die "no Python >= 3.11 found (set HASS_EDGE_CLIENTS_PYTHON)"
LOG=$VENV.install.log
if [[ ${HASS_EDGE_CLIENTS_FORCE:-0} == 1 || ! -x $VENV/bin/python ]]; then
	rm -rf "$VENV"
	say "creating $VENV with $PY"
	"$PY" -m venv "$VENV" || die "python -m venv failed"
fi
rm -f "$MARKER"
say "installing the pinned clients (requirements.txt) — log: $LOG"
if ! "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input -r "$REQ" >"$LOG" 2>&1; then
	tail -n 30 "$LOG" >&2
	die "pip install failed"
fi
# What the tests use must be there, at the pinned versions.
"$VENV/bin/python" - "$REQ" <<'EOF' || die "the installed clients do not match requirements.txt"
import sys
from importlib.metadata import version
pins = {}
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if "==" in line:
        name, ver = line.split("==", 1)
        pins[name.strip()] = ver.strip()
bad = [f"{n} {version(n)} != {v}" for n, v in pins.items() if version(n) != v]
if bad:
    sys.exit("mismatch: " + ", ".join(bad))
import homeassistant_api, homeassistant_cli  # noqa: E401,F401
EOF
[[ -x $VENV/bin/hass-cli ]] || die "no hass-cli in $VENV/bin"
want_marker >"$MARKER"
say "installed in $((SECONDS - t0)) s: HomeAssistant-API $("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("HomeAssistant-API"))'), homeassistant-cli $("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("homeassistant-cli"))')"
echo "$VENV"
