#!/usr/bin/env bash
# Builds, without any image registry, the images the other files in this directory name:
#
#   debian:bookworm-slim   the base of every image here: `debootstrap --variant=minbase` + `docker import`,
#                          tagged with the name the Dockerfiles use, so the same Dockerfiles work
#                          unchanged where the real image can be pulled
#   meshnode-etcd:local    etcd from Debian's etcd-server package (Dockerfile.etcd)
#   meshnode-tools:local   socat + bash, runs the sample echo services (Dockerfile.tools)
#
# Idempotent: an image that already exists is kept. `--force` rebuilds etcd and tools (never the
# base; remove it by hand with `docker rmi debian:bookworm-slim` to rebuild it).
# Needs root (debootstrap) and the Debian mirror configured for apt on this host.
set -euo pipefail

BASE_IMAGE=${MESHNODE_BASE_IMAGE:-debian:bookworm-slim}
ETCD_IMAGE=${MESHNODE_ETCD_IMAGE:-meshnode-etcd:local}
TOOLS_IMAGE=${MESHNODE_TOOLS_IMAGE:-meshnode-tools:local}
SUITE=bookworm
here=$(cd "$(dirname "$0")" && pwd)

force=0
[[ ${1:-} == --force ]] && force=1

log() { printf '[build-base] %s\n' "$*" >&2; }
have_image() { docker image inspect "$1" >/dev/null 2>&1; }

# The first Debian (non-security) / security mirror URI apt uses on this host, one-line or deb822.
apt_uri() { # $1 = main|security
    local files=() f
    [[ -f /etc/apt/sources.list ]] && files+=(/etc/apt/sources.list)
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] && files+=("$f")
    done
    ((${#files[@]})) || return 0
    awk -v want="$1" '
        function pick(u) {
            if (u !~ /^(https?|ftp):\/\//) return 0
            if (u !~ /debian/) return 0
            if ((want == "security") != (u ~ /security/)) return 0
            print u; found = 1; exit
        }
        /^[[:space:]]*#/ { next }
        $1 == "deb" { for (i = 2; i <= NF; i++) if (pick($i)) exit }
        $1 == "URIs:" { for (i = 2; i <= NF; i++) if (pick($i)) exit }
    ' "${files[@]}" | head -n1
}

build_base() {
    if have_image "$BASE_IMAGE"; then
        log "$BASE_IMAGE exists, kept"
        return
    fi
    if ! command -v debootstrap >/dev/null; then
        log "installing debootstrap"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    fi
    local mirror security root t0
    mirror=$(apt_uri main); mirror=${mirror:-http://deb.debian.org/debian}
    security=$(apt_uri security); security=${security:-http://deb.debian.org/debian-security}
    root=$(mktemp -d /var/tmp/meshnode-rootfs.XXXXXX)
    # shellcheck disable=SC2064
    trap "rm -rf '$root'" RETURN
    t0=$SECONDS
    log "debootstrap --variant=minbase $SUITE from $mirror (about a minute)"
    debootstrap --variant=minbase "$SUITE" "$root" "${mirror%/}/" >"$root.log" 2>&1 || {
        tail -n 30 "$root.log" >&2; rm -f "$root.log"; exit 1; }
    rm -f "$root.log"
    cat >"$root/etc/apt/sources.list" <<SRC
deb ${mirror%/} $SUITE main
deb ${mirror%/} $SUITE-updates main
deb ${security%/} $SUITE-security main
SRC
    # What the official slim image also leaves out: caches, docs, man pages.
    cat >"$root/etc/dpkg/dpkg.cfg.d/docker-slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
CFG
    cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'CFG'
APT::Install-Recommends "false";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
CFG
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/* \
        "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/tmp/*
    : >"$root/etc/hostname"
    : >"$root/etc/resolv.conf"
    log "docker import → $BASE_IMAGE"
    tar --numeric-owner -C "$root" -c . | docker import \
        -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'CMD ["bash"]' \
        -m "debootstrap --variant=minbase $SUITE $mirror" - "$BASE_IMAGE" >/dev/null
    log "$BASE_IMAGE built in $((SECONDS - t0)) s"
}

build_from_base() { # $1 = image, $2 = Dockerfile
    if ((!force)) && have_image "$1"; then
        log "$1 exists, kept"
        return
    fi
    local t0=$SECONDS previous
    previous=$(docker image inspect -f '{{.Id}}' "$1" 2>/dev/null || true)
    log "building $1 from $2"
    # No build context is needed: the Dockerfile is sent on stdin.
    local out
    if ! out=$(docker build -t "$1" - <"$here/$2" 2>&1); then
        printf '%s\n' "$out" >&2
        exit 1
    fi
    # A forced rebuild leaves the previous image untagged: remove it (kept if still in use).
    if [[ -n $previous && $previous != "$(docker image inspect -f '{{.Id}}' "$1")" ]]; then
        docker rmi "$previous" >/dev/null 2>&1 || true
    fi
    log "$1 built in $((SECONDS - t0)) s"
}

build_base
build_from_base "$ETCD_IMAGE" Dockerfile.etcd
build_from_base "$TOOLS_IMAGE" Dockerfile.tools
