#!/usr/bin/env bash
# End-to-end test of the docker deployment (compose.yaml), run from the repository root:
#
#   deploy/docker/test.sh
#
# 1. images: base/etcd/tools via build-base.sh (kept between runs), meshnode:test-PID from
#    target/release/meshnode (built with `cargo build --release -p meshnode` if missing)
# 2. `compose up`, wait (≤ 120 s) until etcd, pki and the three nodes are healthy and node-a sees
#    both echo endpoints
# 3. traffic through node-a's published port (127.0.0.1 only): short TCP connections from bash,
#    each one line echoed back tagged with the node that served it; both node-b and node-c serve
# 4. `docker kill` node-b during traffic: zero failed connections among those started ≥ 100 ms
#    after the kill; a failure before that must overlap the kill (in flight), at most one per
#    client loop
# 5. `docker start` node-b, wait until healthy and serving again
# 6. `docker network disconnect` node-c during traffic: traffic moves to node-b within 5 s, zero
#    failures among connections started ≥ 100 ms after the disconnect
# 7. always (trap on EXIT): `compose down -v` and remove the meshnode image it built; the base
#    images (debian:bookworm-slim, meshnode-etcd:local, meshnode-tools:local) are kept
#
# Needs: docker, docker compose or docker-compose (≥ 1.29), jq, bash ≥ 5. Exit 0 on PASS.
# Environment: MESHNODE_TEST_LOOPS (client loops, default 2), MESHNODE_ECHO_PORT (host port,
# default: 15001 if free, else a free one), KEEP_LOGS=1 (keep the work dir with logs).
set -uo pipefail
export LC_ALL=C

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root" || exit 1

PROJECT=meshnode-test-$$
IMAGE=meshnode:test-$$
LOOPS=${MESHNODE_TEST_LOOPS:-2}
UP_TIMEOUT=120
SUBNET=172.28.0.0/24
work=$(mktemp -d /tmp/meshnode-docker-test.XXXXXX)
t_start=$SECONDS
declare -a RESULTS=() TIMINGS=()
failed=0
compose_up=0
image_built=0
traffic_pids=()

say() { printf '[%3ds] %s\n' $((SECONDS - t_start)) "$*"; }
check() { # check OK|FAIL "text"
    RESULTS+=("$1  $2")
    if [[ $1 == OK ]]; then say "ok: $2"; else say "FAIL: $2"; failed=1; fi
}
die() { check FAIL "$*"; exit 1; }
phase_t0=0
phase() { phase_t0=$SECONDS; say "== $*"; phase_name=$*; }
phase_end() { TIMINGS+=("$(printf '%-42s %4d s' "$phase_name" $((SECONDS - phase_t0)))"); }
now_us() { local t=$EPOCHREALTIME; echo "${t/./}"; }

# ---------------------------------------------------------------- compose flavour
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then
    COMPOSE=(docker-compose)
else
    echo "neither 'docker compose' nor 'docker-compose' is installed" >&2
    exit 1
