#!/bin/bash
# Scripted proof that the hass-edge .debs work on real systemd.
# shellcheck disable=SC2317  # functions are called indirectly through check/wait_for
#
#   scripts/test-packaging.sh [static] [arm64] [armhf] [nspawn]   (default: all four)
#
#   static  lintian --pedantic on the three bookworm .debs (errors and
#           non-allow-listed warnings fail), md5sums, synopsis, Depends vs the
#           binary's NEEDED libraries and glibc floor, systemd-analyze security
#           of the packaged unit (<= 1.5), MemoryMax=, check-config on the
#           shipped conffile (host, amd64 binary)
#   arm64   Architecture field, `file`, --version and check-config of the
#           packaged binary under qemu-aarch64-static
#   armhf   the same under qemu-arm-static, then the packaged daemon live against
#           the real Home Assistant under qemu-arm (/health 200); ARMv6: the
#           binary dies with SIGILL under `qemu-arm -cpu arm1176`, and preinst
#           refuses a Pi Zero's /proc/cpuinfo (bind-mounted in a mount namespace)
#   nspawn  publishes the .debs as a signed apt repository
#           (scripts/publish-apt-repo.sh, served on 127.0.0.1), boots a Debian
#           bookworm root with systemd-nspawn (host network), runs README's
#           install section as written, and drives the package through install
#           without token, start against a real Home Assistant, status, journal,
#           D-Bus, HTTP, reload, watchdog, `apt upgrade` from the repository,
#           purge, a provisioned reinstall, and a tampered Release
#   nspawn-arm64, nspawn-bullseye   (only when named; see their section below)
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
#   HASS_EDGE_TEST_REPO_PORT       port of the apt repository's web server on
#                                  127.0.0.1 (default 18130)
#   HASS_EDGE_TEST_QEMU_PORT       HTTP port of the daemon run under qemu-arm
#                                  (default 18131)
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
REPO_PORT=${HASS_EDGE_TEST_REPO_PORT:-18130}
QEMU_PORT=${HASS_EDGE_TEST_QEMU_PORT:-18131}
MAX_EXPOSURE=1.5
# Packages installed into the cached root besides systemd: what the .deb
# depends on (so apt needs no network inside) and the tools the checks use.
# sudo: README's install section is run as written.
ROOTFS_PACKAGES=systemd,systemd-sysv,dbus,ca-certificates,procps,curl,passwd,adduser,sudo

# Lintian warnings accepted (with --pedantic), with the reason. Only tags that
# matter solely for an upload to Debian's archive belong here.
#   initial-upload-closes-no-bugs: a first upload to Debian must close an ITP
#     bug; this package is distributed outside the archive.
LINTIAN_ALLOW="initial-upload-closes-no-bugs"
# Pedantic (P:) tags are shown, and fail unless listed here, with the reason.
LINTIAN_ALLOW_PEDANTIC=""

