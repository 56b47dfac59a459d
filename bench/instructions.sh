#!/usr/bin/env bash
# Instructions per request through two meshnode nodes, counted by valgrind (callgrind): a cost
# figure that does not drift with the machine's load, unlike CPU seconds.
#
# Usage: MESHNODE_BIN=target/release/meshnode bench/instructions.sh
#        (after: cargo build --release -p meshnode -p meshnode-bench)
#
# Rows, each for every binary given (MESHNODE_BIN, then MESH_ALT_BIN if set), interleaved and
# repeated REPEAT times:
#   l4    1 KiB request/response through node A's [[outbound]] -> meshnode/1 over QUIC -> node B
#         -> a TCP echo (`meshbench latency`, CONNS kept-alive tunnels, round-robin)
#   http  HTTP/1.1 GET (1 KiB body) to node A's [http_proxy] -> h3 over QUIC -> node B -> an
#         HTTP/1.1 server (`meshbench http` over CONNS keep-alive connections)
#   grpc  gRPC-shaped unary calls (1 KiB message) over CONNS h2c connections to node A's
#         [[outbound]] (mode auto) -> h3 over QUIC -> node B -> h2c to `meshbench grpc-echo`
#   hbone the l4 row's load through the HBONE-shaped peer pair instead of meshnode
#         (`meshbench h2-entry` -> TLS 1.3 + HTTP/2 CONNECT over one TCP connection ->
#         `meshbench h2-exit`, ztunnel's design): the same count for the design meshnode is
#         compared with (issue 20's CPU-per-request row), once per repetition, not per binary.
# Both nodes run under callgrind. After a warm-up (tunnels open, code paths translated), the
# counters are zeroed, REQUESTS requests are sent at RATE per second, and the counters dumped;
# then, zeroed again, the same time passes with no traffic (timers, keep-alives) and is dumped.
# instructions/request = (traffic - idle) / requests, per node and for both.
#
# Environment (defaults in brackets):
#   MESHNODE_BIN  meshnode binary [target/release/meshnode]
#   MESH_ALT_BIN  a second build measured in the same run, e.g. the previous commit's
#   MESH_LABEL, MESH_ALT_LABEL  names in the table ["new", "alt"]
#   MESHBENCH     meshbench binary [target/release/meshbench]
#   ROWS          ["l4 http grpc hbone"]   REQUESTS [1000]   RATE [100]   CONNS [4]   REPEAT [1]
#   OUT           directory for logs and callgrind files [a new temp dir]
# Needs valgrind (with callgrind_control), jq, curl; bash's /dev/tcp for readiness.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MESHNODE_BIN=${MESHNODE_BIN:-$ROOT/target/release/meshnode}
MESHBENCH=${MESHBENCH:-$ROOT/target/release/meshbench}
ROWS=${ROWS:-l4 http grpc hbone}
REQUESTS=${REQUESTS:-1000}
RATE=${RATE:-100}
CONNS=${CONNS:-4}
REPEAT=${REPEAT:-1}
OUT=${OUT:-$(mktemp -d /tmp/meshnode-instr.XXXXXX)}
mkdir -p "$OUT"

log() { echo "# $*" >&2; }
for tool in valgrind callgrind_control jq curl; do
  command -v "$tool" >/dev/null || { echo "missing: $tool (apt-get install -y valgrind jq curl)" >&2; exit 1; }
done
for bin in "$MESHNODE_BIN" "$MESHBENCH" ${MESH_ALT_BIN:+"$MESH_ALT_BIN"}; do
  [[ -x $bin ]] || { echo "missing: $bin (cargo build --release -p meshnode -p meshnode-bench)" >&2; exit 1; }
done

PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

# `port VAR`: a free TCP (and UDP) port.
source "$(dirname "${BASH_SOURCE[0]}")/ports.sh"

# wait_listen PORT SECONDS [PID...]: until a TCP connect to PORT succeeds; fails at once if a
# PID has exited (e.g. a port taken by another program between choosing and binding it).
wait_listen() {
  local port=$1 end=$((SECONDS + $2)) pid
  shift 2
  until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
    ((SECONDS < end)) || { echo "nothing listens on port $port after $end s" >&2; return 1; }
    for pid in "$@"; do
      kill -0 "$pid" 2>/dev/null || { echo "process $pid exited (see $OUT/*.log)" >&2; return 1; }
    done
    sleep 0.2
  done
}

start() {
  local name=$1
  shift
  "$@" >"$OUT/$name.log" 2>&1 &
  STARTED_PID=$!
  PIDS+=("$STARTED_PID")
}

# The PKI, made once with the first binary.
"$MESHNODE_BIN" ca init --dir "$OUT/pki/ca" --trust-domain bench.mesh >/dev/null
for n in node-a node-b; do
  "$MESHNODE_BIN" cert issue --ca-dir "$OUT/pki/ca" --name "$n" --out "$OUT/pki" >/dev/null
done

