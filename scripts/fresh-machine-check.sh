#!/usr/bin/env bash
# Does the test command's install step work on a fresh machine? In a container from a bare
# Debian 12 image (`debootstrap --variant=minbase`: no python3, procps, iproute2, etcd or
# ca-certificates), runs `scripts/deps.sh --test` from a copy of the repository, then checks every
# tool and Python module the test suite needs, one PASS/FAIL line each.
#
#   scripts/fresh-machine-check.sh
#
# The image is made locally by deploy/docker/build-base.sh (no image registry needed; kept
# between runs). No privileged mode, nothing left behind (`docker run --rm`). Exit 0 when every
# item passes, or when docker is not available (skipped, with a message); 1 otherwise.
#
#   scripts/fresh-machine-check.sh --suite
#
# runs the README's whole test command (`scripts/test.sh`) in such a container instead, with only
# what a user brings first: this host's Rust toolchain (rustup's, mounted read-only), gcc, git
# and CA certificates. Crates come from crates.io into the container's own cargo home. The
# container gets CAP_NET_ADMIN, CAP_SYS_ADMIN and a writable /proc/sys (not privileged mode) so
# that the network namespace tests can run; there is no docker inside it, so test.sh skips its docker steps, and
# the VM test is skipped (MESHNODE_SKIP_VM=1; it runs on the host). About 25 minutes on 2 cores
# (a cold build); on demand, not part of scripts/test.sh.
# Environment: MESHNODE_BASE_IMAGE (the bare image, default debian:bookworm-slim, as build-base.sh).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
t0=$SECONDS
suite=0
[ "${1:-}" = "--suite" ] && suite=1

if ! command -v docker >/dev/null 2>&1 || ! docker info >/dev/null 2>&1; then
  echo "fresh-machine check SKIPPED: docker is not available here (it needs a docker engine)"
  exit 0
fi

image=${MESHNODE_BASE_IMAGE:-debian:bookworm-slim}
# Builds the bare base image if it is missing (and the compose test's etcd and tools images,
# which deploy/docker/test.sh needs next anyway); existing images are kept.
MESHNODE_BASE_IMAGE=$image "$root/deploy/docker/build-base.sh"

run=(docker run --rm -i --network bridge -v "$root:/src:ro")
# This workplace's network: apt mirrors and PyPI are reached through a TLS-inspecting proxy
# whose CA is in this machine's bundle (a user's machine needs none of this). The bundle is
# mounted beside, not over, the container's own store, so that installing ca-certificates
# inside still works.
host_ca=/etc/ssl/certs/ca-certificates.crt
if [ -r "$host_ca" ]; then
  run+=(-v "$host_ca:/run/host-ca.crt:ro" -e SSL_CERT_FILE=/run/host-ca.crt
    -e PIP_CERT=/run/host-ca.crt -e REQUESTS_CA_BUNDLE=/run/host-ca.crt -e HOST_CA=/run/host-ca.crt)
fi
for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
  [ -n "${!v:-}" ] && run+=(-e "$v=${!v}")
done

if [ $suite = 1 ]; then
  rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
  cargo_bin=${CARGO_HOME:-$HOME/.cargo}/bin
  [ -d "$rustup_home/toolchains" ] && [ -x "$cargo_bin/cargo" ] ||
    { echo "fresh-machine suite: no rustup toolchain at $rustup_home and $cargo_bin" >&2; exit 1; }
  # systempaths=unconfined: /proc/sys writable, for the sysctls the namespace tests set inside
  # their own network namespaces (docker mounts it read-only otherwise).
  run+=(--cap-add NET_ADMIN --cap-add SYS_ADMIN --security-opt systempaths=unconfined
    -v "$rustup_home:/opt/rustup:ro" -v "$cargo_bin:/opt/cargo-bin:ro"
    -e RUSTUP_HOME=/opt/rustup -e CARGO_HOME=/root/.cargo
    -e PATH=/opt/cargo-bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)
  [ -r "$host_ca" ] && run+=(-e CARGO_HTTP_CAINFO=/run/host-ca.crt)
  echo "fresh-machine suite: $image with the Rust toolchain, gcc and git; scripts/test.sh in a copy of the repository"
  set +e
  "${run[@]}" "$image" bash -s <<'INNER'
set -u
export DEBIAN_FRONTEND=noninteractive LC_ALL=C MESHNODE_SKIP_VM=1
if [ -n "${HOST_CA:-}" ]; then
  echo "Acquire::https::CAInfo \"$HOST_CA\";" >/etc/apt/apt.conf.d/99host-ca
fi
# What a user has before the README: the toolchain (mounted), a C compiler and linker, git, CAs.
apt-get update -qq && apt-get install -y -qq --no-install-recommends gcc libc6-dev git ca-certificates >/dev/null ||
  { echo "fresh-machine suite: installing gcc, git and ca-certificates failed"; exit 1; }
printf 'before the test command: %s; python3 %s, kill %s, ip %s, etcd %s\n' "$(cargo --version)" \
  "$(command -v python3 || echo absent)" "$([ -x /bin/kill ] && echo present || echo absent)" \
  "$(command -v ip || echo absent)" "$(command -v etcd || echo absent)"
mkdir -p /work/repo
tar -C /src --exclude=./target --exclude=./.git -c . | tar -C /work/repo -x
cd /work/repo
t=$SECONDS
scripts/test.sh </dev/null
rc=$?
echo "fresh-machine suite: scripts/test.sh exited $rc after $((SECONDS - t)) s"
exit $rc
INNER
  rc=$?
  set -e
  echo "fresh-machine suite took $((SECONDS - t0)) s: $([ $rc = 0 ] && echo PASS || echo FAIL)"
  exit $rc
fi

