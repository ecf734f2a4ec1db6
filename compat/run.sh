#!/usr/bin/env bash
# Runs the stock-client compatibility suites (pika, amqplib) against the built `wharf` binary on a
# free loopback port with a fresh data directory. Installs the clients itself.
set -euo pipefail
wharf_bin=$(realpath "${1:?usage: compat/run.sh PATH_TO_WHARF_BINARY}")
cd "$(dirname "$0")"

python3 -m pip install --quiet --disable-pip-version-check pika==1.3.2 2>/dev/null \
  || python3 -m pip install --quiet --disable-pip-version-check pika
(cd node && npm install --no-audit --no-fund --loglevel=error >/dev/null)

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
data_dir=$(mktemp -d "${TMPDIR:-/tmp}/wharf-compat.XXXXXX")
log="$data_dir/wharf.log"
"$wharf_bin" serve --amqp-listen "127.0.0.1:$port" --data-dir "$data_dir/data" --log info 2>"$log" &
wharf_pid=$!
cleanup() { kill "$wharf_pid" 2>/dev/null || true; wait "$wharf_pid" 2>/dev/null || true; rm -rf "$data_dir"; }
trap cleanup EXIT

# Wait for the broker's "accepting" log line (bounded, so a broken build fails instead of hanging).
for _ in $(seq 1 600); do
  grep -q "accepting AMQP connections" "$log" && break
  kill -0 "$wharf_pid" 2>/dev/null || { cat "$log"; echo "wharf exited"; exit 1; }
  sleep 0.1
done
grep -q "accepting AMQP connections" "$log" || { cat "$log"; echo "wharf did not start"; exit 1; }

python3 python/test_pika.py "$port"
node node/test_amqplib.js "$port"
