#!/usr/bin/env bash
# Tests the Debian package in a bare Debian container (no systemd there: the unit's behaviour is
# tested in a VM by deploy/systemd/vm-test.sh): install, files and their owners, the meshnode
# user, a node certificate and config that validate as the meshnode user, an upgrade that keeps
# the edited config, remove, and purge.
#
#   deploy/debian/test.sh [PATH-TO-meshnode]     default: target/release/meshnode
#
# Needs docker and the local base image (deploy/docker/build-base.sh makes it). Builds two
# packages (versions <v>-1 and <v>-2) of the same binary into a temp dir.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
bin="${1:-$repo/target/release/meshnode}"
BASE_IMAGE=${MESHNODE_BASE_IMAGE:-debian:bookworm-slim}

log() { printf '[deb-test] %s\n' "$*" >&2; }
command -v docker >/dev/null || { echo "deb test skipped: docker is not installed"; exit 0; }
[[ -x "$bin" ]] || { echo "deb test: no meshnode binary at $bin" >&2; exit 1; }
docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 || "$repo/deploy/docker/build-base.sh" >&2

work=$(mktemp -d)
name="meshnode-deb-test-$$"
cleanup() {
    docker rm -f "$name" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

v=$("$bin" version | awk '{print $2}')
# gzip: xz takes minutes on a debug binary, and compression is not what this tests.
export MESHNODE_DEB_COMPRESSION=gzip
MESHNODE_DEB_VERSION="$v-1" "$here/build-deb.sh" "$bin" >/dev/null
MESHNODE_DEB_VERSION="$v-2" "$here/build-deb.sh" "$bin" >/dev/null
arch=$(dpkg --print-architecture)
cp "$repo/target/debian/meshnode_$v-1_$arch.deb" "$work/old.deb"
cp "$repo/target/debian/meshnode_$v-2_$arch.deb" "$work/new.deb"
log "packages: $(du -h "$work/new.deb" | cut -f1) each; contents:"
dpkg-deb -c "$work/new.deb" | awk '{print "  " $1, $2, $6}' >&2

cat >"$work/inside.sh" <<'INSIDE'
set -eu
fail() { echo "FAIL: $*"; exit 1; }
ok() { echo "ok: $*"; }
mode_owner() { stat -c '%a %U:%G' "$1"; }

dpkg -i /t/old.deb >/t/install.log 2>&1 || { cat /t/install.log; fail "dpkg -i"; }
grep -q "systemctl enable --now meshnode" /t/install.log && ok "install explains the next steps"
[ "$(meshnode version)" != "" ] && ok "meshnode on PATH: $(command -v meshnode)"
getent passwd meshnode | grep -q ':/var/lib/meshnode:/usr/sbin/nologin$' || fail "meshnode user"
ok "system user meshnode (uid $(id -u meshnode))"
[ "$(mode_owner /var/lib/meshnode)" = "700 meshnode:meshnode" ] || fail "/var/lib/meshnode: $(mode_owner /var/lib/meshnode)"
ok "state dir 0700 meshnode"
[ "$(mode_owner /etc/meshnode)" = "750 root:meshnode" ] || fail "/etc/meshnode: $(mode_owner /etc/meshnode)"
[ "$(mode_owner /etc/meshnode/meshnode.toml)" = "640 root:meshnode" ] || fail "config: $(mode_owner /etc/meshnode/meshnode.toml)"
ok "config dir 0750 and example config 0640, root:meshnode"
unit=/usr/lib/systemd/system/meshnode.service
grep -q '^ExecStart=/usr/bin/meshnode run -c /etc/meshnode/meshnode.toml$' $unit || fail "unit ExecStart"
grep -q '^ExecStartPre=/usr/bin/meshnode validate' $unit || fail "unit ExecStartPre"
grep -q '^Type=notify$' $unit && grep -q '^ProtectSystem=strict$' $unit || fail "unit hardening"
ok "unit: Type=notify, validate before start, hardened, /usr/bin paths"
# The slim base image tells dpkg to skip /usr/share/man (dpkg.cfg.d/docker-slim): read the
# man page from the package itself.
dpkg-deb -x /t/old.deb /tmp/pkg
man=/tmp/pkg/usr/share/man/man1/meshnode.1.gz
zcat $man | grep -q '^\.TH meshnode 1' || fail "man page"
zcat $man | grep -q 'MESHNODE CERT ISSUE' || fail "man page lacks subcommands"
ok "man page meshnode(1) with every subcommand"
meshnode completions bash | cmp -s - /usr/share/bash-completion/completions/meshnode || fail "bash completions"
grep -q 'validate' /usr/share/zsh/vendor-completions/_meshnode || fail "zsh completions"
grep -q 'complete -c meshnode' /usr/share/fish/vendor_completions.d/meshnode.fish || fail "fish completions"
ok "bash, zsh and fish completions"
grep -qx /etc/meshnode/meshnode.toml /var/lib/dpkg/info/meshnode.conffiles || fail "conffile"

# A real node identity and config, validated as the service user (the unit's ExecStartPre).
meshnode ca init --dir /root/ca --trust-domain test.mesh >/dev/null
meshnode cert issue --ca-dir /root/ca --name node-a --out /etc/meshnode >/dev/null
install -m 0644 /root/ca/ca.pem /etc/meshnode/ca.pem
chown meshnode:meshnode /etc/meshnode/node-a.key
sed -i 's/^advertise = .*/advertise = "127.0.0.1:4433"/; s/^endpoints = .*/endpoints = ["http:\/\/127.0.0.1:2379"]/' /etc/meshnode/meshnode.toml
echo "# edited by the admin" >>/etc/meshnode/meshnode.toml
out=$(setpriv --reuid=meshnode --regid=meshnode --groups="$(getent group meshnode | cut -d: -f3)" \
    meshnode validate -c /etc/meshnode/meshnode.toml) || fail "validate as meshnode: $out"
ok "edited config validates as the meshnode user: $out"
chmod 0644 /etc/meshnode/node-a.key
set +e
out=$(meshnode validate -c /etc/meshnode/meshnode.toml 2>&1); code=$?
set -e
[ $code = 78 ] || fail "a key readable by others should be exit 78, got $code: $out"
ok "a world-readable key is refused (exit 78): $out"
chmod 0600 /etc/meshnode/node-a.key

dpkg -i /t/new.deb >/t/upgrade.log 2>&1 || { cat /t/upgrade.log; fail "upgrade"; }
dpkg-query -W -f '${Version}' meshnode | grep -q -- '-2$' || fail "upgraded version"
tail -1 /etc/meshnode/meshnode.toml | grep -q "edited by the admin" || fail "upgrade replaced the edited config"
[ -f /etc/meshnode/node-a.key ] || fail "upgrade removed the key"
ok "upgrade to $(dpkg-query -W -f '${Version}' meshnode) kept the edited config and the keys"

dpkg -r meshnode >/dev/null
[ ! -e /usr/bin/meshnode ] || fail "remove left the binary"
[ -f /etc/meshnode/meshnode.toml ] || fail "remove (not purge) must keep the config"
ok "remove: binary gone, config kept"
dpkg --purge meshnode >/dev/null
[ ! -e /etc/meshnode ] || fail "purge left /etc/meshnode"
[ ! -e /var/lib/meshnode ] || fail "purge left /var/lib/meshnode"
dpkg-query -W meshnode >/dev/null 2>&1 && fail "purge left the package known to dpkg"
ok "purge: /etc/meshnode and /var/lib/meshnode gone (the meshnode user is kept, as Debian recommends)"
echo PASS
INSIDE

log "running install / upgrade / purge in a bare $BASE_IMAGE container"
docker run --name "$name" --network none -v "$work:/t" "$BASE_IMAGE" sh /t/inside.sh | tee "$work/out.log"
grep -qx PASS "$work/out.log"