echo "fresh-machine check: $image, scripts/deps.sh --test in a copy of the repository"
set +e
"${run[@]}" "$image" bash -s <<'INNER'
set -u
export DEBIAN_FRONTEND=noninteractive LC_ALL=C
if [ -n "${HOST_CA:-}" ]; then
  echo "Acquire::https::CAInfo \"$HOST_CA\";" >/etc/apt/apt.conf.d/99host-ca
fi
# A copy of the working tree, without build output or git metadata.
mkdir -p /work/repo
tar -C /src --exclude=./target --exclude=./.git -c . | tar -C /work/repo -x
cd /work/repo

fails=0
pass() { printf 'PASS  %s\n' "$1"; }
fail() { printf 'FAIL  %s\n' "$1"; fails=$((fails + 1)); }
check() { # check "item" command...
  local item=$1 out
  shift
  if out=$("$@" 2>&1); then pass "$item"; else fail "$item"; printf '%s\n' "$out" | tail -n 5 | sed 's/^/      /'; fi
}

printf 'before: python3 %s, kill %s, ip %s, etcd %s\n' \
  "$(command -v python3 || echo absent)" "$(command -v kill >/dev/null && [ -x /bin/kill ] && echo present || echo absent)" \
  "$(command -v ip || echo absent)" "$(command -v etcd || echo absent)"

t=$SECONDS
if scripts/deps.sh --test >/tmp/deps.log 2>&1; then
  pass "scripts/deps.sh --test ($((SECONDS - t)) s)"
else
  fail "scripts/deps.sh --test ($((SECONDS - t)) s)"
  tail -n 30 /tmp/deps.log | sed 's/^/      /'
fi
# A second run has nothing left to do: no apt, no pip.
t=$SECONDS
if again=$(scripts/deps.sh --test 2>&1) && [ -z "$again" ]; then
  pass "scripts/deps.sh --test again: nothing to install ($((SECONDS - t)) s)"
else
  fail "scripts/deps.sh --test again: nothing to install"
  printf '%s\n' "$again" | tail -n 5 | sed 's/^/      /'
fi

# The build's tools.
check "protoc" protoc --version
check "descriptor.proto (libprotobuf-dev)" test -r /usr/include/google/protobuf/descriptor.proto
check "protoc compiles against the well-known types" \
  protoc -I/usr/include --descriptor_set_out=/dev/null google/protobuf/descriptor.proto
# The programs the tests spawn.
check "etcd" etcd --version
check "etcdctl" env ETCDCTL_API=3 etcdctl version
etcd_works() {
  local d pid ok=1 i
  d=$(mktemp -d)
  etcd --name fresh --data-dir "$d" --listen-client-urls http://127.0.0.1:23790 \
    --advertise-client-urls http://127.0.0.1:23790 --listen-peer-urls http://127.0.0.1:23800 \
    --initial-advertise-peer-urls http://127.0.0.1:23800 \
    --initial-cluster fresh=http://127.0.0.1:23800 >"$d.log" 2>&1 &
  pid=$!
  for i in $(seq 100); do
    if ETCDCTL_API=3 etcdctl --endpoints http://127.0.0.1:23790 put /fresh ok >/dev/null 2>&1 &&
      [ "$(ETCDCTL_API=3 etcdctl --endpoints http://127.0.0.1:23790 get --print-value-only /fresh)" = ok ]; then
      ok=0
      break
    fi
    sleep 0.1
  done
  kill "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  [ $ok = 0 ] || tail -n 5 "$d.log"
  rm -rf "$d" "$d.log"
  return $ok
}
check "etcd serves a put and a get (etcdctl)" etcd_works
check "ip (iproute2)" ip -V
check "tc (iproute2)" tc -V
check "nft (nftables)" nft --version
check "sysctl (procps)" sysctl --version
check "/bin/kill (procps, the unit's ExecReload)" test -x /bin/kill
check "systemd-analyze" systemd-analyze --version
check "bash" bash --version
check "jq" jq --version
check "curl" curl --version
check "h2load (nghttp2-client)" h2load --version
check "qemu-system-x86_64 (the VM test)" qemu-system-x86_64 --version
check "debootstrap (the VM test)" debootstrap --version
check "promtool (unpacked from Debian's prometheus into target/tools)" target/tools/promtool --version
check "no Prometheus server installed by the test step" bash -c '! command -v prometheus'

# The Python test clients, in the project-local venv, not the system's Python.
py=/work/repo/target/test-venv/bin/python
check "test venv python ($py)" "$py" -c "import sys; assert sys.prefix != sys.base_prefix, 'not a venv'"
check "python: import aioquic" "$py" -c "import aioquic"
# The interop client's own imports, by loading it as a module (its main does not run).
check "python: node/tests/h3_connect.py loads" "$py" -c "
import importlib.util
spec = importlib.util.spec_from_file_location('h3_connect', 'node/tests/h3_connect.py')
spec.loader.exec_module(importlib.util.module_from_spec(spec))
"
check "python: import grpc" "$py" -c "import grpc"
check "python: import grpc_health.v1" "$py" -c "from grpc_health.v1 import health_pb2, health_pb2_grpc"
check "python: import websockets" "$py" -c "import websockets"
check "python: import opentelemetry.proto" "$py" -c "from opentelemetry.proto.collector.trace.v1 import trace_service_pb2"
check "system pip untouched (no system-wide Python packages)" bash -c \
  "! python3 -c 'import aioquic' 2>/dev/null"

echo "fresh-machine check: $fails failed"
exit $((fails > 0))
INNER
rc=$?
set -e
echo "fresh-machine check took $((SECONDS - t0)) s: $([ $rc = 0 ] && echo PASS || echo FAIL)"
exit $rc
