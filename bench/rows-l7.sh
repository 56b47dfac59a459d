# Rows of bench/run.sh for HTTP/1.1 and gRPC at layer 7, sourced by it (they use its helpers:
# port, start, wait_listen, tls_cert, mesh_pair, path_procs, measure_http, measure_grpc, ...):
# haproxy_http_pair (the L7 peer of meshnode_http), direct_grpc, meshnode_grpc and
# haproxy_grpc_pair (its peer).

# haproxy_l7_start KIND DIR ENTRY MID EXIT_LISTEN ENTRY_LISTEN DEFAULTS: writes and checks the
# configs of a `mode http` haproxy pair (TLS 1.3 between them with a throw-away certificate,
# EXIT_LISTEN and ENTRY_LISTEN being each one's `listen` section body, DEFAULTS extra `defaults`
# lines) and starts exit and entry; HX_EXIT and HX_ENTRY are their PIDs. 1 if haproxy refused
# the config.
haproxy_l7_start() {
  local kind=$1 dir=$2 entry=$3 mid=$4 exit_listen=$5 entry_listen=$6 extra=$7
  local common
  common=$(haproxy_common http "$dir" "$extra")
  printf '%s\nlisten %s\n%s\n' "$common" "$kind" "$exit_listen" >"$dir/exit.cfg"
  printf '%s\nlisten %s\n%s\n' "$common" "$kind" "$entry_listen" >"$dir/entry.cfg"
  "$HAPROXY" -c -q -f "$dir/exit.cfg" && "$HAPROXY" -c -q -f "$dir/entry.cfg" || return 1
  start "haproxy-$kind-exit" "$HAPROXY" -db -f "$dir/exit.cfg"
  HX_EXIT=$STARTED_PID
  start "haproxy-$kind-entry" "$HAPROXY" -db -f "$dir/entry.cfg"
  HX_ENTRY=$STARTED_PID
  wait_listen "$mid"
  wait_listen "$entry"
}

# --- haproxy HTTP pair: entry (mode http, plain listener) -> TLS 1.3 -> exit (mode http) -> target
# The L7 peer of meshnode_http: both ends parse HTTP/1.1; between them one TLS connection per
# server-side keep-alive connection (HTTP/1.1 over TLS, no ALPN h2), the entry checking the
# exit's certificate against the throw-away CA. Defaults otherwise (threads = CPUs, http-reuse
# safe).
haproxy_http_pair() {
  local name="haproxy HTTP pair"
  if ! has haproxy || ! has openssl || ! has curl; then
    skip_row "$name" "skipped (haproxy, openssl or curl missing)" http
    return 0
  fi
  local dir=$OUT/haproxy-http entry mid ok=
  port entry; port mid
  if ! haproxy_l7_start web "$dir" "$entry" "$mid" \
    "  bind 127.0.0.1:$mid ssl crt $dir/combined.pem
  server s 127.0.0.1:$HTTP_PORT" \
    "  bind 127.0.0.1:$entry
  server s 127.0.0.1:$mid ssl verify required ca-file $dir/cert.pem verifyhost localhost sni str(localhost)" \
    "  option http-keep-alive
  timeout http-request 10s
  timeout http-keep-alive 1h"; then
    skip_row "$name" "skipped (haproxy rejected the config; see $dir)" http
    return 0
  fi
  for _ in $(seq 200); do
    curl -sf -o /dev/null -H 'Host: web' "http://127.0.0.1:$entry/" && { ok=1; break; }
    sleep 0.05
  done
  if [[ -z $ok ]]; then
    skip_row "$name" "FAILED: no answer through the pair (see $OUT/haproxy-web-*.log)" http
    kill "$HX_EXIT" "$HX_ENTRY" 2>/dev/null || true
    return 0
  fi
  path_procs "haproxy exit" "$HX_EXIT" "haproxy entry" "$HX_ENTRY"
  measure_http "$name" "127.0.0.1:$entry" web \
    "haproxy $("$HAPROXY" -v | awk 'NR == 1 { print $3 }'), mode http both ends, HTTP/1.1 over TLS 1.3 between them (cert verified), keep-alive"
  kill "$HX_EXIT" "$HX_ENTRY" 2>/dev/null || true
}

