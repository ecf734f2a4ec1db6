#!/usr/bin/env bash
# Runs the cluster's Jepsen-style checker (crates/wharf/tests/cluster_jepsen.rs) over many
# schedules: three `wharf` processes, publishers with confirms and consumers with acks, nodes
# SIGKILLed, isolated, muted one way, their links dropped and slowed, on seeded schedules.
#   scripts/jepsen.sh [FIRST_SEED] [RUNS] [STEPS]      (default: seed 1, 10 runs, 20 steps each)
# Prints one line per schedule (published, confirmed, delivered, duplicates, lost) and fails at
# the first schedule that loses a confirmed message or delivers one never published; its seed
# runs it again. CI runs one bounded schedule (6 steps) as part of the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
first=${1:-1}
runs=${2:-10}
steps=${3:-20}
# Built once and copied, with the broker it starts, so a long run tests one build however the
# tree changes meanwhile.
checker=$(cargo test --locked -p wharf --test cluster_jepsen --no-run --message-format=json \
  | grep -o '"executable":"[^"]*cluster_jepsen[^"]*"' | tail -1 | cut -d'"' -f4)
work=$(mktemp -d "${TMPDIR:-/tmp}/wharf-jepsen.XXXXXX")
trap 'rm -rf "$work"' EXIT
cp "$checker" "$work/cluster_jepsen"
cp "$(dirname "$checker")/../wharf" "$work/wharf"
log="$work/log"
for seed in $(seq "$first" $(( first + runs - 1 ))); do
  started=$(date +%s)
  if ! WHARF_JEPSEN_SEED=$seed WHARF_JEPSEN_STEPS=$steps WHARF_TEST_BINARY="$work/wharf" \
      "$work/cluster_jepsen" --nocapture >"$log" 2>&1; then
    cat "$log"
    echo "seed $seed FAILED (WHARF_JEPSEN_SEED=$seed WHARF_JEPSEN_STEPS=$steps runs it again)"
    exit 1
  fi
  echo "$(grep 'jepsen result' "$log" | sed 's/^jepsen result: //') [$(( $(date +%s) - started )) s]"
done
