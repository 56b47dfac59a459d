#!/usr/bin/env bash
# meshnode baseline benchmarks: one run, same machine, same payloads, every path side by side.
#
# Usage: bench/run.sh                (after: cargo build --release -p meshnode-bench)
#
# Paths: direct TCP, socat pair (relay without crypto), stunnel pair (TLS 1.3), raw quinn (bulk
# only: no TCP legs), and meshnode L4 when MESHNODE_BIN is set (see meshnode_l4 below).
# For each: bulk throughput (median of BULK_REPEAT runs, per entry of BULK_CONNS) against a
# `meshbench sink`, then open-loop latency (LAT_RATE req/s, LAT_SIZE bytes, LAT_DURATION) against
# a `meshbench echo`. Prints markdown tables with ratios vs direct TCP and vs the stunnel pair.
#
# Environment (defaults in brackets):
#   MESHBENCH     meshbench binary            [target/release/meshbench]
#   MESHNODE_BIN  meshnode binary; unset = meshnode rows skipped
#   BULK_BYTES    bytes per bulk run          [2GiB]      BULK_REPEAT  runs per median [3]
#   BULK_CONNS    connection counts to test   ["1"]       e.g. "1 8"
#   LAT_RATE      requests/s                  [1000]      LAT_SIZE     request bytes   [1024]
#   LAT_DURATION  measured time               [10s]       LAT_WARMUP   unrecorded lead [1s]
#   LAT_CONNS     latency connection pool     [4]
#   BASE_PORT     first of ~20 loopback ports [random in 20000-39999]
#   OUT           directory for raw JSON      [a new temp dir]
#   IDLE_TUNNELS  if > 0, also RSS of both nodes with that many idle meshnode tunnels open
#   QUIET_LOAD    if set, first wait (up to 15 min) for the 1-minute load average to drop below it
# Installs nothing. Needs jq; socat, stunnel4 and openssl for their rows
# (apt-get install -y jq socat stunnel4 openssl).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MESHBENCH=${MESHBENCH:-$ROOT/target/release/meshbench}
BULK_BYTES=${BULK_BYTES:-2GiB}
BULK_REPEAT=${BULK_REPEAT:-3}
BULK_CONNS=${BULK_CONNS:-1}
LAT_RATE=${LAT_RATE:-1000}
LAT_SIZE=${LAT_SIZE:-1024}
LAT_DURATION=${LAT_DURATION:-10s}
LAT_WARMUP=${LAT_WARMUP:-1s}
LAT_CONNS=${LAT_CONNS:-4}
BASE_PORT=${BASE_PORT:-$((20000 + RANDOM % 20000))}
OUT=${OUT:-$(mktemp -d /tmp/meshbench.XXXXXX)}
RESULTS=$OUT/results.jsonl
CLK_TCK=$(getconf CLK_TCK)
PIDS=()           # every process this script started, killed by PID on exit
TUNNEL_PIDS=()    # the processes of the path being measured (CPU and RSS are read from these)

mkdir -p "$OUT"
: >"$RESULTS"

cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

log() { echo "# $*" >&2; }

