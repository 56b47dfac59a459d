#!/bin/bash
# Runs inside the VM that deploy/systemd/vm-test.sh boots (as root, from a oneshot unit, after
# etcd.service): installs the meshnode .deb next to this script, makes a CA and this node's
# certificate, turns the packaged example config into a real node, then checks the unit under
# systemd. One PASS/FAIL line per check; the exit status is the number of FAILs (0 = all passed).
set -u
payload=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
conf=/etc/meshnode/meshnode.toml
export ETCDCTL_API=3
fails=0

pass() { echo "PASS: $*"; }
fail() {
    echo "FAIL: $*"
    fails=$((fails + 1))
}
info() { echo "INFO: $*"; }
etcd_keys() { etcdctl --endpoints=http://127.0.0.1:2379 get --prefix /meshnode --keys-only | grep -v '^$'; }
main_pid() { systemctl show -p MainPID --value meshnode; }
prop() { systemctl show -p "$1" --value meshnode; }
# The admin API's /readyz answer: "200 ready" / "503 not ready: ..." (or nothing).
readyz() {
    timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/15000 || exit 1
        printf "GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n" >&3
        cat <&3' 2>/dev/null | tr -d '\r' | awk 'NR == 1 { code = $2 } END { print code, $0 }'
}
# wait_for SECS CMD...: polls CMD every 0.2 s until it succeeds or SECS pass.
wait_for() {
    local end=$((SECONDS + $1))
    shift
    until "$@"; do
        ((SECONDS < end)) || return 1
        sleep 0.2
    done
}
journal_count() { journalctl -u meshnode -o cat --no-pager | grep -c -- "$1"; }
echo "INFO: guest $(uname -r), $(systemctl --version | head -n1)"

# A minimal Debian has no procps (no /bin/kill, ps, pgrep): the unit must not need it.
if dpkg-query -W -f '${Status}' procps 2>/dev/null | grep -q 'ok installed'; then
    dpkg --purge procps >/dev/null 2>&1 && info "procps purged (a minimal Debian has none)"
fi

# --- install -----------------------------------------------------------------------------------
if dpkg -i "$payload/meshnode.deb" >/tmp/dpkg.log 2>&1; then
    pass "dpkg -i $(dpkg-query -W -f '${Package} ${Version}' meshnode)"
else
    cat /tmp/dpkg.log
    fail "dpkg -i"
    exit 1
fi
if wait_for 60 etcdctl --endpoints=http://127.0.0.1:2379 endpoint health >/dev/null 2>&1; then
    pass "etcd.service $(systemctl is-active etcd) on 127.0.0.1:2379"
else
    fail "etcd not healthy: $(systemctl status etcd --no-pager 2>&1 | tail -n 5)"
    exit 1
fi

# --- a real node: CA, certificate, config ------------------------------------------------------
meshnode ca init --dir /root/ca --trust-domain vm.test >/dev/null
meshnode cert issue --ca-dir /root/ca --name node-a --out /etc/meshnode >/dev/null
install -m 0644 /root/ca/ca.pem /etc/meshnode/ca.pem
chown meshnode:meshnode /etc/meshnode/node-a.key
sed -i 's/^listen = "0.0.0.0:4433"/listen = "127.0.0.1:4433"/
    s/^advertise = .*/advertise = "127.0.0.1:4433"/
    s#^endpoints = .*#endpoints = ["http://127.0.0.1:2379"]#' "$conf"
cat >>"$conf" <<'TOML'

[[service]]
name = "orders"
protocol = "tcp"
target = "127.0.0.1:7001"
TOML
if out=$(runuser -u meshnode -- meshnode validate -c "$conf" 2>&1); then
    pass "config validates as the meshnode user: $out"
else
    fail "config does not validate: $out"
fi

# --- start: active only once READY, i.e. registered --------------------------------------------
# With etcd down the node runs but cannot register: the unit must stay "activating".
systemctl stop etcd
systemctl start --no-block meshnode
wait_for 60 bash -c '[[ $(systemctl show -p MainPID --value meshnode) != 0 ]] &&
    exec 3<>/dev/tcp/127.0.0.1/15000' 2>/dev/null
sleep 3
state=$(prop ActiveState)
r=$(readyz)
if [[ $state == activating && $r == 503* ]]; then
    pass "etcd down: unit stays '$state' while the node runs unregistered (/readyz: ${r#* })"
else
    fail "etcd down: unit '$state', /readyz '$r' (want activating, 503)"
fi
systemctl start etcd
t0=$SECONDS
if timeout 180 systemctl start meshnode; then
    keys=$(etcd_keys)
    if grep -qx /meshnode/nodes/node-a <<<"$keys" && grep -qx /meshnode/services/orders/node-a <<<"$keys"; then
        pass "systemctl start returned ($((SECONDS - t0)) s after etcd came up) with the node registered: $(echo $keys)"
    else
        fail "systemctl start returned before registration: keys: '$keys'"
    fi
else
    fail "systemctl start meshnode: $(systemctl status meshnode --no-pager 2>&1 | tail -n 5)"
fi
[[ $(prop ActiveState)/$(prop SubState) == active/running ]] && pass "unit active/running" ||
    fail "unit $(prop ActiveState)/$(prop SubState)"
r=$(readyz)
[[ $r == 200* ]] && pass "/readyz: $r" || fail "/readyz: '$r'"
journal_count 'ready' >/dev/null && pass "journal: $(journalctl -u meshnode -o cat --no-pager | grep -m1 -i 'ready')" ||
    fail "no 'ready' line in the journal"

# --- hardening, seen from the running service --------------------------------------------------
pid=$(main_pid)
uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")
[[ $uid == "$(id -u meshnode)" ]] && pass "runs as user meshnode (uid $uid)" || fail "runs as uid $uid"
nnp=$(awk '/^NoNewPrivs:/ {print $2}' "/proc/$pid/status")
[[ $nnp == 1 ]] && pass "NoNewPrivs: 1" || fail "NoNewPrivs: $nnp"
for cap in CapEff CapPrm CapBnd CapAmb; do
    v=$(awk -v c="$cap:" '$1 == c {print $2}' "/proc/$pid/status")
    [[ $v =~ ^0+$ ]] && pass "$cap: $v" || fail "$cap: $v"
done
seccomp=$(awk '/^Seccomp:/ {print $2}' "/proc/$pid/status")
[[ $seccomp == 2 ]] && pass "Seccomp: 2 (filter)" || fail "Seccomp: $seccomp"
# Writes inside the service's own mount namespace: as root there, so that only the mounts (not
# file permissions) can refuse them.
in_ns() { nsenter -t "$pid" -m -- "$@"; }
for dir in / /etc /etc/meshnode /usr /var /var/lib /boot; do
    if out=$(in_ns touch "$dir/.vm-test-write" 2>&1); then
        in_ns rm -f "$dir/.vm-test-write"
        fail "service namespace: $dir is writable"
    elif [[ $out == *"Read-only file system"* ]]; then
        pass "service namespace: $dir read-only"
    else
        fail "service namespace: $dir: $out"
    fi
done
if in_ns setpriv --reuid=meshnode --regid=meshnode --clear-groups \
    sh -c 'echo x >/var/lib/meshnode/.vm-test-write && rm /var/lib/meshnode/.vm-test-write'; then
    pass "service namespace: /var/lib/meshnode writable by meshnode"
else
    fail "service namespace: /var/lib/meshnode not writable by meshnode"
fi
home=$(in_ns ls -A /root 2>&1)
[[ -z $home || $home == *"Permission denied"* || $home == *"No such file"* ]] &&
    pass "service namespace: /root hidden (ProtectHome)" || fail "service namespace: /root shows '$home'"
[[ $(in_ns ls /tmp) == "" ]] && pass "service namespace: private /tmp" || fail "service namespace: /tmp shared"
in_ns setpriv --reuid=meshnode --regid=meshnode --clear-groups test -d /proc/1 &&
    fail "service namespace: /proc/1 visible to meshnode" ||
    pass "service namespace: other users' processes invisible (ProtectProc=invisible)"
state=$(stat -c '%a %U' /var/lib/meshnode)
[[ $state == "700 meshnode" ]] && pass "state dir /var/lib/meshnode: $state, $(ls -A /var/lib/meshnode | wc -l) file(s)" ||
    fail "state dir /var/lib/meshnode: $state"
score=$(systemd-analyze security meshnode --no-pager 2>&1 | tail -n 1)
systemd-analyze security meshnode --no-pager 2>&1 | grep -E '^ *✗' | sed 's/^/INFO: exposed: /; s/ *$//' | cut -c1-150
if [[ $score =~ level\ for\ meshnode.service:\ ([0-9.]+)\ ([A-Z]+) ]]; then
    info "systemd-analyze security meshnode: ${BASH_REMATCH[1]} ${BASH_REMATCH[2]}"
    awk -v s="${BASH_REMATCH[1]}" 'BEGIN { exit !(s <= 2.0) }' &&
        pass "systemd-analyze security: exposure ${BASH_REMATCH[1]} ${BASH_REMATCH[2]} (<= 2.0)" ||
        fail "systemd-analyze security: exposure ${BASH_REMATCH[1]} ${BASH_REMATCH[2]} (> 2.0)"
else
    fail "systemd-analyze security: '$score'"
fi

# --- reload: a service added, same process -----------------------------------------------------
cp "$conf" /root/meshnode.toml.good
cat >>"$conf" <<'TOML'

[[service]]
name = "billing"
protocol = "http"
target = "127.0.0.1:7002"
TOML
if systemctl reload meshnode; then
    if wait_for 30 bash -c 'etcdctl --endpoints=http://127.0.0.1:2379 get --keys-only /meshnode/services/billing/node-a | grep -q .'; then
        pass "systemctl reload: service billing registered"
    else
        fail "systemctl reload: billing not in etcd: $(echo $(etcd_keys))"
    fi
else
    fail "systemctl reload failed: $(journalctl -u meshnode -n 5 -o cat --no-pager)"
fi
[[ $(main_pid) == "$pid" ]] && pass "reload kept MainPID $pid" || fail "MainPID changed: $pid -> $(main_pid)"
wait_for 10 bash -c '[[ $(systemctl show -p SubState --value meshnode) == running ]]'
[[ $(prop ActiveState) == active ]] && pass "unit active after reload" || fail "unit $(prop ActiveState) after reload"

# --- a broken config: the reload is refused, the node keeps the old config ---------------------
cp "$conf" /root/meshnode.toml.reloaded
before=$(journal_count vm_test_bogus)
echo 'vm_test_bogus = 1' >>"$conf"
if systemctl reload meshnode 2>/tmp/reload.err; then
    fail "systemctl reload accepted a config with an unknown key"
else
    pass "systemctl reload refused the broken config: $(head -n1 /tmp/reload.err)"
fi
sleep 1
after=$(journal_count vm_test_bogus)
if ((after > before)); then
    pass "journal names the field: $(journalctl -u meshnode -o cat --no-pager | grep -m1 'unknown field .vm_test_bogus')"
else
    fail "the journal does not name vm_test_bogus"
fi
[[ $(prop ActiveState) == active && $(main_pid) == "$pid" ]] && pass "node still active, same MainPID $pid" ||
    fail "node $(prop ActiveState), MainPID $(main_pid)"
r=$(readyz)
[[ $r == 200* ]] && pass "/readyz after the refused reload: $r" || fail "/readyz after the refused reload: '$r'"
keys=$(etcd_keys)
grep -qx /meshnode/services/billing/node-a <<<"$keys" && grep -qx /meshnode/services/orders/node-a <<<"$keys" &&
    pass "old config still served: $(echo $keys)" || fail "keys after the refused reload: '$keys'"
cp /root/meshnode.toml.reloaded "$conf"

# --- stop: drained, keys gone, exit 0 ----------------------------------------------------------
# systemd counts SIGTERM as a clean end too (Result=success), and logs the main process's exit
# only at debug level: raise it for the stop to see "code=exited, status=0".
systemd-analyze log-level debug
t0=$SECONDS
if timeout 60 systemctl stop meshnode; then
    pass "systemctl stop returned after $((SECONDS - t0)) s"
else
    fail "systemctl stop"
fi
systemd-analyze log-level info
keys=$(etcd_keys)
[[ -z $keys ]] && pass "after stop: no /meshnode keys in etcd" || fail "after stop, keys left: $(echo $keys)"
st="ExecMainCode=$(prop ExecMainCode) ExecMainStatus=$(prop ExecMainStatus) Result=$(prop Result)"
exited=$(journalctl -u meshnode -o cat --no-pager | grep 'Main process exited' | tail -n 1)
if [[ $exited == *"code=exited, status=0/SUCCESS"* && $(prop Result) == success ]]; then
    pass "exit status 0: '$exited' ($st)"
else
    fail "stop: '$exited' ($st)"
fi
journalctl -u meshnode -o cat --no-pager | grep -qi drain && pass "journal: $(journalctl -u meshnode -o cat --no-pager | grep -i -m1 drain)" ||
    fail "no drain line in the journal"

# --- start with a broken config: ExecStartPre refuses it, naming the field ---------------------
echo 'vm_test_start_bogus = 1' >>"$conf"
if timeout 60 systemctl start meshnode 2>/dev/null; then
    fail "systemctl start accepted a config with an unknown key"
else
    pass "systemctl start refused the broken config ($(prop ActiveState))"
fi
journal_count vm_test_start_bogus >/dev/null && pass "journal names the field: $(journalctl -u meshnode -o cat --no-pager | grep -m1 'vm_test_start_bogus')" ||
    fail "the journal does not name vm_test_start_bogus"
systemctl stop meshnode 2>/dev/null
systemctl reset-failed meshnode 2>/dev/null
cp /root/meshnode.toml.reloaded "$conf"

echo "INFO: $fails FAIL(s)"
exit "$fails"
