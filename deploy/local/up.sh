#!/usr/bin/env bash
# Starts a local chatgate cluster: N gateway nodes (default 3) in cluster mode against the local
# Redis and PostgreSQL, behind nginx as a WebSocket-aware round-robin load balancer.
#
#   deploy/local/up.sh [--redis-cluster] [N]   then   . .state/local/env   and   deploy/local/down.sh
#
# --redis-cluster (or CHATGATE_LOCAL_REDIS_CLUSTER=1): instead of REDIS_URL, a Redis Cluster of
# its own: cluster-enabled redis-servers on free ports (no persistence, loopback only, their
# files under the state directory), formed with `redis-cli --cluster create`; the nodes run with
# CHATGATE_REDIS_MODE=cluster and the seed list as REDIS_URL; down.sh stops the Redis nodes too.
#
# Environment (all optional):
#   CHATGATE_BIN                  gateway binary (default target/release/chatgate, built if missing)
#   REDIS_URL                     default redis://127.0.0.1:6379 (with CHATGATE_REDIS_MODE=cluster
#                                 or sentinel, a comma list: an existing cluster or sentinels)
#   CHATGATE_LOCAL_REDIS_CLUSTER_NODES  Redis Cluster nodes with --redis-cluster: 3 (three
#                                 primaries, default) or 6 (three primaries with a replica each)
#   CHATGATE_LOCAL_REDIS_BASE_PORT  first port tried for them (default 7101; the port + 10000,
#                                 their cluster bus, must be free too)
#   DATABASE_URL                  default postgres://postgres@127.0.0.1:5432/test
#   CHATGATE_LB_PORT              balancer port (default 8080)
#   CHATGATE_LOCAL_BASE_PORT      first port tried for the nodes (default 3101; taken ones skipped)
#   CHATGATE_LOCAL_STATE          state directory (default .state/local)
#   CHATGATE_LOCAL_USER           user id of the printed token (default local-user)
#   CHATGATE_LOCAL_READY_TIMEOUT  seconds to wait for each node's /readyz (default 60)
#   CHATGATE_LB_WORKER_CONNECTIONS  nginx worker_connections (default 32768)
#   any other CHATGATE_* setting (CHATGATE_DRAIN_GRACE, CHATGATE_PROVIDERS, ...) is passed on to
#   every node; CHATGATE_LISTEN and CHATGATE_NODE_ID are set per node (local-1 ... local-N).
set -euo pipefail

# shellcheck source=deploy/local/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage="usage: up.sh [--redis-cluster] [N]  (N = 1..99 gateway nodes, default 3)"
redis_cluster="${CHATGATE_LOCAL_REDIS_CLUSTER:-0}"
[[ "$redis_cluster" =~ ^[01]$ ]] || die "CHATGATE_LOCAL_REDIS_CLUSTER must be 0 or 1"
nodes=""
for arg in "$@"; do
    case "$arg" in
        --redis-cluster) redis_cluster=1 ;;
        -*) die "$usage" ;;
        *) [[ -z "$nodes" ]] || die "$usage"; nodes="$arg" ;;
    esac
done
nodes="${nodes:-3}"
[[ "$nodes" =~ ^[1-9][0-9]?$ ]] || die "$usage"
redis_cluster_nodes="${CHATGATE_LOCAL_REDIS_CLUSTER_NODES:-3}"
case "$redis_cluster_nodes" in
    3) redis_replicas=0 ;;
    6) redis_replicas=1 ;;
    *) die "CHATGATE_LOCAL_REDIS_CLUSTER_NODES must be 3 or 6" ;;
esac
redis_mode="${CHATGATE_REDIS_MODE:-standalone}"
lb_port="${CHATGATE_LB_PORT:-8080}"
[[ "$lb_port" =~ ^[0-9]+$ ]] || die "CHATGATE_LB_PORT must be a port number"
redis_url="${REDIS_URL:-redis://127.0.0.1:6379}"
database_url="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"

mkdir -p "$STATE_DIR" "${CHATGATE_WORKSPACES_ROOT:-$STATE_DIR/workspaces}"
if [[ -f "$STATE_DIR/nodes" ]]; then
    for ((i = 1; i <= $(cat "$STATE_DIR/nodes"); i++)); do
        if node_is_running "$i"; then
            die "a local stack is already running (state in $STATE_DIR): run deploy/local/down.sh first"
        fi
    done
fi
command -v curl >/dev/null 2>&1 || die "curl is required (apt-get install curl)"

