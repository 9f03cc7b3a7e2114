#!/usr/bin/env bash
# Home Assistant's own frontend in Chromium through hass-edge (issue 15); see tests/frontend/README.md.
#
#   HA_PEER_DIR=<dir of a running tests/ha-peer peer> OUT_DIR=<dir> bash tests/frontend/run.sh
#
# Optional: EDGE_BIN (default target/debug/hass-edge, relative to the repository root),
# SCENARIOS (default "password api-token dashboard trusted no-xff read-only", see test.mjs), EDGE_LOG_LEVEL (hass-edge's [log] level, default info),
# CHROMIUM (default /usr/bin/chromium), FRONTEND_TARGET=ha (a control run of the browser steps
# directly against HA, without hass-edge: the password scenario only).
# The trusted and no-xff scenarios need the peer started with `ha-peer.sh start ... --trusted-proxy`;
# a peer started without it is restarted with it for them and restarted as it was at the end.
# Prints "frontend: N passed, M failed"; exit 0 = all passed.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
T0=$SECONDS
# shellcheck source-path=SCRIPTDIR source=../lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh" # also PEER, tests/ha-peer/ha-peer.sh

say() { printf 'frontend: %s\n' "$*"; }
die() { printf 'frontend: FAIL: %s\n' "$*" >&2; exit 1; }

# ---------- prerequisites ----------
[[ -n ${HA_PEER_DIR:-} ]] || die "HA_PEER_DIR is not set (the DIR of 'tests/ha-peer/ha-peer.sh start VERSION DIR PORT')"
[[ -n ${OUT_DIR:-} ]] || die "OUT_DIR is not set (where screenshots and logs go)"
[[ -s $HA_PEER_DIR/url && -s $HA_PEER_DIR/token && -s $HA_PEER_DIR/version && -s $HA_PEER_DIR/venv ]] ||
	die "$HA_PEER_DIR has no url/token/version/venv: is the HA peer started?"
TARGET=${FRONTEND_TARGET:-edge}
[[ $TARGET == edge || $TARGET == ha ]] || die "FRONTEND_TARGET must be edge or ha, not $TARGET"
resolve_edge_bin
[[ $TARGET == ha || -x $EDGE_BIN ]] || die "no hass-edge binary at $EDGE_BIN (cargo build, or set EDGE_BIN)"
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
[[ -x $CHROMIUM ]] || die "no Chromium at $CHROMIUM (Debian package chromium)"
for tool in node npm python3 curl ss pgrep; do
	command -v "$tool" >/dev/null || die "$tool is not installed"
