#!/usr/bin/env bash
# Stops the local cluster started by up.sh: every node gets SIGTERM (and drains), nginx quits,
# and the Redis Cluster nodes of `up.sh --redis-cluster` stop after the gateway nodes.
# Logs, the JWT secret and the token stay in the state directory; --purge removes it all.
#
#   deploy/local/down.sh [--purge]
set -euo pipefail

# shellcheck source=deploy/local/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

purge=0
case "${1:-}" in
    "") ;;
    --purge) purge=1 ;;
    *) die "usage: down.sh [--purge]" ;;
esac

if [[ ! -d "$STATE_DIR" ]]; then
    echo "nothing to stop (no $STATE_DIR)"
    exit 0
fi

# The balancer first, so no new connection reaches a stopping node.
if [[ -s "$STATE_DIR/nginx.pid" ]]; then
    nginx_pid="$(cat "$STATE_DIR/nginx.pid")"
    if pid_is_ours "$nginx_pid" nginx; then
        kill -QUIT "$nginx_pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            pid_alive "$nginx_pid" || break
            sleep 0.1
        done
        if pid_alive "$nginx_pid"; then
            kill -TERM "$nginx_pid" 2>/dev/null || true
        fi
    fi
    rm -f "$STATE_DIR/nginx.pid"
fi

# The nodes in parallel: each drains for up to its grace period.
stopped=0
for pid_file in "$STATE_DIR"/node-*.pid; do
    [[ -e "$pid_file" ]] || continue
    index="${pid_file##*/node-}"
    index="${index%.pid}"
    stop_node "$index" &
    stopped=$(( stopped + 1 ))
done
wait

# The local Redis Cluster of `up.sh --redis-cluster` last: the nodes drained against it.
redis_stopped="$(stop_redis_cluster)"

if (( purge )); then
    rm -rf "$STATE_DIR"
    echo "stopped $stopped nodes and nginx; removed $STATE_DIR"
else
    rm -f "$STATE_DIR/nodes"
    echo "stopped $stopped nodes and nginx; logs are in $STATE_DIR"
fi
if (( redis_stopped > 0 )); then
    echo "stopped $redis_stopped Redis Cluster nodes"
fi