# --- the gateway binary -------------------------------------------------------------------
if [[ -n "${CHATGATE_BIN:-}" ]]; then
    bin="$CHATGATE_BIN"
    [[ -x "$bin" ]] || die "CHATGATE_BIN=$bin is not an executable file"
else
    bin="$REPO_ROOT/target/release/chatgate"
    if [[ ! -x "$bin" ]]; then
        log "building $bin (cargo build --release --bin chatgate)"
        (cd "$REPO_ROOT" && cargo build --release --bin chatgate) || die "cargo build failed"
    fi
    [[ -x "$bin" ]] || die "no binary at $bin after the build"
fi
bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"

# --- nginx --------------------------------------------------------------------------------
nginx="$(nginx_bin)"
if [[ -z "$nginx" ]]; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        log "installing nginx (Debian package)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null 2>&1 \
            || { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null; } \
            || die "could not install nginx"
        nginx="$(nginx_bin)"
    fi
    [[ -n "$nginx" ]] || die "nginx is not installed (as root: apt-get install nginx)"
fi

# --- backing services (checked when their clients are installed) ---------------------------
if (( redis_cluster )); then
    for program in redis-server redis-cli; do
        command -v "$program" >/dev/null 2>&1 && continue
        if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
            log "installing redis-server (Debian package) for --redis-cluster"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null 2>&1 \
                || { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; } \
                || die "could not install redis-server"
        fi
        command -v "$program" >/dev/null 2>&1 || die "--redis-cluster needs $program (as root: apt-get install redis-server)"
    done
