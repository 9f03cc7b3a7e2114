#!/usr/bin/env bash
# Real Home Assistant clients against HA and through hass-edge, results compared (issue 15).
# See tests/clients/README.md.
#
#   HA_PEER_DIR=<dir of a running tests/ha-peer peer> bash tests/clients/run.sh
#
# Optional: EDGE_BIN (default target/debug/hass-edge, relative to the repository root);
# CLIENTS_TARGET=ha (the self-check: every call made against HA twice, no hass-edge);
# CLIENTS_SECTIONS (default api-sync,api-async,api-ws-sync,api-ws-async,cli,errors,config,auth); OUT_DIR (keeps the daemons' logs and
# the full output there); CLIENTS_VERBOSE=1 (print HA's answer to every call).
#
# Starts three hass-edge daemons on free loopback ports, each with its own config and state file
# in a temporary directory: the main one (loopback-open, every domain mirrored), a read-only one
# (allow_service_calls = false, an API token) and one whose HA is a closed port. Prints one
# PASS/FAIL line per check and `N passed, M failed`; exit 0 only when every check passed.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
T0=$SECONDS
# shellcheck source-path=SCRIPTDIR source=../lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

say() { printf 'clients: %s\n' "$*" >&2; }
die() { printf 'clients: FAIL: %s\n' "$*" >&2; exit 1; }

# ---------- prerequisites ----------
[[ -n ${HA_PEER_DIR:-} ]] || die "HA_PEER_DIR is not set (the DIR of 'tests/ha-peer/ha-peer.sh start VERSION DIR PORT')"
[[ -s $HA_PEER_DIR/url && -s $HA_PEER_DIR/token ]] || die "$HA_PEER_DIR has no url/token: is the HA peer started?"
HA_PEER_DIR=$(cd "$HA_PEER_DIR" && pwd)
TARGET=${CLIENTS_TARGET:-edge}
[[ $TARGET == edge || $TARGET == ha ]] || die "CLIENTS_TARGET must be edge or ha, not $TARGET"
if [[ $TARGET == edge ]]; then
	resolve_edge_bin
	[[ -x $EDGE_BIN ]] || die "no hass-edge binary at $EDGE_BIN (cargo build, or set EDGE_BIN)"
fi
for tool in python3 curl; do
	command -v "$tool" >/dev/null || die "$tool is not installed"
done
HA_URL=$(cat "$HA_PEER_DIR/url")
curl -fsS -o /dev/null --max-time 5 -H "Authorization: Bearer $(cat "$HA_PEER_DIR/token")" "$HA_URL/api/" ||
	die "Home Assistant at $HA_URL does not answer GET /api/ with its token"
HA_VERSION=$(cat "$HA_PEER_DIR/version" 2>/dev/null || echo '?')
# The auth checks make HA log ~10 refused requests per run (a bad token, a non-admin user on admin
# routes): a peer started with --ip-ban (5 attempts) would ban 127.0.0.1 half-way.
if grep -qs 'ip_ban_enabled: true' "$HA_PEER_DIR/configuration.yaml"; then
	die "$HA_PEER_DIR runs with ip_ban_enabled (--ip-ban): its 5-attempt ban would cut this run short; use a peer without --ip-ban"
fi

# ---------- the clients (cached venv; instant when installed) ----------
VENV=$(bash "$HERE/install.sh") || die "tests/clients/install.sh failed"
PY=$VENV/bin/python
python_lib # compare.py imports tests/lib/ha_ws.py

# ---------- processes and their cleanup ----------
work_dirs hass-edge-clients || die "could not make the temporary directory or OUT_DIR"
declare -A EDGE_PID=() EDGE_PORT=() # the hass-edge daemons by name and their ports

cleanup() {
	local name
	for name in "${!EDGE_PID[@]}"; do stop_pid "${EDGE_PID[$name]}"; done
	if ((CLEANUP_RC != 0)); then
		for name in "${!EDGE_PID[@]}"; do
			[[ ! -s $LOGDIR/clients-edge-$name.log ]] || {
				echo "--- hass-edge ($name) log (tail) ---" >&2
				tail -n 15 "$LOGDIR/clients-edge-$name.log" >&2
			}
		done
	fi
	rm -rf "$WORK"
}
on_exit cleanup

# start_edge NAME HA_URL EXTRA_HTTP_TOML: writes WORK/NAME/config.toml, starts the daemon, sets
# EDGE_PID[NAME] and EDGE_PORT[NAME]
start_edge() {
	local name=$1 ha_url=$2 extra=$3 port dir=$WORK/$1
	port=$(free_port 127.0.0.1)
	mkdir -p "$dir"
	edge_mirror_config "$ha_url" "$HA_PEER_DIR/token" "127.0.0.1:$port" "$dir/states.json" "$extra" >"$dir/config.toml"
	spawn_edge "$EDGE_BIN" "$dir/config.toml" "$LOGDIR/clients-edge-$name.log"
	EDGE_PID[$name]=$!
	EDGE_PORT[$name]=$port
}

