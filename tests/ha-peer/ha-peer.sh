#!/usr/bin/env bash
# ha-peer.sh — start/stop/restart a real Home Assistant on 127.0.0.1 for tests.
#
#   ha-peer.sh start VERSION DIR PORT [--ip-ban] [--trusted-proxy]
#   ha-peer.sh stop DIR            graceful stop (SIGTERM, SIGKILL after 20 s)
#   ha-peer.sh kill DIR            SIGKILL hass; it stays down until `start`
#   ha-peer.sh restart DIR         homeassistant.restart service; wait until RUNNING
#   ha-peer.sh hup DIR             SIGHUP to hass (HA restarts); wait until RUNNING
#   ha-peer.sh wait-running DIR    block until RUNNING
#   ha-peer.sh status DIR          exit 0 if running (RUNNING), 1 if not
#   ha-peer.sh unban DIR           forget IP bans (ip_bans.yaml) and restart if running
#
# `start` prints `url=http://127.0.0.1:PORT` and `token_file=DIR/token` on
# stdout; everything else goes to stderr.  See README.md.
#
# Environment: HASS_EDGE_PEER_CACHE (venvs, see install.sh),
#              HASS_EDGE_PEER_TIMEOUT (seconds to wait for RUNNING, default 120).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF=$HERE/$(basename "${BASH_SOURCE[0]}")
CACHE=${HASS_EDGE_PEER_CACHE:-$HOME/.cache/hass-edge}
TIMEOUT=${HASS_EDGE_PEER_TIMEOUT:-120}
STOP_GRACE=20

say() { printf '[ha-peer] %s\n' "$*" >&2; }
die() { printf '[ha-peer] error: %s\n' "$*" >&2; exit 1; }

usage() {
	sed -n '2,13p' "$SELF" | sed 's/^# \{0,1\}//' >&2
	exit 2
}

now_ms() { date +%s%3N; }
elapsed() { local t=$(($(now_ms) - $1)); printf '%d.%03d' $((t / 1000)) $((t % 1000)); }

# ---- processes -------------------------------------------------------------

# proc_alive PID NEEDLE: PID is a live (non-zombie) process whose command line
# contains NEEDLE (guards against a recycled pid).
proc_alive() {
	local pid=$1 needle=$2 stat cmd
	[[ $pid =~ ^[0-9]+$ ]] || return 1
	stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
	stat=${stat##*) }
	[[ ${stat%% *} != Z ]] || return 1
	cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
	[[ $cmd == *"$needle"* ]]
}

# the pid in DIR/<name>.pid if that process is alive
hass_pid() {
	local p
	p=$(cat "$DIR/hass.pid" 2>/dev/null) || return 1
	proc_alive "$p" "-c $DIR " && echo "$p"
}
supervisor_pid() {
	local p
	p=$(cat "$DIR/supervisor.pid" 2>/dev/null) || return 1
	proc_alive "$p" "_supervise $DIR " && echo "$p"
}

set_dir() {
	[[ -n ${1:-} ]] || usage
	[[ -d $1 ]] || die "no such peer directory: $1"
	DIR=$(cd "$1" && pwd -P)
}

load_peer() {
	# VERSION, VENV, URL of an existing DIR
	VERSION=$(cat "$DIR/version" 2>/dev/null) || die "$DIR has never been started (no $DIR/version)"
	URL=$(cat "$DIR/url" 2>/dev/null) || die "no $DIR/url"
	VENV=$(cat "$DIR/venv" 2>/dev/null) || VENV=$CACHE/ha-$VERSION
	[[ -x $VENV/bin/python ]] || die "venv $VENV missing: run $HERE/install.sh $VERSION"
}

# One lifecycle command at a time per DIR (fd 8; the supervisor must not
# inherit it: it is started with 8>&-).
lock_dir() {
	exec 8>"$DIR/.peer.lock"
	flock -w 300 8 || die "another ha-peer.sh command holds $DIR/.peer.lock"
}

peer_py() { "$VENV/bin/python" "$HERE/peer.py" "$@"; }
# peer.py commands that import homeassistant need HA's own Python: a peer in a
# Debian root (install.sh, HA >= 2025.5) has it as bin/ha-python, which runs
# it in the root; its bin/python is only the host's Python with aiohttp.
ha_py() {
	local py=$VENV/bin/python
	[[ -x $VENV/bin/ha-python ]] && py=$VENV/bin/ha-python
	"$py" "$HERE/peer.py" "$@"
}

log_size() { stat -c %s "$DIR/ha.log" 2>/dev/null || echo 0; }

log_tail() {
	say "---- last lines of $DIR/ha.log ----"
	tail -n "${1:-60}" "$DIR/ha.log" >&2 2>/dev/null || true
	say "-----------------------------------"
}

# PID exists and is not a zombie (a zombie waits for its parent — or, for an
# orphan, for init — to reap it; it is as good as gone)
pid_running() {
	kill -0 "$1" 2>/dev/null && [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) != Z ]]
}

