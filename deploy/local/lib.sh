# shellcheck shell=bash
# Shared helpers of the local multi-node stack (up.sh, down.sh, restart-node.sh).
# Sourced, not run. Everything the stack starts is recorded in the state directory:
#   node-I.pid  node-I.port  node-I.log   one gateway node each (I = 1..N)
#   nodes       the node count             jwt-secret   the shared HS256 secret (mode 600)
#   node.env    the environment every node starts with (sourced by restart-node.sh)
#   bin         the chatgate binary in use nginx.conf, nginx.pid, nginx-*.log   the balancer
#   lb-port     the balancer's port        token        a token from `chatgate token`
#   env         CHATGATE_LB_URL, CHATGATE_WS_URL, CHATGATE_TOKEN, CHATGATE_NODE_URLS, ...
#               for tests and benchmarks: `. .state/local/env`

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE_DIR="${CHATGATE_LOCAL_STATE:-$REPO_ROOT/.state/local}"

die() {
    echo "error: $*" >&2
    exit 1
}

log() {
    echo "[local] $*" >&2
}

# HTTP status of a GET (000 when nothing answers).
http_status() {
    curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1" 2>/dev/null || true
}

# Whether something accepts TCP connections on 127.0.0.1:PORT.
port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Whether PID is alive (a zombie waiting to be reaped counts as gone).
pid_alive() {
    local state=""
    kill -0 "$1" 2>/dev/null || return 1
    if [[ -r "/proc/$1/stat" ]]; then
        state="$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$1/stat" 2>/dev/null || true)"
    fi
    [[ "$state" != Z ]]
}

# Whether PID is alive and runs the program recorded for it (guards against pid reuse).
pid_is_ours() {
    local pid="$1" expect="$2" cmdline
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    pid_alive "$pid" || return 1
    [[ -r "/proc/$pid/cmdline" ]] || return 0
    cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline")"
    [[ "$cmdline" == *"$expect"* ]]
}

# Whether node I's recorded pid is alive and is that node: its environment holds the node's
# listen address (kept across a wrapper's exec), or else its command line names the binary.
node_is_running() {
    local index="$1" pid port
    pid="$(node_pid "$index")"
    port="$(node_port "$index")"
    pid_alive "$pid" || return 1
    if [[ -r "/proc/$pid/environ" ]]; then
        tr '\0' '\n' <"/proc/$pid/environ" | grep -qx "CHATGATE_LISTEN=127.0.0.1:$port"
    else
        pid_is_ours "$pid" "$(cat "$STATE_DIR/bin" 2>/dev/null || echo chatgate)"
    fi
}

node_pid() {
    cat "$STATE_DIR/node-$1.pid" 2>/dev/null || true
}

node_port() {
    cat "$STATE_DIR/node-$1.port" 2>/dev/null || true
}

# Seconds a node may take to exit after SIGTERM: its drain grace plus a margin.
stop_timeout() {
    local grace="${CHATGATE_DRAIN_GRACE:-25s}" seconds
    case "$grace" in
        *ms) seconds=$(( ${grace%ms} / 1000 )) ;;
        *s) seconds="${grace%s}" ;;
        *m) seconds=$(( ${grace%m} * 60 )) ;;
        *h) seconds=$(( ${grace%h} * 3600 )) ;;
        *) seconds=25 ;;
    esac
    [[ "$seconds" =~ ^[0-9]+$ ]] || seconds=25
    echo $(( seconds + 15 ))
}

# Starts node I on PORT in the background with the environment of node.env.
start_node() {
    local index="$1" port="$2" bin log pid
    bin="$(cat "$STATE_DIR/bin")"
    log="$STATE_DIR/node-$index.log"
    {
        echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) starting node $index on 127.0.0.1:$port"
    } >>"$log"
    # A subshell with the recorded environment; setsid keeps the node out of the caller's
    # terminal process group, so a Ctrl-C in that terminal does not kill the stack.
    (
        set -a
        # shellcheck source=/dev/null
        . "$STATE_DIR/node.env"
        set +a
        export CHATGATE_LISTEN="127.0.0.1:$port"
        export CHATGATE_NODE_ID="local-$index"
        exec setsid "$bin" serve
    ) >>"$log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$STATE_DIR/node-$index.pid"
    echo "$port" >"$STATE_DIR/node-$index.port"
}

