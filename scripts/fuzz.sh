#!/usr/bin/env bash
# Builds every fuzz target (each [[bin]] of fuzz/Cargo.toml) and runs each for a bounded time
# from its seed corpus in fuzz/corpus/<target>/; prints each target's executions, and fails if
# any target found a crash (a panic, an abort, a hang, or memory past the limit). Works on stable
# Rust: no cargo-fuzz, no nightly; fuzz/README.md says how and why.
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 60 s, every target)
# New inputs found go to a scratch directory, never into the committed seeds; a crashing input is
# saved in fuzz/artifacts/<target>/ and its reproduction command printed.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
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
  echo "== fuzzing $target for ${seconds}s"
  # -timeout: an input that takes 10 s is a hang; -rss_limit_mb: memory past 2 GiB is a finding.
  # shellcheck disable=SC2046
  if "$target_dir/$host/release/$target" "$scratch/$target" "fuzz/corpus/$target" \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
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
  line="$target: ${executions:-?} executions in ${seconds}s, ${corpus:-corp: ?}, $status"
  echo "$line"
  summary+=("$line")
done

echo "== fuzzing summary"
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzzing found crashes in: ${failed[*]}" >&2
  exit 1
fi
