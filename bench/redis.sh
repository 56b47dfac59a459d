#!/usr/bin/env bash
# redis-benchmark through meshnode against redis direct (issue 20's redis row): a real
# redis-server, `redis-benchmark -c CLIENTS -n REQUESTS -t set,get` straight to it, and through
# node A's `[[outbound]]` (mode tcp) -> one QUIC/mTLS connection -> node B -> redis, the two
# interleaved ROUNDS times in one run, a fresh node pair per round. CPU is utime + stime of both
# node processes over the meshnode run.
#
# Usage: bench/redis.sh      (after `cargo build --release -p meshnode`)
# Environment [defaults]: MESHNODE_BIN [target/release/meshnode], CLIENTS [50],
#   REQUESTS [100000], ROUNDS [3], PIPELINE [1], OUT [a new temp dir].
# Needs redis-server and redis-benchmark (apt-get install -y redis-server redis-tools), jq.
# Prints a markdown table (each round, then medians) and keeps the logs in OUT.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MESHNODE_BIN=${MESHNODE_BIN:-$ROOT/target/release/meshnode}
CLIENTS=${CLIENTS:-50}
REQUESTS=${REQUESTS:-100000}
ROUNDS=${ROUNDS:-3}
PIPELINE=${PIPELINE:-1}
OUT=${OUT:-$(mktemp -d /tmp/meshnode-redis-bench.XXXXXX)}
CLK_TCK=$(getconf CLK_TCK)
PIDS=()

log() { echo "[redis-bench] $*" >&2; }
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
for tool in redis-server redis-benchmark jq; do
  command -v "$tool" >/dev/null || { echo "missing: $tool (apt-get install -y redis-server redis-tools jq)" >&2; exit 1; }
done
[[ -x $MESHNODE_BIN ]] || { echo "missing: $MESHNODE_BIN (cargo build --release -p meshnode)" >&2; exit 1; }

# `port VAR`: a free TCP (and UDP) port.
source "$(dirname "${BASH_SOURCE[0]}")/ports.sh"
wait_listen() {
  for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done
  echo "nothing listens on port $1" >&2
  return 1
}
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

# bench PORT: "set_rps get_rps" of one redis-benchmark run against PORT.
bench() {
  redis-benchmark -h 127.0.0.1 -p "$1" -c "$CLIENTS" -n "$REQUESTS" -P "$PIPELINE" -t set,get --csv \
    2>/dev/null | awk -F'","' '/^"SET"/ { s = $2 } /^"GET"/ { g = $2 } END { print s + 0, g + 0 }'
}

mkdir -p "$OUT/pki"
"$MESHNODE_BIN" ca init --dir "$OUT/pki/ca" --trust-domain bench.mesh >/dev/null
for n in node-a node-b; do
  "$MESHNODE_BIN" cert issue --ca-dir "$OUT/pki/ca" --name "$n" --out "$OUT/pki" >/dev/null
done
port REDIS
redis-server --port "$REDIS" --bind 127.0.0.1 --save '' --appendonly no >"$OUT/redis.log" 2>&1 &
PIDS+=($!)
wait_listen "$REDIS"

node_config() { # NAME QUIC ADMIN PEER PEER_QUIC BODY
  cat <<EOT
[node]
name = "$1"
listen = "127.0.0.1:$2"
state_dir = "$OUT/state-$1"
[tls]
ca = "$OUT/pki/ca/ca.pem"
cert = "$OUT/pki/$1.pem"
key = "$OUT/pki/$1.key"
[registry]
backend = "static"
[[registry.peers]]
name = "$4"
addr = "127.0.0.1:$5"
$6
[admin]
listen = "127.0.0.1:$3"
EOT
}

log "$(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg); $CLIENTS clients, $REQUESTS requests, pipeline $PIPELINE, $ROUNDS rounds; out: $OUT"
echo "| round | direct SET / GET req/s | meshnode SET / GET req/s | meshnode ÷ direct (SET, GET) | node CPU µs per request (both nodes) |"
echo "|---|---|---|---|---|"
for round in $(seq "$ROUNDS"); do
  read -r dset dget <<<"$(bench "$REDIS")"
  port qa; port qb; port aa; port ab; port entry
  node_config node-b "$qb" "$ab" node-a "$qa" "[[service]]
name = \"redis\"
protocol = \"tcp\"
target = \"127.0.0.1:$REDIS\"" >"$OUT/b-$round.toml"
  node_config node-a "$qa" "$aa" node-b "$qb" "services = [{ name = \"redis\", protocol = \"tcp\", port = $REDIS }]
[[outbound]]
service = \"redis\"
listen = \"127.0.0.1:$entry\"
mode = \"tcp\"" >"$OUT/a-$round.toml"
  MESHNODE_LOG=warn "$MESHNODE_BIN" run -c "$OUT/b-$round.toml" >"$OUT/b-$round.log" 2>&1 &
  b=$!
  MESHNODE_LOG=warn "$MESHNODE_BIN" run -c "$OUT/a-$round.toml" >"$OUT/a-$round.log" 2>&1 &
  a=$!
  PIDS+=("$a" "$b")
  wait_listen "$entry"
  for _ in $(seq 100); do
    [[ $(redis-cli -p "$entry" ping 2>/dev/null || true) == PONG ]] && break
    sleep 0.05
  done
  c0=$(($(cpu_ticks "$a") + $(cpu_ticks "$b")))
  read -r mset mget <<<"$(bench "$entry")"
  c1=$(($(cpu_ticks "$a") + $(cpu_ticks "$b")))
  kill "$a" "$b" 2>/dev/null || true
  wait "$a" "$b" 2>/dev/null || true
  jq -nc --argjson round "$round" --argjson dset "$dset" --argjson dget "$dget" \
    --argjson mset "$mset" --argjson mget "$mget" \
    --argjson cpu_us "$(( (c1 - c0) * 1000000 / CLK_TCK ))" --argjson n "$((2 * REQUESTS))" \
    '{round: $round, direct: [$dset, $dget], meshnode: [$mset, $mget],
      ratio: [($mset / $dset * 100 | round / 100), ($mget / $dget * 100 | round / 100)],
      cpu_us_per_req: ($cpu_us / $n * 10 | round / 10)}' | tee -a "$OUT/results.jsonl" |
    jq -r '"| \(.round) | \(.direct[0]) / \(.direct[1]) | \(.meshnode[0]) / \(.meshnode[1]) | \(.ratio[0]), \(.ratio[1]) | \(.cpu_us_per_req) |"'
done
jq -rs 'def med: sort | .[length / 2 | floor];
  "| median | \(map(.direct[0]) | med) / \(map(.direct[1]) | med) | \(map(.meshnode[0]) | med) / \(map(.meshnode[1]) | med) | \(map(.ratio[0]) | med), \(map(.ratio[1]) | med) | \(map(.cpu_us_per_req) | med) |"' \
  "$OUT/results.jsonl"
