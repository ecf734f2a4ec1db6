#!/usr/bin/env bash
# MQTT side by side on this machine: Wharf, RabbitMQ's MQTT plugin (Debian's rabbitmq-server,
# rabbitmq_mqtt) and Mosquitto (Debian's mosquitto, persistence on), each measured by
# wharf-mqtt-bench (MQTT 3.1.1) in the same run:
#
#   M1  QoS 1 throughput: P publishers (window W awaiting PUBACK each), 1 KiB payloads, one
#       subscriber with a persistent session on bench/# acknowledging every delivery
#   M2  publish-to-deliver latency at a fixed rate (QoS 1): p50, p99, p99.9
#   M3  idle devices: IDLE_DEVICES connections, each a persistent session subscribed to its own
#       topic; broker RSS before and after, per device
#
# What "persistent" means differs: Wharf acknowledges a QoS 1 publish after fdatasync; RabbitMQ
# 3.10's MQTT plugin stores QoS 1 messages as persistent in a durable classic queue (its publisher
# confirm, which the PUBACK waits for, follows its own fsync batching); Mosquitto keeps messages
# in memory and writes its persistence file every `autosave_interval` (here 1 s), with no fsync
# per message. The table says so beside the numbers.
#
# Settings (environment): ROUNDS (3), DURATION_S (10), PUBLISHERS (4), WINDOW (100), RATE (1000),
# IDLE_DEVICES (10000), TARGETS ("wharf rabbitmq mosquitto"), SCENARIOS (which of M1 M2 M3 to run;
# default all three; other names are ignored), OUT (results file).
# Usage: bench/mqtt.sh   (installs rabbitmq-server and mosquitto with apt-get if missing; as root)
# bench/compare.sh runs this script for its scenarios M1-M3 (SCENARIOS="M1 M2 M3" bench/compare.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DURATION_S=${DURATION_S:-10}
PUBLISHERS=${PUBLISHERS:-4}
WINDOW=${WINDOW:-100}
RATE=${RATE:-1000}
IDLE_DEVICES=${IDLE_DEVICES:-10000}
TARGETS=${TARGETS:-"wharf rabbitmq mosquitto"}
SCENARIOS=${SCENARIOS:-"M1 M2 M3"}
asked() { echo "$SCENARIOS" | grep -qw "$1"; }
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

install() { # command package
  command -v "$1" >/dev/null && return 0
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$2" >/dev/null 2>&1 \
    || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$2" >/dev/null; }
}
case " $TARGETS " in *" rabbitmq "*) [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || install rabbitmq-server rabbitmq-server ;; esac
case " $TARGETS " in *" mosquitto "*) install mosquitto mosquitto ;; esac
cargo build --release --locked -p wharf -p wharf-bench
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
wharf="$target_dir/release/wharf"
bench="$target_dir/release/wharf-mqtt-bench"
work=$(mktemp -d "${TMPDIR:-/tmp}/wharf-mqtt-bench.XXXXXX")
results="${OUT:-$work/results.jsonl}"
: >"$results"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }
wait_port() {
  for _ in $(seq 1 1200); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $1), 0.2).close()" 2>/dev/null && return 0
    sleep 0.05
  done
  echo "nothing listens on port $1" >&2
  return 1
}
rss_mib() { python3 bench/proctree.py "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["rss_mib"])'; }

broker_pid=
start() { # target dir -> sets broker_pid, port
  local target=$1 dir=$2
  port=$(free_port)
  mkdir -p "$dir"
  case $target in
    wharf)
      "$wharf" serve --http-listen none --amqp-listen "127.0.0.1:$(free_port)" --mqtt-listen "127.0.0.1:$port" \
        --data-dir "$dir/data" --connections-max 20000 --log warn 2>>"$work/wharf.log" &
      broker_pid=$! ;;
    rabbitmq)
      local amqp dist
      amqp=$(free_port); dist=$(free_port)
      printf 'listeners.tcp.default = 127.0.0.1:%s\nloopback_users = none\nmqtt.listeners.tcp.default = 127.0.0.1:%s\nmqtt.allow_anonymous = false\n' "$amqp" "$port" >"$dir/rabbitmq.conf"
      echo "[rabbitmq_mqtt]." >"$dir/enabled_plugins"
      HOME="$dir" RABBITMQ_NODENAME="wharfmqtt@localhost" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT="$amqp" RABBITMQ_DIST_PORT="$dist" RABBITMQ_MNESIA_BASE="$dir/mnesia" \
        RABBITMQ_LOG_BASE="$dir/log" RABBITMQ_CONFIG_FILE="$dir/rabbitmq" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" RABBITMQ_PID_FILE="$dir/pid" \
        /usr/lib/rabbitmq/bin/rabbitmq-server >>"$dir/out.log" 2>&1 &
      broker_pid=$! ;;
    mosquitto)
      mosquitto_passwd -c -b "$dir/passwords" guest guest
      printf 'user root\nlistener %s 127.0.0.1\nallow_anonymous false\npassword_file %s/passwords\npersistence true\npersistence_location %s/\nautosave_interval 1\nmax_queued_messages 0\nmax_inflight_messages 0\n' \
        "$port" "$dir" "$dir" >"$dir/mosquitto.conf"
      mosquitto -c "$dir/mosquitto.conf" >>"$dir/out.log" 2>&1 &
      broker_pid=$! ;;
  esac
  wait_port "$port"
}
stop() {
  [ -z "$broker_pid" ] && return 0
  pkill -TERM -P "$broker_pid" 2>/dev/null || true
  kill -TERM "$broker_pid" 2>/dev/null || true
  wait "$broker_pid" 2>/dev/null || true
  broker_pid=
}
trap stop EXIT

for round in $(seq 1 "$ROUNDS"); do
  for target in $TARGETS; do
    if asked M1; then
      start "$target" "$work/$target-$round-m1"
      "$bench" --broker "127.0.0.1:$port" --mode throughput --publishers "$PUBLISHERS" --window "$WINDOW" \
        --duration-s "$DURATION_S" --label "$target M1 round $round" | tee -a "$results"
      stop
    fi
    if asked M2; then
      start "$target" "$work/$target-$round-m2"
      "$bench" --broker "127.0.0.1:$port" --mode latency --rate "$RATE" --duration-s "$DURATION_S" \
        --label "$target M2 round $round" | tee -a "$results"
      stop
    fi
    if asked M3; then
      start "$target" "$work/$target-$round-m3"
      before=$(rss_mib "$broker_pid")
      "$bench" --broker "127.0.0.1:$port" --mode idle --connections "$IDLE_DEVICES" --duration-s 20 \
        --label "$target M3 round $round" >"$work/idle.json" &
      bench_pid=$!
      # Read once every device is connected (the line is printed then), while they are held.
      for _ in $(seq 1 1200); do [ -s "$work/idle.json" ] && break; sleep 0.1; done
      sleep 2
      after=$(rss_mib "$broker_pid")
      wait "$bench_pid"
      python3 -c "
import json,sys
line = json.load(open('$work/idle.json'))
line['rss_before_mib'] = $before; line['rss_after_mib'] = $after
line['kib_per_device'] = round(($after - $before) * 1024 / max(line['connections'], 1), 1)
print(json.dumps(line))" | tee -a "$results"
      stop
    fi
  done
done
echo "results: $results"
