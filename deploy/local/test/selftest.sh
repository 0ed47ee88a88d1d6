#!/usr/bin/env bash
# Self-test of the local multi-node stack scripts (up.sh, down.sh, restart-node.sh) and their
# nginx balancer. By default the nodes are deploy/local/test/stand-in-node.py, so the plumbing
# is tested without building the gateway; CHATGATE_BIN=target/release/chatgate runs the same
# checks against the real binary (stand-in-only checks are then skipped). Last, `up.sh
# --redis-cluster` on a 3-node Redis Cluster of its own (skipped without redis-server).
#
# Uses its own state directory and balancer port, so it does not disturb a running stack.
# Ends with a line "selftest: N passed, N failed"; exit status 1 if anything failed.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
local_dir="$(dirname "$here")"
stand_in="$here/stand-in-node.py"
bin="${CHATGATE_BIN:-$stand_in}"
real=0
[[ "$bin" == "$stand_in" ]] || real=1
python="${PYTHON:-python3}"

export CHATGATE_LOCAL_STATE
CHATGATE_LOCAL_STATE="$(mktemp -d "${TMPDIR:-/tmp}/chatgate-selftest.XXXXXX")"
export CHATGATE_BIN="$bin"
export CHATGATE_DRAIN_GRACE="${CHATGATE_DRAIN_GRACE:-5s}"
state="$CHATGATE_LOCAL_STATE"

passed=0
failed=0
check() {
    local description="$1"
    shift
    if "$@"; then
        passed=$((passed + 1))
        echo "ok    $description"
    else
        failed=$((failed + 1))
        echo "FAIL  $description"
    fi
}

port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

lb_port=18080
while ! port_free "$lb_port"; do lb_port=$((lb_port + 1)); done
export CHATGATE_LB_PORT="$lb_port"
base_port=19101
while ! port_free "$base_port" || ! port_free $((base_port + 1)) || ! port_free $((base_port + 2)); do
    base_port=$((base_port + 10))
done
export CHATGATE_LOCAL_BASE_PORT="$base_port"
lb="http://127.0.0.1:$lb_port"

finish() {
    "$local_dir/down.sh" --purge >/dev/null 2>&1 || true
    rm -rf "$state"
}
trap finish EXIT

# --- usage errors -----------------------------------------------------------------------------
check "up.sh refuses N=0" bash -c "! '$local_dir/up.sh' 0 >/dev/null 2>&1"
check "up.sh refuses N=x" bash -c "! '$local_dir/up.sh' x >/dev/null 2>&1"
check "restart-node.sh refuses a node that does not exist" bash -c "! '$local_dir/restart-node.sh' 7 >/dev/null 2>&1"

# --- up ---------------------------------------------------------------------------------------
up_output="$("$local_dir/up.sh" 3 2>&1)"
up_status=$?
check "up.sh 3 succeeds" test "$up_status" -eq 0
if [[ "$up_status" -ne 0 ]]; then
    echo "$up_output"
    echo "selftest: $passed passed, $((failed + 1)) failed (stopped: the stack did not come up)"
    exit 1
fi
check "up.sh prints the balancer URL" grep -q "load balancer   $lb" <<<"$up_output"

pids_before=()
for i in 1 2 3; do
    pid="$(cat "$state/node-$i.pid" 2>/dev/null)"
    pids_before+=("$pid")
    check "node $i is running (pid $pid)" kill -0 "$pid"
    check "node $i answers /readyz on its own port" \
        test "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$(cat "$state/node-$i.port")/readyz")" = 200
    check "node $i has a log" test -s "$state/node-$i.log"
done
check "the node ports are distinct" test "$(sort -u "$state"/node-*.port | wc -l)" -eq 3
check "the JWT secret is private" test "$(stat -c %a "$state/jwt-secret")" = 600
check "the JWT secret is 64 hex characters" grep -Eqx '[0-9a-f]{64}' "$state/jwt-secret"
check "every node got the shared secret and Redis URL" \
    grep -q "^CHATGATE_JWT_SECRET=$(cat "$state/jwt-secret")\$" "$state/node.env"