port ECHO_PORT
port HTTP_PORT
port GRPC_PORT
start echo "$MESHBENCH" echo --listen "127.0.0.1:$ECHO_PORT"
start http-echo "$MESHBENCH" http-echo --listen "127.0.0.1:$HTTP_PORT" --size 1024
start grpc-echo "$MESHBENCH" grpc-echo --listen "127.0.0.1:$GRPC_PORT"
wait_listen "$ECHO_PORT" 10
wait_listen "$HTTP_PORT" 10
wait_listen "$GRPC_PORT" 10

# node_config NAME QUIC ADMIN PEER PEER_QUIC BODY: one node's TOML on a static registry.
node_config() {
  local name=$1 quic=$2 admin=$3 peer=$4 peer_quic=$5 body=$6 dir=$7
  cat <<EOT
[node]
name = "$name"
listen = "127.0.0.1:$quic"
state_dir = "$dir/state-$name"
[tls]
ca = "$OUT/pki/ca/ca.pem"
cert = "$OUT/pki/$name.pem"
key = "$OUT/pki/$name.key"
[registry]
backend = "static"
[[registry.peers]]
name = "$peer"
addr = "127.0.0.1:$peer_quic"
$body
[admin]
listen = "127.0.0.1:$admin"
EOT
}

# callgrind_total PID: zeroes nothing; dumps PID's counters and prints the instructions counted
# since the last zero (the newest dump file's "summary:" line).
callgrind_dump() {
  local pid=$1 before after f
  before=$(ls "$DIR"/cg-"$pid".out* 2>/dev/null | wc -l)
  callgrind_control -d "$pid" >/dev/null 2>&1
  for _ in $(seq 300); do
    after=$(ls "$DIR"/cg-"$pid".out* 2>/dev/null | wc -l)
    ((after > before)) && break
    sleep 0.1
  done
  f=$(ls -t "$DIR"/cg-"$pid".out* | head -1)
  # The dump is complete once its summary line is written.
  for _ in $(seq 100); do
    grep -q '^summary:' "$f" && break
    sleep 0.1
  done
  awk '/^summary:/ { print $2 }' "$f"
}

# measure ROW LABEL A_PID B_PID ENTRY CLIENT...: warms the path up with `meshbench CLIENT`, counts
# both processes' instructions over REQUESTS requests and over the same time idle, stops them,
# and appends the JSON line of the row to $OUT/results.jsonl.
measure() {
  local row=$1 label=$2 a=$3 b=$4 entry=$5 secs ia ib ia0 ib0 n
  shift 5
  # Warm-up: tunnels or connections open, the paths translated by valgrind.
  "$MESHBENCH" "$@" --connect "127.0.0.1:$entry" --rate "$RATE" --duration 3s \
    --warmup 1s --conns "$CONNS" --json >"$DIR/warmup.json"
  secs=$(jq -n "$REQUESTS / $RATE")
  callgrind_control -z "$a" >/dev/null 2>&1
  callgrind_control -z "$b" >/dev/null 2>&1
  "$MESHBENCH" "$@" --connect "127.0.0.1:$entry" --rate "$RATE" --duration "${secs}s" \
    --warmup 0s --conns "$CONNS" --json >"$DIR/run.json"
  ia=$(callgrind_dump "$a")
  ib=$(callgrind_dump "$b")
  callgrind_control -z "$a" >/dev/null 2>&1
  callgrind_control -z "$b" >/dev/null 2>&1
  sleep "$secs"
  ia0=$(callgrind_dump "$a")
  ib0=$(callgrind_dump "$b")
  kill "$a" "$b" 2>/dev/null || true
  wait "$a" "$b" 2>/dev/null || true
  n=$(jq '.requests + .errors + .missing' "$DIR/run.json")
  jq -nc --arg row "$row" --arg build "$label" --argjson n "$n" \
    --argjson errors "$(jq '.errors + .missing' "$DIR/run.json")" \
    --argjson ia "$ia" --argjson ib "$ib" --argjson ia0 "$ia0" --argjson ib0 "$ib0" \
    '{row: $row, build: $build, requests: $n, errors: $errors,
      a_per_req: (($ia - $ia0) / $n | floor), b_per_req: (($ib - $ib0) / $n | floor),
      both_per_req: (($ia + $ib - $ia0 - $ib0) / $n | floor),
      idle_per_s_both: (($ia0 + $ib0) / ($n / '"$RATE"') | floor)}' | tee -a "$OUT/results.jsonl"
}

