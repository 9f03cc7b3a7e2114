#!/usr/bin/env bash
# Real Home Assistant WebSocket clients (home-assistant-js-websocket on Node, hass-client on Python)
# run one scripted session against HA directly and through hass-edge's /api/websocket at once, and
# the results are compared (issue 16). See tests/wsclients/README.md.
#
#   HA_PEER_DIR=<dir of a running tests/ha-peer peer> bash tests/wsclients/run.sh
#
# Optional: EDGE_BIN (default target/debug/hass-edge, relative to the repository root);
# WSCLIENTS_TARGET=ha (the self-check: both connections go to HA, no hass-edge);
# WSCLIENTS_CLIENTS (default "js py"); WSCLIENTS_MODES (default "ha-token api-token"; also "open":
# a loopback-open hass-edge and the HA token);
# WSCLIENTS_KILL=0 (skip the HA SIGKILL step); WSCLIENTS_JS_DEFLATE=0 (the js client offers no
# permessage-deflate; by default it does, as ws and browsers do); OUT_DIR (keeps the daemon's log and the output);
# WSCLIENTS_VERBOSE=1 (print HA's answers).
#
# The SIGKILL step kills and restarts the peer in HA_PEER_DIR (same version, port and DIR) with
# tests/ha-peer/ha-peer.sh. Prints one PASS/FAIL line per check and `N passed, M failed`; exit 0
# only when every check passed.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
T0=$SECONDS
# shellcheck source-path=SCRIPTDIR source=../lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh" # also PEER, tests/ha-peer/ha-peer.sh

say() { printf 'wsclients: %s\n' "$*" >&2; }
die() { printf 'wsclients: FAIL: %s\n' "$*" >&2; exit 1; }

# ---------- prerequisites ----------
[[ -n ${HA_PEER_DIR:-} ]] || die "HA_PEER_DIR is not set (the DIR of 'tests/ha-peer/ha-peer.sh start VERSION DIR PORT')"
[[ -s $HA_PEER_DIR/url && -s $HA_PEER_DIR/token && -s $HA_PEER_DIR/version ]] || die "$HA_PEER_DIR has no url/token/version: is the HA peer started?"
HA_PEER_DIR=$(cd "$HA_PEER_DIR" && pwd -P)
TARGET=${WSCLIENTS_TARGET:-edge}
[[ $TARGET == edge || $TARGET == ha ]] || die "WSCLIENTS_TARGET must be edge or ha, not $TARGET"
if [[ $TARGET == edge ]]; then
	resolve_edge_bin
	[[ -x $EDGE_BIN ]] || die "no hass-edge binary at $EDGE_BIN (cargo build, or set EDGE_BIN)"
fi
for tool in node python3 curl; do
	command -v "$tool" >/dev/null || die "$tool is not installed"
done
HA_URL=$(cat "$HA_PEER_DIR/url")
HA_PORT=${HA_URL##*:}
HA_TOKEN=$(cat "$HA_PEER_DIR/token")
HA_VERSION=$(cat "$HA_PEER_DIR/version")
curl -fsS -o /dev/null --max-time 5 -H "Authorization: Bearer $HA_TOKEN" "$HA_URL/api/" ||
	die "Home Assistant at $HA_URL does not answer GET /api/ with its token"
# The sessions make a few refused logins (a bad token): a peer with --ip-ban would ban 127.0.0.1.
if grep -qs 'ip_ban_enabled: true' "$HA_PEER_DIR/configuration.yaml"; then
	die "$HA_PEER_DIR runs with ip_ban_enabled (--ip-ban); use a peer without it"
fi
CLIENTS=${WSCLIENTS_CLIENTS:-js py}
MODES=${WSCLIENTS_MODES:-ha-token api-token}
for c in $CLIENTS; do [[ $c == js || $c == py ]] || die "WSCLIENTS_CLIENTS: unknown client $c (js, py)"; done
for m in $MODES; do [[ $m == ha-token || $m == api-token || $m == open ]] || die "WSCLIENTS_MODES: unknown mode $m (ha-token, api-token, open)"; done

# ---------- the clients (cached; instant when installed) ----------
INSTALLED=$(bash "$HERE/install.sh") || die "tests/wsclients/install.sh failed"
NODE_MODULES=$(sed -n 's/^node_modules=//p' <<<"$INSTALLED")
VENV=$(sed -n 's/^venv=//p' <<<"$INSTALLED")
PY=$VENV/bin/python
python_lib # helper.py imports tests/lib/ha_ws.py

# ---------- processes and their cleanup ----------
work_dirs hass-edge-wsclients || die "could not make the temporary directory or OUT_DIR"
declare -A EDGE_PID=() EDGE_URL=() # the hass-edge daemons by name (tok, open) and their base URLs

cleanup() {
	local name
	for name in "${!EDGE_PID[@]}"; do
		stop_pid "${EDGE_PID[$name]}"
		if ((CLEANUP_RC != 0)) && [[ -s $LOGDIR/wsclients-edge-$name.log ]]; then
			echo "--- hass-edge ($name) log (tail) ---" >&2
			tail -n 15 "$LOGDIR/wsclients-edge-$name.log" >&2
		fi
	done
	# A SIGKILL step cut short leaves the peer down: bring it back as it was found.
	peer_ensure_running /dev/null || true
	rm -rf "$WORK"
}
on_exit cleanup

# hass-edge with an API token ("tok"): a client sending hass-edge's API token is served by
# hass-edge (issue 16, mode api-token); one sending an HA token is "any other token", HA's verdict
# (mode ha-token). Mode open: a loopback-open hass-edge ("open", no API token) and the HA token,
# which issue 16 serves locally like the API token.
start_edge() { # NAME EXTRA_HTTP_TOML
	local name=$1 extra=$2 port dir=$WORK/$1
	port=$(free_port 127.0.0.1)
	mkdir -p "$dir"
	EDGE_URL[$name]=http://127.0.0.1:$port
	edge_mirror_config "$HA_URL" "$HA_PEER_DIR/token" "127.0.0.1:$port" "$dir/states.json" "$extra" >"$dir/config.toml"
	spawn_edge "$EDGE_BIN" "$dir/config.toml" "$LOGDIR/wsclients-edge-$name.log"
	EDGE_PID[$name]=$!
}

wait_edge() { # NAME: /health 200 (live and synced with HA)
	wait_health "${EDGE_PID[$1]}" "${EDGE_URL[$1]}" || case $? in
		1) die "hass-edge ($1) exited (log: $LOGDIR/wsclients-edge-$1.log)" ;;
		*) die "hass-edge ($1): /health is not 200 after 30 s (last: $HEALTH_CODE)" ;;
	esac
}
if [[ $TARGET == edge ]]; then
	(umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(24))' >"$WORK/api-token")
	start_edge tok "api_token_file = \"$WORK/api-token\""
	[[ " $MODES " != *" open "* ]] || start_edge open ""
	for name in "${!EDGE_PID[@]}"; do wait_edge "$name"; done
	say "HA $HA_VERSION at $HA_URL; hass-edge $("$EDGE_BIN" --version 2>/dev/null | head -1) live on ${EDGE_URL[tok]}${EDGE_URL[open]:+ (loopback-open: ${EDGE_URL[open]:-})} after $((SECONDS - T0)) s"