# --- direct gRPC: meshbench grpc straight to the grpc-echo (h2c) -------------------------------
direct_grpc() {
  path_procs
  measure_grpc "direct gRPC" "127.0.0.1:$GRPC_PORT" "meshbench grpc-echo (h2 0.4, h2c prior knowledge)"
}

# grpc_ready ADDR: 0 once one short closed-loop gRPC run through ADDR gets answers and no errors.
grpc_ready() {
  local one
  for _ in $(seq 50); do
    one=$("$MESHBENCH" grpc --connect "$1" --concurrency 1 --duration 100ms --warmup 0s --json 2>/dev/null) &&
      jq -e '.requests > 0 and .errors == 0 and .missing == 0' <<<"$one" >/dev/null && return 0
    sleep 0.1
  done
  return 1
}

# --- meshnode gRPC: h2c to node A's [[outbound]] -> h3 over QUIC/mTLS -> node B -> h2c target --
meshnode_grpc() {
  local name="meshnode gRPC"
  if ! mesh_ready; then
    skip_row "$name" "$MESH_SKIP" grpc
    return 0
  fi
  local qb po
  port qb; port po
  mesh_pair meshnode-grpc "$qb" "127.0.0.1:$qb" "[[service]]
name = \"rpc\"
protocol = \"grpc\"
target = \"127.0.0.1:$GRPC_PORT\"" "{ name = \"rpc\", protocol = \"grpc\", port = $GRPC_PORT }" \
    "[[outbound]]
service = \"rpc\"
listen = \"127.0.0.1:$po\""
  wait_listen "$po"
  if ! grpc_ready "127.0.0.1:$po"; then
    skip_row "$name" "FAILED: no gRPC answer through the outbound (see $OUT/meshnode-grpc-*.log)" grpc
    kill "$A_PID" "$B_PID" 2>/dev/null || true
    return 0
  fi
  path_procs "meshnode A" "$A_PID" "meshnode B" "$B_PID"
  measure_grpc "$name" "127.0.0.1:$po" \
    "meshnode $(mesh_version): h2c to A's [[outbound]] (mode auto), h3 over QUIC/mTLS to B, h2c to grpc-echo"
  mesh_quic_stats meshnode-grpc
  kill "$A_PID" "$B_PID" 2>/dev/null || true
}

# --- haproxy gRPC pair: the same pair as haproxy_http_pair speaking HTTP/2 end to end ----------
# h2c from the client to the entry (`proto h2`), h2 over TLS 1.3 between the pair (ALPN h2, the
# exit's certificate verified), h2c from the exit to the grpc-echo (`proto h2`): the gRPC peer of
# meshnode_grpc. Trailers pass through (haproxy ≥ 2.0).
haproxy_grpc_pair() {
  local name="haproxy gRPC pair"
  if ! has haproxy || ! has openssl; then
    skip_row "$name" "skipped (haproxy or openssl missing)" grpc
    return 0
  fi
  local dir=$OUT/haproxy-grpc entry mid
  port entry; port mid
  if ! haproxy_l7_start rpc "$dir" "$entry" "$mid" \
    "  bind 127.0.0.1:$mid ssl crt $dir/combined.pem alpn h2
  server s 127.0.0.1:$GRPC_PORT proto h2" \
    "  bind 127.0.0.1:$entry proto h2
  server s 127.0.0.1:$mid ssl verify required ca-file $dir/cert.pem verifyhost localhost sni str(localhost) alpn h2" \
    ""; then
    skip_row "$name" "skipped (haproxy rejected the config; see $dir)" grpc
    return 0
  fi
  if ! grpc_ready "127.0.0.1:$entry"; then
    skip_row "$name" "FAILED: no gRPC answer through the pair (see $OUT/haproxy-rpc-*.log)" grpc
    kill "$HX_EXIT" "$HX_ENTRY" 2>/dev/null || true
    return 0
  fi
  path_procs "haproxy exit" "$HX_EXIT" "haproxy entry" "$HX_ENTRY"
  measure_grpc "$name" "127.0.0.1:$entry" \
    "haproxy $("$HAPROXY" -v | awk 'NR == 1 { print $3 }'), mode http, h2c in and out, h2 over TLS 1.3 between the pair"
  kill "$HX_EXIT" "$HX_ENTRY" 2>/dev/null || true
}
