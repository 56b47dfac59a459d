#!/usr/bin/env bash
# Installs what meshnode's build needs, and with --test what its test suite needs, when missing.
# Debian 12/13 or Ubuntu 24.04 (apt); as root, or through sudo.
#
#   build    protoc and its well-known types (etcd-client's build script)
#   --test   every program the tests spawn: etcd and etcdctl (registry tests), ip and tc (network
#            namespace tests), sysctl and /bin/kill (procps: sysctl inside a namespace, the
#            systemd unit's ExecReload), nft, systemd-analyze (unit check), jq (the docker
#            compose test; docker itself is not installed here), curl and h2load (nghttp2-client:
#            HTTP/1.1 and h2c clients of the proxy and outbound-port tests), python3 with venv
#            for the Python test clients, qemu-system-x86 and debootstrap for the VM test (unless
#            MESHNODE_SKIP_VM=1); then the project-local virtual environment below
#
# Python test clients (scripts/test-requirements.txt, pinned) go into target/test-venv, made with
# `python3 -m venv` and filled with that venv's own pip: never the system's pip, which Debian 12
# and later refuse anyway (PEP 668). Tests run that interpreter: $MESHNODE_TEST_PYTHON, set by
# scripts/test.sh, else target/test-venv/bin/python. MESHNODE_TEST_VENV overrides the place.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
test=0
[ "${1:-}" = "--test" ] && test=1

want=()
command -v protoc >/dev/null 2>&1 || want+=(protobuf-compiler)
# protoc's well-known types (google/protobuf/descriptor.proto, imported by etcd's protos) come
# from libprotobuf-dev, which protobuf-compiler only recommends: without it the build fails.
[ -e /usr/include/google/protobuf/descriptor.proto ] || want+=(libprotobuf-dev)
if [ $test = 1 ]; then
  command -v etcd >/dev/null 2>&1 || want+=(etcd-server)
  command -v etcdctl >/dev/null 2>&1 || want+=(etcd-client)
  { command -v ip >/dev/null 2>&1 && command -v tc >/dev/null 2>&1; } || want+=(iproute2)
  { command -v sysctl >/dev/null 2>&1 && [ -x /bin/kill ]; } || want+=(procps)
  command -v nft >/dev/null 2>&1 || want+=(nftables)
  command -v systemd-analyze >/dev/null 2>&1 || want+=(systemd)
  command -v jq >/dev/null 2>&1 || want+=(jq) # deploy/docker/test.sh reads /status with it
  command -v curl >/dev/null 2>&1 || want+=(curl)
  command -v h2load >/dev/null 2>&1 || want+=(nghttp2-client)
  # The VM test (deploy/systemd/vm-test.sh): the .deb under a real systemd in a qemu guest built
  # with debootstrap (skipped by scripts/test.sh with MESHNODE_SKIP_VM=1).
  if [ "${MESHNODE_SKIP_VM:-}" != 1 ]; then
    command -v qemu-system-x86_64 >/dev/null 2>&1 || want+=(qemu-system-x86)
    command -v debootstrap >/dev/null 2>&1 || want+=(debootstrap)
    { command -v mkfs.ext4 >/dev/null 2>&1 && command -v debugfs >/dev/null 2>&1; } || want+=(e2fsprogs)
  fi
  # `venv` with `ensurepip` (Debian splits it into python3-venv) makes a venv with its own pip.
  python3 -c "import venv, ensurepip" >/dev/null 2>&1 || want+=(python3 python3-venv)
fi

if [ ${#want[@]} -gt 0 ]; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "need root (or sudo) to install: ${want[*]}" >&2; exit 1; }
    sudo=sudo
  fi
  echo "installing: ${want[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
fi
[ $test = 1 ] || exit 0

# ---- the Python test clients, in the project's own virtual environment
venv=${MESHNODE_TEST_VENV:-$root/target/test-venv}
req=$root/scripts/test-requirements.txt
stamp=$venv/.meshnode-requirements
# A venv whose interpreter no longer runs (the system python3 was replaced) is made anew.
if [ -e "$venv" ] && ! "$venv/bin/python" -c "import sys" >/dev/null 2>&1; then
  echo "test venv $venv is broken: making it again" >&2
  rm -rf "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "creating the test venv: $venv" >&2
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
fi
# Installed once per version of the requirements file (it is pinned).
if ! cmp -s "$req" "$stamp" 2>/dev/null; then
  echo "installing the Python test clients into $venv (scripts/test-requirements.txt)" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
  cp "$req" "$stamp"
fi

# ---- promtool (the alert rules' checks and unit tests, node/tests/alert_rules.rs)
# Debian ships it only inside the `prometheus` package, whose install would also enable a
# Prometheus server on this machine. The package is downloaded and only promtool unpacked into
# target/tools: Debian's binary, nothing started, nothing installed system-wide.
tools=$root/target/tools
if ! command -v promtool >/dev/null 2>&1 && [ ! -x "$tools/promtool" ]; then
  echo "unpacking promtool from Debian's prometheus package into $tools" >&2
  mkdir -p "$tools"
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1) || { apt-get update -qq && (cd "$tmp" && apt-get download prometheus >/dev/null); }
  dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root"
  install -m 0755 "$tmp/root/usr/bin/promtool" "$tools/promtool"
  rm -rf "$tmp"
fi
