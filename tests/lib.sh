# shellcheck shell=bash
# lib.sh — what the shell test harnesses share (tests/clients, tests/wsclients, tests/browser,
# tests/frontend and measure/kiosk); what their Python and Node scripts share is beside it, in
# tests/lib/ (ha_ws.py, harness.mjs). Sourced, never run:
#
#   . "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
#
# It sets no shell options (the scripts run under `set -euo pipefail`) and starts nothing when
# sourced; it only defines the functions below, PEER and TESTS_LIB. A function marked "uses
# say/die" calls the sourcing script's own `say MESSAGE` and `die MESSAGE` (which print with the
# script's prefix; die exits).

# PEER: the HA test peer's script (start, stop, status, wait-running; see tests/ha-peer/README.md).
PEER=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/ha-peer/ha-peer.sh
# TESTS_LIB: tests/lib, the Python module (ha_ws.py) and the Node module (harness.mjs) the
# harnesses' scripts share.
TESTS_LIB=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib

# ---------- the harness ----------

# python_lib: puts TESTS_LIB first on PYTHONPATH, exported, so that every Python the script runs
# (directly or through node) imports ha_ws as a plain module.
python_lib() {
	export PYTHONPATH=$TESTS_LIB${PYTHONPATH:+:$PYTHONPATH}
}