# wait_edge NAME WANT: WANT=200 waits for /health 200 (live and synced), WANT=any for any HTTP answer
wait_edge() {
	local name=$1 want=$2
	wait_health "${EDGE_PID[$name]}" "http://127.0.0.1:${EDGE_PORT[$name]}" "$want" || case $? in
		1) die "hass-edge ($name) exited at start (log: $LOGDIR/clients-edge-$name.log)" ;;
		*) die "hass-edge ($name): /health is not $want after 30 s (last: $HEALTH_CODE)" ;;
	esac
}

ARGS=(--ha-url "$HA_URL" --ha-token-file "$HA_PEER_DIR/token" --sections "${CLIENTS_SECTIONS:-api-sync,api-async,api-ws-sync,api-ws-async,cli,errors,config,auth}")
if [[ $TARGET == edge ]]; then
	(umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(24))' >"$WORK/api-token")
	closed=$(free_port 127.0.0.1) # nothing listens there: "HA unreachable"
	start_edge main "$HA_URL" ""
	start_edge ro "$HA_URL" "api_token_file = \"$WORK/api-token\"
allow_service_calls = false"
	start_edge down "http://127.0.0.1:$closed" ""
	start_edge tok "$HA_URL" "api_token_file = \"$WORK/api-token\""
	wait_edge main 200
	wait_edge ro 200
	wait_edge down any
	wait_edge tok 200
	say "HA $HA_VERSION at $HA_URL; hass-edge $("$EDGE_BIN" --version 2>/dev/null | head -1) live on :${EDGE_PORT[main]} (read-only :${EDGE_PORT[ro]}, HA unreachable :${EDGE_PORT[down]}) after $((SECONDS - T0)) s"
	ARGS+=(--target-url "http://127.0.0.1:${EDGE_PORT[main]}" --target-label hass-edge
		--edge-readonly "http://127.0.0.1:${EDGE_PORT[ro]}" --edge-api-token-file "$WORK/api-token"
		--edge-unreachable "http://127.0.0.1:${EDGE_PORT[down]}")
else
	say "self-check: every call against HA $HA_VERSION at $HA_URL twice"
	ARGS+=(--target-url "$HA_URL" --target-label HA-again)
fi

# ---------- the comparison ----------
rc=0
"$PY" "$HERE/compare.py" "${ARGS[@]}" 2>&1 | tee "$WORK/out.txt" || rc=$?
if [[ $TARGET == edge && -n ${CLIENTS_TOKEN_SECTIONS-api-sync,cli,errors,ws-token} ]]; then
	# The REST clients again, now sending hass-edge's API token (a hass-edge with api_token_file):
	# hass-edge forwards with its own HA token, so HA must answer as to the HA token; in a
	# WebSocket tunnel hass-edge swaps the API token in HA's auth message for its HA token
	# (README, Credentials), so hass-cli's WebSocket commands too, and ws-token checks it.
	"$PY" "$HERE/compare.py" --ha-url "$HA_URL" --ha-token-file "$HA_PEER_DIR/token" \
		--target-url "http://127.0.0.1:${EDGE_PORT[tok]}" --target-token-file "$WORK/api-token" --target-label "hass-edge (API token)" \
		--sections "${CLIENTS_TOKEN_SECTIONS-api-sync,cli,errors,ws-token}" --name-prefix "api-token: " 2>&1 | tee -a "$WORK/out.txt" || rc=$?
fi
[[ -z ${OUT_DIR:-} ]] || cp "$WORK/out.txt" "$OUT_DIR/clients-output.txt"
if [[ $TARGET == edge ]]; then # the daemons must still be running (none crashed under the clients)
	for name in main ro down tok; do
		if kill -0 "${EDGE_PID[$name]}" 2>/dev/null; then
			echo "PASS hass-edge ($name) still running after the clients" | tee -a "$WORK/out.txt"
		else
			echo "FAIL hass-edge ($name) still running after the clients: it exited (log: $LOGDIR/clients-edge-$name.log)" | tee -a "$WORK/out.txt"
		fi
	done
fi
if [[ $TARGET == edge ]]; then
	# Nothing the clients did should make hass-edge warn: e.g. "could not read the states HA answered"
	# means a forwarded write's answer did not reach the mirror. (The "down" daemon warns by design.)
	for name in main ro tok; do
		warns=$(grep -E '^[^ ]+ (WARN|ERROR) ' "$LOGDIR/clients-edge-$name.log" || true)
		if [[ -z $warns ]]; then
			echo "PASS hass-edge ($name) logged no WARN/ERROR during the clients" | tee -a "$WORK/out.txt"
		else
			echo "FAIL hass-edge ($name) logged no WARN/ERROR during the clients: $(wc -l <<<"$warns") lines, first: $(head -n 3 <<<"$warns" | tr '\n' '|')" | tee -a "$WORK/out.txt"
		fi
	done
fi
passed=$(grep -c '^PASS ' "$WORK/out.txt" || true)
failed=$(grep -c '^FAIL ' "$WORK/out.txt" || true)
say "HA $HA_VERSION, target $TARGET: done in $((SECONDS - T0)) s"
echo "$passed passed, $failed failed"
((failed == 0 && passed > 0 && rc == 0))
