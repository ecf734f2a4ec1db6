#!/usr/bin/env bash
# A quick run of the broker benchmark against a release build of Wharf on a free loopback port,
# so the load generator cannot rot (CI runs it). Numbers from it are not measurements.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p wharf -p wharf-bench
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
data_dir=$(mktemp -d "${TMPDIR:-/tmp}/wharf-bench.XXXXXX")
"$target_dir/release/wharf" serve --http-listen 127.0.0.1:0 --amqp-listen "127.0.0.1:$port" --data-dir "$data_dir/data" --log warn 2>"$data_dir/log" &
wharf_pid=$!
cleanup() { kill "$wharf_pid" 2>/dev/null || true; wait "$wharf_pid" 2>/dev/null || true; rm -rf "$data_dir"; }
trap cleanup EXIT
for _ in $(seq 1 600); do
  python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2).close()" 2>/dev/null && break
  kill -0 "$wharf_pid" 2>/dev/null || { cat "$data_dir/log"; echo "wharf exited"; exit 1; }
  sleep 0.1
done
url="amqp://guest:guest@127.0.0.1:$port/%2f"
"$target_dir/release/wharf-bench" --url "$url" --quick
"$target_dir/release/wharf-bench" --url "$url" --quick --producers 2 --consumers 2 --fanout 3 --name fanout
# Acks with `multiple` every 10th message, and a fixed rate (S4's mode): both pipelined paths.
"$target_dir/release/wharf-bench" --url "$url" --quick --ack-every 10 --name batched
"$target_dir/release/wharf-bench" --url "$url" --quick --rate 500 --name fixed-rate
# S5's phases: a backlog published with no consumer, then drained (fails unless all arrive).
"$target_dir/release/wharf-bench" --url "$url" --name backlog --phase publish --producers 2 --messages 2000
"$target_dir/release/wharf-bench" --url "$url" --name backlog --phase drain --expect 4000