done
HA_PEER_DIR=$(cd "$HA_PEER_DIR" && pwd)
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
rm -f "$OUT_DIR"/frontend-*.png "$OUT_DIR"/frontend-*-requests.txt "$OUT_DIR"/frontend-*-daemon.log
HA_URL=$(cat "$HA_PEER_DIR/url")
HA_PORT=${HA_URL##*:}
HA_VERSION=$(cat "$HA_PEER_DIR/version")
HA_PY=$(cat "$HA_PEER_DIR/venv")/bin/python
[[ -x $HA_PY ]] || die "the peer's Python $HA_PY is missing"
python_lib # ha_helper.py (run here and by test.mjs) imports tests/lib/ha_ws.py
curl -fsS -o /dev/null --max-time 5 -H "Authorization: Bearer $(cat "$HA_PEER_DIR/token")" "$HA_URL/api/" ||
	die "Home Assistant at $HA_URL does not answer GET /api/ with its token"
SCENARIOS=${SCENARIOS:-password api-token dashboard trusted no-xff read-only}
for s in $SCENARIOS; do
	[[ $s == password || $s == api-token || $s == dashboard || $s == trusted || $s == no-xff || $s == read-only ]] ||
		die "unknown scenario $s (password, api-token, dashboard, trusted, no-xff, read-only)"
done
if [[ $TARGET == ha && $SCENARIOS != password ]]; then
	say "FRONTEND_TARGET=ha: api-token, dashboard, trusted, no-xff and read-only need hass-edge between the browser and HA; running the password scenario only"
	SCENARIOS=password
fi

# ---------- playwright-core (no browser download: Debian's Chromium is used) ----------
npm_ci_stamped "$HERE" playwright-core "$OUT_DIR/frontend-npm.log" || die "npm ci in tests/frontend failed"
[[ -z $NPM_CI_SECONDS ]] ||
	say "npm ci: playwright-core $(node -p "require('$HERE/node_modules/playwright-core/package.json').version") installed in $NPM_CI_SECONDS s"

# ---------- processes and their cleanup ----------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/hass-edge-frontend.XXXXXX")
EDGE_PID='' NODE_PID='' RESTORE_PEER=0 EDGE_LOG='' EDGE_API_TOKEN_FILE=''

# The peer as it was found (without --trusted-proxy), if this run restarted it with the option.
restore_peer() {
	((RESTORE_PEER)) || return 0
	RESTORE_PEER=0
	say "restarting the HA peer as it was (without --trusted-proxy)"
	peer_restart "$OUT_DIR/frontend-peer.log" ||
		{ tail -n 20 "$OUT_DIR/frontend-peer.log" >&2; printf 'frontend: FAIL: could not restart the HA peer in %s as it was\n' "$HA_PEER_DIR" >&2; return 1; }
}
cleanup() {
	stop_pid "$NODE_PID" # closes its Chromium
	kill_chromiums "$WORK/profile-" # one that outlived its driver
	stop_pid "$EDGE_PID"
	restore_peer || CLEANUP_RC=1
	rm -rf "$WORK"
}
on_exit cleanup

# start_edge SCENARIO ADDRESS XFF [token|read-only|dashboards]: hass-edge on ADDRESS:<free port>,
# [http] x_forwarded_for = XFF, and an api_token_file, allow_service_calls = false or
# [dashboards] url_paths = ["lovelace"] (HA's default dashboard's allowlist); sets EDGE_PID,
# BASE, EDGE_LOG, EDGE_API_TOKEN_FILE
start_edge() {
	local scenario=$1 addr=$2 xff=$3 token=${4:-} port hostport
	port=$(free_port "$addr") || die "cannot bind $addr (needed for the $scenario scenario)"
	hostport=$addr:$port
	[[ $addr != *:* ]] || hostport=[$addr]:$port
	BASE=http://$hostport
	EDGE_LOG=$OUT_DIR/frontend-$scenario-daemon.log
	cat >"$WORK/$scenario.toml" <<EOF
[ha]
url = "$HA_URL"
token_file = "$HA_PEER_DIR/token"

[http]
listen = "$hostport"
x_forwarded_for = $xff

[dbus]
bus = "none"

[cache]
state_file = "$WORK/$scenario-states.json"

[log]
level = "${EDGE_LOG_LEVEL:-info}"
EOF
	EDGE_API_TOKEN_FILE=''
	if [[ $token == token ]]; then
		EDGE_API_TOKEN_FILE=$WORK/$scenario-api-token
		(umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(24))' >"$EDGE_API_TOKEN_FILE")
		sed -i "/^x_forwarded_for = /a api_token_file = \"$EDGE_API_TOKEN_FILE\"" "$WORK/$scenario.toml"
	elif [[ $token == read-only ]]; then
		sed -i "/^x_forwarded_for = /a allow_service_calls = false" "$WORK/$scenario.toml"
	elif [[ $token == dashboards ]]; then
		printf '\n[dashboards]\nurl_paths = ["lovelace"]\n' >>"$WORK/$scenario.toml"
	fi
	spawn_edge "$EDGE_BIN" "$WORK/$scenario.toml" "$EDGE_LOG"
	EDGE_PID=$!
	wait_health "$EDGE_PID" "$BASE" || case $? in
		1) tail -n 20 "$EDGE_LOG" >&2; die "hass-edge exited at start (log: $EDGE_LOG)" ;;
		*) die "hass-edge's /health on $BASE is not 200 after 30 s (last: $HEALTH_CODE)" ;;
	esac
	say "hass-edge live on $BASE (x_forwarded_for = $xff${EDGE_API_TOKEN_FILE:+, api_token_file}$([[ $token == read-only ]] && echo ', allow_service_calls = false')$([[ $token == dashboards ]] && echo ', [dashboards] url_paths = ["lovelace"]'); HA $HA_VERSION at $HA_URL)"
}