check "the drain grace is passed on to the nodes" grep -q "^CHATGATE_DRAIN_GRACE=$CHATGATE_DRAIN_GRACE\$" "$state/node.env"
check "a token was printed" test -s "$state/token"
check "nginx.conf lists the 3 nodes" test "$(grep -c 'server 127.0.0.1:' "$state/nginx.conf")" -eq 3
# shellcheck disable=SC2016 # a literal nginx variable
check "nginx.conf forwards the upgrade" grep -q 'proxy_set_header Upgrade $http_upgrade' "$state/nginx.conf"
check "nginx.conf has long timeouts" grep -q 'proxy_read_timeout 3600s' "$state/nginx.conf"
check "nginx.conf has no stickiness" bash -c "! grep -Eq 'ip_hash|hash |sticky' '$state/nginx.conf'"
check "env file is sourceable and names the balancer" \
    bash -c ". '$state/env' && test \"\$CHATGATE_LB_URL\" = '$lb' && test -n \"\$CHATGATE_TOKEN\""
check "a second up.sh is refused while the stack runs" bash -c "! '$local_dir/up.sh' 3 >/dev/null 2>&1"

# --- balancing --------------------------------------------------------------------------------
codes=""
marker="rr$RANDOM$RANDOM"
for _ in $(seq 1 9); do
    codes+="$(curl -s -o /dev/null -w '%{http_code}' "$lb/readyz?$marker") "
done
check "9 requests through the balancer all answer 200" test "$codes" = "200 200 200 200 200 200 200 200 200 "
sleep 1.5 # the access log is flushed every second
distribution="$(grep -F "$marker" "$state/nginx-access.log" | grep -o 'upstream=[0-9.:]*' | sort | uniq -c | awk '{print $1}' | tr '\n' ' ')"
check "round robin: each node served 3 of 9 requests ($distribution)" test "$distribution" = "3 3 3 "

token="$(cat "$state/token")"
no_token="$("$python" "$here/ws_probe.py" "ws://127.0.0.1:$lb_port/ws" 1 0.5)"
check "an upgrade without a token is refused with 401" grep -q '"status": 401' <<<"$no_token"

# --- drain of one node through the balancer ----------------------------------------------------
probe_out="$state/probe.out"
ready_flag="$state/probe.ready"
stop_flag="$state/probe.stop"
"$python" "$here/ws_probe.py" "ws://127.0.0.1:$lb_port/ws?token=$token" 3 60 \
    --ready-file "$ready_flag" --stop-file "$stop_flag" >"$probe_out" &
probe_pid=$!
for _ in $(seq 1 50); do [[ -e "$ready_flag" ]] && break; sleep 0.1; done
check "3 WebSocket upgrades through the balancer" test -e "$ready_flag"
(
    for _ in $(seq 1 80); do
        curl -s -o /dev/null -w '%{http_code}\n' "$lb/readyz"
        sleep 0.05
    done
) >"$state/during-restart.codes" &
poll_pid=$!
restart_output="$("$local_dir/restart-node.sh" 2 2>&1)"
restart_status=$?
check "restart-node.sh 2 succeeds" test "$restart_status" -eq 0
[[ "$restart_status" -eq 0 ]] || echo "$restart_output"
wait "$poll_pid"
check "the balancer kept answering 200 while node 2 restarted" \
    test "$(grep -vc '^200$' "$state/during-restart.codes")" -eq 0
check "node 2 runs again under a new pid" \
    bash -c "test \"\$(cat '$state/node-2.pid')\" != '${pids_before[1]}' && kill -0 \"\$(cat '$state/node-2.pid')\""
check "node 2 is back on its port" \
    test "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$(cat "$state/node-2.port")/readyz")" = 200
check "nodes 1 and 3 were not restarted" \
    test "$(cat "$state/node-1.pid") $(cat "$state/node-3.pid")" = "${pids_before[0]} ${pids_before[2]}"
sleep 0.5
touch "$stop_flag"
wait "$probe_pid"
check "all 3 sockets were upgraded (101)" test "$(grep -c '"status": 101' "$probe_out")" -eq 3
check "exactly one socket was closed with 1012 (node draining)" test "$(grep -c '"close_code": 1012' "$probe_out")" -eq 1
check "the other sockets stayed open" test "$(grep -c '"closed": false' "$probe_out")" -eq 2
if (( ! real )); then
    check "the socket closed with 1012 was the one on node 2" grep -q 'local-2.*"close_code": 1012' "$probe_out"
fi