# Waits until node I answers 200 on /readyz; fails early if it exits.
wait_node_ready() {
    local index="$1" timeout="${CHATGATE_LOCAL_READY_TIMEOUT:-60}" pid port waited=0
    pid="$(node_pid "$index")"
    port="$(node_port "$index")"
    while [[ "$(http_status "http://127.0.0.1:$port/readyz")" != 200 ]]; do
        if ! pid_alive "$pid"; then
            log "node $index (pid $pid) exited; last lines of $STATE_DIR/node-$index.log:"
            tail -n 20 "$STATE_DIR/node-$index.log" >&2
            return 1
        fi
        if (( waited >= timeout * 5 )); then
            log "node $index not ready on :$port after ${timeout}s; last lines of its log:"
            tail -n 20 "$STATE_DIR/node-$index.log" >&2
            return 1
        fi
        sleep 0.2
        waited=$(( waited + 1 ))
    done
}

# Sends SIGTERM to node I and waits for it to exit (SIGKILL after stop_timeout).
stop_node() {
    local index="$1" pid bin timeout waited=0
    pid="$(node_pid "$index")"
    if ! node_is_running "$index"; then
        rm -f "$STATE_DIR/node-$index.pid"
        return 0
    fi
    timeout="$(stop_timeout)"
    kill -TERM "$pid" 2>/dev/null || true
    while pid_alive "$pid"; do
        if (( waited >= timeout * 5 )); then
            log "node $index (pid $pid) still running ${timeout}s after SIGTERM: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
        waited=$(( waited + 1 ))
    done
    # Reap it if it is our child (restart-node.sh); otherwise just wait for it to vanish.
    wait "$pid" 2>/dev/null || true
    rm -f "$STATE_DIR/node-$index.pid"
}

nginx_bin() {
    if command -v nginx >/dev/null 2>&1; then
        command -v nginx
    elif [[ -x /usr/sbin/nginx ]]; then
        echo /usr/sbin/nginx
    fi
}

# --- a local Redis Cluster (up.sh --redis-cluster) -----------------------------------------------
# Recorded in the state directory: redis-I.pid, redis-I.port (I = 1..M), redis-cluster/<port>/
# (each node's directory: nodes.conf, redis.log), redis-urls (the seed list, comma-separated).

# Whether PORT and its cluster bus port (PORT + 10000) are both free.
redis_ports_free() {
    ! port_in_use "$1" && ! port_in_use $(( $1 + 10000 ))
}

# Starts M cluster-enabled redis-servers on PORTS... (no persistence, loopback only), forms one
# cluster of them (M = 3: three primaries; M = 6: three primaries with a replica each) and waits
# until every node reports cluster_state:ok. Prints the seed list.
start_redis_cluster() {
    local replicas="$1" index=0 port dir pid urls="" waited
    shift
    local ports=("$@") addresses=()
    rm -rf "$STATE_DIR/redis-cluster"
    for port in "${ports[@]}"; do
        index=$(( index + 1 ))
        dir="$STATE_DIR/redis-cluster/$port"
        mkdir -p "$dir"
        (
            cd "$dir" && exec setsid redis-server --port "$port" --bind 127.0.0.1 \
                --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
                --save "" --appendonly no --dir "$dir" --logfile "$dir/redis.log" \
                --maxmemory-policy noeviction
        ) </dev/null >/dev/null 2>&1 &
        pid=$!
        echo "$pid" >"$STATE_DIR/redis-$index.pid"
        echo "$port" >"$STATE_DIR/redis-$index.port"
        addresses+=("127.0.0.1:$port")
        urls+="${urls:+,}redis://127.0.0.1:$port"
    done
    for port in "${ports[@]}"; do
        waited=0
        until [[ "$(redis-cli -p "$port" ping 2>/dev/null)" == PONG ]]; do
            (( waited < 50 )) || { log "redis-server on :$port does not answer (see $STATE_DIR/redis-cluster/$port/redis.log)"; return 1; }
            sleep 0.1
            waited=$(( waited + 1 ))
        done
    done
    redis-cli --cluster create "${addresses[@]}" --cluster-replicas "$replicas" --cluster-yes \
        >"$STATE_DIR/redis-cluster/create.log" 2>&1 \
        || { log "redis-cli --cluster create failed:"; tail -n 20 "$STATE_DIR/redis-cluster/create.log" >&2; return 1; }
    for port in "${ports[@]}"; do
        waited=0
        until redis-cli -p "$port" cluster info 2>/dev/null | grep -q '^cluster_state:ok'; do
            (( waited < 100 )) || { log "the Redis Cluster node on :$port is not ok after 10s"; return 1; }
            sleep 0.1
            waited=$(( waited + 1 ))
        done
    done
    echo "$urls" >"$STATE_DIR/redis-urls"
    echo "$urls"
}

# Stops the local Redis Cluster's nodes (SIGTERM; SIGKILL after 5 s). Prints how many it stopped.
stop_redis_cluster() {
    local pid_file pid stopped=0 waited
    for pid_file in "$STATE_DIR"/redis-*.pid; do
        [[ -e "$pid_file" ]] || continue
        pid="$(cat "$pid_file")"
        if pid_is_ours "$pid" redis-server; then
            kill -TERM "$pid" 2>/dev/null || true
            waited=0
            while pid_alive "$pid"; do
                if (( waited >= 50 )); then
                    kill -KILL "$pid" 2>/dev/null || true
                    break
                fi
                sleep 0.1
                waited=$(( waited + 1 ))
            done
            stopped=$(( stopped + 1 ))
        fi
        rm -f "$pid_file"
    done
    rm -f "$STATE_DIR/redis-urls"
    echo "$stopped"
}
