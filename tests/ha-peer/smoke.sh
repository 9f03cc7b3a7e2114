#!/usr/bin/env bash
# smoke.sh VERSION PORT [DIR] — end-to-end check of the test peer: install,
# start (onboarding), REST/WS checks (smoke.py), restart, hup, kill, start
# again (auth reused), stop; no process may be left.  DIR defaults to a new
# temporary directory (removed at the end).  Prints "N passed, M failed".
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PEER=$HERE/ha-peer.sh
[[ $# -ge 2 ]] || { echo "usage: $0 VERSION PORT [DIR]" >&2; exit 2; }
VERSION=$1 PORT=$2
if [[ -n ${3:-} ]]; then
	DIR=$3 KEEP=1
else
	DIR=$(mktemp -d "${TMPDIR:-/tmp}/ha-peer-smoke.XXXXXX") KEEP=0
fi
CACHE=${HASS_EDGE_PEER_CACHE:-$HOME/.cache/hass-edge}
PY=$CACHE/ha-$VERSION/bin/python

passed=0 failed=0
check() { # check DESCRIPTION COMMAND...
	local what=$1
	shift
	if "$@"; then
		passed=$((passed + 1))
		echo "  ok    $what"
	else
		failed=$((failed + 1))
		echo "  FAIL  $what"
	fi
}
ms() { date +%s%3N; }
secs() { local t=$(($(ms) - $1)); printf '%d.%03d' $((t / 1000)) $((t % 1000)); }
cleanup() {
	"$PEER" stop "$DIR" >/dev/null 2>&1 || true
	((KEEP)) || rm -rf "$DIR"
}
trap cleanup EXIT

http() { # http METHOD PATH [BODY] -> prints the status code
	local tok
	tok=$(cat "$DIR/token")
	curl -s -o /dev/null -w '%{http_code}' -m 10 -X "$1" -H "Authorization: Bearer $tok" \
		-H 'Content-Type: application/json' ${3:+-d "$3"} "$(cat "$DIR/url")$2"
}
no_procs() { ! pgrep -f -- "-c $DIR --skip-pip" >/dev/null && ! pgrep -f -- "_supervise $DIR " >/dev/null; }
hass_pid() { cat "$DIR/hass.pid" 2>/dev/null; }

echo "== smoke test of the HA test peer: $VERSION on 127.0.0.1:$PORT, dir $DIR"
t=$(ms)
check "install.sh $VERSION" "$HERE/install.sh" "$VERSION"
echo "     install: $(secs "$t") s"
t=$(ms)
check "install.sh $VERSION again (marker present)" "$HERE/install.sh" "$VERSION"
echo "     second install.sh: $(secs "$t") s"

t=$(ms)
out=$("$PEER" start "$VERSION" "$DIR" "$PORT")
rc=$?
echo "     start: $(secs "$t") s"
check "start $VERSION $DIR $PORT" test $rc -eq 0
((rc == 0)) || { echo "$passed passed, $((failed)) failed"; exit 1; }
check "start prints url= and token_file=" \
	test "$out" = "$(printf 'url=http://127.0.0.1:%s\ntoken_file=%s/token' "$PORT" "$(cd "$DIR" && pwd -P)")"
check "token file mode 600" test "$(stat -c %a "$DIR/token")" = 600
check "status -> 0" "$PEER" status "$DIR"

"$PY" "$HERE/smoke.py" "$DIR" | sed 's/^/  /'
r=("${PIPESTATUS[@]}")
check "smoke.py (REST + WS)" test "${r[0]}" -eq 0

check "POST /api/states/sensor.vanishing -> 201" test "$(http POST /api/states/sensor.vanishing '{"state":"1"}')" = 201
pid=$(hass_pid)
t=$(ms)
check "restart (homeassistant.restart)" "$PEER" restart "$DIR"
echo "     restart to RUNNING: $(secs "$t") s"
check "  hass pid changed ($pid -> $(hass_pid))" test "$(hass_pid)" != "$pid"
check "  sensor.vanishing is gone after the restart (404)" test "$(http GET /api/states/sensor.vanishing)" = 404
check "  light.kitchen there (200)" test "$(http GET /api/states/light.kitchen)" = 200

pid=$(hass_pid)
t=$(ms)
check "hup (SIGHUP)" "$PEER" hup "$DIR"
echo "     hup to RUNNING: $(secs "$t") s"
check "  hass pid changed ($pid -> $(hass_pid))" test "$(hass_pid)" != "$pid"
check "  status -> 0" "$PEER" status "$DIR"

check "kill (SIGKILL)" "$PEER" kill "$DIR"
sleep 2
check "  status -> 1 (stays down)" bash -c "! '$PEER' status '$DIR'"
check "  no hass / supervisor process left" no_procs
check "  wait-running fails fast when down" bash -c "! HASS_EDGE_PEER_TIMEOUT=5 '$PEER' wait-running '$DIR' 2>/dev/null"

t=$(ms)
out=$("$PEER" start "$VERSION" "$DIR" "$PORT" 2>&1)
check "start again (reuses the token, no onboarding)" \
	bash -c '[[ $0 != *onboard* && $0 == *RUNNING* ]]' "$out"
echo "     second start: $(secs "$t") s"
check "  GET /api/ with the old token -> 200" test "$(http GET /api/)" = 200
check "  start on a running DIR is a no-op" "$PEER" start "$VERSION" "$DIR" "$PORT"

t=$(ms)
check "stop" "$PEER" stop "$DIR"
echo "     stop: $(secs "$t") s"
check "  no hass / supervisor process left" no_procs
check "  status -> 1" bash -c "! '$PEER' status '$DIR'"
check "  stop again is a no-op" "$PEER" stop "$DIR"

echo "$passed passed, $failed failed"
((failed == 0))