wait_gone() { # wait_gone SECONDS PID... -> 0 when all gone
	local deadline=$(($(now_ms) + $1 * 1000)) p any
	shift
	while :; do
		any=0
		for p in "$@"; do
			[[ -n $p ]] || continue
			if pid_running "$p"; then any=1; fi
		done
		((any)) || return 0
		(($(now_ms) < deadline)) || return 1
		sleep 0.1
	done
}

group_alive() { # live (non-zombie) pids of process group $1
	local p
	for p in $(pgrep -g "$1" 2>/dev/null); do
		pid_running "$p" && echo "$p"
	done
}

# ---- the supervisor (runs detached, one per DIR) -----------------------------

cmd_supervise() {
	DIR=$1 VENV=$2
	local child="" sig=0 rc n=0
	echo $$ >"$DIR/supervisor.pid"
	slog() { printf '%s [ha-peer supervisor %s] %s\n' "$(date '+%F %T')" $$ "$*"; }
	on_term() {
		sig=1
		: >"$DIR/.peer-stop"
		if [[ -n $child ]]; then kill -TERM "$child" 2>/dev/null || true; fi
	}
	trap on_term TERM INT
	set +e
	while :; do
		if [[ -e $DIR/.peer-stop ]]; then slog "stop requested; not starting hass"; break; fi
		n=$((n + 1))
		slog "starting hass (run $n): $VENV/bin/hass -c $DIR --skip-pip"
		"$VENV/bin/hass" -c "$DIR" --skip-pip --log-no-color </dev/null &
		child=$!
		echo "$child" >"$DIR/hass.pid.tmp" && mv "$DIR/hass.pid.tmp" "$DIR/hass.pid"
		sig=0
		wait "$child"
		rc=$?
		# `wait` returns early when a trapped signal arrives: wait again
		while ((sig)); do sig=0; wait "$child"; rc=$?; done
		slog "hass (pid $child) exited with code $rc"
		child=""
		if ((rc == 100)) && [[ ! -e $DIR/.peer-stop ]]; then
			slog "exit code 100 = Home Assistant restart: starting it again"
			continue
		fi
		break
	done
	rm -f "$DIR/hass.pid"
	[[ $(cat "$DIR/supervisor.pid" 2>/dev/null) == "$$" ]] && rm -f "$DIR/supervisor.pid"
	slog "supervisor exits"
	exit 0
}

# ---- commands -----------------------------------------------------------------

