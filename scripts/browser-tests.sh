#!/usr/bin/env bash
# Browser suite: the web console and the client module in headless Chromium against a 3-node
# stack behind nginx, plus the client's Node unit tests.
#
# Installs what is missing (as root, Debian's chromium; the npm packages of tests/browser from
# its lockfile), builds the debug binary and the test kit's stack supervisor, and runs the tests
# under it: `chatgate-stack --nodes 3` (crates/chatgate-testkit/src/stack.rs) starts the nodes and
# nginx on free ports below the ephemeral range in a temp state dir (Redis 127.0.0.1:6379 and
# PostgreSQL postgres://postgres@127.0.0.1:5432/test by default), gives the tests the stack's
# URLs, secret and a control endpoint that restarts or kills a node, and always stops the stack
# when the tests end. Screenshots and node logs go to tests/browser/artifacts/
# (CHATGATE_BROWSER_ARTIFACTS to change).
#
#   scripts/browser-tests.sh [files or name filters...]   (e.g. e2e/05_node_drain.test.js, 11_upstream)
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"

log() { printf '\n== %s\n' "$*"; }
die() { echo "browser-tests: $*" >&2; exit 1; }

chromium_bin="${CHATGATE_CHROMIUM:-/usr/bin/chromium}"
artifacts="${CHATGATE_BROWSER_ARTIFACTS:-$repo/tests/browser/artifacts}"

# --- tools -------------------------------------------------------------------------------------
command -v node >/dev/null 2>&1 || die "node (20+) is required"
command -v npm >/dev/null 2>&1 || die "npm is required"
if [[ ! -x "$chromium_bin" ]]; then
    [[ "$(id -u)" == 0 ]] || die "Chromium is not installed (as root: apt-get install chromium)"
    log "installing Chromium (Debian package)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq chromium >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null; } \
        || die "could not install chromium"
    [[ -x "$chromium_bin" ]] || die "no $chromium_bin after installing chromium"
fi
pinned="$(node -p 'require("./tests/browser/package.json").devDependencies["playwright-core"]')"
installed="$(node -p 'require("./tests/browser/node_modules/playwright-core/package.json").version' 2>/dev/null || true)"
if [[ "$installed" != "$pinned" ]]; then
    log "installing tests/browser npm packages (npm ci)"
    npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error >/dev/null
fi

# --- binaries -----------------------------------------------------------------------------------
target_dir="${CARGO_TARGET_DIR:-target}"
[[ "$target_dir" == /* ]] || target_dir="$repo/$target_dir"
if [[ -z "${CHATGATE_BIN:-}" ]]; then
    log "building the debug binary"
    cargo build --locked --bin chatgate
    export CHATGATE_BIN="$target_dir/debug/chatgate"
fi
log "building the stack supervisor (chatgate-testkit)"
cargo build --locked -p chatgate-testkit --bin chatgate-stack
stack_bin="$target_dir/debug/chatgate-stack"

# --- the stack ----------------------------------------------------------------------------------
state="$(mktemp -d /tmp/chatgate-browser.XXXXXX)"
mkdir -p "$state/workspaces" "$artifacts"
rm -f "$artifacts"/*.png "$artifacts"/*.log # this run's screenshots and logs only
export CHATGATE_WORKSPACES_ROOT="$state/workspaces"
export CHATGATE_RUN_LEASE="${CHATGATE_RUN_LEASE:-3s}"
export CHATGATE_DRAIN_GRACE="${CHATGATE_DRAIN_GRACE:-2s}"
# A small replay window, so a tab joining a long run late gets replayTruncated.
export CHATGATE_REPLAY_MAX_EVENTS="${CHATGATE_REPLAY_MAX_EVENTS:-150}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
export DATABASE_URL="${DATABASE_URL:-${CHATGATE_TEST_PG_URL:-postgres://postgres@127.0.0.1:5432/test}}"

# chatgate-stack stops the nodes and nginx itself; this keeps their logs and removes the rest.
keep_logs() {
    local status=$?
    for f in "$state"/stack/node-*.log "$state"/stack/nginx-error.log; do
        [[ -e "$f" ]] && cp "$f" "$artifacts/" 2>/dev/null
    done
    rm -rf "$state"
    exit "$status"
}
trap keep_logs EXIT
trap 'exit 130' INT TERM
export CHATGATE_CHROMIUM="$chromium_bin" CHATGATE_BROWSER_ARTIFACTS="$artifacts"

log "browser tests (Chromium $("$chromium_bin" --version 2>/dev/null | awk '{print $2}')) on 3 nodes + nginx (run lease $CHATGATE_RUN_LEASE, replay window $CHATGATE_REPLAY_MAX_EVENTS)"
cd tests/browser
stack=("$stack_bin" --nodes 3 --state "$state/stack" --)
# The upstream-style client test (e2e/11) uses Node's WebSocket: built in from Node 22, behind a
# flag on Node 20 and 21.
node_flags=()
node -e 'process.exit(typeof WebSocket === "function" ? 0 : 1)' 2>/dev/null || node_flags+=(--experimental-websocket)
if (( $# > 0 )); then
    # A filter that is not a path under tests/browser names the files containing it
    # (`11_upstream` -> e2e/11_upstream_client.test.js): Node 20 takes no globs.
    files=()
    for filter in "$@"; do
        if [[ -e "$filter" || "$filter" == -* ]]; then
            files+=("$filter")
            continue
        fi
        matched=0
        for f in unit/*.test.js e2e/*.test.js; do
            if [[ "$f" == *"$filter"* ]]; then
                files+=("$f")
                matched=1
            fi
        done
        (( matched )) || die "no test file under tests/browser matches '$filter'"
    done
    "${stack[@]}" node "${node_flags[@]}" --test --test-concurrency=1 "${files[@]}"
else
    "${stack[@]}" node "${node_flags[@]}" --test --test-concurrency=1 unit/ e2e/
fi
