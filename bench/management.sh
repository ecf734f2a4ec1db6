#!/usr/bin/env bash
# How the management API answers with many queues: declares QUEUES durable queues (10,000 by
# default) through the API itself, then times paginated listings (the first page, a page sorted
# by depth, a name filter, a regular expression), /api/overview and /metrics, ROUNDS times each,
# and prints each one's median and worst time in milliseconds, as JSON lines. Uses the release
# binary (built if missing) on free loopback ports and a temporary data directory.
#
# Usage: bench/management.sh   (QUEUES=10000 ROUNDS=20)
set -euo pipefail
cd "$(dirname "$0")/.."
queues=${QUEUES:-10000}
rounds=${ROUNDS:-20}
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release -p wharf --locked >/dev/null 2>&1 || cargo build --release -p wharf --locked
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }
port=$(free_port)
http_port=$(free_port)
# Two free ports asked one after the other can be the same one (the first was released).
while [ "$http_port" = "$port" ]; do http_port=$(free_port); done
work=$(mktemp -d "${TMPDIR:-/tmp}/wharf-management-bench.XXXXXX")
"$target_dir/release/wharf" serve --amqp-listen "127.0.0.1:$port" --http-listen "127.0.0.1:$http_port" \
  --data-dir "$work/data" --log warn 2>"$work/wharf.log" &
wharf_pid=$!
trap 'kill $wharf_pid 2>/dev/null; wait $wharf_pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 300); do
  python3 -c "import socket; socket.create_connection(('127.0.0.1', $http_port), 1).close()" 2>/dev/null && break
  sleep 0.1
done

python3 - "$http_port" "$queues" "$rounds" <<'PY'
import base64, http.client, json, statistics, sys, time
port, queues, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
auth = "Basic " + base64.b64encode(b"guest:guest").decode()
connection = http.client.HTTPConnection("127.0.0.1", port)
def call(method, path, body=None):
    headers = {"Authorization": auth}
    if body is not None:
        headers["Content-Type"] = "application/json"
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    data = response.read()
    if response.status >= 300:
        raise SystemExit(f"{method} {path}: {response.status} {data[:200]!r}")
    return data
started = time.perf_counter()
for index in range(queues):
    call("PUT", f"/api/queues/%2F/bench.q{index:05d}", json.dumps({"durable": True}))
declare_s = time.perf_counter() - started
print(json.dumps({"what": "declare via PUT", "queues": queues, "per_queue_ms": round(declare_s * 1000 / queues, 3)}))
for name, path in [
    ("first page of 100", "/api/queues?page=1&page_size=100"),
    ("page 50, sorted by messages", "/api/queues?page=50&page_size=100&sort=messages&sort_reverse=true"),
    ("name filter", "/api/queues?page=1&page_size=100&name=q099"),
    ("regex filter", "/api/queues?page=1&page_size=100&name=%5Ebench%5C.q0.*5%24&use_regex=true"),
    ("rabbitmqadmin list queues (every queue, 2 columns)", "/api/queues?columns=name,messages"),
    ("overview", "/api/overview"),
    ("metrics (aggregated)", "/metrics"),
    ("metrics per object", "/metrics/per-object"),
]:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        call("GET", path)
        times.append((time.perf_counter() - started) * 1000)
    print(json.dumps({"what": name, "queues": queues, "median_ms": round(statistics.median(times), 1), "max_ms": round(max(times), 1)}))
PY