fi
compose() { "${COMPOSE[@]}" -p "$PROJECT" -f "$here/compose.yaml" "$@"; }
# Container of a service, running or not (`compose ps -q` of compose v2 omits stopped ones).
cid() {
    docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" \
        --filter "label=com.docker.compose.service=$1" | head -n1
}
health() { docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$1" 2>/dev/null; }

# ---------------------------------------------------------------- cleanup
cleanup() {
    local rc=$? t0=$SECONDS
    stop_traffic
    if ((compose_up)); then
        if ((failed || rc)); then
            compose logs --no-color >"$work/compose.log" 2>&1
            say "compose logs saved in $work/compose.log; last node lines:"
            grep -E '^(node-[abc]|etcd|pki)' "$work/compose.log" | grep -Ev ' INFO ' | tail -n 25
        fi
        compose down -v --remove-orphans -t 20 >"$work/down.log" 2>&1 ||
            { say "compose down failed:"; cat "$work/down.log"; }
    fi
    ((image_built)) && docker rmi "$IMAGE" >/dev/null 2>&1
    # Anything of this project left behind (it should be none).
    local left
    left=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")
    # shellcheck disable=SC2086 # one id per word
    [[ -n $left ]] && docker rm -f $left >/dev/null 2>&1
    left=$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT")
    # shellcheck disable=SC2086
    [[ -n $left ]] && docker volume rm $left >/dev/null 2>&1
    left=$(docker network ls -q --filter "label=com.docker.compose.project=$PROJECT")
    # shellcheck disable=SC2086
    [[ -n $left ]] && docker network rm $left >/dev/null 2>&1
    TIMINGS+=("$(printf '%-42s %4d s' "cleanup (down -v, rmi)" $((SECONDS - t0)))")

    echo
    echo "================ meshnode docker test: summary ================"
    printf '%s\n' "${RESULTS[@]}"
    echo "---- timings"
    printf '%s\n' "${TIMINGS[@]}"
    printf '%-42s %4d s\n' "total" $((SECONDS - t_start))
    if ((failed || rc)); then
        echo "RESULT: FAIL (work dir kept: $work)"
        exit 1
    fi
    if [[ ${KEEP_LOGS:-0} == 1 ]]; then echo "work dir: $work"; else rm -rf "$work"; fi
    echo "RESULT: PASS"
    exit 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- traffic
# One client loop: short connections one after another until $work/stop exists. Each line of its
# log: loop seq start_us end_us result, result ∈ b | c (served by node-b/node-c) | fail | bad.
client_loop() {
    local id=$1 port=$2 stop=$3 i=0 t0 t1 line r
    while [[ ! -e $stop ]]; do
        i=$((i + 1))
        t0=$EPOCHREALTIME
        if { exec 3<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null; then
            if { printf 'ping %d-%d\n' "$id" "$i" >&3; } 2>/dev/null && IFS= read -r -t 5 line <&3; then
                case $line in
                    "node-b ping $id-$i") r=b ;;
                    "node-c ping $id-$i") r=c ;;
                    *) r=bad ;;
                esac
            else
                r=fail
            fi
            exec 3>&-
        else
            r=fail
        fi
        t1=$EPOCHREALTIME
        echo "$id $i ${t0/./} ${t1/./} $r"
    done
}
start_traffic() { # $1 = log name
    rm -f "$work/stop"
    traffic_pids=()
    local l
    for ((l = 1; l <= LOOPS; l++)); do
        client_loop "$l" "$PORT" "$work/stop" >"$work/$1.$l.log" &
        traffic_pids+=($!)
    done
}
stop_traffic() {
    ((${#traffic_pids[@]})) || return 0
    touch "$work/stop"
    wait "${traffic_pids[@]}" 2>/dev/null
    traffic_pids=()
}
logs() { cat "$work/$1".*.log; }
count() { # count NAME AWK-CONDITION  (fields: $1 loop $2 seq $3 start $4 end $5 result)
    logs "$1" | awk "$2 { n++ } END { print n + 0 }"
}

# Latency of the connections matching an awk condition: "p50 X ms, p99 Y ms, max Z ms".
latency() { # latency NAME AWK-CONDITION
    logs "$1" | awk "$2 { print (\$4 - \$3) / 1000 }" | sort -n |
        awk '{ v[NR] = $1 } END {
            if (!NR) { print "no connections"; exit }
            p50 = v[int((NR - 1) * 0.50) + 1]; p99 = v[int((NR - 1) * 0.99) + 1]
            printf "p50 %.1f ms, p99 %.1f ms, max %.1f ms", p50, p99, v[NR] }'
}

# Echo endpoints as node-a sees them: "node-b healthy 12 0" per line (node state requests failures).
endpoints() {
    docker exec "$A" meshnode status --admin 127.0.0.1:15000 --json 2>/dev/null |
        jq -r '.services[]? | select(.name == "echo") | .endpoints[] |
               "\(.node) \(.state) \(.requests_total) \(.failures_total)"'
}
endpoint_state() { endpoints | awk -v n="$1" '$1 == n { print $2 }'; }

# ---------------------------------------------------------------- preflight
phase "preflight"
command -v docker >/dev/null || die "docker is not installed"
command -v jq >/dev/null || die "jq is not installed (apt-get install jq)"
docker info >/dev/null 2>&1 || die "the Docker engine does not answer (docker info)"
say "compose: ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short 2>/dev/null || echo '?'))"
for net in $(docker network ls -q); do
    if docker network inspect -f '{{range .IPAM.Config}}{{.Subnet}} {{end}}' "$net" 2>/dev/null |
        grep -qF "$SUBNET"; then
        die "subnet $SUBNET (fixed in compose.yaml and config/) is used by docker network $(docker network inspect -f '{{.Name}}' "$net"); another run or project must be brought down first"
    fi
done
port_free() { ! { exec 9<>"/dev/tcp/127.0.0.1/$1"; } 2>/dev/null; }
PORT=${MESHNODE_ECHO_PORT:-}
if [[ -z $PORT ]]; then
    PORT=15001
    while ! port_free "$PORT"; do PORT=$((20000 + RANDOM % 30000)); done
fi
exec 9>&- 2>/dev/null
export MESHNODE_IMAGE=$IMAGE MESHNODE_ECHO_PORT=$PORT
say "project $PROJECT, image $IMAGE, host port 127.0.0.1:$PORT, $LOOPS client loops"
if [[ -n ${MESHNODE_BIN:-} ]]; then
    [[ -x $MESHNODE_BIN ]] || die "MESHNODE_BIN=$MESHNODE_BIN is not an executable"
    say "using MESHNODE_BIN=$MESHNODE_BIN"
elif [[ ! -x target/release/meshnode ]]; then
    say "target/release/meshnode missing: cargo build --release -p meshnode"
    cargo build --release -p meshnode || die "cargo build --release -p meshnode failed"
fi
phase_end

# ---------------------------------------------------------------- images
phase "base images (build-base.sh)"
"$here/build-base.sh" || die "build-base.sh failed"
phase_end
phase "meshnode image"
image_built=1
"$here/build-image.sh" "$IMAGE" || die "building $IMAGE failed"
phase_end

# ---------------------------------------------------------------- up
phase "compose up + healthy"
compose_up=1
timeout "$UP_TIMEOUT" "${COMPOSE[@]}" -p "$PROJECT" -f "$here/compose.yaml" up -d >"$work/up.log" 2>&1 || {
    cat "$work/up.log"
    die "compose up failed or took more than $UP_TIMEOUT s"
}
A=$(cid node-a) B=$(cid node-b) C=$(cid node-c)
[[ -n $A && -n $B && -n $C ]] || die "compose up did not create node-a/b/c"
NET=$(docker network ls -q --filter "label=com.docker.compose.project=$PROJECT" | head -n1)
deadline=$((phase_t0 + UP_TIMEOUT))
until [[ $(health "$A") == healthy && $(health "$B") == healthy && $(health "$C") == healthy &&
    $(endpoint_state node-b) == healthy && $(endpoint_state node-c) == healthy ]]; do
    if ((SECONDS > deadline)); then
        die "nodes not healthy within $UP_TIMEOUT s: node-a $(health "$A"), node-b $(health "$B"), node-c $(health "$C")"
    fi
    sleep 0.5
done
check OK "cluster healthy in $((SECONDS - phase_t0)) s (etcd, pki job exit 0, node-a/b/c /readyz 200, node-a sees 2 echo endpoints)"
valid=0
for n in A B C; do
    if out=$(docker exec "${!n}" meshnode validate 2>&1); then
        valid=$((valid + 1))
    else
        check FAIL "meshnode validate in node-${n,,}: $out"
    fi
done
((valid == 3)) && check OK "meshnode validate passes in node-a, node-b, node-c"
pki_exit=$(docker inspect -f '{{.State.ExitCode}}' "$(cid pki)")
keymode=$(docker exec "$B" stat -c '%a %u' /etc/meshnode/pki/node-b.key)
if [[ $pki_exit == 0 && $keymode == "600 10001" ]]; then
    check OK "pki job exit 0; node-b.key mode/owner: $keymode"
else
    check FAIL "pki job exit $pki_exit; node-b.key mode/owner: '$keymode' (want 600 10001)"
fi
phase_end

# ---------------------------------------------------------------- steady traffic
phase "steady traffic (4 s)"
start_traffic steady
sleep 4
stop_traffic
total=$(count steady 1) nb=$(count steady '$5=="b"') nc=$(count steady '$5=="c"') nf=$(count steady '$5!="b" && $5!="c"')
rate=$((total / 4))
read -r _ _ rb _ < <(endpoints | grep '^node-b ')
read -r _ _ rc _ < <(endpoints | grep '^node-c ')
if ((total >= 40 && nf == 0 && nb > 0 && nc > 0 && ${rb:-0} > 0 && ${rc:-0} > 0)); then
    say "latency: $(latency steady 1)"
    check OK "steady: $total connections (~$rate/s), 0 failed; served by node-b $nb, node-c $nc; node-a /status requests_total node-b ${rb:-?} node-c ${rc:-?}"
else
    check FAIL "steady: $total connections, $nf failed; served by node-b $nb, node-c $nc; node-a /status requests_total node-b ${rb:-?} node-c ${rc:-?}"
fi
phase_end

# ---------------------------------------------------------------- kill node-b
phase "docker kill node-b under traffic"
start_traffic kill
sleep 2
t_kill=$(now_us)
docker kill "$B" >/dev/null || die "docker kill node-b failed"
t_killed=$(now_us)
t_dead=$(date -d "$(docker inspect -f '{{.State.FinishedAt}}' "$B")" +%s%6N)
((t_dead < t_kill || t_dead > t_killed)) && t_dead=$t_killed # clock oddities: be strict
sleep 5
stop_traffic
cut=$((t_dead + 100000))
before=$(count kill "\$3 < $t_kill")
after=$(count kill "\$3 >= $cut")
after_fail=$(count kill "\$3 >= $cut && \$5 != \"b\" && \$5 != \"c\"")
after_b=$(count kill "\$3 >= $cut && \$5 == \"b\"")
after_c=$(count kill "\$3 >= $cut && \$5 == \"c\"")
# Failures around the kill: each must overlap it (started before death + 100 ms, ended after the
# kill was sent); a loop has one connection at a time, so at most one per loop was in flight.
window_fail=$(count kill "\$3 < $cut && \$4 >= $t_kill && \$5 != \"b\" && \$5 != \"c\"")
stray_fail=$(count kill "\$3 < $cut && \$4 < $t_kill && \$5 != \"b\" && \$5 != \"c\"")
max_loop_fail=$(logs kill | awk -v c="$cut" -v k="$t_kill" '$3 < c && $4 >= k && $5 != "b" && $5 != "c" { n[$1]++ } END { m = 0; for (l in n) if (n[l] > m) m = n[l]; print m }')
say "latency: before the kill $(latency kill "\$3 < $t_kill"); started in the first 2 s after death $(latency kill "\$3 >= $cut && \$3 < $cut + 2000000"); later $(latency kill "\$3 >= $cut + 2000000")"
say "kill sent at +0 ms, docker kill returned +$(((t_killed - t_kill) / 1000)) ms, container exit recorded +$(((t_dead - t_kill) / 1000)) ms"
if ((after_fail == 0 && after >= 50 && after_b == 0 && stray_fail == 0 && max_loop_fail <= 1)); then
    check OK "kill node-b: $after connections started ≥ 100 ms after node-b died, 0 failed (all served by node-c: $after_c); $window_fail in flight at the kill (excused, ≤ 1 per loop); $before before, 0 failed"
else
    check FAIL "kill node-b: $after connections started ≥ 100 ms after death, $after_fail failed, $after_b answered by node-b; in flight at kill $window_fail (max per loop $max_loop_fail); failures before the kill $stray_fail"
fi
phase_end

# ---------------------------------------------------------------- restart node-b
phase "docker start node-b, healthy and serving"
t0=$SECONDS
docker start "$B" >/dev/null || die "docker start node-b failed"
until [[ $(health "$B") == healthy ]]; do
    ((SECONDS - t0 > 60)) && die "node-b not healthy again within 60 s ($(health "$B"))"
    sleep 0.25
done
t_healthy=$((SECONDS - t0))
# node-a ejected node-b when it died; if node-b came back before its lease expired, node-a keeps
# that endpoint and lets it back after a successful probe, which needs traffic: so send some.
say "node-b healthy; node-a sees its endpoint as '$(endpoint_state node-b)'"
start_traffic restart
until (($(count restart '$5=="b"') >= 20)); do
    if ((SECONDS - t0 > 60)); then
        stop_traffic
        die "node-b healthy but not serving within 60 s of docker start"
    fi
    sleep 0.5
done
stop_traffic
say "node-a sees node-b as '$(endpoint_state node-b)'"
rs_fail=$(count restart '$5!="b" && $5!="c"')
rs_b=$(count restart '$5=="b"') rs_c=$(count restart '$5=="c"')
if ((rs_fail == 0)); then
    check OK "restart node-b: healthy in ${t_healthy} s, serving in $((SECONDS - t0)) s (node-b $rs_b, node-c $rs_c, 0 failed)"
else
    check FAIL "restart node-b: $rs_fail failed connections after it came back (node-b $rs_b, node-c $rs_c)"
fi
phase_end

# ---------------------------------------------------------------- disconnect node-c
phase "docker network disconnect node-c"
start_traffic disc
sleep 3
t_disc=$(now_us)
docker network disconnect "$NET" "$C" || die "docker network disconnect node-c failed"
t_discd=$(now_us)
sleep 6
stop_traffic
pre_b=$(count disc "\$3 < $t_disc && \$5 == \"b\"") pre_c=$(count disc "\$3 < $t_disc && \$5 == \"c\"")
cut=$((t_discd + 100000))
after=$(count disc "\$3 >= $cut")
after_b=$(count disc "\$3 >= $cut && \$5 == \"b\"")
after_fail=$(count disc "\$3 >= $cut && \$5 != \"b\" && \$5 != \"c\"")
window_fail=$(count disc "\$3 < $cut && \$4 >= $t_disc && \$5 != \"b\" && \$5 != \"c\"")
stray_fail=$(count disc "\$3 < $cut && \$4 < $t_disc && \$5 != \"b\" && \$5 != \"c\"")
max_loop_fail=$(logs disc | awk -v c="$cut" -v k="$t_disc" '$3 < c && $4 >= k && $5 != "b" && $5 != "c" { n[$1]++ } END { m = 0; for (l in n) if (n[l] > m) m = n[l]; print m }')
# Moved: the end of the last connection that was not served by node-b, after the disconnect.
moved_ms=$(logs disc | awk -v k="$t_disc" '$4 >= k && $5 != "b" { if ($4 > m) m = $4 } END { print (m ? int((m - k) / 1000) : 0) }')
say "disconnect sent at +0 ms, docker network disconnect returned +$(((t_discd - t_disc) / 1000)) ms; before it node-b served $pre_b, node-c $pre_c"
say "latency: before $(latency disc "\$3 < $t_disc"); started in the first 2 s after $(latency disc "\$3 >= $cut && \$3 < $cut + 2000000"); later $(latency disc "\$3 >= $cut + 2000000")"
say "node-a sees node-c as: $(endpoint_state node-c) (the registry drops it when its lease expires)"
if ((pre_c > 0 && after >= 50 && after_fail == 0 && after_b == after && moved_ms <= 5000 && stray_fail == 0 && max_loop_fail <= 1)); then
    check OK "disconnect node-c: traffic on node-b only ${moved_ms} ms after the disconnect was sent (docker needed $(((t_discd - t_disc) / 1000)) ms to apply it); $after connections started ≥ 100 ms after, 0 failed; $window_fail in flight at the disconnect (excused, ≤ 1 per loop)"
else
    check FAIL "disconnect node-c: moved after ${moved_ms} ms (want ≤ 5000); after: $after connections, $after_fail failed, $after_b by node-b; node-c served $pre_c before; in flight $window_fail (max per loop $max_loop_fail), stray failures $stray_fail"
fi
phase_end
exit 0
