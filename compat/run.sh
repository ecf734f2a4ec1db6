#!/usr/bin/env bash
# Runs the stock-client compatibility suites (pika, amqplib) against the built `wharf` binary on a
# free loopback port, and pika against its TLS listener (mutual TLS) on another, with a fresh data
# directory, and pika against a second broker with a 1 MB memory watermark (the memory alarm).
# Installs the clients itself.
set -euo pipefail
wharf_bin=$(realpath "${1:?usage: compat/run.sh PATH_TO_WHARF_BINARY}")
cd "$(dirname "$0")"

python3 -m pip install --quiet --disable-pip-version-check pika==1.3.2 2>/dev/null \
  || python3 -m pip install --quiet --disable-pip-version-check pika
(cd node && npm install --no-audit --no-fund --loglevel=error >/dev/null)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }
port=$(free_port)
tls_port=$(free_port)
# Two free ports asked one after the other can be the same one (the first was released).
while [ "$tls_port" = "$port" ]; do tls_port=$(free_port); done
data_dir=$(mktemp -d "${TMPDIR:-/tmp}/wharf-compat.XXXXXX")
log="$data_dir/wharf.log"

# Certificates for the TLS listener: a CA, a server certificate for 127.0.0.1, a client
# certificate for guest (CN=guest, for SASL EXTERNAL).
certs="$data_dir/certs"
./make_certs.sh "$certs"

"$wharf_bin" serve --http-listen 127.0.0.1:0 --mqtt-listen none --amqp-listen "127.0.0.1:$port" --data-dir "$data_dir/data" --log info \
  --amqps-listen "127.0.0.1:$tls_port" --tls-cert "$certs/server.pem" --tls-key "$certs/server.key" \
  --tls-ca-cert "$certs/ca.pem" --tls-verify-peer 2>"$log" &
wharf_pid=$!
# A second broker with a 1 MB memory watermark, for the alarm test.
alarm_port=$(free_port)
while [ "$alarm_port" = "$port" ] || [ "$alarm_port" = "$tls_port" ]; do alarm_port=$(free_port); done
alarm_log="$data_dir/wharf-alarm.log"
"$wharf_bin" serve --http-listen 127.0.0.1:0 --mqtt-listen none --amqp-listen "127.0.0.1:$alarm_port" --data-dir "$data_dir/alarm-data" --log info \
  --memory-high-watermark-bytes 1000000 2>"$alarm_log" &
alarm_pid=$!
cleanup() {
  kill "$wharf_pid" "$alarm_pid" 2>/dev/null || true
  wait "$wharf_pid" "$alarm_pid" 2>/dev/null || true
  rm -rf "$data_dir"
}
trap cleanup EXIT

# Wait for each broker's "accepting" log line (bounded, so a broken build fails instead of hanging).
wait_ready() { # log, pid
  for _ in $(seq 1 600); do
    grep -q "accepting AMQP connections" "$1" && return 0
    kill -0 "$2" 2>/dev/null || { cat "$1"; echo "wharf exited"; exit 1; }
    sleep 0.1
  done
  cat "$1"; echo "wharf did not start"; exit 1
}
wait_ready "$log" "$wharf_pid"
wait_ready "$alarm_log" "$alarm_pid"

python3 python/test_pika.py "$port"
python3 python/test_pika_tls.py "$tls_port" "$certs"
node node/test_amqplib.js "$port"
python3 python/test_pika_alarm.py "$alarm_port"