[[ -x $MESHBENCH ]] || { echo "missing: $MESHBENCH (cargo build --release -p meshnode-bench)" >&2; exit 1; }
command -v jq >/dev/null || { echo "missing: jq (apt-get install -y jq)" >&2; exit 1; }
STUNNEL=$(command -v stunnel4 || command -v stunnel || true)
MISSING=()
command -v socat >/dev/null || MISSING+=(socat)
[[ -n $STUNNEL ]] || MISSING+=(stunnel4)
command -v openssl >/dev/null || MISSING+=(openssl)
((${#MISSING[@]} == 0)) || log "missing: ${MISSING[*]} (apt-get install -y ${MISSING[*]}); their rows are skipped"
has() { [[ " ${MISSING[*]} " != *" $1 "* ]]; }

if [[ -n ${QUIET_LOAD:-} ]]; then
  for _ in $(seq 180); do
    awk -v q="$QUIET_LOAD" '{ exit !($1 < q) }' /proc/loadavg && break
    log "waiting for load average < $QUIET_LOAD (now $(cut -d' ' -f1 /proc/loadavg))"
    sleep 5
  done
fi
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

NEXT_PORT=$BASE_PORT
# port VAR: sets VAR to the next free loopback TCP/UDP port at or after NEXT_PORT.
port() {
  while ss -Htuan "( sport = :$NEXT_PORT )" | grep -q .; do NEXT_PORT=$((NEXT_PORT + 1)); done
  printf -v "$1" '%s' "$NEXT_PORT"
  NEXT_PORT=$((NEXT_PORT + 1))
}

# wait_listen PORT: until something listens on TCP PORT (10 s at most).
wait_listen() {
  local i
  for i in $(seq 200); do
    ss -Htln "( sport = :$1 )" | grep -q . && return 0
    sleep 0.05
  done
  echo "nothing listens on port $1" >&2
  return 1
}

# start NAME CMD...: runs CMD in the background, logging to $OUT/NAME.log; sets STARTED_PID.
start() {
  local name=$1
  shift
  "$@" >"$OUT/$name.log" 2>&1 &
  STARTED_PID=$!
  PIDS+=("$STARTED_PID")
}

# cpu_ticks PID...: user+system ticks of the processes and their reaped children.
cpu_ticks() {
  local pid total=0 t
  for pid in "$@"; do
    t=$(awk '{ sub(/^.*\) /, ""); print $12 + $13 + $14 + $15 }' "/proc/$pid/stat" 2>/dev/null || echo 0)
    total=$((total + t))
  done
  echo "$total"
}

# peak_rss_kib PID...: the sum of the processes' peak RSS (VmHWM).
peak_rss_kib() {
  local pid total=0 k
  for pid in "$@"; do
    k=$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo 0)
    total=$((total + ${k:-0}))
  done
  echo "$total"
}

# record JSON: appends one result object.
record() { echo "$1" >>"$RESULTS"; }

# skip_row PATH REASON: a row that was not measured, and why.
skip_row() { record "$(jq -nc --arg p "$1" --arg r "$2" '{path: $p, note: $r}')"; }

# measure_path NAME SINK_ADDR ECHO_ADDR [NOTE]: bulk and latency through one path; the path's
# processes must be in TUNNEL_PIDS (empty for direct TCP).
measure_path() {
  local name=$1 sink=$2 echo_addr=$3 note=${4:-} conns bulk='{}' one lat cpu0 cpu1 t0 t1
  local cores=null rss=null
  for conns in $BULK_CONNS; do
    log "$name: bulk $BULK_BYTES x$BULK_REPEAT over $conns connection(s)"
    one=$("$MESHBENCH" bulk --connect "$sink" --bytes "$BULK_BYTES" --conns "$conns" \
      --repeat "$BULK_REPEAT" --json)
    bulk=$(jq -c --arg c "$conns" --argjson r "$one" '. + {($c): $r.median_gbps}' <<<"$bulk")
  done
  log "$name: latency $LAT_RATE req/s x $LAT_SIZE B for $LAT_DURATION"
  cpu0=$(cpu_ticks "${TUNNEL_PIDS[@]}")
  t0=$(date +%s.%N)
  lat=$("$MESHBENCH" latency --connect "$echo_addr" --rate "$LAT_RATE" --size "$LAT_SIZE" \
    --duration "$LAT_DURATION" --warmup "$LAT_WARMUP" --conns "$LAT_CONNS" --json)
  t1=$(date +%s.%N)
  sleep 0.3 # let forking relays reap their children, whose CPU then shows in cutime/cstime
  cpu1=$(cpu_ticks "${TUNNEL_PIDS[@]}")
  if ((${#TUNNEL_PIDS[@]} > 0)); then
    # Cores used by the path's processes over the latency run (warm-up included).
    cores=$(jq -n "($cpu1 - $cpu0) / $CLK_TCK / ($t1 - $t0)")
    rss=$(peak_rss_kib "${TUNNEL_PIDS[@]}")
  fi
  record "$(jq -nc --arg p "$name" --arg n "$note" --argjson b "$bulk" --argjson l "$lat" \
    --argjson c "$cores" --argjson r "$rss" \
    '{path: $p, note: $n, bulk: $b, latency: $l, cpu_cores: $c, peak_rss_kib: $r}')"
}

# --- the targets --------------------------------------------------------------------------
port SINK_PORT
port ECHO_PORT
start sink "$MESHBENCH" sink --listen "127.0.0.1:$SINK_PORT"
start echo "$MESHBENCH" echo --listen "127.0.0.1:$ECHO_PORT"
wait_listen "$SINK_PORT"
wait_listen "$ECHO_PORT"

# --- direct TCP ---------------------------------------------------------------------------
direct() {
  TUNNEL_PIDS=()
  measure_path "direct TCP" "127.0.0.1:$SINK_PORT" "127.0.0.1:$ECHO_PORT"
}

# --- socat pair: entry relay -> exit relay -> target, no crypto ----------------------------
socat_pair() {
  if ! has socat; then skip_row "socat pair" "skipped (socat missing)"; return 0; fi
  local target entry mid pids=()
  local -A entries=()
  for target in "$SINK_PORT" "$ECHO_PORT"; do
    port entry
    port mid
    start "socat-exit-$target" socat "TCP-LISTEN:$mid,bind=127.0.0.1,reuseaddr,fork,nodelay" \
      "TCP:127.0.0.1:$target,nodelay"
    pids+=("$STARTED_PID")
    start "socat-entry-$target" socat "TCP-LISTEN:$entry,bind=127.0.0.1,reuseaddr,fork,nodelay" \
      "TCP:127.0.0.1:$mid,nodelay"
    pids+=("$STARTED_PID")
    wait_listen "$mid"
    wait_listen "$entry"
    entries[$target]=$entry
  done
  TUNNEL_PIDS=("${pids[@]}")
  measure_path "socat pair" "127.0.0.1:${entries[$SINK_PORT]}" "127.0.0.1:${entries[$ECHO_PORT]}" \
    "socat $(socat -V | awk '/socat version/ { print $3 }'), default buffers, nodelay, fork"
  for target in "${pids[@]}"; do kill "$target" 2>/dev/null || true; done
}

# --- stunnel pair: entry (TLS client) -> exit (TLS server) -> target, TLS 1.3 ----------------
stunnel_pair() {
  if ! has stunnel4 || ! has openssl; then
    skip_row "stunnel pair" "skipped (stunnel4 or openssl missing)"
    return 0
  fi
  local dir=$OUT/stunnel target entry mid exit_conf entry_conf cipher
  local -A entries=()
  mkdir -p "$dir"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
    -subj /CN=localhost -addext subjectAltName=DNS:localhost \
    -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null
  exit_conf=$dir/exit.conf
  entry_conf=$dir/entry.conf
  local common="foreground = yes
pid =
sslVersionMin = TLSv1.3
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1"
  printf '%s\noutput = %s/exit.log\ncert = %s/cert.pem\nkey = %s/key.pem\n' \
    "$common" "$dir" "$dir" "$dir" >"$exit_conf"
  printf '%s\noutput = %s/entry.log\ndebug = info\nclient = yes\nCAfile = %s/cert.pem\nverifyChain = yes\ncheckHost = localhost\n' \
    "$common" "$dir" "$dir" >"$entry_conf"
  for target in "$SINK_PORT" "$ECHO_PORT"; do
    port entry
    port mid
    printf '[t%s]\naccept = 127.0.0.1:%s\nconnect = 127.0.0.1:%s\n' "$target" "$mid" "$target" >>"$exit_conf"
    printf '[t%s]\naccept = 127.0.0.1:%s\nconnect = 127.0.0.1:%s\n' "$target" "$entry" "$mid" >>"$entry_conf"
    entries[$target]=$entry
  done
  start stunnel-exit "$STUNNEL" "$exit_conf"
  local exit_pid=$STARTED_PID
  start stunnel-entry "$STUNNEL" "$entry_conf"
  local entry_pid=$STARTED_PID
  for target in "$SINK_PORT" "$ECHO_PORT"; do wait_listen "${entries[$target]}"; done
  TUNNEL_PIDS=("$exit_pid" "$entry_pid")
  measure_path "stunnel pair" "127.0.0.1:${entries[$SINK_PORT]}" "127.0.0.1:${entries[$ECHO_PORT]}" \
    "stunnel $("$STUNNEL" -version 2>&1 | awk '/^stunnel/ { print $2; exit }'), TLS 1.3, P-256 cert, nodelay"
  cipher=$(grep -ohE 'TLSv1\.3 ciphersuite: [A-Z0-9_]+' "$dir/entry.log" | head -1 || true)
  [[ -z $cipher ]] || log "stunnel negotiated $cipher"
  kill "$exit_pid" "$entry_pid" 2>/dev/null || true
}

# --- raw quinn: the QUIC ceiling, no TCP legs (bulk only) ------------------------------------
raw_quinn() {
  local qport one
  port qport
  start quic-server "$MESHBENCH" quic-bulk-server --listen "127.0.0.1:$qport"
  local pid=$STARTED_PID
  for _ in $(seq 200); do grep -q listening "$OUT/quic-server.log" && break; sleep 0.05; done
  log "raw quinn: bulk $BULK_BYTES x$BULK_REPEAT over one connection"
  one=$("$MESHBENCH" quic-bulk --connect "127.0.0.1:$qport" --bytes "$BULK_BYTES" \
    --repeat "$BULK_REPEAT" --json)
  record "$(jq -nc --argjson r "$one" --argjson rss "$(peak_rss_kib "$pid")" \
    '{path: "raw quinn", note: "meshbench quic-bulk, one stream; latency n/a (no TCP legs)",
      bulk: {"1": $r.median_gbps}, peak_rss_kib: $rss}')"
  kill "$pid" 2>/dev/null || true
}

# --- meshnode L4: entry node A -> QUIC/mTLS -> exit node B -> target -------------------------
meshnode_l4() {
  if [[ -z ${MESHNODE_BIN:-} ]]; then
    echo "meshnode: skipped (MESHNODE_BIN unset)"
    skip_row "meshnode L4" "pending (MESHNODE_BIN unset)"
    return 0
  fi
  if [[ ! -x $MESHNODE_BIN ]]; then
    echo "meshnode: skipped ($MESHNODE_BIN is not executable)"
    skip_row "meshnode L4" "skipped ($MESHNODE_BIN is not executable)"
    return 0
  fi
  local dir=$OUT/meshnode qa qb aa ab entry_sink entry_echo n
  mkdir -p "$dir"
  "$MESHNODE_BIN" ca init --dir "$dir/ca" --trust-domain bench.mesh >/dev/null
  for n in node-a node-b; do
    "$MESHNODE_BIN" cert issue --ca-dir "$dir/ca" --name "$n" --out "$dir" >/dev/null
  done
  port qa; port qb; port aa; port ab; port entry_sink; port entry_echo
  cat >"$dir/b.toml" <<EOT
[node]
name = "node-b"
listen = "127.0.0.1:$qb"
state_dir = "$dir/state-b"
[tls]
ca = "$dir/ca/ca.pem"
cert = "$dir/node-b.pem"
key = "$dir/node-b.key"
[registry]
backend = "static"
[[registry.peers]]
name = "node-a"
addr = "127.0.0.1:$qa"
[admin]
listen = "127.0.0.1:$ab"
[[service]]
name = "sink"
protocol = "tcp"
target = "127.0.0.1:$SINK_PORT"
[[service]]
name = "echo"
protocol = "tcp"
target = "127.0.0.1:$ECHO_PORT"
EOT
  cat >"$dir/a.toml" <<EOT
[node]
name = "node-a"
listen = "127.0.0.1:$qa"
state_dir = "$dir/state-a"
[tls]
ca = "$dir/ca/ca.pem"
cert = "$dir/node-a.pem"
key = "$dir/node-a.key"
[registry]
backend = "static"
[[registry.peers]]
name = "node-b"
addr = "127.0.0.1:$qb"
services = [{ name = "sink", protocol = "tcp", port = $SINK_PORT }, { name = "echo", protocol = "tcp", port = $ECHO_PORT }]
[admin]
listen = "127.0.0.1:$aa"
[[outbound]]
service = "sink"
listen = "127.0.0.1:$entry_sink"
[[outbound]]
service = "echo"
listen = "127.0.0.1:$entry_echo"
EOT
  MESHNODE_LOG=warn start meshnode-b "$MESHNODE_BIN" run -c "$dir/b.toml"
  local b_pid=$STARTED_PID
  MESHNODE_LOG=warn start meshnode-a "$MESHNODE_BIN" run -c "$dir/a.toml"
  local a_pid=$STARTED_PID
  wait_listen "$entry_sink"
  wait_listen "$entry_echo"
  TUNNEL_PIDS=("$a_pid" "$b_pid")
  measure_path "meshnode L4" "127.0.0.1:$entry_sink" "127.0.0.1:$entry_echo" \
    "meshnode $("$MESHNODE_BIN" version | awk '{ print $2 }'), meshnode/1 over QUIC, TLS 1.3 mTLS, static registry"
  if [[ ${IDLE_TUNNELS:-0} -gt 0 ]]; then
    # Memory per idle tunnel: RSS of both nodes before and with IDLE_TUNNELS open tunnels.
    local rss0 rss1 idle_pid
    rss0=$(awk '/^VmRSS:/ { s += $2 } END { print s }' "/proc/$a_pid/status" "/proc/$b_pid/status")
    log "meshnode L4: opening $IDLE_TUNNELS idle tunnels"
    start idle "$MESHBENCH" idle --connect "127.0.0.1:$entry_echo" --conns "$IDLE_TUNNELS"
    idle_pid=$STARTED_PID
    for _ in $(seq 1200); do
      grep -q "idle .* open" "$OUT/idle.log" && break
      kill -0 "$idle_pid" 2>/dev/null || break
      sleep 0.1
    done
    if ! grep -q "idle $IDLE_TUNNELS open" "$OUT/idle.log"; then
      log "idle tunnels: FAILED to open $IDLE_TUNNELS (see $OUT/idle.log); no number recorded"
      kill "$idle_pid" "$a_pid" "$b_pid" 2>/dev/null || true
      return 0
    fi
    sleep 1
    rss1=$(awk '/^VmRSS:/ { s += $2 } END { print s }' "/proc/$a_pid/status" "/proc/$b_pid/status")
    # Kept out of results.jsonl (the tables); printed and saved beside it.
    jq -nc --argjson n "$IDLE_TUNNELS" --argjson r0 "$rss0" --argjson r1 "$rss1" \
      '{path: "meshnode L4 idle tunnels", note: "RSS of both nodes, KiB", tunnels: $n,
        rss_before_kib: $r0, rss_after_kib: $r1, kib_per_tunnel_both_nodes: (($r1 - $r0) / $n)}' \
      | tee "$OUT/idle.json" >&2
    log "idle tunnels: $rss0 KiB -> $rss1 KiB for $IDLE_TUNNELS tunnels (both nodes)"
    kill "$idle_pid" 2>/dev/null || true
  fi
  kill "$a_pid" "$b_pid" 2>/dev/null || true
}

direct
socat_pair
stunnel_pair
raw_quinn
meshnode_l4

# --- report ------------------------------------------------------------------------------------
{
  echo
  echo "Bulk throughput, Gbit/s (median of $BULK_REPEAT x $BULK_BYTES), ratios vs direct TCP and vs stunnel pair:"
  echo
  jq -rs --arg conns "$BULK_CONNS" -f "$ROOT/bench/report.jq" --arg table bulk "$RESULTS"
  echo
  echo "Latency at $LAT_RATE req/s, $LAT_SIZE B, $LAT_DURATION, $LAT_CONNS connections (µs, from the scheduled send; added = path - direct):"
  echo
  jq -rs --arg conns "$BULK_CONNS" -f "$ROOT/bench/report.jq" --arg table latency "$RESULTS"
  echo
  echo "Load average (1/5/15 min) before: $LOAD_BEFORE; after: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "Raw results: $RESULTS"
} | tee "$OUT/report.md"
