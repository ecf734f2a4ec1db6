#!/usr/bin/env bash
# Builds every fuzz target (each [[bin]] of fuzz/Cargo.toml) and runs each for a bounded time
# from its seed corpus in fuzz/corpus/<target>/; prints each target's executions, and fails if
# any target found a crash (a panic, an abort, a hang, or memory past the limit). Works on stable
# Rust: no cargo-fuzz, no nightly; fuzz/README.md says how and why.
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 60 s, every target)
#   scripts/fuzz.sh --fixed [TARGET...]                  (CI: a fixed part, the same on every run)
# --fixed runs each target from the same random seed (1) for a fixed number of executions: a
# bounded, fixed amount of work whatever the machine's speed, close to what a developer ran
# before pushing. It is not repeatable bit for bit (the code under test uses randomly seeded
# hash maps, so coverage, and with it the inputs tried, differ a little from run to run).
# Open-ended fuzzing is the timed form, run and recorded by hand (docs/security.md, "Fuzzing").
# New inputs found go to a scratch directory, never into the committed seeds; a crashing input is
# saved in fuzz/artifacts/<target>/ and its reproduction command printed.
set -euo pipefail
cd "$(dirname "$0")/.."
fixed=false
if [ "${1:-}" = "--fixed" ]; then
  fixed=true
  seconds=300
else
  seconds=${1:-60}
fi
shift || true
target_dir="${CARGO_TARGET_DIR:-$PWD/fuzz/target}"

if [ $# -gt 0 ]; then
  targets=("$@")
else
  # The [[bin]] names, in file order.
  mapfile -t targets < <(awk '/^\[\[bin\]\]/ { in_bin = 1; next } /^\[/ { in_bin = 0 }
    in_bin && $1 == "name" { gsub(/"/, "", $3); print $3 }' fuzz/Cargo.toml)
fi

# libFuzzer options of a target's own (the largest input worth trying, by its format).
options_for() {
  case $1 in
    frame) echo "-max_len=16384" ;;
    store_recovery) echo "-max_len=65536" ;;
    definitions) echo "-max_len=16384" ;;
    *) echo "-max_len=4096" ;;
  esac
}

# --fixed: executions per target, each about 30 s on CI's 2-core machine at the rates CI showed
# (store_recovery lays out a whole data directory per input, so it runs ~2,000 a second; the
# parsers run 50,000-500,000). A target that is not listed runs 1,000,000.
runs_for() {
  case $1 in
    frame) echo 1500000 ;;
    field_table) echo 4000000 ;;
    sasl) echo 4500000 ;;
    store_recovery) echo 60000 ;;
    definitions) echo 1600000 ;;
    mqtt_packet) echo 8000000 ;;
    cluster_link) echo 5000000 ;;
    *) echo 1000000 ;;
  esac
}

# What `cargo fuzz build --sanitizer none` passes, all stable flags: libFuzzer's coverage
# instrumentation (inline 8-bit counters, the PC table, comparison tracing, stack depth) and
# `cfg(fuzzing)`. `--target` keeps these flags off build scripts and proc macros. Debug assertions
# and overflow checks come from fuzz/Cargo.toml's release profile.
host=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cllvm-args=-sanitizer-coverage-stack-depth \
-Cllvm-args=-simplifycfg-branch-fold-threshold=0 --cfg fuzzing"
build_started=$(date +%s)
bin_args=()
for target in "${targets[@]}"; do bin_args+=(--bin "$target"); done
cargo build --manifest-path fuzz/Cargo.toml --release --locked --target "$host" --target-dir "$target_dir" "${bin_args[@]}"
echo "fuzz targets built in $(( $(date +%s) - build_started ))s"

scratch=$(mktemp -d "${TMPDIR:-/tmp}/wharf-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
failed=()
summary=()
for target in "${targets[@]}"; do
  mkdir -p "$scratch/$target" "fuzz/artifacts/$target" "fuzz/corpus/$target"
  log="$scratch/$target.log"
  # -max_total_time caps a fixed run too: on a slow machine it ends early rather than late.
  bounds=(-max_total_time="$seconds")
  if $fixed; then
    bounds+=(-seed=1 -runs="$(runs_for "$target")")
    echo "== fuzzing $target: $(runs_for "$target") executions from seed 1 (at most ${seconds}s)"
  else
    echo "== fuzzing $target for ${seconds}s"
  fi
  target_started=$(date +%s)
  # -timeout: an input that takes 10 s is a hang; -rss_limit_mb: memory past 2 GiB is a finding.
  # shellcheck disable=SC2046
  if "$target_dir/$host/release/$target" "$scratch/$target" "fuzz/corpus/$target" \
      "${bounds[@]}" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      -artifact_prefix="fuzz/artifacts/$target/" $(options_for "$target") >"$log" 2>&1; then
    status=ok
  else
    status=CRASH
    failed+=("$target")
    tail -n 60 "$log"
    echo "reproduce: $target_dir/$host/release/$target fuzz/artifacts/$target/<file>"
  fi
  executions=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  corpus=$(grep -o 'corp: [0-9]*/[0-9a-zA-Z]*' "$log" | tail -1 || true)
  line="$target: ${executions:-?} executions in $(( $(date +%s) - target_started ))s, ${corpus:-corp: ?}, $status"
  echo "$line"
  summary+=("$line")
done

echo "== fuzzing summary"
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzzing found crashes in: ${failed[*]}" >&2
  exit 1
fi
