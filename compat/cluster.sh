#!/usr/bin/env bash
# Runs pika against a three-node Wharf cluster on loopback (compat/python/test_pika_cluster.py): a
# classic queue used through the nodes it does not live on; then
# a quorum queue, publishers with confirms connected to the leader and to a follower, the leader
# SIGKILLed while they are connected. Installs pika itself.
set -euo pipefail
wharf_bin=$(realpath "${1:?usage: compat/cluster.sh PATH_TO_WHARF_BINARY}")
cd "$(dirname "$0")"
python3 -m pip install --quiet --disable-pip-version-check pika==1.3.2 2>/dev/null \
  || python3 -m pip install --quiet --disable-pip-version-check pika

# Nine distinct free ports: AMQP, HTTP and cluster link for each node.
ports=$(python3 ../scripts/free_ports.py 9)
read -r -a port <<<"$ports"
data_dir=$(mktemp -d "${TMPDIR:-/tmp}/wharf-cluster-compat.XXXXXX")
members=""
for node in 1 2 3; do members="$members --cluster-node $node=127.0.0.1:${port[$(( (node - 1) * 3 + 2 ))]}"; done
pids=()
for node in 1 2 3; do
  base=$(( (node - 1) * 3 ))
  # shellcheck disable=SC2086 # members is a list of arguments
  "$wharf_bin" serve --amqp-listen "127.0.0.1:${port[base]}" --http-listen "127.0.0.1:${port[base + 1]}" \
    --mqtt-listen none --data-dir "$data_dir/node-$node" --log info --node-id "$node" \
    --cluster-listen "127.0.0.1:${port[base + 2]}" $members 2>"$data_dir/node-$node.log" &
  pids+=($!)
done
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
  rm -rf "$data_dir"
}
trap cleanup EXIT
for node in 1 2 3; do
  for _ in $(seq 1 600); do
    grep -q "accepting AMQP connections" "$data_dir/node-$node.log" && break
    kill -0 "${pids[node - 1]}" 2>/dev/null || { cat "$data_dir/node-$node.log"; echo "wharf node $node exited"; exit 1; }
    sleep 0.1
  done
done
arguments=()
for node in 1 2 3; do
  base=$(( (node - 1) * 3 ))
  arguments+=("${port[base]},${port[base + 1]},${pids[node - 1]}")
done
if ! python3 python/test_pika_cluster.py "${arguments[@]}"; then
  for node in 1 2 3; do echo "--- node $node"; tail -40 "$data_dir/node-$node.log"; done
  exit 1
fi
