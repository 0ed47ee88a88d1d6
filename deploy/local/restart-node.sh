#!/usr/bin/env bash
# Restarts one node of the local cluster, for drain tests: SIGTERM (the node drains: /readyz
# 503, sockets closed with 1012, runs given the grace period), wait for it to exit, then start
# it again on the same port with the same environment and wait for /readyz.
#
#   deploy/local/restart-node.sh I          (I = 1..N, as printed by up.sh)
#   CHATGATE_RESTART_PAUSE=S  seconds to stay down between the exit and the new start (default 0)
set -euo pipefail

# shellcheck source=deploy/local/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

index="${1:-}"
[[ "$index" =~ ^[1-9][0-9]*$ ]] || die "usage: restart-node.sh I   (node number, 1..N)"
[[ -s "$STATE_DIR/node-$index.port" ]] || die "no node $index in $STATE_DIR (is the local stack up?)"
port="$(node_port "$index")"

started="$(date +%s.%N)"
stop_node "$index"
stopped="$(date +%s.%N)"
port_in_use "$port" && die "port $port is still taken after node $index stopped"
pause="${CHATGATE_RESTART_PAUSE:-0}"
[[ "$pause" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "CHATGATE_RESTART_PAUSE must be a number of seconds"
sleep "$pause"

start_node "$index" "$port"
wait_node_ready "$index" || die "node $index did not become ready again"
ready="$(date +%s.%N)"
awk -v i="$index" -v port="$port" -v pid="$(node_pid "$index")" -v a="$started" -v b="$stopped" -v c="$ready" \
    'BEGIN { printf "node local-%s restarted on :%s (pid %s): stopped in %.1fs, ready %.1fs later\n", i, port, pid, b - a, c - b }'
