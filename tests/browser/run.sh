#!/usr/bin/env bash
# The real-browser test of hass-edge (issue #3); see tests/browser/README.md.
#
#   HA_PEER_DIR=<dir of a running tests/ha-peer peer> OUT_DIR=<dir> bash tests/browser/run.sh
#
# Optional: EDGE_BIN (default target/debug/hass-edge, relative to the repository root),
# CHROMIUM (default /usr/bin/chromium). Writes $OUT_DIR/browser-stream.png (the kiosk right after
# the change made in HA arrived), $OUT_DIR/browser-final.png (at the end) (and, on failure,
# $OUT_DIR/browser-failure.png) and $OUT_DIR/browser-daemon.log. Exit 0 = pass.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
T0=$SECONDS
# shellcheck source-path=SCRIPTDIR source=../lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

say() { printf 'browser: %s\n' "$*"; }
die() { printf 'browser: FAIL: %s\n' "$*" >&2; exit 1; }

# ---------- prerequisites ----------
[[ -n ${HA_PEER_DIR:-} ]] || die "HA_PEER_DIR is not set (the DIR of 'tests/ha-peer/ha-peer.sh start VERSION DIR PORT')"
[[ -n ${OUT_DIR:-} ]] || die "OUT_DIR is not set (where the screenshot goes)"
[[ -s $HA_PEER_DIR/url && -s $HA_PEER_DIR/token ]] || die "$HA_PEER_DIR has no url/token: is the HA peer started?"
resolve_edge_bin
[[ -x $EDGE_BIN ]] || die "no hass-edge binary at $EDGE_BIN (cargo build, or set EDGE_BIN)"
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
[[ -x $CHROMIUM ]] || die "no Chromium at $CHROMIUM (Debian package chromium)"
for tool in node npm python3 curl; do
	command -v "$tool" >/dev/null || die "$tool is not installed"
done
HA_PEER_DIR=$(cd "$HA_PEER_DIR" && pwd)
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
rm -f "$OUT_DIR/browser-stream.png" "$OUT_DIR/browser-final.png" "$OUT_DIR/browser-failure.png"
HA_URL=$(cat "$HA_PEER_DIR/url")
curl -fsS -o /dev/null --max-time 5 -H "Authorization: Bearer $(cat "$HA_PEER_DIR/token")" "$HA_URL/api/" ||
	die "Home Assistant at $HA_URL does not answer GET /api/ with its token"

# ---------- playwright-core (no browser download: Debian's Chromium is used) ----------
# Installed once per package-lock.json; a later run only compares a checksum.
npm_ci_stamped "$HERE" playwright-core "$OUT_DIR/browser-npm.log" || die "npm ci in tests/browser failed"
[[ -z $NPM_CI_SECONDS ]] ||
	say "npm ci: playwright-core $(node -p "require('$HERE/node_modules/playwright-core/package.json').version") installed in $NPM_CI_SECONDS s"

# ---------- processes and their cleanup ----------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/hass-edge-browser.XXXXXX")
EDGE_PID='' PAGE_PID='' NODE_PID=''

cleanup() {
	stop_pid "$NODE_PID" # closes its Chromium
	kill_chromiums "$WORK/profile" # one that outlived its driver (node killed hard)
	stop_pid "$EDGE_PID"
	stop_pid "$PAGE_PID"
	if ((CLEANUP_RC != 0)); then
		[[ ! -s $OUT_DIR/browser-daemon.log ]] || { echo "--- hass-edge log (tail) ---" >&2; tail -n 30 "$OUT_DIR/browser-daemon.log" >&2; }
		[[ ! -s $WORK/page-server.log ]] || { echo "--- page server log (tail) ---" >&2; tail -n 15 "$WORK/page-server.log" >&2; }
	fi
	rm -rf "$WORK"
}
on_exit cleanup

API_PORT=$(free_port 127.0.0.1)
PAGE_PORT=$(free_port 127.0.0.1)
while [[ $PAGE_PORT == "$API_PORT" ]]; do PAGE_PORT=$(free_port 127.0.0.1); done
API_BASE=http://127.0.0.1:$API_PORT
PAGE_BASE=http://localhost:$PAGE_PORT   # the allowed origin
OTHER_BASE=http://127.0.0.1:$PAGE_PORT  # the same server under an origin not in cors_origins

# ---------- hass-edge ----------
(umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(24))' >"$WORK/api-token")
cat >"$WORK/config.toml" <<EOF
[ha]
url = "$HA_URL"
token_file = "$HA_PEER_DIR/token"

[http]
listen = "127.0.0.1:$API_PORT"
api_token_file = "$WORK/api-token"
cors_origins = ["$PAGE_BASE"]

[dbus]
bus = "none"
EOF
# Keep a saved-states file (builds that have [cache] persist) out of /var/lib.
if "$EDGE_BIN" check-config --config "$WORK/config.toml" 2>/dev/null | grep -q '^state_file'; then
	printf '\n[cache]\nstate_file = "%s"\n' "$WORK/states.json" >>"$WORK/config.toml"
fi
spawn_edge "$EDGE_BIN" "$WORK/config.toml" "$OUT_DIR/browser-daemon.log"
EDGE_PID=$!
wait_health "$EDGE_PID" "$API_BASE" || case $? in
	1) die "hass-edge exited at start (log: $OUT_DIR/browser-daemon.log)" ;;
	*) die "hass-edge's /health is not 200 after 30 s (last: $HEALTH_CODE)" ;;
esac
say "hass-edge live on $API_BASE (cors_origins = [\"$PAGE_BASE\"]) after $((SECONDS - T0)) s"

# ---------- the page, on another origin ----------
python3 -m http.server "$PAGE_PORT" --bind 127.0.0.1 --directory "$HERE/page" >"$WORK/page-server.log" 2>&1 &
PAGE_PID=$!
for ((i = 0; ; i++)); do
	kill -0 "$PAGE_PID" 2>/dev/null || die "the page server (python3 -m http.server) exited"
	curl -fs -o /dev/null --max-time 2 "$PAGE_BASE/index.html" && break
	((i < 100)) || die "the page server does not answer on $PAGE_BASE after 10 s"
	sleep 0.1
done

# ---------- the browser ----------
mkdir -m 700 "$WORK/profile"
(
	cd "$HERE"
	export API_BASE PAGE_BASE OTHER_BASE OUT_DIR HA_URL CHROMIUM
	export API_TOKEN_FILE=$WORK/api-token HA_TOKEN_FILE=$HA_PEER_DIR/token PROFILE_DIR=$WORK/profile
	# Chromium's crash-report database goes under XDG_CONFIG_HOME: keep it in WORK too.
	export XDG_CONFIG_HOME=$WORK/xdg
	exec node test.mjs
) &
NODE_PID=$!
rc=0
wait "$NODE_PID" || rc=$?
NODE_PID=''
((rc == 0)) || die "the browser test failed (exit $rc)"
say "done in $((SECONDS - T0)) s"