else
	say "self-check: both connections to HA $HA_VERSION at $HA_URL"
	MODES=self
fi

OUT=$WORK/out.txt
: >"$OUT"
status_info() { # LABEL NAME: the websocket_api counters of hass-edge's /status (recorded, not asserted yet)
	[[ $TARGET == edge ]] || return 0
	"$PY" "$HERE/helper.py" status "${EDGE_URL[$2]}" "$(cat "$WORK/api-token")" 2>&1 | sed "s/^INFO /INFO $1: /" | tee -a "$OUT" || true
}
rc=0
for mode in $MODES; do
	case $mode in
		self) edge='' TGT_URL=$HA_URL TGT_TOKEN=$HA_TOKEN TGT_LABEL=HA-again ;;
		ha-token) edge=tok TGT_URL=${EDGE_URL[tok]} TGT_TOKEN=$HA_TOKEN TGT_LABEL="hass-edge" ;;
		api-token) edge=tok TGT_URL=${EDGE_URL[tok]} TGT_TOKEN=$(cat "$WORK/api-token") TGT_LABEL="hass-edge (API token)" ;;
		open) edge=open TGT_URL=${EDGE_URL[open]} TGT_TOKEN=$HA_TOKEN TGT_LABEL="hass-edge (loopback-open)" ;;
	esac
	for client in $CLIENTS; do
		# a fresh non-admin token each time: the SIGKILL step may lose HA's latest auth writes
		NONADMIN_TOKEN=$("$PY" "$HERE/helper.py" nonadmin "$HA_URL" "$HA_TOKEN" 2>"$WORK/nonadmin.err") ||
			{ NONADMIN_TOKEN=''; say "no non-admin token: $(tail -n 1 "$WORK/nonadmin.err")"; }
		t=$SECONDS
		export HA_URL HA_TOKEN TGT_URL TGT_TOKEN TGT_LABEL NONADMIN_TOKEN HA_PEER_DIR HA_VERSION HA_PORT
		export PEER_SCRIPT=$PEER WSC_KILL=${WSCLIENTS_KILL:-1} WSC_VERBOSE=${WSCLIENTS_VERBOSE:-0}
		export WSC_PREFIX="$client [$mode]: " WSC_NODE_MODULES=$NODE_MODULES WSC_JS_DEFLATE=${WSCLIENTS_JS_DEFLATE:-1}
		if [[ $client == js ]]; then
			node "$HERE/session.mjs" 2>&1 | tee -a "$OUT" || rc=$?
		else
			"$PY" "$HERE/session.py" 2>&1 | tee -a "$OUT" || rc=$?
		fi
		say "$client [$mode] done in $((SECONDS - t)) s"
		status_info "$client [$mode]" "$edge"
		# after a SIGKILL step: HA is back and hass-edge resynced before the next session
		bash "$PEER" wait-running "$HA_PEER_DIR" 60 >/dev/null 2>&1 || die "the HA peer is not RUNNING after $client [$mode]"
		if [[ $TARGET == edge ]]; then for name in "${!EDGE_PID[@]}"; do wait_edge "$name"; done; fi
	done
done

if [[ $TARGET == edge ]]; then
	"$PY" "$HERE/helper.py" origin "${EDGE_URL[tok]}" 2>&1 | tee -a "$OUT" || true
	for name in "${!EDGE_PID[@]}"; do
		if kill -0 "${EDGE_PID[$name]}" 2>/dev/null; then
			echo "PASS hass-edge ($name) still running after the sessions" | tee -a "$OUT"
		else
			echo "FAIL hass-edge ($name) still running after the sessions: it exited (log: $LOGDIR/wsclients-edge-$name.log)" | tee -a "$OUT"
		fi
	done
fi
[[ -z ${OUT_DIR:-} ]] || cp "$OUT" "$OUT_DIR/wsclients-output.txt"
passed=$(grep -c '^PASS ' "$OUT" || true)
failed=$(grep -c '^FAIL ' "$OUT" || true)
say "HA $HA_VERSION, target $TARGET: done in $((SECONDS - T0)) s"
echo "$passed passed, $failed failed"
((failed == 0 && passed > 0 && rc == 0))