# resolve_edge_bin: EDGE_BIN (default target/debug/hass-edge; a relative path is relative to the
# repository root) made absolute. Whether it is there is the caller's to check.
resolve_edge_bin() {
	EDGE_BIN=${EDGE_BIN:-target/debug/hass-edge}
	[[ $EDGE_BIN = /* ]] || EDGE_BIN=$(cd "$TESTS_LIB/../.." && pwd)/$EDGE_BIN
}

# work_dirs NAME: WORK, a new temporary directory ${TMPDIR:-/tmp}/NAME.XXXXXX (the caller removes
# it); OUT_DIR, when set, created and made absolute; LOGDIR, where the daemons' logs go: OUT_DIR,
# else WORK. Returns non-zero when a directory could not be made.
# shellcheck disable=SC2034 # LOGDIR is the caller's
work_dirs() {
	WORK=$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX") || return 1
	if [[ -n ${OUT_DIR:-} ]]; then
		mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd) || return 1
	fi
	LOGDIR=${OUT_DIR:-$WORK}
}

# ---------- processes ----------

# stop_pid PID: SIGTERM to PID, then SIGKILL if it still runs after 5 s, and reaps it. Nothing
# when PID is empty or gone; always returns 0.
stop_pid() {
	local pid=$1 i
	[[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
	kill -TERM "$pid" 2>/dev/null || true
	for ((i = 0; i < 50; i++)); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	kill -KILL "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
}

# kill_chromiums PROFILE: SIGKILL to every process whose command line has
# --user-data-dir=PROFILE (a pgrep -f pattern, so PROFILE may be a prefix): the Chromiums that
# outlived their driver (node killed hard). Always returns 0.
kill_chromiums() {
	local pid
	for pid in $(pgrep -f -- "--user-data-dir=$1" || true); do
		kill -KILL "$pid" 2>/dev/null || true
	done
}

# on_exit FUNC: when the script exits, also on SIGINT/SIGTERM (which exit 130), runs FUNC once,
# with the traps reset and CLEANUP_RC set to the exit status; the script then exits with
# CLEANUP_RC (FUNC may change it, e.g. to report a failed cleanup).
on_exit() {
	_LIB_ON_EXIT=$1
	trap _lib_on_exit EXIT
	trap 'exit 130' INT TERM
}
_lib_on_exit() {
	CLEANUP_RC=$?
	trap - EXIT INT TERM
	"$_LIB_ON_EXIT"
	exit "$CLEANUP_RC"
}

# free_port ADDRESS: prints a TCP port free on ADDRESS (IPv4 such as 127.0.0.1, or IPv6).
free_port() {
	python3 -c 'import socket, sys
a = sys.argv[1]
s = socket.socket(socket.AF_INET6 if ":" in a else socket.AF_INET)
s.bind((a, 0))
print(s.getsockname()[1])' "$1"
}

# ---------- hass-edge ----------

# edge_mirror_config HA_URL TOKEN_FILE LISTEN STATE_FILE [HTTP_LINES]: prints a hass-edge
# config.toml that mirrors every entity of HA at HA_URL (token in TOKEN_FILE; no [filter]), listens
# on LISTEN (HOST:PORT) with HTTP_LINES added to [http], keeps its states in STATE_FILE, no D-Bus.
edge_mirror_config() {
	cat <<EOF
[ha]
url = "$1"
token_file = "$2"

[http]
listen = "$3"
${5:-}

# Mirror every entity: the clients compare what they get with HA's whole list.
[filter]
enabled = false

[cache]
state_file = "$4"

[dbus]
bus = "none"
EOF
}

# spawn_edge BIN CONFIG LOG: starts the hass-edge binary BIN with --config CONFIG in the
# background, stdout and stderr to LOG; $! is its PID afterwards. The caller's HASS_EDGE_*
# variables (they would be config overrides) and systemd's NOTIFY_SOCKET/WATCHDOG_* do not reach it.
spawn_edge() {
	(
		for v in $(env | grep -o '^HASS_EDGE_[A-Z_]*' || true); do unset "$v"; done
		unset NOTIFY_SOCKET WATCHDOG_USEC WATCHDOG_PID
		exec "$1" --config "$2"
	) >"$3" 2>&1 &
}

# wait_health PID URL [WANT]: polls URL/health every 0.1 s, for 30 s, until it answers WANT (an
# HTTP status, default 200 (live and synced with HA); `any`: any HTTP answer) while process PID
# lives. Returns 0 when it did, 1 when PID is gone, 2 after 30 s; HEALTH_CODE holds the last
# status (000: no answer).
wait_health() {
	local pid=$1 url=$2 want=${3:-200} i
	for ((i = 0; ; i++)); do
		kill -0 "$pid" 2>/dev/null || return 1
		HEALTH_CODE=$(curl -gs -o /dev/null -w '%{http_code}' --max-time 2 "$url/health" || true)
		if [[ $want == any && $HEALTH_CODE != 000 ]] || [[ $HEALTH_CODE == "$want" ]]; then return 0; fi
		((i < 300)) || return 2
		sleep 0.1
	done
}

# ---------- the HA test peer in HA_PEER_DIR (the caller's HA_VERSION and HA_PORT) ----------

# peer_ensure_running LOG [START_ARGS...]: starts the peer again (ha-peer.sh start VERSION DIR
# PORT START_ARGS) unless `ha-peer.sh status` says it runs; ha-peer.sh's output is appended to LOG.
# Returns non-zero when it is not running and would not start.
peer_ensure_running() {
	local log=$1
	shift
	{ bash "$PEER" status "$HA_PEER_DIR" || bash "$PEER" start "$HA_VERSION" "$HA_PEER_DIR" "$HA_PORT" "$@"; } >>"$log" 2>&1
}

# peer_restart LOG [START_ARGS...]: stops the peer and starts it again with START_ARGS;
# ha-peer.sh's output is appended to LOG. Returns non-zero when either failed.
peer_restart() {
	local log=$1
	shift
	{ bash "$PEER" stop "$HA_PEER_DIR" && bash "$PEER" start "$HA_VERSION" "$HA_PEER_DIR" "$HA_PORT" "$@"; } >>"$log" 2>&1
}

# ---------- installs ----------

# npm_ci_stamped DIR PACKAGE [LOG]: `npm ci` in DIR (PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1: Debian's
# Chromium is used) unless DIR/node_modules has PACKAGE and the stamp
# DIR/node_modules/.hass-edge-installed holds the sha256 of DIR's package.json + package-lock.json;
# writes that stamp after a good npm ci. npm's output goes to LOG (all of it printed on stderr when
# npm ci fails), or where the caller's goes without LOG. Returns 1 when npm ci failed;
# NPM_CI_SECONDS: how long npm ci took, empty when it was not needed.
# shellcheck disable=SC2034 # NPM_CI_SECONDS is the caller's
npm_ci_stamped() {
	local dir=$1 package=$2 log=${3:-} sum stamp t=$SECONDS
	NPM_CI_SECONDS=''
	sum=$(cat "$dir/package.json" "$dir/package-lock.json" | sha256sum | cut -d' ' -f1) || return 1
	stamp=$dir/node_modules/.hass-edge-installed
	if [[ -f $dir/node_modules/$package/package.json && "$(cat "$stamp" 2>/dev/null)" == "$sum" ]]; then
		return 0
	fi
	if [[ -z $log ]]; then
		_lib_npm_ci "$dir" || return 1
	elif ! _lib_npm_ci "$dir" >"$log" 2>&1; then
		cat "$log" >&2
		return 1
	fi
	echo "$sum" >"$stamp" || return 1
	NPM_CI_SECONDS=$((SECONDS - t))
}
_lib_npm_ci() { (cd "$1" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error); }

# pick_python311 [PYTHON]: prints a Python >= 3.11: PYTHON when given (the caller's override),
# else pyenv's 3.11.*, else python3.11 or python3 on PATH when it is 3.11+. Returns 1 when none.
pick_python311() {
	local p
	if [[ -n ${1:-} ]]; then echo "$1"; return; fi
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

# venv_stamp VENV REQ: prints the stamp of a complete VENV: `python=X.Y.Z req=HASH` (VENV's Python,
# `none` without one; the first 16 hex digits of REQ's sha256).
venv_stamp() {
	printf 'python=%s req=%s\n' "$("$1/bin/python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null || echo none)" \
		"$(sha256sum "$2" | cut -c1-16)"
}

# venv_create VENV PYTHON FORCE: a new venv VENV made with PYTHON (any old one removed) when FORCE
# is 1 or VENV has no bin/python; nothing otherwise. Uses say/die.
venv_create() {
	if [[ $3 == 1 || ! -x $1/bin/python ]]; then
		rm -rf "$1"
		say "creating $1 with $2"
		"$2" -m venv "$1" || die "python -m venv failed"
	fi
}

# pip_install_pinned VENV REQ LOG MODULES WHAT: pip install -r REQ into VENV, pip's output to LOG
# (its last 30 lines on stderr when pip fails: die "pip install failed"); then every NAME==VERSION
# of REQ must be installed at VERSION and each of MODULES (comma-separated) importable, else
# die "the installed WHAT do not match requirements.txt". Uses die.
pip_install_pinned() {
	local venv=$1 req=$2 log=$3 modules=$4 what=$5
	if ! "$venv/bin/python" -m pip install --disable-pip-version-check --no-input -r "$req" >"$log" 2>&1; then
		tail -n 30 "$log" >&2
		die "pip install failed"
	fi
	"$venv/bin/python" - "$req" "$modules" <<'EOF' || die "the installed $what do not match requirements.txt"
import importlib
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
for module in sys.argv[2].split(","):
    importlib.import_module(module)
EOF
}
