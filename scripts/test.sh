#!/usr/bin/env bash
# Runs chatgate's whole test suite. On a fresh Debian machine with Rust it first
# installs (as root, from Debian's packages) and starts Redis and PostgreSQL
# when they are missing; where they already run it leaves them alone.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_URL=${CHATGATE_TEST_PG_URL:-postgres://postgres@127.0.0.1:5432/test}
export CHATGATE_TEST_PG_URL=$PG_URL

log() { printf '\n== %s\n' "$*"; }

apt_install() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "need root to install $* (run as root, or install them yourself)" >&2
    exit 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_redis() {
  if command -v redis-cli >/dev/null && redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then
    return
  fi
  command -v redis-server >/dev/null || { log "installing Redis"; apt_install redis-server; }
  log "starting Redis on 127.0.0.1:6379"
  mkdir -p /tmp/chatgate-redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp/chatgate-redis --logfile /tmp/chatgate-redis/redis.log
  for _ in $(seq 50); do redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG && return; sleep 0.1; done
  echo "Redis did not start" >&2; exit 1
}

pg_ready() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }

ensure_postgres() {
  if ! pg_ready; then
    command -v pg_ctlcluster >/dev/null || { log "installing PostgreSQL"; apt_install postgresql postgresql-client; }
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    local hba=/etc/postgresql/$version/main/pg_hba.conf
    # Tests connect as postgres over TCP without a password: trust loopback.
    if ! grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
      sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
    fi
    log "starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || pg_ctlcluster "$version" main start
    for _ in $(seq 100); do pg_ready && break; sleep 0.2; done
    pg_ready || { echo "PostgreSQL did not start" >&2; exit 1; }
  fi
  if ! psql "$PG_URL" -Atc 'SELECT 1' >/dev/null 2>&1; then
    log "creating database test"
    psql "${PG_URL%/*}/postgres" -c 'CREATE DATABASE test' >/dev/null
  fi
}

ensure_nginx() {
  # The load balancer of the drain tests, the browser suite and the chaos soak.
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || { log "installing nginx"; apt_install nginx; }
}

ensure_real_clis() {
  # The real Claude Code, Codex, Gemini CLI and OpenCode of tests/real_*.rs, pinned in
  # tests/real-cli/package-lock.json, installed once per machine into a cache outside the
  # checkout (one directory per lockfile content) and reused by every later run and clone.
  if [ "${CHATGATE_SKIP_REAL_CLIS:-}" = 1 ]; then return; fi
  if ! command -v npm >/dev/null; then log "installing Node.js and npm"; apt_install nodejs npm; fi
  local lock_hash dir
  lock_hash=$(cat tests/real-cli/package.json tests/real-cli/package-lock.json | sha256sum | cut -c1-16)
  dir="${CHATGATE_REAL_CLI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/chatgate/real-cli}/$lock_hash"
  if [ ! -f "$dir/.installed" ]; then
    log "installing the real provider CLIs into $dir (pinned by tests/real-cli/package-lock.json)"
    rm -rf "$dir" && mkdir -p "$dir"
    cp tests/real-cli/package.json tests/real-cli/package-lock.json "$dir/"
    # `npm install` from the lockfile, not `npm ci`: the lock records opencode-ai's optional
    # per-platform packages only for the platforms the registry serves, and `npm ci` refuses a
    # lock that does not list all of them. Versions are exact in package.json either way.
    npm install --prefix "$dir" --no-audit --no-fund
    touch "$dir/.installed"
  fi
  export CHATGATE_REAL_CLI_MODULES="$dir/node_modules"
  local bin
  for bin in claude codex gemini opencode; do
    printf '%s: %s\n' "$bin" "$("$CHATGATE_REAL_CLI_MODULES/.bin/$bin" --version)"
  done
}

ensure_bwrap() {
  # The sandbox of the provider CLIs (--sandbox bwrap), attacked by tests/containment.rs.
  command -v bwrap >/dev/null || { log "installing bubblewrap"; apt_install bubblewrap; }
}

ensure_redis
ensure_postgres
ensure_nginx
ensure_bwrap
ensure_real_clis

log "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

log "the gateway's own dependencies (no test, bench or client crate among them)"
direct=$(cargo tree -p chatgate -e normal --depth 1 --prefix none --locked | cut -d' ' -f1)
for crate in reqwest tokio-tungstenite tempfile tokio-stream chatgate-testkit chatgate-bench; do
  if grep -qx "$crate" <<<"$direct"; then echo "chatgate depends on $crate: it belongs in [dev-dependencies] or a tool crate" >&2; exit 1; fi
done

log "tests"
cargo test --workspace --all-targets --locked

log "chaos soak (2 minutes: 3 nodes behind nginx, kill -9, SIGSTOP past the lease, Redis restart, drain)"
target/debug/chatgate-bench chaos --minutes 2
log "chaos soak on a Redis Cluster (2 minutes: 3 primaries + 3 replicas, kill -9, SIGSTOP, drain, a primary killed, live sessions' slots migrated)"
target/debug/chatgate-bench chaos --minutes 2 --redis-cluster

log "fuzzing (libFuzzer, ${FUZZ_SECONDS:-20} s per target, from the committed corpora)"
scripts/fuzz.sh "${FUZZ_SECONDS:-20}"
log "browser tests (web console and JS client in headless Chromium, 3-node stack)"; scripts/browser-tests.sh

log "the README's run command from a fresh clone (release build)"
scripts/readme-check.sh

if [ -x scripts/check-deploy.sh ]; then
  log "deploy manifests (offline validation)"
  scripts/check-deploy.sh
fi
log "all tests passed"
