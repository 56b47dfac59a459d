#!/usr/bin/env bash
# CPU cost of [tracing] on the HTTP path: `meshbench http` (open loop, RATE req/s, keep-alive)
# -> node A's proxy -> h3 over QUIC/mTLS -> node B -> `meshbench http-echo`, with tracing off,
# at sample_ratio 1.0 and at 0.01, in one run: the variants interleaved, ROUNDS rounds, a fresh
# node pair per measurement. With tracing, both nodes export to one real OTLP/HTTP receiver
# (node/tests/otlp_receiver.py, the test venv's Python). CPU is utime + stime of both node
# processes over the measured window (warm-up included), in cores (CPU-seconds per second).
#
# Usage: bench/tracing.sh          (after `cargo build -p meshnode --tests` and
#                                   `cargo build -p meshnode-bench --bin meshbench`)
# Environment [defaults]: MESHNODE_BIN [target/debug/meshnode], MESHBENCH [target/debug/meshbench],
#   PYTHON [target/test-venv/bin/python, else $MESHNODE_TEST_PYTHON], RATE [1000],
#   DURATION [10s], ROUNDS [3], OUT [a new temp dir].
# Needs jq and curl. Prints one markdown table (medians over the rounds) and keeps raw JSON in OUT.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MESHNODE_BIN=${MESHNODE_BIN:-$ROOT/target/debug/meshnode}
MESHBENCH=${MESHBENCH:-$ROOT/target/debug/meshbench}
PYTHON=${PYTHON:-${MESHNODE_TEST_PYTHON:-$ROOT/target/test-venv/bin/python}}
RATE=${RATE:-1000}
DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-3}
OUT=${OUT:-$(mktemp -d /tmp/meshnode-tracing-bench.XXXXXX)}
CLK_TCK=$(getconf CLK_TCK)
PIDS=()

