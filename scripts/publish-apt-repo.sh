#!/bin/bash
# Build (or update) a signed apt repository of hass-edge from the .debs in target/debian/.
#
#   scripts/publish-apt-repo.sh [--key KEYID] [--debs DIR] [--state DIR] OUT_DIR
#
#   OUT_DIR   the repository to publish, self-contained: dists/, pool/ and the public
#             key hass-edge-archive-keyring.gpg (binary, for signed-by=) + .asc.
#             Serve it with any static web server (nginx, Apache, GitHub Pages, S3,
#             `python3 -m http.server`); nothing in it is secret.
#   --key     sign with this key from your gpg keyring (GNUPGHOME honoured). Without
#             it a throwaway key is made (and reused on the next run with the same
#             --state), and the script says so: fine for tests, not for users.
#   --debs    where the .debs are (default target/debian): every hass-edge_*~deb12_*.deb
#             there goes to suite bookworm, every *~deb11_* (also in bullseye/) to
#             bullseye. Architectures amd64, arm64, armhf; component main.
#   --state   reprepro's conf/ and db/, and the throwaway key (default OUT_DIR.state,
#             next to OUT_DIR, never inside it). Keep it to add versions later.
#
# reprepro writes Release, InRelease and Release.gpg; a newer version replaces the
# older one of the same architecture in its suite (run again after a new build).
set -euo pipefail

usage() { sed -n '2,21p' "$0"; exit 2; }
KEY=""
DEBS=""
STATE=""
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --key) KEY=$2; shift ;;
        --debs) DEBS=$2; shift ;;
        --state) STATE=$2; shift ;;
        -h|--help) usage ;;
        -*) echo "publish-apt-repo: unknown option $1" >&2; usage ;;
        *) [ -z "$OUT" ] || usage; OUT=$1 ;;
    esac
    shift
done
[ -n "$OUT" ] || usage
REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEBS=${DEBS:-$REPO_ROOT/target/debian}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STATE=${STATE:-$OUT.state}
mkdir -p "$STATE/conf"
for tool in reprepro gpg; do
    command -v "$tool" >/dev/null || { echo "publish-apt-repo: $tool missing (scripts/packaging-deps.sh)" >&2; exit 1; }
done

if [ -z "$KEY" ]; then
    export GNUPGHOME="$STATE/gnupg"
    if [ ! -d "$GNUPGHOME" ]; then
        mkdir -m 700 "$GNUPGHOME"
        gpg --batch --quiet --passphrase '' --quick-gen-key \
            "hass-edge throwaway test repository key <test@invalid>" ed25519 sign never
    fi
    KEY=$(gpg --batch --quiet --with-colons --list-secret-keys 2>/dev/null | awk -F: '/^fpr:/ { print $10; exit }')
    echo "publish-apt-repo: NOTE: signed with a throwaway test key ($KEY, in $GNUPGHOME);"
    echo "publish-apt-repo: pass --key KEYID to sign with the project's real key."
fi
gpg --batch --list-secret-keys "$KEY" >/dev/null 2>&1 ||
    { echo "publish-apt-repo: no secret key $KEY in ${GNUPGHOME:-~/.gnupg}" >&2; exit 1; }

cat >"$STATE/conf/distributions" <<EOF
Origin: hass-edge
Label: hass-edge
Codename: bookworm
Architectures: amd64 arm64 armhf
Components: main
Description: hass-edge for Debian 12 bookworm / Raspberry Pi OS bookworm
SignWith: $KEY

Origin: hass-edge
Label: hass-edge
Codename: bullseye
Architectures: amd64 arm64 armhf
Components: main
Description: hass-edge for Debian 11 bullseye / Raspberry Pi OS bullseye
SignWith: $KEY
EOF
cat >"$STATE/conf/options" <<EOF
outdir $OUT
EOF

reprepro_() { reprepro --basedir "$STATE" --silent "$@"; }
reprepro_ export   # creates both suites (signed) even when one has no package yet
n=0
while IFS= read -r deb; do
    case "$(dpkg-deb -f "$deb" Version)" in
        *~deb12) suite=bookworm ;;
        *~deb11) suite=bullseye ;;
        *) echo "publish-apt-repo: skipping $deb (version is neither ~deb12 nor ~deb11)" >&2; continue ;;
    esac
    reprepro_ includedeb "$suite" "$deb"
    n=$((n + 1))
done < <(find "$DEBS" -maxdepth 2 -name 'hass-edge_*.deb' | sort)
[ "$n" -gt 0 ] || { echo "publish-apt-repo: no .deb found in $DEBS (scripts/build-debs.sh)" >&2; exit 1; }

gpg --batch --export "$KEY" >"$OUT/hass-edge-archive-keyring.gpg"
gpg --batch --armor --export "$KEY" >"$OUT/hass-edge-archive-keyring.asc"

echo "publish-apt-repo: $OUT ($n .debs), signed by $KEY"
for suite in bookworm bullseye; do
    reprepro_ list "$suite" | sed "s/^/  /"
done
cat <<EOF
Publish $OUT with any static web server, then on the Pi (URL = where it is served):
  curl -fsSL URL/hass-edge-archive-keyring.gpg | sudo tee /usr/share/keyrings/hass-edge-archive-keyring.gpg >/dev/null
  echo "deb [signed-by=/usr/share/keyrings/hass-edge-archive-keyring.gpg] URL bookworm main" | sudo tee /etc/apt/sources.list.d/hass-edge.list
EOF
