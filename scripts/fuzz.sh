#!/usr/bin/env bash
# Runs chatgate's libFuzzer targets (fuzz/, cargo-fuzz) for a short time each,
# starting from the committed corpora, and fails on any crash, leak or timeout.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# SECONDS_PER_TARGET defaults to $FUZZ_SECONDS, else 30; the targets default to
# every target in fuzz/. Other settings (environment):
#   FUZZ_SANITIZER  address (default on nightly) or none
#   FUZZ_TOOLCHAIN  rustup toolchain to build with (default: nightly if installed, else stable)
#   FUZZ_KEEP=1     keep the scratch directory (corpus grown by the run, artifacts)
#
# cargo-fuzz is installed on first use into target/fuzz-tools; fuzz builds go to
# target/fuzz. The committed corpus is copied to a scratch directory, so a run
# never changes the repository. On a crash the input is kept and its path printed.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

seconds=${1:-${FUZZ_SECONDS:-30}}
[ $# -gt 0 ] && shift
case $seconds in '' | *[!0-9]*) echo "fuzz.sh: SECONDS_PER_TARGET must be a whole number, got '$seconds'" >&2; exit 2 ;; esac

tools=$root/target/fuzz-tools
export PATH="$tools/bin:$PATH"
if ! command -v cargo-fuzz >/dev/null; then
  echo "== installing cargo-fuzz into $tools"
  cargo install cargo-fuzz --locked --root "$tools"
fi

toolchain=${FUZZ_TOOLCHAIN:-}
if [ -z "$toolchain" ]; then
  if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then toolchain=nightly; else toolchain=stable; fi
fi
if [ "$toolchain" = nightly ]; then
  sanitizer=${FUZZ_SANITIZER:-address}
else
  # Sanitizers need nightly's -Z flags; stable builds the coverage instrumentation only.
  sanitizer=${FUZZ_SANITIZER:-none}
  if [ "$sanitizer" != none ]; then
    echo "fuzz.sh: sanitizer '$sanitizer' needs a nightly toolchain (rustup toolchain install nightly)" >&2
    exit 2
  fi
  echo "== $toolchain toolchain: building without a sanitizer (-s none); install nightly for AddressSanitizer"
fi

cd fuzz
if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo "+$toolchain" fuzz list)
fi

scratch=$(mktemp -d "${TMPDIR:-/tmp}/chatgate-fuzz.XXXXXX")
cleanup() { if [ "${FUZZ_KEEP:-0}" = 1 ] || [ "${failed:-0}" = 1 ]; then echo "scratch kept: $scratch"; else rm -rf "$scratch"; fi; }
trap cleanup EXIT

build_flags=(--sanitizer "$sanitizer" --target-dir "$root/target/fuzz")
echo "== building ${targets[*]} ($toolchain, sanitizer $sanitizer)"
for target in "${targets[@]}"; do
  cargo "+$toolchain" fuzz build "${build_flags[@]}" "$target"
done

summary=()
failed=0
for target in "${targets[@]}"; do
  corpus=$scratch/corpus/$target
  artifacts=$scratch/artifacts/$target
  mkdir -p "$corpus" "$artifacts"
  if [ -d "corpus/$target" ]; then cp -R "corpus/$target/." "$corpus/"; fi
  seeds=$(find "$corpus" -type f | wc -l)
  log=$scratch/$target.log
  echo "== fuzzing $target for ${seconds}s from $seeds seed inputs"
  extra=()
  # The dispatcher's tokio tasks outlive an input by design (the registry's sweeper
  # sleeps 5 s), so LeakSanitizer would rescan the heap after every input and cut
  # the rate fivefold; memory growth is still caught by -rss_limit_mb.
  if [ "$target" = dispatcher ]; then extra+=(-detect_leaks=0); fi
  status=0
  cargo "+$toolchain" fuzz run "${build_flags[@]}" "$target" "$corpus" -- \
    -max_total_time="$seconds" -timeout=60 -rss_limit_mb=2048 -dict=dict/chatgate.dict \
    -artifact_prefix="$artifacts/" -print_final_stats=1 "${extra[@]}" >"$log" 2>&1 || status=$?
  stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -n 1; }
  execs=$(stat number_of_executed_units)
  rate=$(stat average_exec_per_sec)
  rss=$(stat peak_rss_mb)
  units=$(find "$corpus" -type f | wc -l)
  crashes=$(find "$artifacts" -type f | wc -l)
  line="$target: ${execs:-?} executions in ${seconds}s (${rate:-?}/s), corpus $seeds -> $units inputs, peak RSS ${rss:-?} MB, $crashes crash(es)"
  summary+=("$line")
  echo "$line"
  if [ "$status" -ne 0 ] || [ "$crashes" -ne 0 ]; then
    failed=1
    echo "!! $target failed (exit $status); last lines of $log:" >&2
    grep -E 'panicked|ERROR: libFuzzer|SUMMARY|Test unit written|==[0-9]+==' "$log" | head -n 20 >&2 || true
    tail -n 30 "$log" >&2
    find "$artifacts" -type f -exec echo "crashing input: {}" \; >&2
  fi
done

echo "== fuzz summary"
printf '%s\n' "${summary[@]}"
if [ "$failed" -ne 0 ]; then
  echo "fuzzing found a failure (reproduce: cd fuzz && cargo +$toolchain fuzz run -s $sanitizer <target> <input>)" >&2
  exit 1
fi