# render_config VERSION PORT IPBAN [TRUSTED]: configuration.yaml for VERSION on stdout
# (install.sh reads it too, for the requirements).  TRUSTED=1 (--trusted-proxy):
# HA trusts X-Forwarded-For from 127.0.0.1 (a reverse proxy such as hass-edge on
# this machine) and logs in clients at ::1 without a password (trusted_networks,
# allow_bypass_login; listed first so that HA's login page starts with it).  ::1,
# not 127.0.0.2: Linux connects to 127.0.0.2 from 127.0.0.1 (the source address of
# the 127.0.0.0/8 route), so a client at 127.0.0.x would look like the proxy itself;
# a client of the proxy at [::1] is told apart only by X-Forwarded-For.
# Without TRUSTED the output is byte for byte the default.  HA 2025.10 brought the
# template light/switch/cover/lock under `template:` (default_entity_id);
# 2026.x refuses the legacy `platform: template` form.
render_config() {
	local version=$1 port=$2 ipban=$3 trusted=${4:-0} extra="" haextra="" y m tpl
	if ((ipban)); then
		extra=$'  ip_ban_enabled: true\n  login_attempts_threshold: 5'
	fi
	if ((trusted)); then
		[[ -z $extra ]] || extra+=$'\n'
		extra+=$'  use_x_forwarded_for: true\n  trusted_proxies:\n    - 127.0.0.1'
		# appended to the internal_url line, hence the leading newline
		haextra=$'\n  auth_providers:\n    - type: trusted_networks\n      trusted_networks:\n        - "::1/128"\n      allow_bypass_login: true\n    - type: homeassistant'
	fi
	IFS=. read -r y m _ <<<"$version"
	tpl=$HERE/config/template-legacy.yaml
	((10#$y * 100 + 10#$m >= 202510)) && tpl=$HERE/config/template-modern.yaml
	local f
	f=$(<"$HERE/config/configuration.yaml")
	f=${f//@PORT@/$port}
	f=${f//@HTTP_EXTRA@/$extra}
	f=${f//@HOMEASSISTANT_EXTRA@/$haextra}
	f=${f//@TEMPLATE_PLATFORMS@/$(<"$tpl")}
	printf '%s\n' "$f"
}

write_config() { # write_config PORT IPBAN VERSION TRUSTED
	render_config "$3" "$1" "$2" "$4" >"$DIR/configuration.yaml.tmp"
	mv "$DIR/configuration.yaml.tmp" "$DIR/configuration.yaml"
	cp "$HERE/config/scripts.yaml" "$DIR/scripts.yaml"
	cp "$HERE/config/automations.yaml" "$DIR/automations.yaml"
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

print_info() {
	echo "url=$URL"
	echo "token_file=$DIR/token"
}

cmd_start() {
	local version=${1:-} dir=${2:-} port=${3:-} ipban=0 trusted=0
	[[ -n $version && -n $dir && -n $port ]] || usage
	shift 3
	while (($#)); do
		case $1 in
		--ip-ban) ipban=1 ;;
		--trusted-proxy) trusted=1 ;;
		*) die "unknown option: $1" ;;
		esac
		shift
	done
	[[ $port =~ ^[0-9]+$ ]] && ((port > 0 && port < 65536)) || die "bad port: $port"
	mkdir -p "$dir"
	DIR=$(cd "$dir" && pwd -P)
	[[ $DIR != *" "* ]] || die "DIR must not contain spaces: $DIR"
	local t0 sp
	t0=$(now_ms)
	lock_dir

	if [[ -f $DIR/version && $(cat "$DIR/version") != "$version" ]]; then
		die "$DIR belongs to Home Assistant $(cat "$DIR/version"), not $version (use another DIR)"
	fi
	if sp=$(supervisor_pid); then
		load_peer
		[[ $URL == "http://127.0.0.1:$port" ]] || die "$DIR is already running at $URL (supervisor pid $sp)"
		say "already running (supervisor pid $sp); waiting until RUNNING"
		peer_py wait-running --url "$URL" --token-file "$DIR/token" \
			--supervisor-pid-file "$DIR/supervisor.pid" --timeout "$TIMEOUT" >/dev/null || { log_tail; exit 1; }
		promote_http || exit 1
		print_info
		return 0
	fi
	if hp=$(hass_pid); then
		say "found a hass (pid $hp) without its supervisor: stopping it first"
		do_stop
	fi

	"$HERE/install.sh" "$version" || die "install.sh $version failed"
	VENV=$CACHE/ha-$version
	if [[ -x $VENV/bin/in-root ]]; then
		# HA in a Debian root sees DIR through a bind mount at the same path, and the
		# root's own system directories are never shadowed (in-root.sh)
		case /${DIR#/} in
		/usr/* | /lib*/* | /bin/* | /sbin/* | /etc/* | /opt/* | /var/* | /run/* | /boot/* | /proc/* | /dev/* | /sys/*)
			die "HA $version runs in a Debian root: DIR must not be under ${DIR%"${DIR#/*/}"} (use /tmp, /root, /home, ...)" ;;
		esac
	fi
	VERSION=$version
	URL="http://127.0.0.1:$port"

	port_in_use "$port" && die "127.0.0.1:$port is already in use"

	write_config "$port" "$ipban" "$version" "$trusted"
	ha_py check-config --dir "$DIR" --port "$port" || die "bad configuration in $DIR (not started)"
	echo "$version" >"$DIR/version"
	echo "$URL" >"$DIR/url"
	echo "$VENV" >"$DIR/venv"
	rm -f "$DIR/.peer-stop" "$DIR/hass.pid" "$DIR/supervisor.pid"
	# HA 2026.x migrates `http:` from YAML to .storage/http once and then ignores the
	# YAML: drop that store so this start's port and ip-ban lines count again.
	if grep -qs '"pending"' "$DIR/.storage/http"; then rm -f "$DIR/.storage/http"; fi
	local logoff
	logoff=$(log_size)
	printf '\n%s [ha-peer] start %s on %s%s\n' "$(date '+%F %T')" "$version" "$URL" \
		"$( ((ipban)) && echo ' (ip_ban_enabled)')$( ((trusted)) && echo ' (trusted proxy 127.0.0.1, trusted network ::1)')" >>"$DIR/ha.log"

	say "starting Home Assistant $version in $DIR on $URL (log: $DIR/ha.log)"
	setsid "$BASH" "$SELF" _supervise "$DIR" "$VENV" </dev/null >>"$DIR/ha.log" 2>&1 8>&- &
	local i
	for ((i = 0; i < 100; i++)); do
		supervisor_pid >/dev/null && break
		sleep 0.05
	done
	supervisor_pid >/dev/null || { log_tail; die "the supervisor did not start"; }

	local rc=0
	if [[ ! -s $DIR/token ]]; then
		say "first start of $DIR: onboarding"
		peer_py onboard --url "$URL" --dir "$DIR" --supervisor-pid-file "$DIR/supervisor.pid" \
			--log-file "$DIR/ha.log" --log-offset "$logoff" --timeout "$TIMEOUT" || rc=$?
	fi
	if ((rc == 0)); then
		local left=$((TIMEOUT - ($(now_ms) - t0) / 1000))
		((left > 5)) || left=5
		peer_py wait-running --url "$URL" --token-file "$DIR/token" \
			--supervisor-pid-file "$DIR/supervisor.pid" --log-file "$DIR/ha.log" --log-offset "$logoff" \
			--timeout "$left" >/dev/null || rc=$?
	fi
	if ((rc != 0)); then
		log_tail 80
		say "start failed; stopping what was started"
		do_stop || true
		exit 1
	fi
	promote_http || { log_tail 30; say "start failed; stopping what was started"; do_stop || true; exit 1; }
	say "Home Assistant $version RUNNING after $(elapsed "$t0") s (hass pid $(cat "$DIR/hass.pid"))"
	print_info
}

# HA 2026.x runs the migrated http config as a 5-minute trial, then restarts on
# 0.0.0.0:8123 unless it is promoted (peer.py promote-http; no-op on older HA).
promote_http() { peer_py promote-http --url "$URL" --token-file "$DIR/token"; }

# do_stop: stop hass and the supervisor of $DIR; returns 0 when all gone.
do_stop() {
	local hp sp t0 pg
	t0=$(now_ms)
	: >"$DIR/.peer-stop" # the supervisor must not start hass again
	hp=$(hass_pid) || hp=""
	sp=$(supervisor_pid) || sp=""
	if [[ -z $hp && -z $sp ]]; then
		say "not running"
		rm -f "$DIR/hass.pid" "$DIR/supervisor.pid"
		return 0
	fi
	if [[ -n $hp ]]; then
		say "SIGTERM to hass (pid $hp)"
		kill -TERM "$hp" 2>/dev/null || true
	elif [[ -n $sp ]]; then
		kill -TERM "$sp" 2>/dev/null || true
	fi
	if ! wait_gone "$STOP_GRACE" $hp $sp; then
		say "still running after ${STOP_GRACE} s: SIGKILL"
		[[ -n $hp ]] && kill -KILL "$hp" 2>/dev/null
		wait_gone 3 $hp $sp || { [[ -n $sp ]] && kill -KILL "$sp" 2>/dev/null; }
		wait_gone 3 $hp $sp || true
	fi
	# anything else left in the supervisor's process group (setsid: pgid = sp)
	if [[ -n $sp ]] && pg=$(group_alive "$sp") && [[ -n $pg ]]; then
		say "killing leftover processes of group $sp: $(echo $pg)"
		kill -KILL -- "-$sp" 2>/dev/null || true
	fi
	rm -f "$DIR/hass.pid" "$DIR/supervisor.pid"
	if [[ -n $hp ]] && pid_running "$hp"; then die "hass pid $hp is still there"; fi
	say "stopped in $(elapsed "$t0") s"
}

cmd_stop() {
	set_dir "${1:-}"
	lock_dir
	do_stop
}

cmd_kill() {
	set_dir "${1:-}"
	local hp sp
	: >"$DIR/.peer-stop"
	hp=$(hass_pid) || { say "hass is not running"; return 0; }
	sp=$(supervisor_pid) || sp=""
	say "SIGKILL to hass (pid $hp)"
	kill -KILL "$hp"
	wait_gone 5 "$hp" $sp || die "hass (pid $hp) or its supervisor ($sp) still alive after SIGKILL"
	rm -f "$DIR/hass.pid" "$DIR/supervisor.pid"
	say "killed; it stays down until 'start'"
}

restart_and_wait() { # restart_and_wait how
	local how=$1 hp t0 rc=0
	load_peer
	hp=$(hass_pid) || die "hass is not running in $DIR"
	supervisor_pid >/dev/null || die "hass (pid $hp) runs without its supervisor; it would not come back: use stop + start"
	t0=$(now_ms)
	local logoff
	logoff=$(log_size)
	case $how in
	service) peer_py call-restart --url "$URL" --token-file "$DIR/token" || die "restart request failed" ;;
	hup)
		# unlike homeassistant.restart, SIGHUP does not check the config first:
		# a broken configuration.yaml would bring HA up in recovery mode
		ha_py check-config --dir "$DIR" --port "${URL##*:}" || die "not restarting with a broken configuration"
		say "SIGHUP to hass (pid $hp)"
		kill -HUP "$hp"
		;;
	esac
	peer_py wait-running --url "$URL" --token-file "$DIR/token" --supervisor-pid-file "$DIR/supervisor.pid" \
		--hass-pid-file "$DIR/hass.pid" --not-pid "$hp" --log-file "$DIR/ha.log" --log-offset "$logoff" \
		--timeout "$TIMEOUT" >/dev/null || rc=$?
	if ((rc)); then log_tail; exit 1; fi
	promote_http || exit 1
	say "RUNNING again after $(elapsed "$t0") s (hass pid $(cat "$DIR/hass.pid"))"
}

cmd_restart() {
	set_dir "${1:-}"
	lock_dir
	restart_and_wait service
}

cmd_hup() {
	set_dir "${1:-}"
	lock_dir
	restart_and_wait hup
}

cmd_wait_running() {
	set_dir "${1:-}"
	load_peer
	local t=${2:-$TIMEOUT}
	peer_py wait-running --url "$URL" --token-file "$DIR/token" \
		--supervisor-pid-file "$DIR/supervisor.pid" --timeout "$t" >/dev/null || { log_tail 30; exit 1; }
	say "RUNNING: $URL"
}

cmd_status() {
	set_dir "${1:-}"
	load_peer
	local hp sp
	sp=$(supervisor_pid) || { say "not running (no supervisor)"; exit 1; }
	hp=$(hass_pid) || { say "supervisor $sp up but no hass process (restarting?)"; exit 1; }
	if peer_py wait-running --url "$URL" --token-file "$DIR/token" --timeout 0 >/dev/null; then
		say "running: Home Assistant $VERSION at $URL (hass pid $hp, supervisor pid $sp)"
		return 0
	fi
	say "hass pid $hp is up but not RUNNING at $URL"
	exit 1
}

cmd_unban() {
	set_dir "${1:-}"
	lock_dir
	load_peer
	rm -f "$DIR/ip_bans.yaml"
	say "removed $DIR/ip_bans.yaml"
	if hass_pid >/dev/null; then
		say "restarting (HA keeps bans in memory)"
		restart_and_wait hup
	fi
}

main() {
	local cmd=${1:-}
	(($#)) && shift
	case $cmd in
	start) cmd_start "$@" ;;
	stop) cmd_stop "$@" ;;
	kill) cmd_kill "$@" ;;
	restart) cmd_restart "$@" ;;
	hup) cmd_hup "$@" ;;
	wait-running) cmd_wait_running "$@" ;;
	status) cmd_status "$@" ;;
	unban) cmd_unban "$@" ;;
	_supervise) cmd_supervise "$@" ;;
	_render-config) render_config "$1" "${2:-8123}" 0 ;;
	-h | --help | help | "") usage ;;
	*) say "unknown command: $cmd"; usage ;;
	esac
}

main "$@"