elif command -v redis-cli >/dev/null 2>&1 && [[ "$redis_url" == redis://* ]]; then
    # A seed list or the sentinels: the first of them answers PING too. (rediss:// is left to
    # the nodes: redis-cli would need the CA and client certificate passed separately.)
    [[ "$(redis-cli -u "${redis_url%%,*}" ping 2>/dev/null)" == PONG ]] || die "Redis does not answer at ${redis_url%%,*}"
fi
if command -v psql >/dev/null 2>&1 && [[ "$database_url" == postgres* ]]; then
    psql "$database_url" -tAc 'select 1' >/dev/null 2>&1 || die "PostgreSQL does not answer at $database_url"
fi

# --- shared secret and node environment ------------------------------------------------------
if [[ ! -s "$STATE_DIR/jwt-secret" ]]; then
    (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$STATE_DIR/jwt-secret")
fi
jwt_secret="$(cat "$STATE_DIR/jwt-secret")"
echo "$bin" >"$STATE_DIR/bin"
echo "$nodes" >"$STATE_DIR/nodes"
echo "$lb_port" >"$STATE_DIR/lb-port"
{
    echo "# Environment of every local node (written by up.sh; CHATGATE_LISTEN/NODE_ID are per node)."
    printf 'REDIS_URL=%q\n' "$redis_url"
    printf 'DATABASE_URL=%q\n' "$database_url"
    printf 'CHATGATE_JWT_SECRET=%q\n' "$jwt_secret"
    printf 'CHATGATE_LOG_FORMAT=%q\n' "${CHATGATE_LOG_FORMAT:-text}"
    # Every node sees the same users' workspaces and provider homes (one machine's disk).
    printf 'CHATGATE_WORKSPACES_ROOT=%q\n' "${CHATGATE_WORKSPACES_ROOT:-$STATE_DIR/workspaces}"
    printf 'CHATGATE_HOMES_ROOT=%q\n' "${CHATGATE_HOMES_ROOT:-$STATE_DIR/homes}"
    # Pass on the caller's other settings.
    for name in $(compgen -e); do
        case "$name" in
            CHATGATE_LISTEN | CHATGATE_NODE_ID | CHATGATE_JWT_SECRET | CHATGATE_LOG_FORMAT | CHATGATE_BIN | CHATGATE_LB_* | CHATGATE_LOCAL_* | CHATGATE_WORKSPACES_ROOT | CHATGATE_HOMES_ROOT) ;;
            CHATGATE_*) printf '%s=%q\n' "$name" "${!name}" ;;
        esac
    done
} >"$STATE_DIR/node.env"
chmod 600 "$STATE_DIR/node.env"

# --- ports ----------------------------------------------------------------------------------
port_in_use "$lb_port" && die "port $lb_port (CHATGATE_LB_PORT) is in use"
ports=()
candidate="${CHATGATE_LOCAL_BASE_PORT:-3101}"
while (( ${#ports[@]} < nodes )); do
    (( candidate < 65535 )) || die "no free ports left for the nodes"
    if (( candidate != lb_port )) && ! port_in_use "$candidate"; then
        ports+=("$candidate")
    fi
    candidate=$(( candidate + 1 ))
done
redis_ports=()
if (( redis_cluster )); then
    candidate="${CHATGATE_LOCAL_REDIS_BASE_PORT:-7101}"
    [[ "$candidate" =~ ^[0-9]+$ ]] || die "CHATGATE_LOCAL_REDIS_BASE_PORT must be a port number"
    while (( ${#redis_ports[@]} < redis_cluster_nodes )); do
        (( candidate < 55535 )) || die "no free ports left for the Redis Cluster (each needs port + 10000 free too)"
        if (( candidate != lb_port )) && [[ " ${ports[*]} " != *" $candidate "* ]] && redis_ports_free "$candidate"; then
            redis_ports+=("$candidate")
        fi
        candidate=$(( candidate + 1 ))
    done
fi

# From here on, a failure stops whatever was started.
starting=1
on_exit() {
    local status=$?
    if (( status != 0 && starting )); then
        log "start failed: stopping what was started (logs stay in $STATE_DIR)"
        "$REPO_ROOT/deploy/local/down.sh" >/dev/null 2>&1 || true
    fi
}
trap on_exit EXIT

# --- the local Redis Cluster ------------------------------------------------------------------
if (( redis_cluster )); then
    log "starting a Redis Cluster of $redis_cluster_nodes nodes on ports ${redis_ports[*]}"
    redis_url="$(start_redis_cluster "$redis_replicas" "${redis_ports[@]}")" || die "the local Redis Cluster did not form"
    redis_mode=cluster
    {
        grep -v -e '^REDIS_URL=' -e '^CHATGATE_REDIS_MODE=' "$STATE_DIR/node.env"
        printf 'REDIS_URL=%q\n' "$redis_url"
        printf 'CHATGATE_REDIS_MODE=%q\n' "$redis_mode"
    } >"$STATE_DIR/node.env.new"
    chmod 600 "$STATE_DIR/node.env.new"
    mv "$STATE_DIR/node.env.new" "$STATE_DIR/node.env"
fi

# --- nodes ----------------------------------------------------------------------------------
for ((i = 1; i <= nodes; i++)); do
    start_node "$i" "${ports[$((i - 1))]}"
done
for ((i = 1; i <= nodes; i++)); do
    wait_node_ready "$i" || die "node $i did not become ready"
done

# --- nginx ----------------------------------------------------------------------------------
mkdir -p "$STATE_DIR/nginx-tmp"
# Each proxied socket takes two descriptors; stay within the hard limit nginx may raise to.
nofile="$(ulimit -Hn)"
[[ "$nofile" =~ ^[0-9]+$ ]] || nofile=131072
(( nofile <= 131072 )) || nofile=131072
worker_connections="${CHATGATE_LB_WORKER_CONNECTIONS:-32768}"
(( worker_connections <= nofile - 64 )) || worker_connections=$(( nofile - 64 ))
{
    echo "# Local load balancer for chatgate (written by deploy/local/up.sh)."
    echo "worker_processes auto;"
    echo "worker_rlimit_nofile $nofile;"
    echo "pid $STATE_DIR/nginx.pid;"
    echo "error_log $STATE_DIR/nginx-error.log warn;"
    echo "events { worker_connections $worker_connections; }"
    echo "http {"
    echo "    log_format upstream '\$remote_addr [\$time_local] \"\$request\" \$status \$body_bytes_sent upstream=\$upstream_addr upstream_status=\$upstream_status request_time=\$request_time';"
    echo "    access_log $STATE_DIR/nginx-access.log upstream buffer=64k flush=1s;"
    echo "    client_body_temp_path $STATE_DIR/nginx-tmp/body;"
    echo "    proxy_temp_path $STATE_DIR/nginx-tmp/proxy;"
    echo "    fastcgi_temp_path $STATE_DIR/nginx-tmp/fastcgi;"
    echo "    uwsgi_temp_path $STATE_DIR/nginx-tmp/uwsgi;"
    echo "    scgi_temp_path $STATE_DIR/nginx-tmp/scgi;"
    echo "    # Upgrade WebSocket requests; keep plain requests on upstream keep-alive connections."
    echo "    map \$http_upgrade \$connection_upgrade {"
    echo "        default upgrade;"
    echo "        ''      '';"
    echo "    }"
    echo "    # Round robin, no stickiness: any node serves any socket."
    echo "    upstream chatgate {"
    echo "        zone chatgate 64k;  # round-robin position and failures shared by the workers"
    for port in "${ports[@]}"; do
        echo "        server 127.0.0.1:$port max_fails=1 fail_timeout=2s;"
    done
    echo "        keepalive 64;"
    echo "    }"
    echo "    server {"
    echo "        listen 127.0.0.1:$lb_port;"
    echo "        location / {"
    echo "            proxy_pass http://chatgate;"
    echo "            proxy_http_version 1.1;"
    echo "            proxy_set_header Upgrade \$http_upgrade;"
    echo "            proxy_set_header Connection \$connection_upgrade;"
    echo "            proxy_set_header Host \$host;"
    echo "            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;"
    echo "            proxy_set_header X-Forwarded-Proto \$scheme;"
    echo "            # Idle sockets are kept alive by the server's 30 s pings; long runs stream."
    echo "            proxy_read_timeout 3600s;"
    echo "            proxy_send_timeout 3600s;"
    echo "            proxy_connect_timeout 2s;"
    echo "            proxy_buffering off;"
    echo "            client_max_body_size 16m;"
    echo "            # A stopped or draining node (refused, 502/503) is skipped for the next one."
    echo "            proxy_next_upstream error timeout http_502 http_503;"
    echo "            proxy_next_upstream_tries $(( nodes < 3 ? nodes : 3 ));"
    echo "        }"
    echo "    }"
    echo "}"
} >"$STATE_DIR/nginx.conf"
"$nginx" -t -q -e "$STATE_DIR/nginx-error.log" -p "$STATE_DIR/" -c "$STATE_DIR/nginx.conf" \
    || die "nginx rejected $STATE_DIR/nginx.conf"
"$nginx" -e "$STATE_DIR/nginx-error.log" -p "$STATE_DIR/" -c "$STATE_DIR/nginx.conf"
echo "$nginx" >"$STATE_DIR/nginx-bin"
for _ in $(seq 1 50); do
    [[ "$(http_status "http://127.0.0.1:$lb_port/readyz")" == 200 ]] && break
    sleep 0.2
done
[[ "$(http_status "http://127.0.0.1:$lb_port/readyz")" == 200 ]] \
    || die "the balancer on :$lb_port does not answer /readyz (see $STATE_DIR/nginx-error.log)"
starting=0

# --- token and summary ------------------------------------------------------------------------
user="${CHATGATE_LOCAL_USER:-local-user}"
token="$(CHATGATE_JWT_SECRET="$jwt_secret" "$bin" token --user "$user" 2>/dev/null | tail -n 1 || true)"
[[ -n "$token" ]] || log "warning: \`chatgate token --user $user\` printed nothing"
(umask 077 && echo "$token" >"$STATE_DIR/token")
node_urls=""
for port in "${ports[@]}"; do
    node_urls+="${node_urls:+ }http://127.0.0.1:$port"
done
{
    echo "# Source me: . $STATE_DIR/env"
    printf 'export CHATGATE_LB_URL=%q\n' "http://127.0.0.1:$lb_port"
    printf 'export CHATGATE_WS_URL=%q\n' "ws://127.0.0.1:$lb_port/ws"
    printf 'export CHATGATE_NODE_URLS=%q\n' "$node_urls"
    printf 'export CHATGATE_TOKEN=%q\n' "$token"
    printf 'export CHATGATE_JWT_SECRET=%q\n' "$jwt_secret"
    printf 'export CHATGATE_BIN=%q\n' "$bin"
    printf 'export CHATGATE_LOCAL_STATE=%q\n' "$STATE_DIR"
    # The Redis the nodes use (not REDIS_URL itself, so that a later up.sh is not steered by it).
    printf 'export CHATGATE_LOCAL_REDIS_URL=%q\n' "$redis_url"
    printf 'export CHATGATE_LOCAL_REDIS_MODE=%q\n' "$redis_mode"
} >"$STATE_DIR/env"
chmod 600 "$STATE_DIR/env"

echo "chatgate local cluster is up: $nodes nodes behind nginx"
for ((i = 1; i <= nodes; i++)); do
    echo "  node local-$i  http://127.0.0.1:$(node_port "$i")  pid $(node_pid "$i")  log $STATE_DIR/node-$i.log"
done
echo "load balancer   http://127.0.0.1:$lb_port   (WebSocket ws://127.0.0.1:$lb_port/ws)"
if (( redis_cluster )); then
    echo "redis cluster   $redis_url   ($redis_cluster_nodes nodes, files in $STATE_DIR/redis-cluster)"
else
    echo "redis           $(sed -E 's#//[^@/,]*@#//***@#g' <<<"$redis_url")   ($redis_mode)"
fi
echo "token ($user)   $token"
echo "environment     . $STATE_DIR/env      stop: deploy/local/down.sh"