# --- down -------------------------------------------------------------------------------------
nginx_pid="$(cat "$state/nginx.pid")"
pids_now=("$(cat "$state/node-1.pid")" "$(cat "$state/node-2.pid")" "$(cat "$state/node-3.pid")")
down_output="$("$local_dir/down.sh" 2>&1)"
check "down.sh succeeds" test $? -eq 0
check "down.sh reports 3 stopped nodes" grep -q "stopped 3 nodes" <<<"$down_output"
for pid in "${pids_now[@]}" "$nginx_pid"; do
    check "pid $pid is gone" bash -c "! kill -0 $pid 2>/dev/null || grep -q '^[0-9]* (.*) Z' /proc/$pid/stat"
done
check "the balancer port is free again" port_free "$lb_port"
check "node logs are kept" test -s "$state/node-1.log"
check "down.sh on a stopped stack is harmless" bash -c "'$local_dir/down.sh' >/dev/null"

# --- a node that cannot start -------------------------------------------------------------------
failing="$state/failing-node.sh"
printf '#!/bin/sh\necho "cannot start: bad configuration" >&2\nexit 2\n' >"$failing"
chmod +x "$failing"
fail_output="$(CHATGATE_BIN="$failing" "$local_dir/up.sh" 2 2>&1)"
check "up.sh fails when a node cannot start" test $? -ne 0
check "up.sh shows the failing node's log" grep -q "cannot start: bad configuration" <<<"$fail_output"
check "nothing is left listening on the balancer port" port_free "$lb_port"
check "no node is left running" bash -c "! ls '$state'/node-*.pid >/dev/null 2>&1"

# --- a stack on a local Redis Cluster (up.sh --redis-cluster) ----------------------------------
if command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; then
    redis_base=17101
    while ! port_free "$redis_base" || ! port_free $((redis_base + 1)) || ! port_free $((redis_base + 2)) \
        || ! port_free $((redis_base + 10000)) || ! port_free $((redis_base + 10001)) || ! port_free $((redis_base + 10002)); do
        redis_base=$((redis_base + 10))
    done
    cluster_output="$(CHATGATE_LOCAL_REDIS_BASE_PORT="$redis_base" "$local_dir/up.sh" --redis-cluster 1 2>&1)"
    cluster_status=$?
    check "up.sh --redis-cluster 1 succeeds" test "$cluster_status" -eq 0
    [[ "$cluster_status" -eq 0 ]] || echo "$cluster_output"
    redis_ports=()
    for port_file in "$state"/redis-*.port; do
        [[ -e "$port_file" ]] && redis_ports+=("$(cat "$port_file")")
    done
    check "3 Redis Cluster nodes were started (ports ${redis_ports[*]})" test "${#redis_ports[@]}" -eq 3
    for port in "${redis_ports[@]}"; do
        check "Redis Cluster node :$port reports cluster_state:ok" \
            bash -c "redis-cli -p $port cluster info | grep -q '^cluster_state:ok'"
    done
    check "the nodes run in cluster mode" grep -qx 'CHATGATE_REDIS_MODE=cluster' "$state/node.env"
    check "the nodes get the 3 seeds as REDIS_URL" \
        bash -c "set -a && . '$state/node.env' && test \"\$REDIS_URL\" = \"\$(cat '$state/redis-urls' 2>/dev/null)\" && test \"\$(tr ',' '\\n' <<<\"\$REDIS_URL\" | grep -c '^redis://127.0.0.1:')\" -eq 3"
    check "the balancer answers /readyz on the Redis Cluster stack" \
        test "$(curl -s -o /dev/null -w '%{http_code}' "$lb/readyz")" = 200
    redis_pids=()
    for pid_file in "$state"/redis-*.pid; do
        [[ -e "$pid_file" ]] && redis_pids+=("$(cat "$pid_file")")
    done
    cluster_down="$("$local_dir/down.sh" 2>&1)"
    check "down.sh stops the 3 Redis Cluster nodes" grep -q "stopped 3 Redis Cluster nodes" <<<"$cluster_down"
    for pid in "${redis_pids[@]}"; do
        check "redis-server pid $pid is gone" bash -c "! kill -0 $pid 2>/dev/null || grep -q '^[0-9]* (.*) Z' /proc/$pid/stat"
    done
    for port in "${redis_ports[@]}"; do
        check "Redis port $port and its bus port are free again" bash -c "! (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && ! (exec 3<>/dev/tcp/127.0.0.1/$((port + 10000))) 2>/dev/null"
    done
else
    echo "skip  the Redis Cluster stack (redis-server and redis-cli are not installed)"
fi

echo "selftest: $passed passed, $failed failed"
(( failed == 0 ))
