#!/bin/bash
# Scripted proof that the hass-edge .debs work on real systemd.
# shellcheck disable=SC2317  # functions are called indirectly through check/wait_for
#
#   scripts/test-packaging.sh [static] [arm64] [nspawn]    (default: all three)
#
#   static  lintian on both .debs (errors and non-allow-listed warnings fail),
#           systemd-analyze security of the packaged unit (<= 1.5),
#           check-config on the shipped conffile (host, amd64 binary)
#   arm64   Architecture field, `file`, glibc floor vs Depends, --version and
#           check-config of the packaged binary under qemu-aarch64-static
#   nspawn  boots a Debian bookworm root with systemd-nspawn (host network)
#           and drives the amd64 .deb through install without token, start
#           against a real Home Assistant, status, journal, D-Bus, HTTP, reload,
#           watchdog, upgrade, purge, and a provisioned reinstall
#
# Environment:
#   HASS_EDGE_DEB_DIR              .debs to test (default target/debian); the
#                                  newest hass-edge_*_{amd64,arm64}.deb is used
#   HASS_EDGE_CACHE                cache dir (default ~/.cache/hass-edge); the
#                                  debootstrapped root is kept in
#                                  $HASS_EDGE_CACHE/bookworm-rootfs
#   HASS_EDGE_DEBIAN_MIRROR        debootstrap mirror (default deb.debian.org)
#   HASS_EDGE_SCRATCH              where per-run copies go (default /var/tmp)
#   HASS_EDGE_TEST_HA_URL          Home Assistant base URL reachable from this
#                                  host, e.g. http://127.0.0.1:8123 (required
#                                  for the live checks)
#   HASS_EDGE_TEST_HA_TOKEN_FILE   file with a long-lived token for it
#   HASS_EDGE_TEST_HTTP_PORT       port for the daemon's HTTP API inside the
#                                  container, which shares the host's network
#                                  (default 18124, so a host daemon on 8124 is
#                                  not disturbed)
#   HASS_EDGE_TEST_ENTITY          entity used by the checks (default
#                                  sensor.hass_edge_pkgtest); its domain is the
#                                  one excluded by the reload check
#   HASS_EDGE_TEST_CREATE_ENTITY   1 (default): create/update the entity in HA
#                                  via POST /api/states/<id>; 0: it must exist
#   HASS_EDGE_TEST_KEEP            1: keep the scratch root and leave the
#                                  container running for inspection
#
# Needs root (debootstrap, nspawn, nsenter). Prints PASS/FAIL per check and
# exits non-zero if any check failed.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)

