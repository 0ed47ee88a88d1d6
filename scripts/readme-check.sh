#!/usr/bin/env bash
# The README's run command, as written, from a fresh clone of this checkout: it builds and
# serves, its printed token works, still works after a restart, and `chatgate token --user bob`
# beside it mints a token the gateway accepts. The command is read from the README's table
# ("run the gateway"), so what is tested is what a new user types. The target directory is
# shared with this checkout (no second build of the dependencies); the port is moved off
# 3001 with CHATGATE_LISTEN so a running gateway cannot collide with the check.
#
#   scripts/readme-check.sh          (CHATGATE_README_REV=<commit> to check another commit)
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"

log() { printf '\n== %s\n' "$*"; }
die() { echo "readme-check: $*" >&2; exit 1; }

command="$(grep -m1 '^| run the gateway' README.md | sed -E 's/.*\| `([^`]+)` \|[[:space:]]*$/\1/')"
[[ -n "$command" && "$command" != \|* ]] || die "no run command found in README.md's table"
grep -q "^$command\$" README.md || die "the Quick start does not show the table's command \`$command\`"

work="$(mktemp -d /tmp/chatgate-readme.XXXXXX)"
pid=""
stop_gateway() {
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        kill -INT -- "-$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    pid=""
}
cleanup() { stop_gateway; rm -rf "$work"; }
trap cleanup EXIT

git clone -q "$repo" "$work/chatgate"
# CHATGATE_README_REV checks another commit, e.g. uncommitted work: "$(git stash create)".
if [[ -n "${CHATGATE_README_REV:-}" ]]; then
    git -C "$repo" cat-file -e "$CHATGATE_README_REV^{commit}" || die "no commit $CHATGATE_README_REV"
    git -C "$work/chatgate" fetch -q "$repo" "$CHATGATE_README_REV" && git -C "$work/chatgate" checkout -q FETCH_HEAD
fi
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
base="http://127.0.0.1:$port"

# Starts the README's command in the clone (its own process group); waits for the token line.
start_gateway() {
    local out="$1"
    (cd "$work/chatgate" && CARGO_TARGET_DIR="$repo/target" CHATGATE_LISTEN="127.0.0.1:$port" \
        exec setsid bash -c "$command" >"$out" 2>"$out.stderr") &
    pid=$!
    for _ in $(seq 1800); do
        grep -q '^token for user 1' "$out" 2>/dev/null && return
        kill -0 "$pid" 2>/dev/null || { cat "$out" "$out.stderr" >&2; die "\`$command\` exited before serving"; }
        sleep 0.5
    done
    cat "$out.stderr" >&2
    die "\`$command\` printed no token within 15 minutes"
}

status() { curl -s -o /dev/null -w '%{http_code}' "$@"; }

log "README command from a fresh clone: $command"
start_gateway "$work/first.out"
cat "$work/first.out"
token="$(sed -n 's/^token for user 1, valid 7 days: //p' "$work/first.out")"
[[ "$(status "$base/healthz")" == 200 ]] || die "/healthz does not answer 200"
created="$(curl -s -XPOST "$base/api/providers/sessions" -H "Authorization: Bearer $token" \
    -H 'content-type: application/json' -d '{"provider":"script","projectPath":"demo"}')"
grep -q '"success":true' <<<"$created" || die "the Quick start's session call failed: $created"
[[ -f "$work/chatgate/chatgate.secret" ]] || die "no chatgate.secret beside chatgate.db in the clone"

log "restart: the printed token still works"
stop_gateway
start_gateway "$work/second.out"
[[ "$(status "$base/api/providers/sessions" -H "Authorization: Bearer $token")" == 200 ]] \
    || die "the first start's token was refused after a restart"

log "chatgate token --user bob, beside the gateway"
bob="$(cd "$work/chatgate" && "$repo/target/release/chatgate" token --user bob)"
[[ "$(status "$base/api/providers/sessions" -H "Authorization: Bearer $bob")" == 200 ]] \
    || die "the gateway refused the token of \`chatgate token --user bob\`"
echo "README quick start: OK (serves, token lasts across a restart, chatgate token works)"
