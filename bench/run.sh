#!/usr/bin/env bash
# meshnode baseline benchmarks: one run, same machine, same payloads, every path side by side.
#
# Usage: bench/run.sh                (after: cargo build --release -p meshnode-bench)
#
# Paths: direct TCP, socat pair (relay without crypto), stunnel pair (TLS 1.3), haproxy pair
# (TLS 1.3, mode tcp), an HBONE-shaped pair (TLS 1.3 + HTTP/2 CONNECT over one TCP connection,
# ztunnel's design; meshbench h2-entry/h2-exit), raw quinn (bulk only: no TCP legs), and
# meshnode L4 when MESHNODE_BIN is set (see meshnode_l4 below).
# For each: bulk throughput (median of BULK_REPEAT runs, per entry of BULK_CONNS) against a
# `meshbench sink`, then open-loop latency (LAT_RATE req/s, LAT_SIZE bytes, LAT_DURATION) against
# a `meshbench echo`. Prints markdown tables with ratios vs direct TCP and vs the stunnel pair.
# HTTP: open-loop HTTP/1.1 GETs (`meshbench http`, each rate of HTTP_RATES) against a
# `meshbench http-echo`, direct and through meshnode's HTTP proxy (node A) to node B's
# `protocol = "http"` service, and through an haproxy pair in mode http with TLS 1.3 between the
# two (haproxy_http_pair, the L7 peer); plus a closed-loop run (HTTP_CONCURRENCY connections, one
# request outstanding on each: req/s at a fixed concurrency).
# gRPC: gRPC-shaped unary calls over one h2c connection (`meshbench grpc`) against a
# `meshbench grpc-echo`, direct and through node A's `[[outbound]]` (mode auto, h2c detected) to
# node B's `protocol = "grpc"` service: closed loop at GRPC_CONCURRENCY streams (req/s), open
# loop at each of GRPC_RATES (latency from the scheduled send); and through an haproxy pair in
# mode http speaking h2 end to end (haproxy_grpc_pair, the peer). Every row records CPU seconds
# and peak RSS of each process of the path. With LOSS_PCT, the loss scenario (loss_scenario
# below) runs last.
#
# Environment (defaults in brackets):
#   MESHBENCH     meshbench binary            [target/release/meshbench]
#   MESHNODE_BIN  meshnode binary; unset = meshnode rows skipped
#   BULK_BYTES    bytes per bulk run          [2GiB]      BULK_REPEAT  runs per median [3]
#   BULK_CONNS    connection counts to test   ["1"]       e.g. "1 8" (raw quinn: streams of one connection)
#   LAT_RATE      requests/s                  [1000]      LAT_SIZE     request bytes   [1024]
#   LAT_DURATION  measured time               [10s]       LAT_WARMUP   unrecorded lead [1s]
#   LAT_CONNS     latency connection pool     [4]
#   PINGPONG_DURATION  closed-loop ping-pong (LAT_SIZE, one connection, one request outstanding)
#                 after each TCP row's latency run [5s]; empty = none
#   SYSCALLS      1: system calls and context switches per request of each path process during
#                 the latency run, counted by `perf stat` (raw_syscalls tracepoint, every thread;
#                 forked children not counted) [1 where perf can count them, else 0]
#   HTTP_RATES    HTTP requests/s to test     ["1000 4000"]
#   HTTP_SIZE     HTTP response body bytes    [1024]      HTTP_CONNS   keep-alive pool [LAT_CONNS]
#   HTTP_CONCURRENCY  closed-loop HTTP connections [16]; empty = no closed-loop HTTP run
#   GRPC_CONCURRENCY  closed-loop gRPC streams  [32]      GRPC_RATES   open-loop calls/s ["1000"]
#   GRPC_SIZE     gRPC message bytes          [1024]      GRPC_CONNS   h2c connections [1]
#   LOSS_PCT      if set (e.g. 1): the loss scenario through meshrelay, and (as root, with
#                 nft) the stunnel pair across a veth pair with the same random loss
#   LOSS_BULK     size of the background bulk transfer of the loss scenario [1000GiB: it is
#                 stopped when the probe ends; its rate is read from /proc/PID/io]
#   BASE_PORT     first of ~20 loopback ports [random in 20000-39999]
#   OUT           directory for raw JSON      [a new temp dir]
#   IDLE_TUNNELS  if > 0, also RSS of both nodes with that many idle meshnode tunnels open
#   QUIET_LOAD    if set, first wait (up to 15 min) for the 1-minute load average to drop below it
#   PATHS         only these rows, e.g. "meshnode_l4 loss_meshnode_netns" [all]: direct socat_pair
#                 stunnel_pair haproxy_pair h2_pair raw_quinn meshnode_l4 direct_http meshnode_http
#                 haproxy_http_pair direct_grpc meshnode_grpc haproxy_grpc_pair loss_meshnode
#                 loss_meshnode_netns loss_stunnel_netns loss_h2_netns (loss_* need LOSS_PCT;
#                 keep "direct": the latency table subtracts it)
#   MESH_TRANSPORT  TOML lines for both meshnode nodes' [transport] section, e.g.
#                 'congestion = "bbr"' or $'socket_buffer = 2097152\nsend_window = 4194304'
#   MESH_ENV      environment (VAR=value words) for both meshnode processes, e.g.
#                 MESHNODE_RUNTIME=current
#   MESH_ALT_BIN, MESH_ALT_ENV, MESH_ALT_LABEL  a second meshnode variant measured in the same run
#                 by the rows meshnode_l4_alt and veth_meshnode_alt ["alt"; binary and env default
#                 to MESHNODE_BIN and MESH_ENV], e.g. the previous build against the new one
# Rows across a veth pair (root and nft; no loss, 1500-byte MTU, the namespace made as for the
# loss rows): veth_direct veth_stunnel veth_h2 veth_meshnode veth_meshnode_alt. Their ratios are
# against "direct TCP via veth" and "stunnel pair via veth".
# Installs nothing. Needs jq; socat, stunnel4, haproxy, curl and openssl for their rows
# (apt-get install -y jq socat stunnel4 haproxy curl openssl).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MESHBENCH=${MESHBENCH:-$ROOT/target/release/meshbench}
MESHRELAY=${MESHRELAY:-$(dirname "$MESHBENCH")/meshrelay}
BULK_BYTES=${BULK_BYTES:-2GiB}
BULK_REPEAT=${BULK_REPEAT:-3}
BULK_CONNS=${BULK_CONNS:-1}
LAT_RATE=${LAT_RATE:-1000}
LAT_SIZE=${LAT_SIZE:-1024}
LAT_DURATION=${LAT_DURATION:-10s}
LAT_WARMUP=${LAT_WARMUP:-1s}
LAT_CONNS=${LAT_CONNS:-4}
PINGPONG_DURATION=${PINGPONG_DURATION-5s}
# System calls and context switches per request of each process during the latency run (perf).
if [[ -z ${SYSCALLS:-} ]]; then
  SYSCALLS=0
  perf stat -e raw_syscalls:sys_enter,context-switches -- true >/dev/null 2>&1 && SYSCALLS=1