log() { echo "[tracing-bench] $*" >&2; }
# Closing the receiver's stdin ends it; `wait` would otherwise wait for it for ever.
cleanup() {
  [[ -z ${RECV_IN:-} ]] || exec {RECV_IN}>&-
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
wait_http() {
  for _ in $(seq 400); do curl -sf -o /dev/null "$@" && return 0; sleep 0.05; done
  return 1
}

mkdir -p "$OUT/pki"
"$MESHNODE_BIN" ca init --dir "$OUT/pki/ca" >/dev/null
for n in node-a node-b; do
  "$MESHNODE_BIN" cert issue --ca-dir "$OUT/pki/ca" --name "$n" --out "$OUT/pki" >/dev/null
done

HTTP_PORT=$(free_port)
"$MESHBENCH" http-echo --listen "127.0.0.1:$HTTP_PORT" >"$OUT/http-echo.log" 2>&1 &
PIDS+=($!)
# At nice 19: it stands in for a collector on another host, and decoding 1,000 spans a second
# in Python must not take the CPU from the nodes being measured.
exec {RECV_IN}> >(exec nice -n 19 "$PYTHON" "$ROOT/node/tests/otlp_receiver.py" ok >"$OUT/receiver.out" 2>&1)
for _ in $(seq 200); do grep -q READY "$OUT/receiver.out" 2>/dev/null && break; sleep 0.05; done
RECV_PORT=$(awk '/READY/ { print $2 }' "$OUT/receiver.out")
[[ -n $RECV_PORT ]] || { log "OTLP receiver did not start: $(cat "$OUT/receiver.out")"; exit 1; }
spans_received() { curl -sf "http://127.0.0.1:$RECV_PORT/spans" | jq '.spans | length'; }

# one VARIANT ROUND: a fresh pair, one measurement; prints a JSON line.
one() {
  local variant=$1 round=$2 dir=$OUT/$1-$2 qa qb aa ab px tracing=
  mkdir -p "$dir"
  qa=$(free_port); qb=$(free_port); aa=$(free_port); ab=$(free_port); px=$(free_port)
  if [[ $variant != off ]]; then
    tracing="[tracing]
otlp_endpoint = \"http://127.0.0.1:$RECV_PORT\"
sample_ratio = $variant"
  fi
  cat >"$dir/b.toml" <<EOT
[node]
name = "node-b"
listen = "127.0.0.1:$qb"
state_dir = "$dir/state-b"
[tls]
ca = "$OUT/pki/ca/ca.pem"
cert = "$OUT/pki/node-b.pem"
key = "$OUT/pki/node-b.key"
[registry]
backend = "static"
[[registry.peers]]
name = "node-a"
addr = "127.0.0.1:$qa"
[admin]
listen = "127.0.0.1:$ab"
[[service]]
name = "web"
protocol = "http"
target = "127.0.0.1:$HTTP_PORT"
$tracing
EOT
  cat >"$dir/a.toml" <<EOT
[node]
name = "node-a"
listen = "127.0.0.1:$qa"
state_dir = "$dir/state-a"
[tls]
ca = "$OUT/pki/ca/ca.pem"
cert = "$OUT/pki/node-a.pem"
key = "$OUT/pki/node-a.key"
[registry]
backend = "static"
[[registry.peers]]
name = "node-b"
addr = "127.0.0.1:$qb"
services = [{ name = "web", protocol = "http", port = $HTTP_PORT }]
[admin]
listen = "127.0.0.1:$aa"
[http_proxy]
listen = "127.0.0.1:$px"
$tracing
EOT
  MESHNODE_LOG=warn "$MESHNODE_BIN" run -c "$dir/b.toml" 2>"$dir/b.log" &
  local b=$!
  MESHNODE_LOG=warn "$MESHNODE_BIN" run -c "$dir/a.toml" 2>"$dir/a.log" &
  local a=$!
  PIDS+=("$a" "$b")
  wait_http -H 'Host: web' "http://127.0.0.1:$px/" || { log "$variant: no answer through the proxy"; return 1; }
  local spans0 cpu0 cpu1 t0 t1 res dropped
  spans0=$(spans_received)
  cpu0=$(( $(cpu_ticks "$a") + $(cpu_ticks "$b") ))
  t0=$(date +%s.%N)
  res=$("$MESHBENCH" http --connect "127.0.0.1:$px" --host web --rate "$RATE" \
    --duration "$DURATION" --warmup 1s --expect-size 1024 --json)
  t1=$(date +%s.%N)
  cpu1=$(( $(cpu_ticks "$a") + $(cpu_ticks "$b") ))
  sleep 2 # the last batch (sent every second)
  dropped=$(curl -sf "http://127.0.0.1:$aa/metrics" "http://127.0.0.1:$ab/metrics" \
    | awk '/^meshnode_trace_spans_dropped_total / { s += $2 } END { print s + 0 }')
  jq -nc --arg v "$variant" --argjson r "$round" --argjson res "$res" \
    --argjson cores "$(jq -n "($cpu1 - $cpu0) / $CLK_TCK / ($t1 - $t0)")" \
    --argjson spans "$(( $(spans_received) - spans0 ))" --argjson dropped "$dropped" \
    '{variant: $v, round: $r, cores: $cores, spans: $spans, dropped: $dropped,
      errors: $res.errors, achieved_rps: $res.achieved_rps,
      p50_us: $res.uncorrected_us.p50, p99_us: $res.uncorrected_us.p99}'
  kill "$a" "$b" 2>/dev/null || true
  wait "$a" "$b" 2>/dev/null || true
}

log "$RATE req/s for $DURATION (+1 s warm-up), $ROUNDS rounds of off / 1.0 / 0.01; raw results in $OUT"
for round in $(seq "$ROUNDS"); do
  for variant in off 1.0 0.01; do
    one "$variant" "$round" | tee -a "$OUT/results.jsonl" >&2
  done
done

echo "| tracing | CPU of both nodes (cores, median) | per round | spans exported (both nodes, per round) | dropped | p50 / p99 (µs, median) | errors |"
echo "|---|---|---|---|---|---|---|"
for variant in off 1.0 0.01; do
  jq -rs --arg v "$variant" '
    def median: sort | if length == 0 then null else .[(length - 1) / 2 | floor] end;
    [.[] | select(.variant == $v)] as $rs
    | "| \(if $v == "off" then "off" else "sample_ratio \($v)" end) | \($rs | map(.cores) | median * 1000 | round / 1000) | \($rs | map(.cores * 1000 | round / 1000 | tostring) | join(", ")) | \($rs | map(.spans | tostring) | join(", ")) | \($rs | map(.dropped) | add) | \($rs | map(.p50_us) | median | round) / \($rs | map(.p99_us) | median | round) | \($rs | map(.errors) | add) |"
  ' "$OUT/results.jsonl"
done
