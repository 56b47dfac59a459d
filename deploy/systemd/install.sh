#!/usr/bin/env bash
# Installs meshnode as a systemd service: the binary, the unit, the meshnode user and group,
# and an example config (never overwriting an existing one). Safe to run again to upgrade.
#
#   sudo deploy/systemd/install.sh [PATH-TO-meshnode]      (default: target/release/meshnode)
#   DESTDIR=/tmp/root deploy/systemd/install.sh ...        stage into a directory instead:
#                                                          no user, no chown, no systemctl
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

case "${1:-}" in
-h | --help)
    sed -n '2,7s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
    exit 0
    ;;
esac

bin="${1:-$repo/target/release/meshnode}"
destdir="${DESTDIR:-}"
destdir="${destdir%/}"

die() {
    echo "install.sh: $*" >&2
    exit 1
}

[[ -f "$bin" && -x "$bin" ]] ||
    die "no meshnode binary at $bin; build it with 'cargo build --release -p meshnode' or pass its path"
if [[ -z "$destdir" && "$(id -u)" -ne 0 ]]; then
    die "run as root (or set DESTDIR=/some/dir to stage the files without touching the system)"
fi

staged() {
    [[ -n "$destdir" ]]
}

if staged; then
    echo "DESTDIR=$destdir: staging files only; skipping useradd, chown and systemctl"
fi

# 1. User and group. A fixed system user rather than DynamicUser=: the state directory and the
#    node key must stay readable by the same uid across restarts and upgrades.
if staged; then
    echo "skipped: creating system user and group meshnode"
else
    if ! getent group meshnode >/dev/null; then
        groupadd --system meshnode
        echo "created group meshnode"
    fi
    if ! id -u meshnode >/dev/null 2>&1; then
        useradd --system --no-create-home --home-dir /var/lib/meshnode \
            --shell /usr/sbin/nologin --gid meshnode meshnode
        echo "created user meshnode"
    fi
fi

# 2. Binary: copied next to the target and renamed over it, so a running node is not disturbed.
install -d -m 0755 "$destdir/usr/local/bin"
install -m 0755 "$bin" "$destdir/usr/local/bin/.meshnode.new"
mv -f "$destdir/usr/local/bin/.meshnode.new" "$destdir/usr/local/bin/meshnode"
echo "installed $destdir/usr/local/bin/meshnode ($("$destdir/usr/local/bin/meshnode" version))"

# 3. Unit.
install -d -m 0755 "$destdir/etc/systemd/system"
install -m 0644 "$here/meshnode.service" "$destdir/etc/systemd/system/meshnode.service"
echo "installed $destdir/etc/systemd/system/meshnode.service"

# 4. Config directory (root-owned, readable by the meshnode group) and the example config.
install -d -m 0750 "$destdir/etc/meshnode"
staged || chown root:meshnode "$destdir/etc/meshnode"
config="$destdir/etc/meshnode/meshnode.toml"
if [[ -e "$config" ]]; then
    echo "kept existing $config"
else
    install -m 0640 "$here/meshnode.example.toml" "$config"
    staged || chown root:meshnode "$config"
    echo "installed example config $config (edit it before starting)"
fi

# 5. Tell systemd.
if staged; then
    echo "skipped: systemctl daemon-reload"
elif [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
else
    echo "systemd is not running here: run 'systemctl daemon-reload' where it is"
fi

cat <<'EOF'

Next steps (as root):
  1. Make the mesh CA once, on an admin machine rather than on every node; keep ca.key there:
       meshnode ca init --dir /root/meshnode-ca --trust-domain example.mesh
  2. Issue this node's certificate and install it with ca.pem; the key belongs to meshnode, 0600:
       meshnode cert issue --ca-dir /root/meshnode-ca --name node-a --out /etc/meshnode
       install -m 0644 /root/meshnode-ca/ca.pem /etc/meshnode/ca.pem
       chown meshnode:meshnode /etc/meshnode/node-a.key && chmod 0600 /etc/meshnode/node-a.key
  3. Edit /etc/meshnode/meshnode.toml (node.name = the certificate's name, advertise, registry
     endpoints, services) and check it as the service will:
       runuser -u meshnode -- meshnode validate -c /etc/meshnode/meshnode.toml
  4. Start it now and at boot, then watch it:
       systemctl enable --now meshnode
       systemctl status meshnode; journalctl -u meshnode -f; meshnode status
  After changing the config or certificates: systemctl reload meshnode (validates, then SIGHUP).
  After upgrading the binary: systemctl restart meshnode (drains first).
EOF