# run_browser SCENARIO: test.mjs against $BASE; 0 = pass
run_browser() {
	local scenario=$1 rc=0
	mkdir -m 700 "$WORK/profile-$scenario"
	(
		cd "$HERE"
		export SCENARIO=$scenario BASE HA_URL HA_TOKEN_FILE=$HA_PEER_DIR/token HA_PY OUT_DIR CHROMIUM EDGE_API_TOKEN_FILE
		DIRECT=$([[ $TARGET == ha ]] && echo 1 || echo 0)
		export DASHBOARD VIEW PROFILE_DIR=$WORK/profile-$scenario DIRECT
		# HA restarts under the open dashboard in the password scenario (HA_RESTART=0: not at all)
		# hass-edge keeps HA's frontend assets in $WORK/assets (beside its state file), shared by the
		# scenarios of this run: empty for the first, filled by the first browser for the others
		# shellcheck disable=SC2015 # echo does not fail
		ASSETS=$([[ $TARGET == ha ]] && echo '' || { [[ -d $WORK/assets && -n $(ls -A "$WORK/assets" 2>/dev/null) ]] && echo warm || echo cold; })
		HA_RESTART=$([[ $scenario == password && ${HA_RESTART:-1} == 1 ]] && echo 1 || echo 0)
		export ASSETS PEER_SCRIPT=$PEER HA_PEER_DIR HA_RESTART
		# dashboard: the default dashboard's entities, and how to start the peer again after stopping it
		PEER_START_ARGS=$(peer_start_args)
		export DASH_ENTITIES HA_VERSION HA_PORT PEER_START_ARGS
		# Chromium's crash-report database goes under XDG_CONFIG_HOME: keep it in WORK too.
		export XDG_CONFIG_HOME=$WORK/xdg
		exec node test.mjs
	) &
	NODE_PID=$!
	wait "$NODE_PID" || rc=$?
	NODE_PID=''
	kill_chromiums "$WORK/profile-"
	return "$rc"
}

# hass-edge's established connections to HA's port (its subscription, REST keep-alive, and any
# forward or tunnel still open)
edge_upstreams() {
	ss -tnpH state established "( dport = :$HA_PORT )" 2>/dev/null | grep -c "pid=$EDGE_PID," || true
}
# hass-edge's own count of what it holds open to HA for clients: session links, forwards, tunnels
edge_held() {
	local auth=()
	[[ -z $EDGE_API_TOKEN_FILE ]] || auth=(-H "Authorization: Bearer $(cat "$EDGE_API_TOKEN_FILE")")
	curl -gs --max-time 2 "${auth[@]}" "$BASE/status" | python3 -c '
import json, sys
s = json.load(sys.stdin)
print(s["websocket_api"]["links_open"] + s["forwarding"]["forwards_open"] + s["forwarding"]["tunnels_open"])' 2>/dev/null || echo '?'
}
# upstreams_closed BEFORE: after the browser is gone, within 10 s, hass-edge holds nothing open to
# HA for it (its /status: no session link, forward or tunnel), and its TCP connections to HA are
# no more than before plus the REST client's idle keep-alive pool (at most 4, rest.rs; ureq
# closes an idle one only when the pool is next used, so one from a token check may stay)
upstreams_closed() {
	local before=$1 now held i
	[[ -n $before ]] || return 0
	for ((i = 0; i < 100; i++)); do
		now=$(edge_upstreams)
		held=$(edge_held)
		if [[ $held == 0 ]] && ((now <= before + 4)); then
			say "hass-edge's connections to HA: $before before the browser, $now after it closed (none held for clients)"
			return 0
		fi
		sleep 0.1
	done
	printf 'frontend: FAIL: 10 s after the browser closed, hass-edge holds %s session link(s), forward(s) or tunnel(s) to HA, and %s connection(s) (%s before it came):\n' "$held" "$now" "$before" >&2
	ss -tnpH state established "( dport = :$HA_PORT )" 2>/dev/null | grep "pid=$EDGE_PID," >&2 || true
	return 1
}

peer_trusts_proxy() { grep -q '^  use_x_forwarded_for: true' "$HA_PEER_DIR/configuration.yaml"; }
peer_start_args() { # how the peer was started: --trusted-proxy or nothing
	if peer_trusts_proxy; then echo --trusted-proxy; fi
}

# ---------- Home Assistant: onboarding finished, the dashboard (directly, admin token) ----------
setup=$("$HA_PY" "$HERE/ha_helper.py" setup --url "$HA_URL" --token-file "$HA_PEER_DIR/token") ||
	die "could not prepare Home Assistant (ha_helper.py setup)"