fi
HTTP_RATES=${HTTP_RATES:-1000 4000}
HTTP_SIZE=${HTTP_SIZE:-1024}
HTTP_CONNS=${HTTP_CONNS:-$LAT_CONNS}
HTTP_CONCURRENCY=${HTTP_CONCURRENCY-16}
GRPC_CONCURRENCY=${GRPC_CONCURRENCY:-32}
GRPC_RATES=${GRPC_RATES:-1000}
GRPC_SIZE=${GRPC_SIZE:-1024}
GRPC_CONNS=${GRPC_CONNS:-1}
LOSS_PCT=${LOSS_PCT:-}
LOSS_BULK=${LOSS_BULK:-1000GiB}
BASE_PORT=${BASE_PORT:-$((20000 + RANDOM % 20000))}
OUT=${OUT:-$(mktemp -d /tmp/meshbench.XXXXXX)}
RESULTS=$OUT/results.jsonl
CLK_TCK=$(getconf CLK_TCK)
PIDS=()           # every process this script started, killed by PID on exit
TUNNEL_PIDS=()    # the processes of the path being measured (CPU and RSS are read from these)
TUNNEL_NAMES=()   # their names, same order
CLEANUP_CMDS=()   # extra teardown (network namespace, veth), run on exit

mkdir -p "$OUT"
: >"$RESULTS"

cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  local cmd
  for cmd in "${CLEANUP_CMDS[@]}"; do eval "$cmd" 2>/dev/null || true; done
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
HAPROXY=$(command -v haproxy || { [[ -x /usr/sbin/haproxy ]] && echo /usr/sbin/haproxy; } || true)
[[ -n $HAPROXY ]] || MISSING+=(haproxy)
command -v curl >/dev/null || MISSING+=(curl)
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

# proc_json: a JSON array with each TUNNEL_PIDS process's name, CPU seconds over its life so far
# (user + system, reaped children included) and peak RSS (VmHWM).
proc_json() {
  local i out='[]'
  for i in "${!TUNNEL_PIDS[@]}"; do
    out=$(jq -c --arg n "${TUNNEL_NAMES[$i]:-pid ${TUNNEL_PIDS[$i]}}" \
      --argjson t "$(cpu_ticks "${TUNNEL_PIDS[$i]}")" --argjson hz "$CLK_TCK" \
      --argjson k "$(peak_rss_kib "${TUNNEL_PIDS[$i]}")" \
      '. + [{name: $n, cpu_s: ($t / $hz), peak_rss_kib: $k}]' <<<"$out")
  done
  echo "$out"
}

