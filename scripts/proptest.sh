#!/usr/bin/env bash
# A random search over the property tests: the store's crash property (wharf-store
# tests/crash_property.rs) and the model's (wharf-model: delivery, guarantees, quorum), each round
# from a new random seed and with more cases than CI runs. CI runs one fixed seed
# (scripts/test.sh); this is the open-ended part, run by hand and recorded in docs/durability.md.
#   scripts/proptest.sh [ROUNDS] [CASES_PER_ROUND]      (default: 10 rounds of 5,000 cases)
# A failing round prints its seed: `PROPTEST_RNG_SEED=SEED WHARF_PROPTEST_CASES=CASES cargo test
# -p wharf-store --test crash_property` runs it again (appends left in flight make thread timing
# part of a case, so a replay can differ; the printed input is what a regression test is made of).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-10}
cases=${2:-5000}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/wharf-target}"
export WHARF_PROPTEST_CASES="$cases"
log_dir=$(mktemp -d "${TMPDIR:-/tmp}/wharf-proptest.XXXXXX")
run_suites() {
  cargo test --locked -p wharf-store --test crash_property "$@" &&
    cargo test --locked -p wharf-model --test delivery --test guarantees --lib "$@"
}
run_suites --no-run
failed=()
for round in $(seq 1 "$rounds"); do
  seed=$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')
  log="$log_dir/round-$round-$seed.log"
  started=$(date +%s)
  if PROPTEST_RNG_SEED="$seed" run_suites >"$log" 2>&1; then
    echo "round $round seed $seed: passed ($cases cases, $(( $(date +%s) - started ))s)"
  else
    echo "round $round seed $seed: FAILED, see $log"
    failed+=("$seed")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "failing seeds: ${failed[*]}"
  exit 1
fi
echo "all $rounds rounds passed; logs in $log_dir"