SECTIONS=("$@")
[ ${#SECTIONS[@]} -eq 0 ] && SECTIONS=(static arm64 armhf nspawn)
want() { local s; for s in "${SECTIONS[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

PASS=0
FAILED=()
QEMU_PID=""
REPO_SERVER_PID=""
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

newest_deb() {  # newest hass-edge_*~deb12_$1.deb in DEB_DIR (Debian version order)
    local f best="" bv="" v
    for f in "$DEB_DIR"/hass-edge_*~deb12_"$1".deb; do
        [ -f "$f" ] || continue
        v=$(dpkg-deb -f "$f" Version)
        if [ -z "$best" ] || dpkg --compare-versions "$v" gt "$bv"; then best=$f; bv=$v; fi
    done
    echo "$best"
}
AMD64_DEB=$(newest_deb amd64)
ARM64_DEB=$(newest_deb arm64)
ARMHF_DEB=$(newest_deb armhf)

glibc_floor() {  # FILE -> highest GLIBC_x.y needed (readelf reads any architecture)
    readelf -W --version-info "$1" | grep -o 'Name: GLIBC_[0-9][0-9.]*' | sed 's/.*GLIBC_//' | sort -uV | tail -n1
}

lintian_check() {  # DEB -> fails on E:, on W: not in LINTIAN_ALLOW, on P: not in LINTIAN_ALLOW_PEDANTIC
    local deb=$1 out bad
    out=$(lintian --pedantic --tag-display-limit 0 "$deb" 2>&1 | grep -v '^running with root privileges')
    bad=$(printf '%s\n' "$out" | awk -v allow=" $LINTIAN_ALLOW " -v allowp=" $LINTIAN_ALLOW_PEDANTIC " '
        /^E: / { print; next }
        /^W: / { if (index(allow, " " $3 " ") == 0) print }
        /^P: / { if (index(allowp, " " $3 " ") == 0) print }')
    if [ -z "$bad" ]; then
        pass "lintian --pedantic $(basename "$deb") (no errors, only allowed warnings)"
        printf '%s\n' "$out" | grep -E '^(W|I|P): ' | sed 's/^/      | /'
    else
        fail "lintian --pedantic $(basename "$deb")" "$bad"
    fi
}

# deb_contract DEB LABEL: what every .deb must carry besides its files. The libc6
# floor must cover the binary's highest GLIBC_ symbol, and every NEEDED library's
# package must be in Depends (dpkg-shlibdeps' job, done by hand for cross builds).
deb_contract() {
    local deb=$1 label=$2 x depends floor declared lib pkg missing=""
    x=$TMP/contract-$label
    rm -rf "$x"; dpkg-deb -x "$deb" "$x"; dpkg-deb -e "$deb" "$x/DEBIAN"
    check "$label: md5sums file matches the files shipped" sh -c "cd '$x' && test -s DEBIAN/md5sums && md5sum --quiet -c DEBIAN/md5sums"
    local syn; syn=$(dpkg-deb -f "$deb" Description | head -n1)
    check "$label: synopsis '$syn' is one line of < 80 chars, no trailing full stop" \
        sh -c "[ \${#1} -lt 80 ] && [ \"\${1%.}\" = \"\$1\" ]" _ "$syn"
    depends=$(dpkg-deb -f "$deb" Depends)
    floor=$(glibc_floor "$x/usr/bin/hass-edge")
    declared=$(printf '%s' "$depends" | sed -n 's/.*libc6 (>= \([0-9.]*\)).*/\1/p')
    if [ -n "$floor" ] && [ -n "$declared" ] && dpkg --compare-versions "$floor" le "$declared"; then
        pass "$label: glibc floor GLIBC_$floor <= Depends libc6 (>= $declared)"
    else
        fail "$label: glibc floor GLIBC_${floor:-?} <= Depends libc6 (>= ${declared:-?})"
    fi
    for lib in $(readelf -d "$x/usr/bin/hass-edge" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
        case "$lib" in
            libc.so.*|libm.so.*|libdl.so.*|libpthread.so.*|librt.so.*|ld-linux*) pkg=libc6 ;;
            libgcc_s.so.*) pkg=libgcc-s1 ;;
            *) pkg="?$lib" ;;
        esac
        printf '%s' "$depends" | grep -Eq "(^|, )$pkg( |,|$)" || missing="$missing $lib->$pkg"
    done
    expect "$label: every NEEDED library's package is in Depends" "${missing:-none missing}" "none missing"
}

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

stop_container() {
    if [ -n "$NSPAWN_PID" ] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
        if [ "$KEEP" = 1 ]; then
            echo "container left running: nsenter -t $LEADER -a /bin/bash   (root: $SCRATCH/root)"
            return
        fi
        [ -n "$LEADER" ] && ct systemctl poweroff >/dev/null 2>&1
        for _ in $(seq 60); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 1; done
        kill "$NSPAWN_PID" 2>/dev/null
        wait "$NSPAWN_PID" 2>/dev/null
    fi
    if [ -n "$SCRATCH" ] && [ "$KEEP" != 1 ]; then rm -rf "$SCRATCH"; fi
    NSPAWN_PID=""; LEADER=""; SCRATCH=""
}
cleanup() {
    if [ -n "$QEMU_PID" ]; then kill "$QEMU_PID" 2>/dev/null; wait "$QEMU_PID" 2>/dev/null; fi
    if [ -n "$REPO_SERVER_PID" ]; then kill "$REPO_SERVER_PID" 2>/dev/null; wait "$REPO_SERVER_PID" 2>/dev/null; fi
    stop_container
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- static ----
if want static; then
    section "static checks"
    for arch in amd64 arm64 armhf; do
        deb=$(newest_deb "$arch")
        if [ -z "$deb" ]; then fail "a bookworm $arch .deb in $DEB_DIR (run scripts/build-debs.sh)"; continue; fi
        lintian_check "$deb"
        deb_contract "$deb" "$arch"
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
        check "the unit sets a memory ceiling (MemoryMax=)" grep -q '^MemoryMax=[0-9]' "$unit"
        for f in usr/bin/hass-edge etc/hass-edge/config.toml usr/lib/sysusers.d/hass-edge.conf \
                 usr/share/dbus-1/system.d/io.hassedge.HassEdge1.conf usr/share/man/man8/hass-edge.8.gz \
                 usr/share/doc/hass-edge/copyright usr/share/doc/hass-edge/LICENSES.crates; do
            check "amd64 .deb ships /$f" test -s "$X/$f"
        done
        check "preinst's sysusers line (user made before unpack) matches hass-edge.sysusers" sh -c \
            "dpkg-deb -I '$AMD64_DEB' preinst | grep -qF -- \"\$(grep '^u ' '$X/usr/lib/sysusers.d/hass-edge.conf')\""
        check "systemd-sysusers runs once in postinst" sh -c \
            "[ \$(dpkg-deb -I '$AMD64_DEB' postinst | grep -c '^[^#]*systemd-sysusers') -eq 1 ]"
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
        QEMU=(qemu-aarch64-static -L /usr/aarch64-linux-gnu)
        check "qemu: hass-edge --version" sh -c \
            "env -i ${QEMU[*]} '$A/usr/bin/hass-edge' --version | grep -q hass-edge"
        check "qemu: hass-edge check-config --config <packaged config.toml>" \
            env -i "${QEMU[@]}" "$A/usr/bin/hass-edge" check-config --config "$A/etc/hass-edge/config.toml"
        printf '%-46s %s bytes\n' "      | aarch64 binary (as packaged)" "$(stat -c %s "$A/usr/bin/hass-edge")"
        printf '%-46s %s bytes\n' "      | $(basename "$ARM64_DEB")" "$(stat -c %s "$ARM64_DEB")"
    fi
fi

# ----------------------------------------------------------------- armhf ----
QEMU_ARM=(qemu-arm-static -L /usr/arm-linux-gnueabihf)

# run_preinst MACHINE CPUINFO_FILE: the packaged preinst as dpkg runs it, with
# `uname -m` and /proc/cpuinfo of another board (a PATH shim, and a bind mount in a
# private mount namespace).
run_preinst() {
    local shim=$TMP/shim-$1
    mkdir -p "$shim"
    printf '#!/bin/sh\n[ "$1" = -m ] && echo %s && exit 0\nexec /bin/uname "$@"\n' "$1" >"$shim/uname"
    chmod 755 "$shim/uname"
    unshare -m sh -c 'mount --bind "$1" /proc/cpuinfo && PATH="$2:$PATH" sh "$3" install' _ \
        "$2" "$shim" "$TMP/armhf/DEBIAN/preinst"
}

if want armhf; then
    section "armhf package (ARMv7; ARMv6 refused)"
    if [ -z "$ARMHF_DEB" ]; then
        fail "an armhf .deb in $DEB_DIR (run scripts/build-debs.sh)"
    else
        H=$TMP/armhf
        dpkg-deb -x "$ARMHF_DEB" "$H"; dpkg-deb -e "$ARMHF_DEB" "$H/DEBIAN"
        HBIN=$H/usr/bin/hass-edge
        expect "dpkg-deb -f Architecture" "$(dpkg-deb -f "$ARMHF_DEB" Architecture)" armhf
        check "file says ARM, EABI5, hard-float" sh -c "file -L '$HBIN' | grep 'ARM, EABI5' | grep -q 'armhf'"
        check "qemu-arm: hass-edge --version" sh -c "env -i ${QEMU_ARM[*]} '$HBIN' --version | grep -q hass-edge"
        check "qemu-arm: hass-edge check-config --config <packaged config.toml>" \
            env -i "${QEMU_ARM[@]}" "$HBIN" check-config --config "$H/etc/hass-edge/config.toml"
        printf '%-46s %s bytes\n' "      | armv7 binary (as packaged)" "$(stat -c %s "$HBIN")"
        printf '%-46s %s bytes\n' "      | $(basename "$ARMHF_DEB")" "$(stat -c %s "$ARMHF_DEB")"

        if [ -n "$HA_URL" ] && [ -r "$HA_TOKEN_FILE" ]; then
            cat >"$TMP/armhf.toml" <<EOF
[ha]
url = "$HA_URL"
token_file = "$HA_TOKEN_FILE"
[http]
listen = "127.0.0.1:$QEMU_PORT"
[dbus]
bus = "none"
[cache]
persist = false
EOF
            t0=$SECONDS
            env -i "${QEMU_ARM[@]}" "$HBIN" --config "$TMP/armhf.toml" >"$TMP/armhf-daemon.log" 2>&1 &
            QEMU_PID=$!
            if wait_for 90 sh -c "curl -fsS http://127.0.0.1:$QEMU_PORT/health | grep -q '\"connected\": *true'"; then
                pass "qemu-arm: the packaged daemon is live against $HA_URL (/health 200 after $((SECONDS - t0)) s)"
            else
                fail "qemu-arm: the packaged daemon is live against $HA_URL (/health 200)" "$(cat "$TMP/armhf-daemon.log")"
            fi
            check "qemu-arm: GET /api/states answers 200 with HA's entities" sh -c \
                "curl -fsS http://127.0.0.1:$QEMU_PORT/api/states | grep -q '\"entity_id\"'"
            kill -TERM "$QEMU_PID" 2>/dev/null
            wait "$QEMU_PID"
            expect "qemu-arm: SIGTERM stops it with exit 0" "$?" 0
            QEMU_PID=""
            check "qemu-arm: the token is not in the daemon's log" sh -c \
                "! grep -qF \"\$(tr -d '[:space:]' <'$HA_TOKEN_FILE')\" '$TMP/armhf-daemon.log'"
        else
            fail "HASS_EDGE_TEST_HA_URL and HASS_EDGE_TEST_HA_TOKEN_FILE set (qemu-arm live check skipped)"
        fi

        # ARMv6 (Pi 1, Zero, Zero W): why the package must refuse it, then the refusal.
        # (through sh, so that the shell reporting the signal writes into $LOG)
        sh -c '"$@"; exit $?' _ env -i qemu-arm-static -cpu arm1176 -L /usr/arm-linux-gnueabihf \
            "$HBIN" --version >"$LOG" 2>&1
        expect "qemu-arm -cpu arm1176 (ARMv6): the ARMv7 binary dies with SIGILL (exit 132)" "$?" 132
        cat >"$TMP/cpuinfo-pi-zero-w" <<'EOF'
processor	: 0
model name	: ARMv6-compatible processor rev 7 (v6l)
BogoMIPS	: 697.95
Features	: half thumb fastmult vfp edsp java tls
CPU implementer	: 0x41
CPU architecture: 7
CPU variant	: 0x0
CPU part	: 0xb76
CPU revision	: 7

Hardware	: BCM2835
Revision	: 9000c1
Model		: Raspberry Pi Zero W Rev 1.1
EOF
        cat >"$TMP/cpuinfo-pi-3" <<'EOF'
processor	: 0
model name	: ARMv7 Processor rev 4 (v7l)
BogoMIPS	: 38.40
Features	: half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt vfpd32 lpae evtstrm crc32
CPU implementer	: 0x41
CPU architecture: 7
CPU variant	: 0x0
CPU part	: 0xd03
CPU revision	: 4

Hardware	: BCM2835
Revision	: a02082
Model		: Raspberry Pi 3 Model B Rev 1.2
EOF
        run_preinst armv6l "$TMP/cpuinfo-pi-zero-w" >"$TMP/preinst.log" 2>&1
        expect "preinst on a Pi Zero W (armv6l, v6l): refuses (exit 1)" "$?" 1
        check "preinst's refusal says why (ARMv6, Illegal instruction)" sh -c \
            "grep -q 'ARMv6' '$TMP/preinst.log' && grep -q 'Illegal instruction' '$TMP/preinst.log'"
        sed 's/^/      | /' "$TMP/preinst.log"
        check "preinst on a Pi 3 with a 32-bit OS (armv7l, v7l): proceeds" run_preinst armv7l "$TMP/cpuinfo-pi-3"
        check "preinst on a Pi 3 with a 64-bit kernel (aarch64): proceeds" run_preinst aarch64 "$TMP/cpuinfo-pi-3"
    fi
fi

# ---------------------------------------------------------------- nspawn ----

rootfs_dir() {  # [SUITE ARCH] -> the cached root (bookworm amd64 keeps its old name)
    local suite=${1:-bookworm} arch=${2:-amd64}
    if [ "$suite/$arch" = bookworm/amd64 ]; then echo "$ROOTFS_CACHE"
    else echo "$CACHE/$suite-$arch-rootfs"; fi
}

ensure_rootfs() {  # [SUITE ARCH]; a foreign ARCH needs binfmt_misc (section nspawn-arm64)
    local suite=${1:-bookworm} arch=${2:-amd64} dir
    dir=$(rootfs_dir "$suite" "$arch")
    # The stamp records the package list; a changed list rebuilds the cache.
    if [ -x "$dir/usr/lib/systemd/systemd" ] || [ -x "$dir/lib/systemd/systemd" ]; then
        if [ "$(cat "$dir.packages" 2>/dev/null)" = "$ROOTFS_PACKAGES" ]; then
            echo "reusing $dir"
            return 0
        fi
    fi
    mkdir -p "$CACHE"
    rm -rf "$dir.tmp" "$dir"
    echo "debootstrap --arch=$arch $suite into $dir"
    debootstrap --arch="$arch" --variant=minbase --include="$ROOTFS_PACKAGES" "$suite" "$dir.tmp" "$MIRROR" \
        >"$CACHE/debootstrap-$suite-$arch.log" 2>&1 || { tail -n 20 "$CACHE/debootstrap-$suite-$arch.log"; return 1; }
    mv "$dir.tmp" "$dir"
    echo "$ROOTFS_PACKAGES" >"$dir.packages"
}

boot_container() {  # [SUITE ARCH]
    SCRATCH=$(mktemp -d "$SCRATCH_BASE/hass-edge-nspawn.XXXXXX")
    cp -a --reflink=auto "$(rootfs_dir "$@")" "$SCRATCH/root" || return 1
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
    for _ in $(seq "${BOOT_WAIT:-60}"); do
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

# readme_install_block: the first ```sh block of README's "Install on a Raspberry Pi",
# with REPO= pointed at the local server (the container shares the host's loopback).
readme_install_block() {
    awk '/^## Install on a Raspberry Pi/ { sec = 1; next } /^## / { sec = 0 }
         sec && /^```sh/ && !done { blk = 1; next } blk && /^```/ { blk = 0; done = 1 } blk' README.md |
        sed "s|^REPO=.*|REPO=http://127.0.0.1:$REPO_PORT|"
}

is_live() { [ "$(prop StatusText | cut -c1-5)" = "live:" ]; }

# serve_repo: the bookworm .debs as a signed repository (scripts/publish-apt-repo.sh,
# throwaway key) on 127.0.0.1:$REPO_PORT; also prepares $V1, $V2 and $TMP/debs-v2
# (the amd64 .deb re-versioned one Debian revision up) for the upgrade.
serve_repo() {
    local rev
    V1=$(dpkg-deb -f "$AMD64_DEB" Version)
    rev=${V1#*-}; rev=${rev%%~*}
    V2="${V1%-*}-$((rev + 1))~${V1##*~}"
    mkdir -p "$TMP/debs-v1" "$TMP/debs-v2"
    cp "$AMD64_DEB" "$TMP/debs-v1/"
    [ -n "$ARM64_DEB" ] && cp "$ARM64_DEB" "$TMP/debs-v1/"
    [ -n "$ARMHF_DEB" ] && cp "$ARMHF_DEB" "$TMP/debs-v1/"
    dpkg-deb -R "$AMD64_DEB" "$TMP/repack"
    sed -i "s/^Version: .*/Version: $V2/" "$TMP/repack/DEBIAN/control"
    dpkg-deb --root-owner-group -b "$TMP/repack" "$TMP/debs-v2/hass-edge_${V2}_amd64.deb" >/dev/null || return 1
    bash scripts/publish-apt-repo.sh --debs "$TMP/debs-v1" --state "$TMP/repo.state" "$TMP/repo" || return 1
    python3 -m http.server --bind 127.0.0.1 --directory "$TMP/repo" "$REPO_PORT" >"$TMP/http.log" 2>&1 &
    REPO_SERVER_PID=$!
    wait_for 10 curl -fsS -o /dev/null "http://127.0.0.1:$REPO_PORT/dists/bookworm/InRelease"
}

purge_checks() {  # LABEL -- everything goes but the system user (Debian practice)
    check "$1: apt-get purge" ct apt-get purge -y hass-edge
    check "$1: the system user hass-edge stays (Debian practice)" ct getent passwd hass-edge
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
    elif ! check "signed apt repository of the bookworm .debs, served on 127.0.0.1:$REPO_PORT" serve_repo; then LIVE=0
    fi
    HAVE_HA=0
    if [ -n "$HA_URL" ] && [ -r "$HA_TOKEN_FILE" ]; then HAVE_HA=1; else
        fail "HASS_EDGE_TEST_HA_URL and HASS_EDGE_TEST_HA_TOKEN_FILE set (live checks skipped)"
    fi
fi

if want nspawn && [ "$LIVE" = 1 ]; then
    R=$SCRATCH/root
    ct useradd -m tester

    section "first install from the repository: README's commands as written"
    # The first ```sh block of README's "Install on a Raspberry Pi", with REPO= pointed
    # at the local server (the container shares the host's loopback).
    readme_install_block >"$R/root/readme-install.sh"
    sed 's/^/      | /' "$R/root/readme-install.sh"
    ct bash -e /root/readme-install.sh </dev/null >"$TMP/apt.log" 2>&1
    expect "README's install commands succeed" "$?" 0
    expect "installed version is the repository's $V1" "$(ct dpkg-query -W -f '${Version}' hass-edge)" "$V1"
    check "apt-cache policy: installed from the repository (127.0.0.1:$REPO_PORT bookworm/main)" sh -c \
        "nsenter -t $LEADER -a apt-cache policy hass-edge | grep -q '127.0.0.1:$REPO_PORT bookworm/main amd64'"
    check "apt show: the synopsis is whole" sh -c \
        "nsenter -t $LEADER -a apt-cache show hass-edge | grep -qx 'Description: $(dpkg-deb -f "$AMD64_DEB" Description | head -n1)'"
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
        expect "MemoryMax= of the unit is in force (128M)" "$(prop MemoryMax)" 134217728
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

        section "upgrade through the repository: apt update && apt upgrade"
        echo "# edited by test-packaging.sh" >>"$R/etc/hass-edge/config.toml"
        sum_before=$(md5sum <"$R/etc/hass-edge/config.toml")
        # A clean stop writes the warm-start file (the periodic save is every 15 min).
        check "systemctl restart (a clean stop saves the warm-start file)" ct systemctl restart hass-edge.service
        check "warm-start file /var/lib/hass-edge/states.json holds $ENTITY" \
            grep -q "$ENTITY" "$R/var/lib/hass-edge/states.json"
        check "live again before the upgrade" wait_for 30 is_live
        pid_before=$(prop MainPID)
        inode_before=$(ct stat -c %i /usr/bin/hass-edge)
        check "publish $V2 to the repository (scripts/publish-apt-repo.sh)" \
            bash scripts/publish-apt-repo.sh --debs "$TMP/debs-v2" --state "$TMP/repo.state" "$TMP/repo"
        check "apt update" ct apt-get update
        ct apt-get upgrade -y </dev/null >"$TMP/apt2.log" 2>&1
        expect "apt upgrade" "$?" 0
        expect "installed version" "$(ct dpkg-query -W -f '${Version}' hass-edge)" "$V2"
        expect "edited conffile kept" "$(md5sum <"$R/etc/hass-edge/config.toml")" "$sum_before"
        check "no .dpkg-new/.dpkg-dist left next to it" sh -c "! ls '$R'/etc/hass-edge/*.dpkg-* 2>/dev/null | grep -q ."
        main_pid=$(prop MainPID)
        expect "service restarted by the upgrade and active" \
            "$(prop ActiveState)/$([ "$main_pid" != "$pid_before" ] && echo new-pid)" "active/new-pid"
        # dpkg replaced /usr/bin/hass-edge (new inode); the running process must be that file.
        expect "the new process runs the upgraded binary (new inode, not the deleted one)" \
            "$(ct stat -L -c %i "/proc/$main_pid/exe")/$([ "$(ct stat -c %i /usr/bin/hass-edge)" != "$inode_before" ] && echo replaced)" \
            "$(ct stat -c %i /usr/bin/hass-edge)/replaced"
        check "the warm-start file survived the upgrade (holds $ENTITY, nothing moved aside)" sh -c \
            "grep -q '$ENTITY' '$R/var/lib/hass-edge/states.json' && ! ls '$R'/var/lib/hass-edge/*.corrupt 2>/dev/null | grep -q ."
        check "systemctl status: active (running), Status: \"live…\"" wait_for 30 sh -c \
            "nsenter -t $LEADER -a systemctl status hass-edge.service --no-pager > '$TMP/status.txt';
             grep -q 'Active: active (running)' '$TMP/status.txt' && grep -q 'Status: \"live' '$TMP/status.txt'"
        sed -n 's/^ *Status: /      | Status: /p' "$TMP/status.txt"
    fi

    section "purge"
    purge_checks "purge"

    if [ "$HAVE_HA" = 1 ]; then
        section "provisioned install: token and /etc/default/hass-edge exist before apt"
        # A machine that never had the user (purge keeps it): preinst must create it
        # before the D-Bus policy naming it is unpacked.
        ct userdel hass-edge >/dev/null 2>&1; ct groupdel hass-edge >/dev/null 2>&1
        check "no user hass-edge before this install" sh -c "! nsenter -t $LEADER -a getent passwd hass-edge"
        mkdir -p "$R/etc/hass-edge"
        install -m 600 "$HA_TOKEN_FILE" "$R/etc/hass-edge/token"
        printf 'HASS_EDGE_HA_URL=%s\nHASS_EDGE_HTTP_LISTEN=127.0.0.1:%s\n' "$HA_URL" "$PORT" >"$R/etc/default/hass-edge"
        ct apt-get install -y hass-edge </dev/null >"$TMP/apt3.log" 2>&1
        expect "apt-get install hass-edge (repository) with the token present" "$?" 0
        expect "unit active right after apt returns" "$(prop ActiveState)" active
        check "the daemon owns its bus name at once (policy loaded with the new user)" as_tester \
            busctl --system get-property io.hassedge.HassEdge1 /io/hassedge/HassEdge1 io.hassedge.HassEdge1 Connection
        check "env overrides from /etc/default/hass-edge apply (HTTP on :$PORT)" wait_for 15 http_code_is "$ENTITY" 200
        purge_checks "purge again"
    fi

    section "a tampered Release is refused"
    # Someone between the Pi and the server changes the signed index (here: one
    # hash in InRelease, and in Release next to Release.gpg).
    for f in InRelease Release; do
        cp "$TMP/repo/dists/bookworm/$f" "$TMP/$f.orig"
        python3 -c 'import re, sys
p = sys.argv[1]; s = open(p).read()
m = re.search(r"^ ([0-9a-f])[0-9a-f]{63} ", s, re.M)   # the first SHA256 line
c = "1" if m.group(1) == "0" else "0"
open(p, "w").write(s[:m.start(1)] + c + s[m.end(1):])' "$TMP/repo/dists/bookworm/$f"
    done
    check "the served InRelease really differs" sh -c "! cmp -s '$TMP/InRelease.orig' '$TMP/repo/dists/bookworm/InRelease'"
    # apt refuses the index with "W: … BADSIG" and keeps the previous one, but its
    # exit status stays 0 unless asked (apt-get --error-on=any, apt >= 2.1.16).
    ct apt-get update >"$TMP/apt-tamper.log" 2>&1
    sed -n '/^[WE]:/p' "$TMP/apt-tamper.log" | head -n 2 | cut -c1-160 | sed 's/^/      | /'
    check "apt update refuses the tampered Release: BADSIG, the previous index is kept" \
        grep -q 'BADSIG.*hass-edge' "$TMP/apt-tamper.log"
    ct apt-get update --error-on=any >"$LOG" 2>&1
    rc=$?
    expect "apt-get update --error-on=any fails on it (exit $rc)" "$([ $rc -ne 0 ] && echo failed)" failed
    # A Pi that has no earlier index of the repository gets no package at all.
    ct sh -c 'rm -f /var/lib/apt/lists/127.0.0.1[:_]*'
    ct apt-get update >/dev/null 2>&1
    ct apt-get install -y hass-edge </dev/null >"$LOG" 2>&1
    rc=$?
    check "a fresh client does not install hass-edge from the tampered repository (exit $rc)" sh -c \
        "[ $rc -ne 0 ] && ! nsenter -t $LEADER -a dpkg-query -W -f '\${Status}' hass-edge 2>/dev/null | grep -q 'ok installed'"
    for f in InRelease Release; do cp "$TMP/$f.orig" "$TMP/repo/dists/bookworm/$f"; done
    check "with the original Release restored, apt update is clean again" ct apt-get update --error-on=any
fi

# ------------------------------------------- nspawn-arm64, nspawn-bullseye ----
# Not in the default set: slower, and they need extra builds or emulation.
#   nspawn-arm64     an arm64 bookworm root booted under systemd through binfmt_misc
#                    (qemu-aarch64-static, flag F), the arm64 .deb installed and live
#   nspawn-bullseye  the bullseye (glibc 2.31, ~deb11) .debs: lintian and contract,
#                    then the amd64 one installed in a bullseye root (systemd 247), live

# ensure_binfmt_aarch64: mount binfmt_misc and register qemu-aarch64-static with flag
# F (the kernel opens the interpreter now, so it works inside the container's root).
ensure_binfmt_aarch64() {
    local bm=/proc/sys/fs/binfmt_misc
    if [ ! -e "$bm/register" ]; then
        mount -t binfmt_misc binfmt_misc "$bm" || return 1
    fi
    if [ -e "$bm/qemu-aarch64" ]; then
        grep -q '^flags:.*F' "$bm/qemu-aarch64" && return 0
        echo "qemu-aarch64 is registered without flag F (by someone else): $(tr '\n' ' ' <"$bm/qemu-aarch64")"
        return 1
    fi
    printf '%s' ':qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/usr/bin/qemu-aarch64-static:F' \
        >"$bm/register"
}

# live_proof SUITE ARCH DEB: boot a SUITE/ARCH root under systemd, install DEB, give it
# the token and a config, and show it live against the real Home Assistant.
live_proof() {
    local suite=$1 arch=$2 deb=$3 label="$1/$2" t0 took
    section "nspawn: Debian $label with systemd as PID 1"
    if [ -z "$deb" ]; then fail "$label: a .deb to install (scripts/build-debs.sh)"; return; fi
    if [ -z "$HA_URL" ] || [ ! -r "$HA_TOKEN_FILE" ]; then
        fail "$label: HASS_EDGE_TEST_HA_URL and HASS_EDGE_TEST_HA_TOKEN_FILE set"; return
    fi
    t0=$SECONDS
    check "$label: root (debootstrap --arch=$arch $suite, cached in $(rootfs_dir "$suite" "$arch"))" \
        ensure_rootfs "$suite" "$arch" || return
    echo "      | root ready in $((SECONDS - t0)) s"
    t0=$SECONDS
    check "$label: boot (systemd-nspawn -b --register=no --keep-unit)" boot_container "$suite" "$arch" || return
    R=$SCRATCH/root
    echo "      | booted in $((SECONDS - t0)) s: $(ct systemctl --version | head -n1)"
    expect "$label: dpkg --print-architecture in the container" "$(ct dpkg --print-architecture)" "$arch"
    t0=$SECONDS
    if [ "${4:-}" = repo ]; then
        # One repository with every build; README's commands pick the suite from os-release.
        readme_install_block >"$R/root/readme-install.sh"
        ct bash -e /root/readme-install.sh </dev/null >"$TMP/apt-$arch.log" 2>&1
        expect "$label: README's install commands, from the repository ($((SECONDS - t0)) s)" "$?" 0
        expect "$label: apt picked the $suite build" "$(ct dpkg-query -W -f '${Version}' hass-edge)" \
            "$(dpkg-deb -f "$deb" Version)"
    else
        cp "$deb" "$R/root/"
        ct apt-get install -y "/root/$(basename "$deb")" </dev/null >"$TMP/apt-$arch.log" 2>&1
        expect "$label: apt-get install ./$(basename "$deb") ($((SECONDS - t0)) s)" "$?" 0
    fi
    install -m 600 "$HA_TOKEN_FILE" "$R/etc/hass-edge/token"
    write_test_config
    if [ -n "${QEMU_USER_DROPIN:-}" ]; then
        mkdir -p "$R/etc/systemd/system/hass-edge.service.d"
        printf '%s\n' "$QEMU_USER_DROPIN" >"$R/etc/systemd/system/hass-edge.service.d/qemu-user.conf"
        ct sh -c 'chgrp hass-edge /etc/hass-edge/token && chmod 640 /etc/hass-edge/token && systemctl daemon-reload'
        echo "      | test-only drop-in (qemu-user cannot emulate these; see packaging/README.md):"
        sed 's/^/      |   /' "$R/etc/systemd/system/hass-edge.service.d/qemu-user.conf"
    fi
    t0=$SECONDS
    ct systemctl start hass-edge.service >"$LOG" 2>&1
    rc=$?
    expect "$label: systemctl start returns after READY=1 ($((SECONDS - t0)) s)" "$rc" 0
    check "$label: systemctl status: active (running)" sh -c \
        "nsenter -t $LEADER -a systemctl status hass-edge.service --no-pager | grep -q 'Active: active (running)'"
    check "$label: Status: \"live: …\"" wait_for 60 is_live
    echo "      | Status: $(prop StatusText)"
    check "$label: GET /health from the host answers 200, connected" sh -c \
        "curl -fsS http://127.0.0.1:$PORT/health | grep -q '\"connected\": *true'"
    main_pid=$(prop MainPID)
    expect "$label: daemon runs as user hass-edge" "$(ct stat -c %U "/proc/$main_pid")" hass-edge
    purge_checks "$label"
    stop_container
}

if want nspawn-arm64; then
    section "arm64 under systemd: binfmt_misc + qemu-aarch64-static"
    if check "binfmt_misc mounted, qemu-aarch64-static registered with flag F" ensure_binfmt_aarch64; then
        sed 's/^/      | /' /proc/sys/fs/binfmt_misc/qemu-aarch64
        # Under qemu-user, systemd's credential mount and its user namespace fail with
        # EINVAL ("Failed to set up credentials: Invalid argument", status=243/CREDENTIALS;
        # then "Failed to set up user namespacing: Invalid argument", 217/USER): qemu
        # does not emulate those syscalls for the guest. A real arm64 kernel has them. So
        # this emulated proof runs the packaged unit with these two turned off (token
        # readable by the group instead) and everything else as shipped.
        QEMU_USER_DROPIN='[Service]
LoadCredential=
Environment=HASS_EDGE_HA_TOKEN_FILE=/etc/hass-edge/token
PrivateUsers=no' BOOT_WAIT=300 live_proof bookworm arm64 "$ARM64_DEB"
    fi
fi

if want nspawn-bullseye; then
    section "bullseye (~deb11) packages"
    for arch in amd64 arm64 armhf; do
        deb=$(ls -1 "$DEB_DIR"/bullseye/hass-edge_*~deb11_"$arch".deb 2>/dev/null | tail -n1)
        if [ -z "$deb" ]; then fail "a bullseye $arch .deb (scripts/build-debs.sh --bullseye)"; continue; fi
        lintian_check "$deb"
        deb_contract "$deb" "bullseye $arch"
    done
    # Every .deb (bookworm and bullseye) in one signed repository.
    if check "one signed repository with the bookworm and bullseye .debs" \
            bash scripts/publish-apt-repo.sh --debs "$DEB_DIR" --state "$TMP/repo-all.state" "$TMP/repo-all"; then
        reprepro --basedir "$TMP/repo-all.state" list bullseye | sed 's/^/      | /'
        reprepro --basedir "$TMP/repo-all.state" list bookworm | sed 's/^/      | /'
        if [ -n "$REPO_SERVER_PID" ]; then kill "$REPO_SERVER_PID"; wait "$REPO_SERVER_PID" 2>/dev/null; fi
        python3 -m http.server --bind 127.0.0.1 --directory "$TMP/repo-all" "$REPO_PORT" >"$TMP/http-all.log" 2>&1 &
        REPO_SERVER_PID=$!
        wait_for 10 curl -fsS -o /dev/null "http://127.0.0.1:$REPO_PORT/dists/bullseye/InRelease"
        live_proof bullseye amd64 "$(ls -1 "$DEB_DIR"/bullseye/hass-edge_*~deb11_amd64.deb 2>/dev/null | tail -n1)" repo
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