# run_row ROW BIN LABEL: one measurement; appends a JSON line to $OUT/results.jsonl.
run_row() {
  local row=$1 bin=$2 label=$3 qa qb aa ab entry a_body b_body peer_services a b
  DIR=$OUT/$row-$label-$RANDOM
  mkdir -p "$DIR"
  port qa; port qb; port aa; port ab; port entry
  if [[ $row == l4 ]]; then
    b_body=$'[[service]]\nname = "echo"\nprotocol = "tcp"\ntarget = "127.0.0.1:'"$ECHO_PORT"$'"'
    peer_services="services = [{ name = \"echo\", protocol = \"tcp\", port = $ECHO_PORT }]"
    a_body=$'[[outbound]]\nservice = "echo"\nlisten = "127.0.0.1:'"$entry"$'"'
  elif [[ $row == grpc ]]; then
    b_body=$'[[service]]\nname = "rpc"\nprotocol = "grpc"\ntarget = "127.0.0.1:'"$GRPC_PORT"$'"'
    peer_services="services = [{ name = \"rpc\", protocol = \"grpc\", port = $GRPC_PORT }]"
    a_body=$'[[outbound]]\nservice = "rpc"\nlisten = "127.0.0.1:'"$entry"$'"'
  else
    b_body=$'[[service]]\nname = "web"\nprotocol = "http"\ntarget = "127.0.0.1:'"$HTTP_PORT"$'"'
    peer_services="services = [{ name = \"web\", protocol = \"http\", port = $HTTP_PORT }]"
    a_body=$'[http_proxy]\nlisten = "127.0.0.1:'"$entry"$'"'
  fi
  # A's [[registry.peers]] entry carries B's services; the body's tables follow it.
  node_config node-b "$qb" "$ab" node-a "$qa" "$b_body" "$DIR" >"$DIR/b.toml"
  node_config node-a "$qa" "$aa" node-b "$qb" "$peer_services
$a_body" "$DIR" >"$DIR/a.toml"
  local vg=(valgrind --tool=callgrind --callgrind-out-file="$DIR/cg-%p.out" --dump-instr=no -q)
  MESHNODE_LOG=warn start "$row-$label-b" "${vg[@]}" "$bin" run -c "$DIR/b.toml"
  b=$STARTED_PID
  MESHNODE_LOG=warn start "$row-$label-a" "${vg[@]}" "$bin" run -c "$DIR/a.toml"
  a=$STARTED_PID
  if ! wait_listen "$entry" 300 "$a" "$b" || ! wait_listen "$aa" 300 "$a" "$b"; then
    kill "$a" "$b" 2>/dev/null || true
    return 1
  fi
  local client=(latency --size 1024)
  [[ $row == http ]] && client=(http --host web --expect-size 1024)
  [[ $row == grpc ]] && client=(grpc --authority rpc --size 1024)
  measure "$row" "$label" "$a" "$b" "$entry" "${client[@]}"
}

# run_hbone: the l4 load through the HBONE-shaped pair, both processes under callgrind; a JSON
# line like run_row's (node A = the entry, node B = the exit).
run_hbone() {
  local mid entry a b
  DIR=$OUT/hbone-$RANDOM
  mkdir -p "$DIR"
  port mid; port entry
  local vg=(valgrind --tool=callgrind --callgrind-out-file="$DIR/cg-%p.out" --dump-instr=no -q)
  start hbone-exit "${vg[@]}" "$MESHBENCH" h2-exit --listen "127.0.0.1:$mid"
  b=$STARTED_PID
  wait_listen "$mid" 300 "$b" || return 1
  start hbone-entry "${vg[@]}" "$MESHBENCH" h2-entry --exit "127.0.0.1:$mid" \
    --forward "127.0.0.1:$entry=127.0.0.1:$ECHO_PORT"
  a=$STARTED_PID
  wait_listen "$entry" 300 "$a" "$b" || { kill "$a" "$b" 2>/dev/null || true; return 1; }
  measure hbone "hbone pair" "$a" "$b" "$entry" latency --size 1024
}

log "meshnode instructions per request: $(uname -m), $(nproc) CPUs, $REQUESTS requests at $RATE/s, $CONNS connections; out: $OUT"
for _ in $(seq "$REPEAT"); do
  for row in $ROWS; do
    if [[ $row == hbone ]]; then
      run_hbone || run_hbone
      continue
    fi
    # A row whose node could not start (a port taken meanwhile) is run again on new ports.
    run_row "$row" "$MESHNODE_BIN" "${MESH_LABEL:-new}" ||
      run_row "$row" "$MESHNODE_BIN" "${MESH_LABEL:-new}"
    if [[ -n ${MESH_ALT_BIN:-} ]]; then
      run_row "$row" "$MESH_ALT_BIN" "${MESH_ALT_LABEL:-alt}" ||
        run_row "$row" "$MESH_ALT_BIN" "${MESH_ALT_LABEL:-alt}"
    fi
  done
done

echo
echo "| row | build | requests | errors | node A instr/req | node B instr/req | both instr/req | idle instr/s (both) |"
echo "|---|---|---|---|---|---|---|---|"
jq -r '"| \(.row) | \(.build) | \(.requests) | \(.errors) | \(.a_per_req) | \(.b_per_req) | \(.both_per_req) | \(.idle_per_s_both) |"' "$OUT/results.jsonl"