# path_procs NAME PID [NAME PID]...: sets TUNNEL_NAMES and TUNNEL_PIDS.
path_procs() {
  TUNNEL_NAMES=()
  TUNNEL_PIDS=()
  while (($# >= 2)); do
    TUNNEL_NAMES+=("$1")
    TUNNEL_PIDS+=("$2")
    shift 2
  done
}

# record JSON: appends one result object.
record() { echo "$1" >>"$RESULTS"; }

# skip_row PATH REASON [TABLE]: a row that was not measured, and why.
skip_row() {
  record "$(jq -nc --arg p "$1" --arg r "$2" --arg t "${3:-}" \
    '{path: $p, note: $r} + (if $t == "" then {} else {table: $t} end)')"
}

# measure_path NAME SINK_ADDR ECHO_ADDR [NOTE]: bulk and latency through one path; the path's
# processes must be in TUNNEL_PIDS (empty for direct TCP).
measure_path() {
  local name=$1 sink=$2 echo_addr=$3 note=${4:-} conns bulk='{}' one lat cpu0 cpu1 t0 t1 pp=null
  local cores=null rss=null
  for conns in $BULK_CONNS; do
    log "$name: bulk $BULK_BYTES x$BULK_REPEAT over $conns connection(s)"
    one=$("$MESHBENCH" bulk --connect "$sink" --bytes "$BULK_BYTES" --conns "$conns" \
      --repeat "$BULK_REPEAT" --json)
    bulk=$(jq -c --arg c "$conns" --argjson r "$one" '. + {($c): $r.median_gbps}' <<<"$bulk")
  done
  log "$name: latency $LAT_RATE req/s x $LAT_SIZE B for $LAT_DURATION"
  syscalls_start "$name"
  cpu0=$(cpu_ticks "${TUNNEL_PIDS[@]}")
  t0=$(date +%s.%N)
  lat=$("$MESHBENCH" latency --connect "$echo_addr" --rate "$LAT_RATE" --size "$LAT_SIZE" \
    --duration "$LAT_DURATION" --warmup "$LAT_WARMUP" --conns "$LAT_CONNS" --json)
  t1=$(date +%s.%N)
  # Requests sent meanwhile: the warm-up's and the measured ones.
  syscalls_stop "$(jq -n "$LAT_RATE * ($t1 - $t0) | floor | if . < 1 then 1 else . end")"
  sleep 0.3 # let forking relays reap their children, whose CPU then shows in cutime/cstime
  cpu1=$(cpu_ticks "${TUNNEL_PIDS[@]}")
  if ((${#TUNNEL_PIDS[@]} > 0)); then
    # Cores used by the path's processes over the latency run (warm-up included).
    cores=$(jq -n "($cpu1 - $cpu0) / $CLK_TCK / ($t1 - $t0)")
    rss=$(peak_rss_kib "${TUNNEL_PIDS[@]}")
  fi
  if [[ -n $PINGPONG_DURATION ]]; then
    log "$name: ping-pong, $LAT_SIZE B, one connection, for $PINGPONG_DURATION"
    pp=$("$MESHBENCH" latency --connect "$echo_addr" --concurrency 1 --size "$LAT_SIZE" \
      --duration "$PINGPONG_DURATION" --warmup "$LAT_WARMUP" --json)
  fi
  record "$(jq -nc --arg p "$name" --arg n "$note" --argjson b "$bulk" --argjson l "$lat" \
    --argjson c "$cores" --argjson r "$rss" --argjson procs "$(proc_json)" --arg g "${GROUP:-}" \
    --argjson pp "$pp" --argjson sys "$PER_REQUEST" \
    '{path: $p, note: $n, bulk: $b, latency: $l, cpu_cores: $c, peak_rss_kib: $r, procs: $procs,
      pingpong: $pp, per_request: $sys} + (if $g == "" then {} else {group: $g} end)')"
}

# syscalls_start NAME: with perf (SYSCALLS=1, the default where `perf stat` can count the
# raw_syscalls tracepoint), counts the system calls and context switches of every thread of each
# TUNNEL_PIDS process until syscalls_stop. Children forked later (socat's) are not counted.
PERF_PIDS=()
PERF_FILES=()
syscalls_start() {
  PERF_PIDS=()
  PERF_FILES=()
  [[ $SYSCALLS == 1 ]] || return 0
  local pid f
  for pid in "${TUNNEL_PIDS[@]}"; do
    f=$OUT/perf-$1-$pid.csv
    perf stat -x, -e raw_syscalls:sys_enter,context-switches -p "$pid" -o "$f" 2>/dev/null &
    PERF_PIDS+=($!)
    PERF_FILES+=("$f")
  done
  sleep 0.2 # attached before the load starts
}

# syscalls_stop REQUESTS: stops the counters and sets PER_REQUEST to a JSON array, per process
# of TUNNEL_PIDS, {syscalls, ctx_switches} per request (of REQUESTS sent meanwhile), or null
# without counters. (Not in a $(...): that subshell could not wait for perf to write its file.)
PER_REQUEST=null
syscalls_stop() {
  PER_REQUEST=null
  ((${#PERF_PIDS[@]} > 0)) || return 0
  kill -INT "${PERF_PIDS[@]}" 2>/dev/null || true
  wait "${PERF_PIDS[@]}" 2>/dev/null || true
  local f out='[]' sc cs
  for f in "${PERF_FILES[@]}"; do
    sc=$(awk -F, '$3 == "raw_syscalls:sys_enter" { print $1 + 0 }' "$f" 2>/dev/null)
    cs=$(awk -F, '$3 == "context-switches" { print $1 + 0 }' "$f" 2>/dev/null)
    out=$(jq -c --argjson s "${sc:-null}" --argjson c "${cs:-null}" --argjson n "$1" \
      '. + [{syscalls: (if $s then $s / $n else null end),
             ctx_switches: (if $c then $c / $n else null end)}]' <<<"$out")
  done
  PER_REQUEST=$out
}

# ticks_each: the CPU ticks of each TUNNEL_PIDS process, space-separated.
ticks_each() {
  local pid
  for pid in "${TUNNEL_PIDS[@]}"; do cpu_ticks "$pid"; done | paste -sd' '
}

# cores_json T0 T1 TICKS0 TICKS1: a JSON array, the cores each TUNNEL_PIDS process used between
# times T0 and T1 (ticks_each taken at each).
cores_json() {
  jq -nc --arg a "$3" --arg b "$4" --argjson dt "$(jq -n "$2 - $1")" --argjson hz "$CLK_TCK" \
    '[$a, $b] | map(split(" ") | map(select(length > 0) | tonumber)) as [$x, $y]
     | [range($x | length) as $i | ($y[$i] - $x[$i]) / $hz / $dt]'
}

# measure_loads TABLE NAME NOTE LOAD... -- CMD...: one `meshbench` client run per LOAD ("cN":
# closed loop at concurrency N, passed as --concurrency N; a number: open loop at that rate,
# --rate R) with the CMD arguments, and one TABLE row: the client's JSON per load, the path's
# cores (all its processes and each one) per load, its processes.
measure_loads() {
  local table=$1 name=$2 note=$3 load one runs='{}' cores='{}' each='{}' k0 k1 t0 t1 c
  shift 3
  local loads=()
  while (($# > 0)) && [[ $1 != -- ]]; do loads+=("$1"); shift; done
  shift
  for load in "${loads[@]}"; do
    local args=(--rate "$load")
    [[ $load != c* ]] || args=(--concurrency "${load#c}")
    log "$name: $table ${args[*]} for $LAT_DURATION"
    k0=$(ticks_each)
    t0=$(date +%s.%N)
    if ! one=$("$MESHBENCH" "$@" "${args[@]}" --duration "$LAT_DURATION" --warmup "$LAT_WARMUP" --json); then
      log "$name: ${args[*]} FAILED"
      one=null
    fi
    t1=$(date +%s.%N)
    sleep 0.1
    k1=$(ticks_each)
    runs=$(jq -c --arg r "$load" --argjson o "$one" '. + {($r): $o}' <<<"$runs")
    if ((${#TUNNEL_PIDS[@]} > 0)); then
      c=$(cores_json "$t0" "$t1" "$k0" "$k1")
      cores=$(jq -c --arg r "$load" --argjson c "$c" '. + {($r): ($c | add)}' <<<"$cores")
      each=$(jq -c --arg r "$load" --argjson c "$c" '. + {($r): $c}' <<<"$each")
    fi
  done
  record "$(jq -nc --arg t "$table" --arg p "$name" --arg n "$note" --argjson h "$runs" \
    --argjson c "$cores" --argjson e "$each" --argjson procs "$(proc_json)" \
    '{table: $t, path: $p, note: $n, http: $h, cpu_cores: $c, cpu_each: $e, procs: $procs}')"
}

# measure_http NAME ADDR HOST [NOTE]: HTTP/1.1 GETs through one path (ADDR: the http-echo
# itself, or a proxy routing by Host: HOST), open loop at each of HTTP_RATES over HTTP_CONNS
# keep-alive connections, then closed loop over HTTP_CONCURRENCY; its processes in TUNNEL_PIDS.
measure_http() {
  local loads=($HTTP_RATES)
  [[ -z $HTTP_CONCURRENCY ]] || loads+=("c$HTTP_CONCURRENCY")
  measure_loads http "$1" "${4:-}" "${loads[@]}" -- http --connect "$2" --host "$3" \
    --conns "$HTTP_CONNS" --expect-size "$HTTP_SIZE"
}

# measure_grpc NAME ADDR [NOTE]: gRPC-shaped unary calls over GRPC_CONNS h2c connection(s),
# open loop at each of GRPC_RATES, then closed loop at GRPC_CONCURRENCY streams.
measure_grpc() {
  measure_loads grpc "$1" "${3:-}" $GRPC_RATES "c$GRPC_CONCURRENCY" -- grpc --connect "$2" \
    --conns "$GRPC_CONNS" --size "$GRPC_SIZE"
}

# --- the targets --------------------------------------------------------------------------
port SINK_PORT
port ECHO_PORT
port HTTP_PORT
port GRPC_PORT
start sink "$MESHBENCH" sink --listen "127.0.0.1:$SINK_PORT"
start echo "$MESHBENCH" echo --listen "127.0.0.1:$ECHO_PORT"
start http-echo "$MESHBENCH" http-echo --listen "127.0.0.1:$HTTP_PORT" --size "$HTTP_SIZE"
wait_listen "$SINK_PORT"
wait_listen "$ECHO_PORT"
start grpc-echo "$MESHBENCH" grpc-echo --listen "127.0.0.1:$GRPC_PORT"
wait_listen "$HTTP_PORT"
wait_listen "$GRPC_PORT"

# --- direct TCP ---------------------------------------------------------------------------
direct() {
  path_procs
  measure_path "direct TCP" "127.0.0.1:$SINK_PORT" "127.0.0.1:$ECHO_PORT"
}

# --- direct HTTP: meshbench http straight to the http-echo ----------------------------------
direct_http() {
  path_procs
  measure_http "direct HTTP" "127.0.0.1:$HTTP_PORT" localhost "meshbench http-echo (hyper 1, HTTP/1.1 keep-alive)"
}

# tls_cert DIR: a throw-away P-256 certificate for CN/SAN localhost: DIR/cert.pem, DIR/key.pem.
tls_cert() {
  mkdir -p "$1"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
    -subj /CN=localhost -addext subjectAltName=DNS:localhost \
    -keyout "$1/key.pem" -out "$1/cert.pem" 2>/dev/null
}

# --- socat pair: entry relay -> exit relay -> target, no crypto ----------------------------
socat_pair() {
  if ! has socat; then skip_row "socat pair" "skipped (socat missing)"; return 0; fi
  local target entry mid pids=() names=()
  local -A entries=()
  for target in "$SINK_PORT" "$ECHO_PORT"; do
    port entry
    port mid
    start "socat-exit-$target" socat "TCP-LISTEN:$mid,bind=127.0.0.1,reuseaddr,fork,nodelay" \
      "TCP:127.0.0.1:$target,nodelay"
    pids+=("$STARTED_PID")
    names+=("socat exit ($([[ $target == "$SINK_PORT" ]] && echo sink || echo echo))")
    start "socat-entry-$target" socat "TCP-LISTEN:$entry,bind=127.0.0.1,reuseaddr,fork,nodelay" \
      "TCP:127.0.0.1:$mid,nodelay"
    pids+=("$STARTED_PID")
    names+=("socat entry ($([[ $target == "$SINK_PORT" ]] && echo sink || echo echo))")
    wait_listen "$mid"
    wait_listen "$entry"
    entries[$target]=$entry
  done
  TUNNEL_PIDS=("${pids[@]}")
  TUNNEL_NAMES=("${names[@]}")
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
  tls_cert "$dir"
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
  path_procs "stunnel exit" "$exit_pid" "stunnel entry" "$entry_pid"
  measure_path "stunnel pair" "127.0.0.1:${entries[$SINK_PORT]}" "127.0.0.1:${entries[$ECHO_PORT]}" \
    "stunnel $("$STUNNEL" -version 2>&1 | awk '/^stunnel/ { print $2; exit }'), TLS 1.3, P-256 cert, nodelay"
  cipher=$(grep -ohE 'TLSv1\.3 ciphersuite: [A-Z0-9_]+' "$dir/entry.log" | head -1 || true)
  [[ -z $cipher ]] || log "stunnel negotiated $cipher"
  kill "$exit_pid" "$entry_pid" 2>/dev/null || true
}

# haproxy_common MODE DIR [EXTRA]: makes DIR's throw-away certificate (cert.pem, key.pem and
# combined.pem for haproxy) and prints the `global` and `defaults` sections every haproxy pair
# shares (TLS 1.3 only, `mode MODE`, long client/server timeouts), then EXTRA defaults lines.
haproxy_common() {
  tls_cert "$2"
  cat "$2/cert.pem" "$2/key.pem" >"$2/combined.pem"
  printf '%s\n' "global
  ssl-default-bind-options ssl-min-ver TLSv1.3
  ssl-default-server-options ssl-min-ver TLSv1.3
defaults
  mode $1
  timeout connect 5s
  timeout client 1h
  timeout server 1h${3:+
$3}"
}

# --- haproxy pair: entry (TLS client) -> exit (TLS server) -> target, TLS 1.3, mode tcp -------
haproxy_pair() {
  if ! has haproxy || ! has openssl; then
    skip_row "haproxy pair" "skipped (haproxy or openssl missing)"
    return 0
  fi
  local dir=$OUT/haproxy target entry mid
  local -A entries=()
  # Defaults: as many threads as CPUs; haproxy sets TCP_NODELAY on its sockets itself.
  local common
  common=$(haproxy_common tcp "$dir")
  printf '%s\n' "$common" >"$dir/exit.cfg"
  printf '%s\n' "$common" >"$dir/entry.cfg"
  for target in "$SINK_PORT" "$ECHO_PORT"; do
    port entry
    port mid
    printf 'listen t%s\n  bind 127.0.0.1:%s ssl crt %s/combined.pem\n  server s 127.0.0.1:%s\n' \
      "$target" "$mid" "$dir" "$target" >>"$dir/exit.cfg"
    printf 'listen t%s\n  bind 127.0.0.1:%s\n  server s 127.0.0.1:%s ssl verify required ca-file %s/cert.pem verifyhost localhost sni str(localhost)\n' \
      "$target" "$entry" "$mid" "$dir" >>"$dir/entry.cfg"
    entries[$target]=$entry
  done
  "$HAPROXY" -c -q -f "$dir/exit.cfg" && "$HAPROXY" -c -q -f "$dir/entry.cfg" || {
    skip_row "haproxy pair" "skipped (haproxy rejected the config; see $dir)"
    return 0
  }
  start haproxy-exit "$HAPROXY" -db -f "$dir/exit.cfg"
  local exit_pid=$STARTED_PID
  start haproxy-entry "$HAPROXY" -db -f "$dir/entry.cfg"
  local entry_pid=$STARTED_PID
  for target in "$SINK_PORT" "$ECHO_PORT"; do wait_listen "${entries[$target]}"; done
  path_procs "haproxy exit" "$exit_pid" "haproxy entry" "$entry_pid"
  local cipher
  cipher=$(echo | openssl s_client -connect "127.0.0.1:$mid" -servername localhost 2>/dev/null \
    | awk '/^New, / { print $2, $NF; exit }' || true)
  [[ -z $cipher ]] || log "haproxy exit negotiates $cipher"
  measure_path "haproxy pair" "127.0.0.1:${entries[$SINK_PORT]}" "127.0.0.1:${entries[$ECHO_PORT]}" \
    "haproxy $("$HAPROXY" -v | awk 'NR == 1 { print $3 }'), mode tcp, TLS 1.3${cipher:+ ($cipher)}, P-256 cert"
  kill "$exit_pid" "$entry_pid" 2>/dev/null || true
}

# --- HBONE-shaped pair (ztunnel's design): one TLS 1.3 + HTTP/2 connection, CONNECT per tunnel -
# h2_entry_pair EXIT_LISTEN SINK_TARGET ECHO_TARGET LABEL [NETNS]: meshbench h2-exit on
# EXIT_LISTEN (in NETNS if given) and h2-entry on the host with one forward for the sink and one
# for the echo (targets as the exit resolves them). Sets H2_E1 / H2_E2 (entry ports for sink /
# echo) and H2_EXIT / H2_ENTRY (PIDs).
h2_entry_pair() {
  local exit_listen=$1 sink=$2 echo_target=$3 label=$4 ns=${5:-} e1 e2 in_ns=()
  port e1; port e2
  [[ -z $ns ]] || in_ns=(ip netns exec "$ns")
  start "$label-exit" "${in_ns[@]}" "$MESHBENCH" h2-exit --listen "$exit_listen"
  H2_EXIT=$STARTED_PID
  for _ in $(seq 200); do grep -q listening "$OUT/$label-exit.log" && break; sleep 0.05; done
  start "$label-entry" "$MESHBENCH" h2-entry --exit "$exit_listen" \
    --forward "127.0.0.1:$e1=$sink" --forward "127.0.0.1:$e2=$echo_target"
  H2_ENTRY=$STARTED_PID
  wait_listen "$e1"
  wait_listen "$e2"
  path_procs "h2 exit${ns:+ (netns)}" "$H2_EXIT" "h2 entry" "$H2_ENTRY"
  H2_E1=$e1 H2_E2=$e2
}

H2_NOTE="meshbench h2-entry/h2-exit: TLS 1.3 + HTTP/2 CONNECT over one TCP connection (HBONE, as ztunnel), ztunnel's windows"
h2_pair() {
  local mid
  port mid
  h2_entry_pair "127.0.0.1:$mid" "127.0.0.1:$SINK_PORT" "127.0.0.1:$ECHO_PORT" h2
  measure_path "HBONE-shaped pair" "127.0.0.1:$H2_E1" "127.0.0.1:$H2_E2" "$H2_NOTE"
  kill "$H2_EXIT" "$H2_ENTRY" 2>/dev/null || true
}

# --- raw quinn: the QUIC ceiling, no TCP legs (bulk only) ------------------------------------
raw_quinn() {
  local qport one
  port qport
  start quic-server "$MESHBENCH" quic-bulk-server --listen "127.0.0.1:$qport"
  local pid=$STARTED_PID
  for _ in $(seq 200); do grep -q listening "$OUT/quic-server.log" && break; sleep 0.05; done
  local conns bulk='{}'
  # N application connections through meshnode are N streams of one peer connection: raw
  # quinn's entry for N is one connection with N concurrent streams.
  for conns in $BULK_CONNS; do
    log "raw quinn: bulk $BULK_BYTES x$BULK_REPEAT over one connection, $conns stream(s)"
    one=$("$MESHBENCH" quic-bulk --connect "127.0.0.1:$qport" --bytes "$BULK_BYTES" \
      --streams "$conns" --repeat "$BULK_REPEAT" --json)
    bulk=$(jq -c --arg c "$conns" --argjson r "$one" '. + {($c): $r.median_gbps}' <<<"$bulk")
  done
  record "$(jq -nc --argjson b "$bulk" --argjson rss "$(peak_rss_kib "$pid")" \
    '{path: "raw quinn", note: "meshbench quic-bulk, one connection, a stream per N; latency n/a (no TCP legs)",
      bulk: $b, peak_rss_kib: $rss}')"
  kill "$pid" 2>/dev/null || true
}

# --- meshnode: two `meshnode run` processes with a static registry ------------------------------
# mesh_ready: 0 if MESHNODE_BIN is usable (the PKI made once); else 1, having said why.
MESH_PKI=
mesh_ready() {
  if [[ -z ${MESHNODE_BIN:-} ]]; then
    MESH_SKIP="pending (MESHNODE_BIN unset)"
    return 1
  fi
  if [[ ! -x $MESHNODE_BIN ]]; then
    MESH_SKIP="skipped ($MESHNODE_BIN is not executable)"
    return 1
  fi
  if [[ -z $MESH_PKI ]]; then
    MESH_PKI=$OUT/meshnode-pki
    mkdir -p "$MESH_PKI"
    "$MESHNODE_BIN" ca init --dir "$MESH_PKI/ca" --trust-domain bench.mesh >/dev/null
    local n
    for n in node-a node-b; do
      "$MESHNODE_BIN" cert issue --ca-dir "$MESH_PKI/ca" --name "$n" --out "$MESH_PKI" >/dev/null
    done
  fi
}

# mesh_pair NAME QB ADVERTISE B_SERVICES A_PEER_SERVICES A_LOCAL: writes the configs of node B
# (QUIC on 127.0.0.1:QB, advertising ADVERTISE, hosting the B_SERVICES TOML) and node A (which
# knows B's services as A_PEER_SERVICES and has the A_LOCAL TOML: outbounds, http_proxy), starts
# B then A, and sets A_PID and B_PID. Readiness is the caller's: wait for A's listeners.
# MESH_A_IP / MESH_B_IP (default 127.0.0.1) are the nodes' QUIC addresses; with MESH_B_NETNS,
# node B runs in that network namespace.
mesh_pair() {
  local name=$1 qb=$2 adv=$3 b_services=$4 a_peers=$5 a_local=$6 dir=$OUT/$1 qa aa ab
  mkdir -p "$dir"
  port qa; port aa; port ab
  cat >"$dir/b.toml" <<EOT
[node]
name = "node-b"
listen = "${MESH_B_IP:-127.0.0.1}:$qb"
advertise = "$adv"
state_dir = "$dir/state-b"
[tls]
ca = "$MESH_PKI/ca/ca.pem"
cert = "$MESH_PKI/node-b.pem"
key = "$MESH_PKI/node-b.key"
[registry]
backend = "static"
[[registry.peers]]
name = "node-a"
addr = "${MESH_A_IP:-127.0.0.1}:$qa"
[admin]
listen = "127.0.0.1:$ab"
[transport]
${MESH_TRANSPORT:-}
$b_services
EOT
  cat >"$dir/a.toml" <<EOT
[node]
name = "node-a"
listen = "${MESH_A_IP:-127.0.0.1}:$qa"
state_dir = "$dir/state-a"
[tls]
ca = "$MESH_PKI/ca/ca.pem"
cert = "$MESH_PKI/node-a.pem"
key = "$MESH_PKI/node-a.key"
[registry]
backend = "static"
[[registry.peers]]
name = "node-b"
addr = "$adv"
services = [$a_peers]
[admin]
listen = "127.0.0.1:$aa"
[transport]
${MESH_TRANSPORT:-}
$a_local
EOT
  local in_ns=()
  [[ -z ${MESH_B_NETNS:-} ]] || in_ns=(ip netns exec "$MESH_B_NETNS")
  local env_words=()
  read -r -a env_words <<<"${MESH_ENV:-}"
  MESHNODE_LOG=warn start "$name-b" "${in_ns[@]}" env "${env_words[@]}" "$MESHNODE_BIN" run -c "$dir/b.toml"
  B_PID=$STARTED_PID
  MESHNODE_LOG=warn start "$name-a" env "${env_words[@]}" "$MESHNODE_BIN" run -c "$dir/a.toml"
  A_PID=$STARTED_PID
  MESH_ADMIN_A=$aa MESH_ADMIN_B=$ab
}

# mesh_quic_stats LABEL: what each node's QUIC connections saw over the row (packets sent and
# declared lost, congestion events, the last RTT and window, per ALPN), from both nodes'
# /metrics; saved to $OUT/LABEL.quic and logged in one line per connection. Call it before
# stopping the pair of mesh_pair.
mesh_quic_stats() {
  local label=$1 file="$OUT/$1.quic" node admin
  : >"$file"
  for node in a b; do
    [[ $node == a ]] && admin=$MESH_ADMIN_A || admin=$MESH_ADMIN_B
    curl -sf "http://127.0.0.1:$admin/metrics" | grep '^meshnode_quic_connection_' \
      | sed "s/^/node-$node /" >>"$file" || true
  done
  awk '{ split($2, a, "{"); m = a[1]; sub("meshnode_quic_connection_", "", m)
         k = $1 " " a[2]; v[k] = v[k] " " m "=" $3 }
       END { for (k in v) print "# '"$label"' QUIC " k ":" v[k] }' "$file" | sort >&2
}

mesh_version() { "$MESHNODE_BIN" version | awk '{ print $2 }'; }

# The TCP services sink and echo on B (targets 127.0.0.1:SINK [SINK_PORT] and :ECHO
# [ECHO_PORT] as B sees them), outbounds for both on A (ports ENTRY_SINK, ENTRY_ECHO).
mesh_l4_pair() {
  local name=$1 qb=$2 adv=$3 sink=${4:-$SINK_PORT} echo_port=${5:-$ECHO_PORT}
  port ENTRY_SINK; port ENTRY_ECHO
  mesh_pair "$name" "$qb" "$adv" "[[service]]
name = \"sink\"
protocol = \"tcp\"
target = \"127.0.0.1:$sink\"
[[service]]
name = \"echo\"
protocol = \"tcp\"
target = \"127.0.0.1:$echo_port\"" \
    "{ name = \"sink\", protocol = \"tcp\", port = $sink }, { name = \"echo\", protocol = \"tcp\", port = $echo_port }" \
    "[[outbound]]
service = \"sink\"
listen = \"127.0.0.1:$ENTRY_SINK\"
[[outbound]]
service = \"echo\"
listen = \"127.0.0.1:$ENTRY_ECHO\""
  wait_listen "$ENTRY_SINK"
  wait_listen "$ENTRY_ECHO"
}

# --- meshnode L4: entry node A -> QUIC/mTLS -> exit node B -> target -------------------------
meshnode_l4() {
  if ! mesh_ready; then
    echo "meshnode: $MESH_SKIP"
    skip_row "meshnode L4" "$MESH_SKIP"
    return 0
  fi
  local qb a_pid b_pid entry_sink entry_echo
  port qb
  mesh_l4_pair "meshnode-l4-$qb" "$qb" "127.0.0.1:$qb"
  a_pid=$A_PID b_pid=$B_PID entry_sink=$ENTRY_SINK entry_echo=$ENTRY_ECHO
  path_procs "meshnode A" "$a_pid" "meshnode B" "$b_pid"
  measure_path "${MESH_L4_NAME:-meshnode L4}" "127.0.0.1:$entry_sink" "127.0.0.1:$entry_echo" \
    "meshnode $(mesh_version), meshnode/1 over QUIC, TLS 1.3 mTLS, static registry"
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
  mesh_quic_stats "meshnode-l4-$qb"
  kill "$a_pid" "$b_pid" 2>/dev/null || true
}

# --- meshnode HTTP: HTTP/1.1 to node A's proxy -> h3 over QUIC/mTLS -> node B -> http-echo -----
meshnode_http() {
  if ! mesh_ready; then
    skip_row "meshnode HTTP" "$MESH_SKIP" http
    return 0
  fi
  if ! has curl; then
    skip_row "meshnode HTTP" "skipped (curl missing: it checks the path end to end first)" http
    return 0
  fi
  local qb px ok=
  port qb; port px
  mesh_pair meshnode-http "$qb" "127.0.0.1:$qb" "[[service]]
name = \"web\"
protocol = \"http\"
target = \"127.0.0.1:$HTTP_PORT\"" "{ name = \"web\", protocol = \"http\", port = $HTTP_PORT }" \
    "[http_proxy]
listen = \"127.0.0.1:$px\""
  wait_listen "$px"
  # Ready once one request has made the whole trip (A dials B for the first one).
  for _ in $(seq 200); do
    curl -sf -o /dev/null -H 'Host: web' "http://127.0.0.1:$px/" && { ok=1; break; }
    sleep 0.05
  done
  if [[ -z $ok ]]; then
    skip_row "meshnode HTTP" "FAILED: no answer through the proxy (see $OUT/meshnode-http-*.log)" http
    kill "$A_PID" "$B_PID" 2>/dev/null || true
    return 0
  fi
  path_procs "meshnode A" "$A_PID" "meshnode B" "$B_PID"
  measure_http "meshnode HTTP" "127.0.0.1:$px" web \
    "meshnode $(mesh_version): HTTP/1.1 to A's proxy (Host: web), h3 over QUIC/mTLS to B, HTTP/1.1 to http-echo"
  mesh_quic_stats meshnode-http
  kill "$A_PID" "$B_PID" 2>/dev/null || true
}

# The L7 peer rows (haproxy HTTP pair) and the gRPC rows.
# shellcheck source=bench/rows-l7.sh
source "$ROOT/bench/rows-l7.sh"

# --- loss scenario ----------------------------------------------------------------------------
# relay_ctl PORT COMMAND: one command on meshrelay's control port; prints the answer.
relay_ctl() {
  local ans
  exec 7<>"/dev/tcp/127.0.0.1/$1"
  printf '%s\n' "$2" >&7
  IFS= read -r ans <&7
  exec 7>&-
  [[ $ans != error* ]] || { log "meshrelay: '$2' -> $ans"; return 1; }
  echo "$ans"
}

# acked PORT: bytes the peer acknowledged on the established TCP connections to loopback PORT
# (the bulk client's side of its connection to the path's entry).
acked() {
  ss -Htin state established "( dst 127.0.0.1 and dport = :$1 )" \
    | grep -o 'bytes_acked:[0-9]*' | awk -F: '{ s += $2 } END { print s + 0 }'
}

# probe_under PATH PCT SINK ECHO BULK: the small-request latency probe (LAT_* settings) against
# ECHO, with (BULK=yes) a bulk transfer to SINK between the same two hops running all along;
# records a "loss" row. The bulk's rate is what the path's entry acknowledged over the probe.
probe_under() {
  local name=$1 pct=$2 sink=$3 echo_addr=$4 bulk=$5 bpid= w0 w1 t0 t1 lat gbps=null
  if [[ $bulk == yes ]]; then
    start "bulk-${name// /-}-$pct" "$MESHBENCH" bulk --connect "$sink" --bytes "$LOSS_BULK" --json
    bpid=$STARTED_PID
    for _ in $(seq 400); do
      (($(acked "${sink##*:}") > 4194304)) && break
      kill -0 "$bpid" 2>/dev/null || break
      sleep 0.05
    done
    w0=$(acked "${sink##*:}")
    t0=$(date +%s.%N)
  fi
  log "$name, loss $pct %, bulk $bulk: latency $LAT_RATE req/s x $LAT_SIZE B for $LAT_DURATION"
  lat=$("$MESHBENCH" latency --connect "$echo_addr" --rate "$LAT_RATE" --size "$LAT_SIZE" \
    --duration "$LAT_DURATION" --warmup "$LAT_WARMUP" --conns "$LAT_CONNS" --json) || {
    log "$name: latency probe FAILED"
    lat=null
  }
  if [[ -n $bpid ]]; then
    w1=$(acked "${sink##*:}")
    t1=$(date +%s.%N)
    if kill -0 "$bpid" 2>/dev/null; then
      gbps=$(jq -n "($w1 - $w0) * 8 / ($t1 - $t0) / 1e9")
      kill "$bpid" 2>/dev/null || true
    else
      log "$name: the bulk transfer ended early (see $OUT/bulk-*.log)"
    fi
    wait "$bpid" 2>/dev/null || true
  fi
  record "$(jq -nc --arg p "$name" --argjson pct "$pct" --arg b "$bulk" --argjson l "$lat" \
    --argjson g "$gbps" --argjson procs "$(proc_json)" \
    '{table: "loss", path: $p, loss_pct: $pct, bulk: ($b == "yes"), latency: $l,
      bulk_gbps: $g, procs: $procs}')"
}

# meshnode L4 with node B advertising a meshrelay, so A -> B QUIC crosses the relay's loss.
loss_meshnode() {
  if ! mesh_ready || [[ ! -x $MESHRELAY ]]; then
    skip_row "meshnode L4 via meshrelay" "skipped (${MESH_SKIP:-$MESHRELAY missing})" loss
    return 0
  fi
  local qb rp cp relay_pid pct bulk
  port qb; port rp; port cp
  start meshrelay "$MESHRELAY" --listen "127.0.0.1:$rp" --upstream "127.0.0.1:$qb" \
    --control "127.0.0.1:$cp"
  relay_pid=$STARTED_PID
  for _ in $(seq 200); do grep -q '^meshrelay listen=' "$OUT/meshrelay.log" && break; sleep 0.05; done
  mesh_l4_pair meshnode-loss "$qb" "127.0.0.1:$rp"
  path_procs "meshnode A" "$A_PID" "meshnode B" "$B_PID" "meshrelay" "$relay_pid"
  for pct in 0 "$LOSS_PCT"; do
    relay_ctl "$cp" "loss $(awk -v x="$pct" 'BEGIN { print x / 100 }')" >/dev/null
    for bulk in no yes; do
      probe_under "meshnode L4 via meshrelay" "$pct" "127.0.0.1:$ENTRY_SINK" \
        "127.0.0.1:$ENTRY_ECHO" "$bulk"
    done
  done
  log "meshrelay stats: $(relay_ctl "$cp" stats)"
  kill "$A_PID" "$B_PID" "$relay_pid" 2>/dev/null || true
}

# netns_up: a network namespace and a veth pair made here (host side NET.1, namespace side NET.2,
# a /30 of 10.251.0.0/16 unused on this host), an nftables table in the namespace for the loss,
# and a sink and an echo inside it on its loopback (ports NS_SINK, NS_ECHO). Both are deleted on
# exit. Root and nft only: returns 1 otherwise.
NS=
netns_up() {
  [[ -z $NS ]] || return 0
  ((EUID == 0)) && command -v nft >/dev/null || return 1
  local sub
  for _ in $(seq 50); do
    sub=$((RANDOM % 250 + 2))
    ip -o addr | grep -q "10\.251\.$sub\." || break
  done
  NET=10.251.$sub
  NS=meshbench$$
  NS_PEER=mbn$$
  local host=mbh$$
  ip netns add "$NS"
  CLEANUP_CMDS+=("ip netns del $NS")
  ip link add "$host" type veth peer name "$NS_PEER"
  CLEANUP_CMDS+=("ip link del $host")
  ip link set "$NS_PEER" netns "$NS"
  ip addr add "$NET.1/30" dev "$host"
  ip link set "$host" up
  ip netns exec "$NS" ip addr add "$NET.2/30" dev "$NS_PEER"
  ip netns exec "$NS" ip link set "$NS_PEER" up
  ip netns exec "$NS" ip link set lo up
  ip netns exec "$NS" nft -f - <<EOT
table inet meshbench_loss {
  chain in { type filter hook input priority 0; policy accept; }
  chain out { type filter hook output priority 0; policy accept; }
}
EOT
  port NS_SINK; port NS_ECHO
  # On every address of the namespace: the veth_direct row reaches them across the veth.
  start netns-sink ip netns exec "$NS" "$MESHBENCH" sink --listen "0.0.0.0:$NS_SINK"
  start netns-echo ip netns exec "$NS" "$MESHBENCH" echo --listen "0.0.0.0:$NS_ECHO"
  ns_wait_listen "$NS_SINK"
  ns_wait_listen "$NS_ECHO"
}

ns_wait_listen() {
  for _ in $(seq 200); do
    ip netns exec "$NS" ss -Htln "( sport = :$1 )" | grep -q . && return 0
    sleep 0.05
  done
  echo "nothing listens on port $1 in $NS" >&2
  return 1
}

# netns_loss PCT: drop PCT % of the packets at random, both ways, on the namespace's veth end.
netns_loss() {
  local per_mille
  ip netns exec "$NS" nft flush chain inet meshbench_loss in
  ip netns exec "$NS" nft flush chain inet meshbench_loss out
  per_mille=$(awk -v x="$1" 'BEGIN { printf "%d", x * 10 + 0.5 }')
  if ((per_mille > 0)); then
    ip netns exec "$NS" nft add rule inet meshbench_loss in iifname "$NS_PEER" numgen random mod 1000 \< "$per_mille" counter drop
    ip netns exec "$NS" nft add rule inet meshbench_loss out oifname "$NS_PEER" numgen random mod 1000 \< "$per_mille" counter drop
  fi
}

nft_counters() { ip netns exec "$NS" nft list ruleset | grep -o 'counter packets [0-9]*' | tr '\n' ' '; }

# The probe alone and beside a bulk, at 0 % and LOSS_PCT % loss on the veth, through the path
# whose sink and echo entries are $2 and $3; $1 names the row.
veth_loss_probes() {
  local name=$1 sink=$2 echo=$3 pct bulk
  for pct in 0 "$LOSS_PCT"; do
    netns_loss "$pct"
    for bulk in no yes; do
      probe_under "$name" "$pct" "$sink" "$echo" "$bulk"
    done
  done
  log "$name: nft drops $(nft_counters)"
}

# A stunnel pair whose TLS leg crosses the veth: the exit in the namespace (to its sink and
# echo), the entry on the host. Sets SV_E1 / SV_E2 (entry ports for sink / echo) and
# SV_EXIT / SV_ENTRY (PIDs). $1: directory for certificates and configs, $2: process label.
stunnel_veth_pair() {
  local dir=$1 label=$2 mid1 mid2 e1 e2
  port mid1; port mid2; port e1; port e2
  tls_cert "$dir"
  local common="foreground = yes
pid =
sslVersionMin = TLSv1.3
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1"
  printf '%s\noutput = %s/exit.log\ncert = %s/cert.pem\nkey = %s/key.pem\n[s]\naccept = %s:%s\nconnect = 127.0.0.1:%s\n[e]\naccept = %s:%s\nconnect = 127.0.0.1:%s\n' \
    "$common" "$dir" "$dir" "$dir" "$NET.2" "$mid1" "$NS_SINK" "$NET.2" "$mid2" "$NS_ECHO" >"$dir/exit.conf"
  printf '%s\noutput = %s/entry.log\nclient = yes\nCAfile = %s/cert.pem\nverifyChain = yes\ncheckHost = localhost\n[s]\naccept = 127.0.0.1:%s\nconnect = %s:%s\n[e]\naccept = 127.0.0.1:%s\nconnect = %s:%s\n' \
    "$common" "$dir" "$dir" "$e1" "$NET.2" "$mid1" "$e2" "$NET.2" "$mid2" >"$dir/entry.conf"
  start "$label-exit" ip netns exec "$NS" "$STUNNEL" "$dir/exit.conf"
  SV_EXIT=$STARTED_PID
  start "$label-entry" "$STUNNEL" "$dir/entry.conf"
  SV_ENTRY=$STARTED_PID
  wait_listen "$e1"
  wait_listen "$e2"
  ns_wait_listen "$mid2"
  path_procs "stunnel exit (netns)" "$SV_EXIT" "stunnel entry" "$SV_ENTRY"
  SV_E1=$e1 SV_E2=$e2
}

# The stunnel pair with its TLS leg across the veth pair: entry in the host namespace, exit (and
# its sink and echo) in the namespace. The bulk and the probe are separate TCP connections.
loss_stunnel_netns() {
  local name="stunnel pair via lossy veth"
  if ! has stunnel4 || ! has openssl || ! netns_up; then
    skip_row "$name" "skipped (needs root, nft, stunnel4, openssl)" loss
    return 0
  fi
  stunnel_veth_pair "$OUT/stunnel-netns" netns-stunnel
  local e1=$SV_E1 e2=$SV_E2 exit_pid=$SV_EXIT entry_pid=$SV_ENTRY
  veth_loss_probes "$name" "127.0.0.1:$e1" "127.0.0.1:$e2"
  kill "$exit_pid" "$entry_pid" 2>/dev/null || true
}

# The HBONE-shaped pair with its one TCP connection across the lossy veth: the bulk and the probe
# are streams of that one connection, as every tunnel between two ztunnel nodes is.
loss_h2_netns() {
  local name="HBONE-shaped pair via lossy veth" mid
  if ! netns_up; then
    skip_row "$name" "skipped (needs root and nft)" loss
    return 0
  fi
  port mid
  h2_entry_pair "$NET.2:$mid" "127.0.0.1:$NS_SINK" "127.0.0.1:$NS_ECHO" loss-h2 "$NS"
  veth_loss_probes "$name" "127.0.0.1:$H2_E1" "127.0.0.1:$H2_E2"
  kill "$H2_EXIT" "$H2_ENTRY" 2>/dev/null || true
}

# meshnode L4 across the same veth pair: node A in the host namespace, node B (and its sink and
# echo) in the namespace, QUIC between NET.1 and NET.2. Bulk and probe share A's one QUIC
# connection to B (separate streams).
loss_meshnode_netns() {
  local name="meshnode L4 via lossy veth"
  if ! mesh_ready || ! netns_up; then
    skip_row "$name" "skipped (${MESH_SKIP:-needs root and nft})" loss
    return 0
  fi
  local qb
  port qb
  MESH_A_IP=$NET.1 MESH_B_IP=$NET.2 MESH_B_NETNS=$NS \
    mesh_l4_pair meshnode-netns "$qb" "$NET.2:$qb" "$NS_SINK" "$NS_ECHO"
  path_procs "meshnode A" "$A_PID" "meshnode B (netns)" "$B_PID"
  veth_loss_probes "$name" "127.0.0.1:$ENTRY_SINK" "127.0.0.1:$ENTRY_ECHO"
  kill "$A_PID" "$B_PID" 2>/dev/null || true
}

# meshnode_l4 with the second variant (MESH_ALT_BIN, MESH_ALT_ENV).
meshnode_l4_alt() {
  MESHNODE_BIN=${MESH_ALT_BIN:-${MESHNODE_BIN:-}} MESH_ENV=${MESH_ALT_ENV:-${MESH_ENV:-}} \
    MESH_L4_NAME="meshnode L4 [${MESH_ALT_LABEL:-alt}]" meshnode_l4
}

# --- the same paths across the veth pair (no loss): B side in the namespace -------------------
veth_direct() {
  if ! netns_up; then skip_row "direct TCP via veth" "skipped (needs root and nft)"; return 0; fi
  path_procs
  GROUP=veth measure_path "direct TCP via veth" "$NET.2:$NS_SINK" "$NET.2:$NS_ECHO"
}

veth_stunnel() {
  local name="stunnel pair via veth"
  if ! has stunnel4 || ! has openssl || ! netns_up; then
    skip_row "$name" "skipped (needs root, nft, stunnel4, openssl)"
    return 0
  fi
  stunnel_veth_pair "$OUT/stunnel-veth" veth-stunnel
  local e1=$SV_E1 e2=$SV_E2 exit_pid=$SV_EXIT entry_pid=$SV_ENTRY
  GROUP=veth measure_path "$name" "127.0.0.1:$e1" "127.0.0.1:$e2" "TLS leg across the veth"
  kill "$exit_pid" "$entry_pid" 2>/dev/null || true
}

veth_h2() {
  local name="HBONE-shaped pair via veth" mid
  if ! netns_up; then skip_row "$name" "skipped (needs root and nft)"; return 0; fi
  port mid
  h2_entry_pair "$NET.2:$mid" "127.0.0.1:$NS_SINK" "127.0.0.1:$NS_ECHO" veth-h2 "$NS"
  GROUP=veth measure_path "$name" "127.0.0.1:$H2_E1" "127.0.0.1:$H2_E2" "$H2_NOTE; across the veth"
  kill "$H2_EXIT" "$H2_ENTRY" 2>/dev/null || true
}

veth_meshnode() {
  local name=${MESH_L4_NAME:-meshnode L4}" via veth"
  if ! mesh_ready || ! netns_up; then
    skip_row "$name" "skipped (${MESH_SKIP:-needs root and nft})"
    return 0
  fi
  local qb
  port qb
  MESH_A_IP=$NET.1 MESH_B_IP=$NET.2 MESH_B_NETNS=$NS \
    mesh_l4_pair "meshnode-veth-$qb" "$qb" "$NET.2:$qb" "$NS_SINK" "$NS_ECHO"
  path_procs "meshnode A" "$A_PID" "meshnode B (netns)" "$B_PID"
  GROUP=veth measure_path "$name" "127.0.0.1:$ENTRY_SINK" "127.0.0.1:$ENTRY_ECHO" \
    "QUIC across the veth (MTU 1500)"
  kill "$A_PID" "$B_PID" 2>/dev/null || true
}

veth_meshnode_alt() {
  MESHNODE_BIN=${MESH_ALT_BIN:-${MESHNODE_BIN:-}} MESH_ENV=${MESH_ALT_ENV:-${MESH_ENV:-}} \
    MESH_L4_NAME="meshnode L4 [${MESH_ALT_LABEL:-alt}]" veth_meshnode
}

[[ -z ${MESH_TRANSPORT:-} ]] || log "meshnode [transport]: ${MESH_TRANSPORT//$'\n'/; }"
ALL_PATHS="direct socat_pair stunnel_pair haproxy_pair h2_pair raw_quinn meshnode_l4 direct_http meshnode_http haproxy_http_pair direct_grpc meshnode_grpc haproxy_grpc_pair"
[[ -z $LOSS_PCT ]] || ALL_PATHS+=" loss_meshnode loss_meshnode_netns loss_stunnel_netns loss_h2_netns"
# Only on request (PATHS): the second meshnode variant and the veth rows.
EXTRA_PATHS="meshnode_l4_alt veth_direct veth_stunnel veth_h2 veth_meshnode veth_meshnode_alt"
for p in ${PATHS:-$ALL_PATHS}; do
  case " $ALL_PATHS $EXTRA_PATHS " in
    *" $p "*) "$p" ;;
    *) echo "PATHS: unknown or unavailable row '$p' (known: $ALL_PATHS $EXTRA_PATHS)" >&2; exit 2 ;;
  esac
done

# --- report ------------------------------------------------------------------------------------
# table NAME HEADING: one table of the report (bench/report.jq), under its heading.
table() {
  printf '\n%s\n\n' "$2"
  jq -rs --arg conns "$BULK_CONNS" -f "$ROOT/bench/report.jq" --arg table "$1" "$RESULTS"
}
{
  table bulk "Bulk throughput, Gbit/s (median of $BULK_REPEAT x $BULK_BYTES), ratios vs direct TCP and vs stunnel pair:"
  table latency "Latency at $LAT_RATE req/s, $LAT_SIZE B, $LAT_DURATION, $LAT_CONNS connections (µs, from the scheduled send; added = path - direct):"
  [[ $SYSCALLS != 1 ]] ||
    table per_request "System calls and context switches per request during the latency run, each process of the path (perf stat; warm-up included):"
  [[ -z $PINGPONG_DURATION ]] ||
    table pingpong "Ping-pong: $LAT_SIZE B, one connection, one request outstanding, $PINGPONG_DURATION (µs from the send; added = path - direct):"
  table http "HTTP/1.1 GETs, $HTTP_SIZE B bodies, $LAT_DURATION per load: open loop over $HTTP_CONNS keep-alive connections (µs from the scheduled send), closed loop (c$HTTP_CONCURRENCY: that many connections, one request outstanding each; µs from the send); ratios and added vs direct HTTP at the same load; CPU of each process of the path:"
  table grpc "gRPC-shaped unary calls over $GRPC_CONNS h2c connection(s), $GRPC_SIZE B messages, $LAT_DURATION per load: open loop (µs from the scheduled send), closed loop (c$GRPC_CONCURRENCY: streams outstanding; µs from the send); ratios and added vs direct gRPC at the same load:"
  [[ -z $LOSS_PCT ]] ||
    table loss "Loss scenario: latency probe at $LAT_RATE req/s, $LAT_SIZE B, $LAT_CONNS connections, $LAT_DURATION, with and without a bulk transfer between the same two hops (µs; × quiet = vs the same path at 0 % loss without bulk):"
  table procs "Processes of each path: CPU seconds (user + system over the process's life: start-up, bulk and latency runs) and peak RSS (VmHWM):"
  echo
  echo "Load average (1/5/15 min) before: $LOAD_BEFORE; after: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "Raw results: $RESULTS"
} | tee "$OUT/report.md"