json_get() { python3 -c 'import json, sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; } # JSON KEY: its value
DASHBOARD=$(json_get "$setup" dashboard)
VIEW=$(json_get "$setup" view_path)
say "HA $HA_VERSION ready: dashboard /$DASHBOARD/$VIEW ($setup)"

# dashboard: HA's default dashboard (`lovelace`) gets an entities card of these before hass-edge
# starts (hass-edge's allowlist is read at start); test.mjs adds an entity card of
# input_select.house_mode later, through HA
DASH_ENTITIES=input_boolean.kitchen,light.kitchen,input_boolean.garage_open,sensor.living_temperature
lovelace() { "$HA_PY" "$HERE/ha_helper.py" lovelace "$@" --url "$HA_URL" --token-file "$HA_PEER_DIR/token"; }

# ---------- the scenarios ----------
passed=0 failed=0 failures=()
for scenario in $SCENARIOS; do
	ts=$SECONDS
	if [[ $scenario == trusted || $scenario == no-xff ]] && ! peer_trusts_proxy; then
		say "restarting the HA peer with --trusted-proxy (X-Forwarded-For from 127.0.0.1 trusted, trusted_networks ::1)"
		RESTORE_PEER=1
		peer_restart "$OUT_DIR/frontend-peer.log" --trusted-proxy || { tail -n 20 "$OUT_DIR/frontend-peer.log" >&2; die "could not restart the HA peer with --trusted-proxy"; }
	fi
	if [[ $TARGET == ha ]]; then
		BASE=$HA_URL
		say "[$scenario] control run: the browser goes to HA itself ($BASE), no hass-edge"
	elif [[ $scenario == trusted ]]; then
		# the browser at [::1]; hass-edge's own connection to HA comes from 127.0.0.1, so HA can
		# see ::1 only in hass-edge's X-Forwarded-For (127.0.0.2 would not do: Linux connects to
		# it from 127.0.0.1, the source address of the 127.0.0.0/8 route)
		start_edge "$scenario" ::1 true
	elif [[ $scenario == no-xff ]]; then
		# the control of trusted: the same without X-Forwarded-For must get the password form
		start_edge "$scenario" ::1 false
	elif [[ $scenario == api-token ]]; then
		start_edge "$scenario" 127.0.0.1 false token
	elif [[ $scenario == read-only ]]; then
		start_edge "$scenario" 127.0.0.1 false read-only
	elif [[ $scenario == dashboard ]]; then
		saved=$(lovelace --entities "$DASH_ENTITIES") || die "could not save HA's default dashboard (ha_helper.py lovelace)"
		if [[ $(json_get "$saved" shown) != True ]]; then
			# HA 2026.x: its frontend shows the saved default dashboard only once HA has made it the
			# dashboard `lovelace` (and the default panel) at its start, as after a user's upgrade
			# (ha_helper.py lovelace); until then it opens /home/overview
			say "[dashboard] HA $HA_VERSION's frontend does not show the saved default dashboard until HA has moved it into the dashboard 'lovelace' at its start: restarting the peer"
			# shellcheck disable=SC2046 # no word, or --trusted-proxy
			peer_restart "$OUT_DIR/frontend-peer.log" $(peer_start_args) || { tail -n 20 "$OUT_DIR/frontend-peer.log" >&2; die "could not restart the HA peer"; }
			saved=$(lovelace --entities "$DASH_ENTITIES") || die "could not save HA's default dashboard (ha_helper.py lovelace)"
			[[ $(json_get "$saved" shown) == True ]] || die "HA's frontend does not show the saved default dashboard after HA's restart either: $saved"
		fi
		say "[dashboard] HA's default dashboard saved: $saved"
		start_edge "$scenario" 127.0.0.1 false dashboards
	else
		start_edge "$scenario" 127.0.0.1 false
	fi
	ups0=''
	if [[ -n $EDGE_PID ]]; then sleep 0.5; ups0=$(edge_upstreams); fi
	if run_browser "$scenario" && upstreams_closed "$ups0"; then
		passed=$((passed + 1))
		say "[$scenario] passed in $((SECONDS - ts)) s"
	else
		failed=$((failed + 1))
		failures+=("$scenario")
		if [[ -n $EDGE_LOG && -s $EDGE_LOG ]]; then
			echo "--- hass-edge log (tail; all of it in $EDGE_LOG) ---" >&2
			tail -n 40 "$EDGE_LOG" >&2
		fi
		say "[$scenario] FAILED after $((SECONDS - ts)) s"
	fi
	stop_pid "$EDGE_PID"
	EDGE_PID='' EDGE_LOG=''
	if [[ $scenario == dashboard ]]; then
		# HA's default dashboard as it was (generated by HA); the peer may have been restarted
		# (test.mjs stops and starts the peer; a failure in between may have left it stopped)
		# shellcheck disable=SC2046 # no word, or --trusted-proxy
		if ! { peer_ensure_running "$OUT_DIR/frontend-peer.log" $(peer_start_args) && lovelace --delete >/dev/null; }; then
			say "could not remove HA's default dashboard config again"
			failed=$((failed + 1))
		fi
	fi
done
restore_peer || failed=$((failed + 1))

say "done in $((SECONDS - T0)) s${failures[*]:+ (failed: ${failures[*]})}"
echo "frontend: $passed passed, $failed failed"
((failed == 0))