DEB_DIR=${HASS_EDGE_DEB_DIR:-$REPO/target/debian}
CACHE=${HASS_EDGE_CACHE:-$HOME/.cache/hass-edge}
ROOTFS_CACHE=$CACHE/bookworm-rootfs
MIRROR=${HASS_EDGE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SCRATCH_BASE=${HASS_EDGE_SCRATCH:-/var/tmp}
HA_URL=${HASS_EDGE_TEST_HA_URL:-}
HA_TOKEN_FILE=${HASS_EDGE_TEST_HA_TOKEN_FILE:-}
PORT=${HASS_EDGE_TEST_HTTP_PORT:-18124}
ENTITY=${HASS_EDGE_TEST_ENTITY:-sensor.hass_edge_pkgtest}
DOMAIN=${ENTITY%%.*}
CREATE_ENTITY=${HASS_EDGE_TEST_CREATE_ENTITY:-1}
KEEP=${HASS_EDGE_TEST_KEEP:-0}
MAX_EXPOSURE=1.5
# Packages installed into the cached root besides systemd: what the .deb
# depends on (so apt needs no network inside) and the tools the checks use.
ROOTFS_PACKAGES=systemd,systemd-sysv,dbus,ca-certificates,procps,curl,passwd,adduser

# Lintian warnings accepted, with the reason. Only tags that matter solely for
# an upload to Debian's archive belong here.
#   initial-upload-closes-no-bugs: a first upload to Debian must close an ITP
#     bug; this package is distributed outside the archive.
LINTIAN_ALLOW="initial-upload-closes-no-bugs"

SECTIONS=("$@")
[ ${#SECTIONS[@]} -eq 0 ] && SECTIONS=(static arm64 nspawn)
want() { local s; for s in "${SECTIONS[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

PASS=0
FAILED=()
TMP=$(mktemp -d /tmp/hass-edge-pkgtest.XXXXXX)
LOG=$TMP/last.log

pass() { PASS=$((PASS + 1)); printf 'PASS  %s\n' "$1"; }
fail() {
    FAILED+=("$1")
    printf 'FAIL  %s\n' "$1"
    if [ -n "${2:-}" ]; then printf '%s\n' "$2" | tail -n 15 | sed 's/^/      | /'; fi
}
# check NAME COMMAND...: PASS when COMMAND exits 0; on FAIL show its output.
check() {
    local name=$1; shift
    if "$@" >"$LOG" 2>&1; then pass "$name"; else fail "$name" "$(cat "$LOG")"; fi
}
# expect NAME ACTUAL EXPECTED: string equality.
expect() {
    if [ "$2" = "$3" ]; then pass "$1"; else fail "$1" "expected '$3', got '$2'"; fi
}
section() { printf '\n== %s\n' "$1"; }

newest_deb() {  # newest hass-edge_*_$1.deb in DEB_DIR
    ls -1 "$DEB_DIR"/hass-edge_*_"$1".deb 2>/dev/null | sort -V | tail -n1
}
AMD64_DEB=$(newest_deb amd64)
ARM64_DEB=$(newest_deb arm64)

glibc_floor() {  # OBJDUMP FILE -> highest GLIBC_x.y needed
    "$1" -T "$2" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n1
}

lintian_check() {  # DEB -> fails on E: and on W: not in LINTIAN_ALLOW
    local deb=$1 out bad
    out=$(lintian --tag-display-limit 0 "$deb" 2>&1 | grep -v '^running with root privileges')
    bad=$(printf '%s\n' "$out" | awk -v allow=" $LINTIAN_ALLOW " '
        /^E: / { print; next }
        /^W: / { if (index(allow, " " $3 " ") == 0) print }')
    if [ -z "$bad" ]; then
        pass "lintian $(basename "$deb") (no errors, only allowed warnings)"
        printf '%s\n' "$out" | grep -E '^(W|I|P): ' | sed 's/^/      | /'
    else
        fail "lintian $(basename "$deb")" "$bad"
    fi
}

# ---------------------------------------------------------------- static ----
if want static; then
    section "static checks"
    for deb in "$AMD64_DEB" "$ARM64_DEB"; do
        if [ -z "$deb" ]; then fail "a .deb in $DEB_DIR (run scripts/build-debs.sh)"; continue; fi
        lintian_check "$deb"
    done
    if [ -n "$AMD64_DEB" ]; then
        X=$TMP/amd64
        dpkg-deb -x "$AMD64_DEB" "$X"
        unit=$X/usr/lib/systemd/system/hass-edge.service
        exposure=$(systemd-analyze security --offline=true "$unit" 2>&1 |
            sed -n 's/.*Overall exposure level for hass-edge.service: \([0-9.]*\).*/\1/p')
        if [ -n "$exposure" ] && awk -v e="$exposure" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e <= m) }'; then
            pass "systemd-analyze security --offline=true: exposure $exposure <= $MAX_EXPOSURE"
        else
            fail "systemd-analyze security --offline=true: exposure '${exposure:-?}' <= $MAX_EXPOSURE" \
                "$(systemd-analyze security --offline=true "$unit" 2>&1 | grep '✗')"
        fi
        for f in usr/bin/hass-edge etc/hass-edge/config.toml usr/lib/sysusers.d/hass-edge.conf \
                 usr/share/dbus-1/system.d/io.hassedge.HassEdge1.conf usr/share/man/man8/hass-edge.8.gz \
                 usr/share/doc/hass-edge/copyright; do
            check "amd64 .deb ships /$f" test -s "$X/$f"
        done
        expect "conffiles lists /etc/hass-edge/config.toml" \
            "$(dpkg-deb --ctrl-tarfile "$AMD64_DEB" | tar -xO ./conffiles 2>/dev/null)" "/etc/hass-edge/config.toml"
        BIN=$X/usr/bin/hass-edge
        deb_upstream=$(dpkg-deb -f "$AMD64_DEB" Version | sed 's/-[^-]*$//')
        check "hass-edge --version mentions $deb_upstream" \
            sh -c "env -i '$BIN' --version | grep -F '$deb_upstream'"
        check "check-config accepts the shipped conffile" \
            env -i "$BIN" check-config --config "$X/etc/hass-edge/config.toml"
        # Every documented setting is written '#key = default': uncomment them
        # all and the result must still be valid (defaults and names are right).
        sed -E 's/^#([a-z_]+ = )/\1/' "$X/etc/hass-edge/config.toml" >"$TMP/all-keys.toml"
        check "check-config accepts every documented key uncommented ($(grep -cE '^[a-z_]+ = ' "$TMP/all-keys.toml") keys)" \
            env -i "$BIN" check-config --config "$TMP/all-keys.toml"
        printf '[bogus_section_for_packaging_test]\nx = 1\n' | cat "$X/etc/hass-edge/config.toml" - >"$TMP/bad.toml"
        env -i "$BIN" check-config --config "$TMP/bad.toml" >"$LOG" 2>&1
        expect "check-config rejects an unknown section with exit 78" "$?" 78
    fi
fi

# ----------------------------------------------------------------- arm64 ----
if want arm64; then
    section "arm64 package"
    if [ -z "$ARM64_DEB" ]; then
        fail "an arm64 .deb in $DEB_DIR (run scripts/build-debs.sh)"
    else
        A=$TMP/arm64
        dpkg-deb -x "$ARM64_DEB" "$A"
        expect "dpkg-deb -f Architecture" "$(dpkg-deb -f "$ARM64_DEB" Architecture)" arm64
        check "file says ARM aarch64" sh -c "file -L '$A/usr/bin/hass-edge' | grep -q 'ARM aarch64'"
        floor=$(glibc_floor aarch64-linux-gnu-objdump "$A/usr/bin/hass-edge")
        declared=$(dpkg-deb -f "$ARM64_DEB" Depends | sed -n 's/.*libc6 (>= \([0-9.]*\)).*/\1/p')
        if [ -n "$floor" ] && [ -n "$declared" ] && dpkg --compare-versions "$floor" le "$declared"; then
            pass "glibc floor GLIBC_$floor <= Depends libc6 (>= $declared)"
        else
            fail "glibc floor GLIBC_${floor:-?} <= Depends libc6 (>= ${declared:-?})"
        fi
        QEMU=(qemu-aarch64-static -L /usr/aarch64-linux-gnu)
        check "qemu: hass-edge --version" sh -c \
            "env -i ${QEMU[*]} '$A/usr/bin/hass-edge' --version | grep -q hass-edge"
        check "qemu: hass-edge check-config --config <packaged config.toml>" \
            env -i "${QEMU[@]}" "$A/usr/bin/hass-edge" check-config --config "$A/etc/hass-edge/config.toml"
        printf '%-46s %s bytes\n' "      | aarch64 binary (as packaged)" "$(stat -c %s "$A/usr/bin/hass-edge")"
        printf '%-46s %s bytes\n' "      | $(basename "$ARM64_DEB")" "$(stat -c %s "$ARM64_DEB")"
    fi
fi

# ---------------------------------------------------------------- nspawn ----
SCRATCH=""
NSPAWN_PID=""
LEADER=""

ct() {  # run a command inside the booted container, as root, clean env
    nsenter -t "$LEADER" -a env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 TERM=dumb \
        SYSTEMD_PAGER= SYSTEMD_COLORS=0 DEBIAN_FRONTEND=noninteractive "$@"
}
as_tester() { ct runuser -u tester -- "$@"; }
prop() { ct systemctl show -p "$1" --value hass-edge.service; }
wait_for() {  # SECONDS COMMAND... -> 0 once COMMAND succeeds
    local deadline=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -ge $deadline ] && return 1
        sleep 1
    done
}
http_code() { ct curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/api/states/$1"; }
http_code_is() { [ "$(http_code "$1")" = "$2" ]; }
# GET /api/states lists the tracked (mirrored) entities; unfiltered ids that
# are not tracked are still answered by /api/states/<id> through HA's REST API.
list_has() { grep -q "\"entity_id\": *\"$1\"" "$TMP/list.json"; }
tracked() { ct curl -fsS "http://127.0.0.1:$PORT/api/states" >"$TMP/list.json" && list_has "$1"; }
not_tracked() { ct curl -fsS "http://127.0.0.1:$PORT/api/states" >"$TMP/list.json" && ! list_has "$1"; }

cleanup() {
    if [ -n "$NSPAWN_PID" ] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
        if [ "$KEEP" = 1 ]; then
            echo "container left running: nsenter -t $LEADER -a /bin/bash   (root: $SCRATCH/root)"
        else
            [ -n "$LEADER" ] && ct systemctl poweroff >/dev/null 2>&1
            for _ in $(seq 30); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 1; done
            kill "$NSPAWN_PID" 2>/dev/null
            wait "$NSPAWN_PID" 2>/dev/null
        fi
    fi
    if [ -n "$SCRATCH" ] && [ "$KEEP" != 1 ]; then rm -rf "$SCRATCH"; fi
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ensure_rootfs() {
    # The stamp records the package list; a changed list rebuilds the cache.
    if [ -x "$ROOTFS_CACHE/usr/lib/systemd/systemd" ] &&
        [ "$(cat "$ROOTFS_CACHE.packages" 2>/dev/null)" = "$ROOTFS_PACKAGES" ]; then
        echo "reusing $ROOTFS_CACHE"
        return 0
    fi
    mkdir -p "$CACHE"
    rm -rf "$ROOTFS_CACHE.tmp" "$ROOTFS_CACHE"
    echo "debootstrap bookworm into $ROOTFS_CACHE"
    debootstrap --variant=minbase --include="$ROOTFS_PACKAGES" bookworm "$ROOTFS_CACHE.tmp" "$MIRROR" \
        >"$CACHE/debootstrap.log" 2>&1 || { tail -n 20 "$CACHE/debootstrap.log"; return 1; }
    mv "$ROOTFS_CACHE.tmp" "$ROOTFS_CACHE"
    echo "$ROOTFS_PACKAGES" >"$ROOTFS_CACHE.packages"
}

boot_container() {
    SCRATCH=$(mktemp -d "$SCRATCH_BASE/hass-edge-nspawn.XXXXXX")
    cp -a --reflink=auto "$ROOTFS_CACHE" "$SCRATCH/root" || return 1
    # No systemd as PID 1 on the build host (no machined, no bus): --register=no
    # and --keep-unit stop nspawn from asking for a scope unit over D-Bus.
    systemd-nspawn -D "$SCRATCH/root" -b --register=no --keep-unit \
        -M "hass-edge-test-$$" --console=read-only >"$SCRATCH/boot.log" 2>&1 &
    NSPAWN_PID=$!
    # nspawn's first child is a short-lived intermediate that forks the container's PID 1:
    # wait until the child we see is systemd itself (under load the intermediate is seen).
    for _ in $(seq 40); do
        LEADER=$(pgrep -P "$NSPAWN_PID" | head -n1)
        [ -n "$LEADER" ] && [ "$(cat "/proc/$LEADER/comm" 2>/dev/null)" = systemd ] && break
        LEADER=""
        sleep 0.5
    done
    [ -n "$LEADER" ] || { tail -n 20 "$SCRATCH/boot.log"; return 1; }
    local state
    for _ in $(seq 60); do
        state=$(ct systemctl is-system-running 2>/dev/null)
        case "$state" in running|degraded) return 0 ;; esac
        sleep 1
    done
    echo "system state: $state"; tail -n 20 "$SCRATCH/boot.log"; return 1
}

write_test_config() {  # the edited conffile used by the live checks
    cat >"$SCRATCH/root/etc/hass-edge/config.toml" <<EOF
# hass-edge packaging test config (written by scripts/test-packaging.sh)
[ha]
url = "$HA_URL"

[filter]
exclude_domains = ["media_player", "camera", "automation"]

[cache]
mode = "update"

[http]
listen = "127.0.0.1:$PORT"

[log]
level = "info"
EOF
}

ha_set_state() {  # STATE -> POST /api/states/<entity> on the real HA
    curl -fsS -o /dev/null -X POST -H "Authorization: Bearer $(tr -d '[:space:]' <"$HA_TOKEN_FILE")" \
        -H 'Content-Type: application/json' \
        -d "{\"state\":\"$1\",\"attributes\":{\"friendly_name\":\"hass-edge packaging test\"}}" \
        "$HA_URL/api/states/$ENTITY"
}

purge_checks() {  # LABEL
    check "$1: apt-get purge" ct apt-get purge -y hass-edge
    check "$1: no user hass-edge" sh -c "! nsenter -t $LEADER -a getent passwd hass-edge"
    check "$1: no group hass-edge" sh -c "! nsenter -t $LEADER -a getent group hass-edge"
    check "$1: /etc/hass-edge is gone" test ! -e "$SCRATCH/root/etc/hass-edge"
    check "$1: /var/lib/hass-edge is gone" test ! -e "$SCRATCH/root/var/lib/hass-edge"
    check "$1: unit file and enable symlink are gone" sh -c \
        "! ls '$SCRATCH'/root/usr/lib/systemd/system/hass-edge.service \
              '$SCRATCH'/root/etc/systemd/system/*/hass-edge.service 2>/dev/null | grep -q ."
    check "$1: no hass-edge process left" sh -c "! nsenter -t $LEADER -a pgrep -x hass-edge"
}

if want nspawn; then
    section "nspawn: Debian bookworm with systemd as PID 1"
    LIVE=1
    if [ "$(id -u)" -ne 0 ]; then
        fail "nspawn checks need root"; LIVE=0
    elif [ -z "$AMD64_DEB" ]; then
        fail "an amd64 .deb in $DEB_DIR (run scripts/build-debs.sh)"; LIVE=0
    elif ! check "bookworm root (debootstrap, cached in $ROOTFS_CACHE)" ensure_rootfs; then LIVE=0
    elif ! check "boot container (systemd-nspawn -b --register=no --keep-unit)" boot_container; then LIVE=0
    fi
    HAVE_HA=0
    if [ -n "$HA_URL" ] && [ -r "$HA_TOKEN_FILE" ]; then HAVE_HA=1; else
        fail "HASS_EDGE_TEST_HA_URL and HASS_EDGE_TEST_HA_TOKEN_FILE set (live checks skipped)"
    fi
fi

if want nspawn && [ "$LIVE" = 1 ]; then
    R=$SCRATCH/root
    V1=$(dpkg-deb -f "$AMD64_DEB" Version)
    V2="$V1+pkgtest1"
    cp "$AMD64_DEB" "$R/root/hass-edge_${V1}_amd64.deb"
    # The upgrade: the same package with a higher version.
    dpkg-deb -R "$AMD64_DEB" "$TMP/repack"
    sed -i "s/^Version: .*/Version: $V2/" "$TMP/repack/DEBIAN/control"
    dpkg-deb -b "$TMP/repack" "$R/root/hass-edge_${V2}_amd64.deb" >/dev/null
    ct useradd -m tester

    section "first install, no token"
    ct apt-get install -y "/root/hass-edge_${V1}_amd64.deb" </dev/null >"$TMP/apt.log" 2>&1
    expect "apt-get install ./hass-edge_${V1}_amd64.deb" "$?" 0
    check "apt output tells how to finish setup" grep -q "needs a Home Assistant token" "$TMP/apt.log"
    check "static system user hass-edge with nologin shell" sh -c \
        "nsenter -t $LEADER -a getent passwd hass-edge | grep -q ':/usr/sbin/nologin$'"
    expect "unit is enabled" "$(ct systemctl is-enabled hass-edge.service)" enabled
    # --man=no: the minimal root has no man-db (lintian checks the page).
    check "systemd-analyze verify hass-edge.service" ct systemd-analyze verify --man=no hass-edge.service
    sleep 3
    expect "no token: unit inactive (not crash-looping)" "$(prop ActiveState)" inactive
    expect "no token: NRestarts=0" "$(prop NRestarts)" 0
    expect "no token: ConditionResult=no" "$(prop ConditionResult)" no
    check "no token: systemctl status names the failed condition" sh -c \
        "nsenter -t $LEADER -a systemctl status hass-edge.service --no-pager | grep -q 'ConditionPathExists=/etc/hass-edge/token'"
    check "D-Bus policy: user hass-edge may own io.hassedge.HassEdge1" \
        ct runuser -u hass-edge -- busctl --system call org.freedesktop.DBus /org/freedesktop/DBus \
            org.freedesktop.DBus RequestName su io.hassedge.HassEdge1 0
    check "D-Bus policy: other users may not own it" sh -c \
        "nsenter -t $LEADER -a runuser -u tester -- busctl --system call org.freedesktop.DBus \
            /org/freedesktop/DBus org.freedesktop.DBus RequestName su io.hassedge.HassEdge1 0 2>&1 \
            | grep -q 'Access denied'"

    if [ "$HAVE_HA" = 1 ]; then
        section "configured against $HA_URL"
        if [ "$CREATE_ENTITY" = 1 ]; then check "HA: create $ENTITY (state on)" ha_set_state on; fi
        install -m 600 "$HA_TOKEN_FILE" "$R/etc/hass-edge/token"
        write_test_config
        check "systemctl start hass-edge (returns after READY=1)" ct systemctl start hass-edge.service
        expect "unit active" "$(prop ActiveState)" active
        status_text=$(prop StatusText)
        check "StatusText set by the daemon: '$status_text'" test -n "$status_text"
        check "systemctl status shows the Status: line" sh -c \
            "nsenter -t $LEADER -a systemctl status hass-edge.service --no-pager | grep -q 'Status: \"'"
        main_pid=$(prop MainPID)
        expect "daemon runs as user hass-edge" "$(ct stat -c %U "/proc/$main_pid")" hass-edge
        expect "StateDirectory /var/lib/hass-edge owned by hass-edge, mode 750" \
            "$(ct stat -c '%U %a' /var/lib/hass-edge)" "hass-edge 750"

        check "GET /api/states lists $ENTITY (mirrored from the snapshot)" tracked "$ENTITY"
        check "curl 127.0.0.1:$PORT/api/states/$ENTITY answers 200 with the entity" sh -c \
            "nsenter -t $LEADER -a curl -fsS http://127.0.0.1:$PORT/api/states/$ENTITY | grep -q '\"entity_id\": *\"$ENTITY\"'"
        if [ "$CREATE_ENTITY" = 1 ]; then
            ha_set_state off
            check "a state change in HA reaches the HTTP API" wait_for 15 sh -c \
                "nsenter -t $LEADER -a curl -fsS http://127.0.0.1:$PORT/api/states/$ENTITY | grep -q '\"state\": *\"off\"'"
        fi

        check "busctl get-property ... Connection as a non-root user" as_tester \
            busctl --system get-property io.hassedge.HassEdge1 /io/hassedge/HassEdge1 io.hassedge.HassEdge1 Connection
        check "busctl call GetState as a non-root user" as_tester \
            busctl --system call io.hassedge.HassEdge1 /io/hassedge/HassEdge1 io.hassedge.HassEdge1 GetState s "$ENTITY"
        check "busctl call ListEntities as a non-root user" as_tester \
            busctl --system call io.hassedge.HassEdge1 /io/hassedge/HassEdge1 io.hassedge.HassEdge1 ListEntities
        check "Resync is denied to a non-root user" sh -c \
            "nsenter -t $LEADER -a runuser -u tester -- busctl --system call io.hassedge.HassEdge1 \
                /io/hassedge/HassEdge1 io.hassedge.HassEdge1 Resync 2>&1 | grep -q 'Access denied'"
        check "Resync is allowed to root" ct busctl --system call io.hassedge.HassEdge1 \
            /io/hassedge/HassEdge1 io.hassedge.HassEdge1 Resync
        check "hass-edge status (as a non-root user) exits 0" as_tester hass-edge status
        check "hass-edge status --json" as_tester hass-edge status --json

        section "reload"
        sed -i "s/^exclude_domains = \[/exclude_domains = [\"$DOMAIN\", /" "$R/etc/hass-edge/config.toml"
        check "systemctl reload (exclude domain $DOMAIN)" ct systemctl reload hass-edge.service
        expect "reload kept the process (active, MainPID unchanged)" "$(prop ActiveState)/$(prop MainPID)" "active/$main_pid"
        check "after reload $ENTITY is no longer in GET /api/states" wait_for 15 not_tracked "$ENTITY"
        sed -i "s/^exclude_domains = \[\"$DOMAIN\", /exclude_domains = [/" "$R/etc/hass-edge/config.toml"
        check "systemctl reload (filter restored)" ct systemctl reload hass-edge.service
        check "after reload $ENTITY is back in GET /api/states" wait_for 30 tracked "$ENTITY"

        section "journal"
        since=$(ct date +%s)
        cp "$R/etc/hass-edge/config.toml" "$TMP/good.toml"
        printf '\n[bogus_section_for_packaging_test]\nx = 1\n' >>"$R/etc/hass-edge/config.toml"
        ct systemctl reload hass-edge.service >/dev/null 2>&1
        expect "reload with an invalid config keeps the daemon running" \
            "$(prop ActiveState)/$(prop MainPID)" "active/$main_pid"
        cp "$TMP/good.toml" "$R/etc/hass-edge/config.toml"
        ct systemctl reload hass-edge.service >/dev/null 2>&1
        check "the daemon logged the rejected reload at warning or worse" wait_for 10 sh -c \
            "nsenter -t $LEADER -a journalctl -u hass-edge.service -p warning --since @$since _PID=$main_pid -o cat | grep -q ."
        warn_prios=$(ct journalctl -u hass-edge.service -p warning -o export | sed -n 's/^PRIORITY=//p' | sort -u | tr '\n' ' ')
        check "journalctl -p warning: only priorities 0-4 ($warn_prios)" sh -c \
            "[ -n '$warn_prios' ] && ! printf '%s\n' $warn_prios | grep -q '[5-7]'"
        n_info=$(ct journalctl -u hass-edge.service -p info _PID="$main_pid" -o cat | wc -l)
        n_warn=$(ct journalctl -u hass-edge.service -p warning _PID="$main_pid" -o cat | wc -l)
        check "journalctl -p warning filters out info lines ($n_warn of $n_info)" test "$n_warn" -lt "$n_info"
        check "no raw <N> prefixes reach the journal" sh -c \
            "! nsenter -t $LEADER -a journalctl -u hass-edge.service _PID=$main_pid -o cat | grep -q '^<[0-7]>'"

        section "watchdog"
        restarts=$(prop NRestarts)
        wd_since=$(ct date +%s)
        main_pid=$(prop MainPID)
        # Never `kill -STOP 0`: that would stop this script's own process group.
        if [ "${main_pid:-0}" -gt 1 ] && [ "$(prop ActiveState)" = active ]; then
            ct kill -STOP "$main_pid"
            check "kill -STOP: watchdog restarts the daemon (NRestarts > $restarts, new MainPID, active)" \
                wait_for 120 sh -c "nsenter -t $LEADER -a sh -c '
                    [ \$(systemctl show -p NRestarts --value hass-edge) -gt $restarts ] &&
                    [ \$(systemctl show -p MainPID --value hass-edge) != $main_pid ] &&
                    [ \$(systemctl show -p ActiveState --value hass-edge) = active ]'"
            check "journal: Failed with result 'watchdog'" sh -c \
                "nsenter -t $LEADER -a journalctl -u hass-edge.service --since @$wd_since -o cat | grep -q \"result 'watchdog'\""
        else
            fail "watchdog check needs an active daemon (MainPID=${main_pid:-none})"
        fi

        section "upgrade"
        echo "# edited by test-packaging.sh" >>"$R/etc/hass-edge/config.toml"
        sum_before=$(md5sum <"$R/etc/hass-edge/config.toml")
        pid_before=$(prop MainPID)
        ct apt-get install -y "/root/hass-edge_${V2}_amd64.deb" </dev/null >"$TMP/apt2.log" 2>&1
        expect "apt-get install the $V2 upgrade" "$?" 0
        expect "installed version" "$(ct dpkg-query -W -f '${Version}' hass-edge)" "$V2"
        expect "edited conffile kept" "$(md5sum <"$R/etc/hass-edge/config.toml")" "$sum_before"
        check "no .dpkg-new/.dpkg-dist left next to it" sh -c "! ls '$R'/etc/hass-edge/*.dpkg-* 2>/dev/null | grep -q ."
        expect "service restarted by the upgrade and active" \
            "$(prop ActiveState)/$([ "$(prop MainPID)" != "$pid_before" ] && echo new-pid)" "active/new-pid"
        check "saved cache /var/lib/hass-edge/states.json exists after the clean stop" \
            test -s "$R/var/lib/hass-edge/states.json"
    fi

    section "purge"
    purge_checks "purge"

    if [ "$HAVE_HA" = 1 ]; then
        section "provisioned install: token and /etc/default/hass-edge exist before apt"
        mkdir -p "$R/etc/hass-edge"
        install -m 600 "$HA_TOKEN_FILE" "$R/etc/hass-edge/token"
        printf 'HASS_EDGE_HA_URL=%s\nHASS_EDGE_HTTP_LISTEN=127.0.0.1:%s\n' "$HA_URL" "$PORT" >"$R/etc/default/hass-edge"
        ct apt-get install -y "/root/hass-edge_${V1}_amd64.deb" </dev/null >"$TMP/apt3.log" 2>&1
        expect "apt-get install with the token present" "$?" 0
        expect "unit active right after apt returns" "$(prop ActiveState)" active
        check "the daemon owns its bus name at once (policy loaded with the new user)" as_tester \
            busctl --system get-property io.hassedge.HassEdge1 /io/hassedge/HassEdge1 io.hassedge.HassEdge1 Connection
        check "env overrides from /etc/default/hass-edge apply (HTTP on :$PORT)" wait_for 15 http_code_is "$ENTITY" 200
        purge_checks "purge again"
    fi
fi

# --------------------------------------------------------------- summary ----
echo
if [ ${#FAILED[@]} -eq 0 ]; then
    echo "ALL $PASS CHECKS PASSED"
    exit 0
fi
echo "$PASS passed, ${#FAILED[@]} FAILED:"
printf '  - %s\n' "${FAILED[@]}"
exit 1
