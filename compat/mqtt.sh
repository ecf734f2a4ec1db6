#!/usr/bin/env bash
# Third-party MQTT clients against the built `wharf` binary (compat/python/test_mqtt.py):
# paho-mqtt over 3.1.1 and 5.0, Debian's mosquitto_pub and mosquitto_sub, pika for the AMQP
# side. Persistent sessions are checked across a `kill -9` of the broker, which this script does
# when the test asks (it creates CONTROL/restart; this answers with CONTROL/restarted).
# Installs the clients itself.
set -euo pipefail
wharf_bin=$(realpath "${1:?usage: compat/mqtt.sh PATH_TO_WHARF_BINARY}")
cd "$(dirname "$0")"

python3 -m pip install --quiet --disable-pip-version-check paho-mqtt==2.1.0 pika==1.3.2 2>/dev/null \
  || python3 -m pip install --quiet --disable-pip-version-check paho-mqtt pika
if ! command -v mosquitto_pub >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mosquitto-clients >/dev/null 2>&1 \
    || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mosquitto-clients >/dev/null; }
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }
amqp_port=$(free_port)
mqtt_port=$(free_port)
while [ "$mqtt_port" = "$amqp_port" ]; do mqtt_port=$(free_port); done
work=$(mktemp -d "${TMPDIR:-/tmp}/wharf-mqtt.XXXXXX")
mkdir "$work/control"
log="$work/wharf.log"
wharf_pid=
start_broker() {
  "$wharf_bin" serve --http-listen none --amqp-listen "127.0.0.1:$amqp_port" --mqtt-listen "127.0.0.1:$mqtt_port" \
    --data-dir "$work/data" --log info 2>>"$log" &
  wharf_pid=$!
  local lines_before=$1
  for _ in $(seq 1 600); do
    tail -n +"$((lines_before + 1))" "$log" | grep -q "accepting MQTT connections" && return 0
    kill -0 "$wharf_pid" 2>/dev/null || { cat "$log"; echo "wharf exited"; exit 1; }
    sleep 0.1
  done
  cat "$log"; echo "wharf did not start"; exit 1
}
watcher_pid=
cleanup() {
  [ -n "$watcher_pid" ] && kill "$watcher_pid" 2>/dev/null || true
  kill "$wharf_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
touch "$log"
start_broker 0

python3 python/test_mqtt.py "$mqtt_port" "$amqp_port" "$work/control" &
test_pid=$!
# Restarts the broker with kill -9 whenever the test asks, until the test ends.
while kill -0 "$test_pid" 2>/dev/null; do
  if [ -e "$work/control/restart" ]; then
    rm "$work/control/restart"
    kill -9 "$wharf_pid"
    wait "$wharf_pid" 2>/dev/null || true
    start_broker "$(wc -l < "$log")"
    touch "$work/control/restarted"
  fi
  sleep 0.1
done
if ! wait "$test_pid"; then
  tail -n 50 "$log"
  exit 1
fi
