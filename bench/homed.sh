#!/usr/bin/env bash
# A classic queue on a three-node Wharf cluster, reached through its home and through the other
# nodes (issue #19): three release nodes on loopback; queues `local` and `remote` declared on
# node 1 (their home); 4 producers with confirms publish to `local` through node 1 and to
# `remote` through node 2 for DURATION_S (5); one consumer drains `local` through node 1 and
# `remote` through node 3. Prints wharf-bench's JSON result of each phase.
# Usage: cargo build --release -p wharf -p wharf-bench && bench/homed.sh
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir=${CARGO_TARGET_DIR:-target}
bin="$target_dir/release/wharf"
bench="$target_dir/release/wharf-bench"
duration=${DURATION_S:-5}
dir=$(mktemp -d "${TMPDIR:-/tmp}/wharf-homed-bench.XXXXXX")
ports=$(python3 scripts/free_ports.py 9)
read -r -a port <<<"$ports"
members=""
for node in 1 2 3; do members="$members --cluster-node $node=127.0.0.1:${port[$(( (node - 1) * 3 + 2 ))]}"; done
pids=()
cleanup() {
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
for node in 1 2 3; do
  base=$(( (node - 1) * 3 ))
  # shellcheck disable=SC2086 # members is a list of arguments
  "$bin" serve --amqp-listen "127.0.0.1:${port[base]}" --http-listen "127.0.0.1:${port[base + 1]}" \
    --mqtt-listen none --data-dir "$dir/node-$node" --node-id "$node" \
    --cluster-listen "127.0.0.1:${port[base + 2]}" $members 2>"$dir/node-$node.log" &
  pids+=($!)
done
for node in 1 2 3; do
  for _ in $(seq 1 600); do grep -q "accepting AMQP" "$dir/node-$node.log" && break; sleep 0.1; done
done
url() { echo "amqp://guest:guest@127.0.0.1:${port[$(( ($1 - 1) * 3 ))]}/%2f"; }
for name in local remote; do
  "$bench" --url "$(url 1)" --phase declare --queues 1 --queue-type classic --name "$name" >/dev/null
done
# The declarations reach nodes 2 and 3 through the metadata group: wait until both have them.
for node in 2 3; do
  for _ in $(seq 1 100); do
    curl -sf -u guest:guest "http://127.0.0.1:${port[$(( (node - 1) * 3 + 1 ))]}/api/queues/%2F/remote.q" >/dev/null && break
    sleep 0.1
  done
done
confirmed() { python3 -c 'import json,sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])["confirmed"])'; }
echo "== publish through node 1 (the home), 4 producers, $duration s"
local_out=$("$bench" --url "$(url 1)" --phase publish --producers 4 --duration-s "$duration" --name local 2>/dev/null)
echo "$local_out" | tail -1
echo "== publish through node 2, 4 producers, $duration s"
remote_out=$("$bench" --url "$(url 2)" --phase publish --producers 4 --duration-s "$duration" --name remote 2>/dev/null)
echo "$remote_out" | tail -1
echo "== drain through node 1 (the home), one consumer"
"$bench" --url "$(url 1)" --phase drain --expect "$(echo "$local_out" | confirmed)" --name local 2>/dev/null | tail -1
echo "== drain through node 3, one consumer"
"$bench" --url "$(url 3)" --phase drain --expect "$(echo "$remote_out" | confirmed)" --name remote 2>/dev/null | tail -1
