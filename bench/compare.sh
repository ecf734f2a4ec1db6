#!/usr/bin/env bash
# Wharf and RabbitMQ (Debian's rabbitmq-server) side by side on this machine: the scenarios of the
# performance issue, every round running each scenario against Wharf, a RabbitMQ classic queue and a
# RabbitMQ quorum queue in turn (so the machine's drift hits all alike), sampling each broker's CPU
# time and RSS; then a table of medians with Wharf's ratios (bench/summarize.py).
#
#   S1  1 producer, 1 consumer, persistent 1 KiB, confirm window 1000, prefetch 1000, durable queue
#   S2  the same with 4 producers and 4 consumers
#   S3  fan-out: 1 producer -> a topic exchange -> 3 durable queues, a consumer each
#   S4  a fixed 2,000 msgs/s: latency percentiles
#   S5  backlog: publish S5_MESSAGES persistent messages with no consumer, RSS, restart the broker,
#       time until the queue serves again, drain it
#   S3x30  S3 with 30 queues
#   S6  many queues: 1,000 durable queues, 100 producers (each publishing to the queues in turn)
#       and 100 consumers (10 queues each, a channel per queue), persistent 1 KiB, confirms, acks
#   S7  idle scale (Wharf and RabbitMQ classic; 10,000 quorum queues on one node are not a
#       configuration anyone runs): S7_QUEUES durable queues declared, then S7_QUEUES
#       connections, each with a channel and a consumer on its own queue; broker RSS per idle
#       queue and per idle connection, the time to open them all, and the time until the broker
#       serves the last queue again after a restart with one message in every queue
#   S8  large messages: 1 producer, 1 consumer, persistent 1 MiB bodies, confirm window and
#       prefetch 16; msgs/s and MB/s (compare with the store bench's synced_seq_mb_per_s)
#   F1  failover (targets quorum3, wharf3): a publisher on a node that is not the leader publishes
#       to a quorum queue, each message confirmed before the next; the leader's node is killed
#       with SIGKILL after 3 s; the figure is the time from the kill to the first confirm after it
#   M1-M3  MQTT, run by bench/mqtt.sh (see its header) after the other scenarios' rounds, in
#       rounds of its own, against Wharf, RabbitMQ's MQTT plugin and Mosquitto (MQTT_TARGETS):
#   M1  QoS 1 throughput with persistence (PUBLISHERS publishers, WINDOW unacknowledged each)
#   M2  publish-to-deliver latency at a fixed RATE (QoS 1): p50, p99, p99.9
#   M3  memory per idle device: IDLE_DEVICES persistent sessions, each subscribed
#   Only run when SCENARIOS names them, e.g. SCENARIOS="M1 M2 M3" bench/compare.sh.
#
# Settings (environment): ROUNDS (3), DURATION_S (10, per S1-S4 run), F1_DURATION_S (20: the
# failover publisher's run; the kill comes 3 s in), S5_MESSAGES (1000000),
# S7_QUEUES (10000), S7_CONNECTIONS (as many as queues, each consuming from one), SCENARIOS ("S1 S2 S3 S4 S5"; every scenario: "S1 S2 S3 S3x30 S4 S5 S6 S7
# S8 M1 M2 M3"), OUT (results file; default in a temporary directory; M1-M3 write theirs beside it,
# "-mqtt" before ".jsonl"), MQTT_TARGETS (M1-M3's brokers, instead of TARGETS: "wharf rabbitmq
# mosquitto"), PUBLISHERS (4), WINDOW (100), RATE (1000), IDLE_DEVICES (10000) (bench/mqtt.sh's,
# for M1-M3; ROUNDS and DURATION_S apply to them too),
# TARGETS ("wharf classic quorum"; add "baseline" to compare with another Wharf build, and
# "quorum3" for quorum queues on a three-node RabbitMQ cluster on loopback, replicated to all
# three: the replicated baseline of issue #19; its CPU per message is the three nodes' sum),
# "wharf3" for quorum queues on a three-node Wharf cluster on loopback (the same, for Wharf),
# WHARF_BASELINE (the other build's `wharf` binary, for the "baseline" target: a before/after
# pair measured in one run, e.g. TARGETS="wharf baseline" SCENARIOS="S1 S4"),
# WHARF_ARGS (extra `wharf serve` arguments for the "wharf" target, e.g. "--config FILE"),
# WHARF3_ARGS (the same for each node of the "wharf3" target, e.g.
# "--quorum-snapshot-entries 100000"),
# WHARF_HTTP_LISTEN (where the "wharf" target serves its management API; a free port by
# default), and
# WHARF_CREDENTIALS (user:password the benchmark logs in to it with; default guest:guest).
# bench/authorization.toml is a user with scoped permissions: measure S1 with authorization on by
#   WHARF_ARGS="--config bench/authorization.toml" WHARF_CREDENTIALS=bench:bench
# Usage: bench/compare.sh   (installs rabbitmq-server with apt-get if it is missing and a RabbitMQ
# target is asked for, and for M1-M3 bench/mqtt.sh installs mosquitto; run as root)
#        SCENARIOS="M1 M2 M3" bench/compare.sh   (the MQTT comparison only; not run by default)
set -euo pipefail
cd "$(dirname "$0")/.."
# S7 holds S7_CONNECTIONS connections and S7_QUEUES queues: a broker needs a descriptor for each
# connection and, in Wharf, one for each queue's open segment. Raised as far as allowed, for both
# brokers alike (a container may cap the hard limit: then S7_CONNECTIONS has to leave room).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
ROUNDS=${ROUNDS:-3}
DURATION_S=${DURATION_S:-10}
S5_MESSAGES=${S5_MESSAGES:-1000000}
S7_QUEUES=${S7_QUEUES:-10000}
S7_CONNECTIONS=${S7_CONNECTIONS:-$S7_QUEUES}
F1_DURATION_S=${F1_DURATION_S:-20}
declare -a rabbit3_urls
declare -a wharf3_urls wharf3_http wharf3_node_pids
SCENARIOS=${SCENARIOS:-"S1 S2 S3 S4 S5"}
TARGETS=${TARGETS:-"wharf classic quorum"}
MQTT_TARGETS=${MQTT_TARGETS:-"wharf rabbitmq mosquitto"}
wants() { echo "$TARGETS" | grep -qw "$1"; }
wants_rabbit() { wants classic || wants quorum; }
if wants baseline && [ ! -x "${WHARF_BASELINE:-}" ]; then
  echo "TARGETS names baseline: set WHARF_BASELINE to the other build's wharf binary" >&2
  exit 2
fi
if wants baseline && echo "$SCENARIOS" | grep -qw S7; then
  echo "the baseline target runs every scenario but S7" >&2
  exit 2
fi

rabbit_server=/usr/lib/rabbitmq/bin/rabbitmq-server
rabbitmqctl=/usr/lib/rabbitmq/bin/rabbitmqctl
if { wants_rabbit || wants quorum3; } && [ ! -x "$rabbit_server" ]; then
  echo "installing rabbitmq-server from Debian" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y rabbitmq-server >/dev/null \
    || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y rabbitmq-server >/dev/null; }
fi
cargo build --release --locked -p wharf -p wharf-bench
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
wharf="$target_dir/release/wharf"
bench="$target_dir/release/wharf-bench"
work=$(mktemp -d "${TMPDIR:-/tmp}/wharf-compare.XXXXXX")
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
# sample "PID..." -> the CPU time and RSS of those processes and their descendants, summed
# shellcheck disable=SC2086 # a list of pids
sample() { python3 bench/proctree.py $1; }

# spawn_wharf DIR PORT [BINARY] -> sets wharf_pid, wharf_url, wharf_port; does not wait for it to
# listen. BINARY is this build's wharf unless given (S5 runs the baseline build through it too).
spawn_wharf() {
  # S7 opens S7_QUEUES connections besides its own: Wharf's default limit is 10,000.
  # shellcheck disable=SC2086 # WHARF_ARGS is a list of arguments
  "${3:-$wharf}" serve --http-listen "${WHARF_HTTP_LISTEN:-127.0.0.1:0}" --mqtt-listen none --amqp-listen "127.0.0.1:$2" --data-dir "$1" --log warn \
    --connections-max $((S7_QUEUES + 1000)) ${WHARF_ARGS:-} 2>>"$work/wharf.log" &
  wharf_pid=$!
  wharf_url="amqp://${WHARF_CREDENTIALS:-guest:guest}@127.0.0.1:$2/%2f"
  wharf_port=$2
}
# start_wharf DIR -> a fresh Wharf on a free port, listening when this returns
start_wharf() { spawn_wharf "$1" "$(free_port)" "${2:-}"; wait_port "$wharf_port"; }
stop_wharf() { kill -TERM "$wharf_pid" 2>/dev/null || true; wait "$wharf_pid" 2>/dev/null || true; }

# start_baseline DIR -> sets baseline_pid, baseline_url (the other Wharf build)
start_baseline() {
  local port
  port=$(free_port)
  "$WHARF_BASELINE" serve --amqp-listen "127.0.0.1:$port" --data-dir "$1" --log warn 2>>"$work/baseline.log" &
  baseline_pid=$!
  baseline_url="amqp://guest:guest@127.0.0.1:$port/%2f"
  wait_port "$port"
}
stop_baseline() { kill -TERM "$baseline_pid" 2>/dev/null || true; wait "$baseline_pid" 2>/dev/null || true; }

# launch_rabbit DIR PORT [NODENAME COOKIE] -> sets rabbit_pid, rabbit_url (a fresh node unless
# DIR holds one); does not wait for it to listen. Nodes of one cluster share COOKIE.
launch_rabbit() {
  local dir=$1 port=$2 nodename=${3:-wharfcompare@localhost} cookie=${4:-} dist
  dist=$(free_port)
  mkdir -p "$dir"
  printf 'listeners.tcp.default = 127.0.0.1:%s\nloopback_users = none\n' "$port" >"$dir/rabbitmq.conf"
  echo "[]." >"$dir/enabled_plugins"
  if [ -n "$cookie" ]; then
    rm -f "$dir/.erlang.cookie"
    printf '%s' "$cookie" >"$dir/.erlang.cookie"
    chmod 400 "$dir/.erlang.cookie"
  fi
  HOME="$dir" RABBITMQ_NODENAME="$nodename" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT="$port" RABBITMQ_DIST_PORT="$dist" RABBITMQ_MNESIA_BASE="$dir/mnesia" \
    RABBITMQ_LOG_BASE="$dir/log" RABBITMQ_CONFIG_FILE="$dir/rabbitmq" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" RABBITMQ_PID_FILE="$dir/pid" \
    "$rabbit_server" >>"$dir/out.log" 2>&1 &
  rabbit_pid=$!
  rabbit_port=$port
  rabbit_url="amqp://guest:guest@127.0.0.1:$port/%2f"
}
start_rabbit() { launch_rabbit "$1" "$(free_port)"; wait_port "$rabbit_port"; }
stop_rabbit() {
  pkill -TERM -P "$rabbit_pid" beam.smp 2>/dev/null || true
  wait "$rabbit_pid" 2>/dev/null || true
}
# start_rabbit_cluster DIR -> three RabbitMQ nodes on loopback joined in one cluster; sets
# rabbit3_pids (all three), rabbit3_url (node 1, where the benchmark declares its queues: their
# leaders are there, with replicas on the other two).
# start_wharf_cluster DIR -> three Wharf nodes on loopback, linked as a cluster; sets
# wharf3_pids, wharf3_url (node 1), listening and with the metadata group's leader known.
start_wharf_cluster() {
  local dir=$1 node members="" amqp http
  local -a cluster_ports amqp_ports http_ports
  for node in 1 2 3; do
    cluster_ports[node]=$(free_port)
    amqp_ports[node]=$(free_port)
    http_ports[node]=$(free_port)
    members="$members --cluster-node $node=127.0.0.1:${cluster_ports[node]}"
  done
  wharf3_pids=""
  wharf3_node_pids=()
  for node in 1 2 3; do
    # shellcheck disable=SC2086 # members is a list of arguments
    "$wharf" serve --http-listen "127.0.0.1:${http_ports[node]}" --mqtt-listen none \
      --amqp-listen "127.0.0.1:${amqp_ports[node]}" --data-dir "$dir/node-$node" --log warn \
      --node-id "$node" --cluster-listen "127.0.0.1:${cluster_ports[node]}" $members ${WHARF3_ARGS:-} \
      2>>"$work/wharf3.log" &
    wharf3_pids="$wharf3_pids $!"
    wharf3_node_pids[node]=$!
    wharf3_urls[node]="amqp://guest:guest@127.0.0.1:${amqp_ports[node]}/%2f"
    wharf3_http[node]="http://127.0.0.1:${http_ports[node]}"
  done
  for node in 1 2 3; do wait_port "${amqp_ports[node]}"; done
  wharf3_url="amqp://guest:guest@127.0.0.1:${amqp_ports[1]}/%2f"
  http="http://127.0.0.1:${http_ports[1]}"
  python3 - "$http" <<'PY'
import base64, json, sys, time, urllib.request
request = urllib.request.Request(sys.argv[1] + "/api/cluster/metadata")
request.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
while True:
    try:
        if json.load(urllib.request.urlopen(request, timeout=5)).get("leader"):
            break
    except OSError:
        pass
    time.sleep(0.2)
PY
}
stop_wharf_cluster() {
  local pid
  for pid in $wharf3_pids; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in $wharf3_pids; do wait "$pid" 2>/dev/null || true; done
}

start_rabbit_cluster() {
  local dir=$1 cookie node port single_pid=${rabbit_pid:-} single_url=${rabbit_url:-} single_port=${rabbit_port:-}
  cookie=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
  rabbit3_pids=""
  for node in 1 2 3; do
    port=$(free_port)
    launch_rabbit "$dir/node-$node" "$port" "wharfq3-$node@localhost" "$cookie"
    rabbit3_pids="$rabbit3_pids $rabbit_pid"
    rabbit3_urls[node]=$rabbit_url
    [ "$node" = 1 ] && rabbit3_url=$rabbit_url
    wait_port "$port"
  done
  for node in 2 3; do
    for step in stop_app "join_cluster wharfq3-1@localhost" start_app; do
      # shellcheck disable=SC2086 # the step is a command and its argument
      HOME="$dir/node-$node" "$rabbitmqctl" -n "wharfq3-$node@localhost" $step >>"$dir/cluster.log" 2>&1
    done
  done
  # All three must be running members, or the figures would not be a cluster's.
  local running
  running=$(HOME="$dir/node-1" "$rabbitmqctl" -n wharfq3-1@localhost eval 'length(rabbit_nodes:all_running()).' 2>>"$dir/cluster.log")
  if [ "$running" != 3 ]; then
    echo "the RabbitMQ cluster did not form ($running of 3 nodes running; $dir/cluster.log)" >&2
    exit 1
  fi
  # The single node of the classic and quorum targets, if it runs, is still the one they use.
  rabbit_pid=$single_pid rabbit_url=$single_url rabbit_port=$single_port
  [ -n "$rabbit_pid" ] || unset rabbit_pid
}
stop_rabbit_cluster() {
  local pid
  for pid in $rabbit3_pids; do
    pkill -TERM -P "$pid" beam.smp 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}
cleanup() {
  [ -n "${rabbit3_pids:-}" ] && stop_rabbit_cluster
  [ -n "${wharf_pid:-}" ] && stop_wharf
  [ -n "${baseline_pid:-}" ] && stop_baseline
  [ -n "${rabbit_pid:-}" ] && stop_rabbit
  return 0
}
trap cleanup EXIT

# record SCENARIO TARGET ROUND BENCH_JSON BEFORE_JSON AFTER_JSON: one result line.
record() {
  python3 - "$@" >>"$results" <<'PY'
import json, sys
scenario, target, round_, run, before, after = sys.argv[1:7]
run, before, after = json.loads(run), json.loads(before), json.loads(after)
messages = max(run.get("confirmed", 0), 1)
print(json.dumps({
    "scenario": scenario, "target": target, "round": int(round_),
    "msgs_per_s": run.get("msgs_per_s"), "e2e_msgs_per_s": run.get("e2e_msgs_per_s"), "missing": run.get("missing", 0),
    "e2e_p50_ms": run["end_to_end_us"]["p50"] / 1000, "e2e_p99_ms": run["end_to_end_us"]["p99"] / 1000,
    "confirm_p99_ms": run["confirm_us"]["p99"] / 1000,
    "cpu_us_per_msg": (after["cpu_s"] - before["cpu_s"]) * 1e6 / messages,
    "broker_cpu_s": after["cpu_s"] - before["cpu_s"], "rss_mib": after["rss_mib"],
    "mb_per_s": run.get("mb_per_s"),
}))
PY
}

scenario_args() {
  case $1 in
    S1) echo "--producers 1 --consumers 1 --duration-s $DURATION_S" ;;
    S2) echo "--producers 4 --consumers 4 --duration-s $DURATION_S" ;;
    S3) echo "--producers 1 --consumers 1 --fanout 3 --duration-s $DURATION_S" ;;
    S4) echo "--producers 1 --consumers 1 --rate 2000 --duration-s $DURATION_S" ;;
    S3x30) echo "--producers 1 --consumers 1 --fanout 30 --duration-s $DURATION_S" ;;
    S6) echo "--producers 100 --consumers 100 --queues 1000 --duration-s $DURATION_S" ;;
    S8) echo "--producers 1 --consumers 1 --size 1048576 --confirm-window 16 --prefetch 16 --duration-s $DURATION_S" ;;
  esac
}

run_one() { # SCENARIO TARGET ROUND URL PID
  local scenario=$1 target=$2 round=$3 url=$4 pid=$5 type_args="" before after run
  case $target in classic | quorum) type_args="--queue-type $target" ;; quorum3 | wharf3) type_args="--queue-type quorum" ;; esac
  before=$(sample "$pid")
  # shellcheck disable=SC2046
  run=$("$bench" --url "$url" --name "$scenario-$target-$round" $type_args $(scenario_args "$scenario") 2>>"$work/bench.log" | tail -1)
  after=$(sample "$pid")
  record "$scenario" "$target" "$round" "$run" "$before" "$after"
  echo "round $round $scenario $target: $(echo "$run" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["msgs_per_s"], "msgs/s, e2e p99", r["end_to_end_us"]["p99"]/1000, "ms")')" >&2
}

run_backlog() { # TARGET ROUND
  local target=$1 round=$2 dir="$work/s5-$1-$2" type_args="" url pid restart_ms first after publish drain binary=""
  local is_wharf=false
  case $target in wharf) is_wharf=true ;; baseline) is_wharf=true binary=$WHARF_BASELINE ;; *) type_args="--queue-type $target" ;; esac
  if $is_wharf; then start_wharf "$dir" "$binary"; url=$wharf_url; pid=$wharf_pid; else start_rabbit "$dir"; url=$rabbit_url; pid=$rabbit_pid; fi
  # shellcheck disable=SC2086
  publish=$("$bench" --url "$url" --name s5 --phase publish --producers 4 --messages $((S5_MESSAGES / 4)) \
    --duration-s 3600 $type_args 2>>"$work/bench.log" | tail -1)
  after=$(sample "$pid")
  # Restart over the same data and time how long until the queue serves a message again.
  if $is_wharf; then
    stop_wharf
    restart_ms=$(date +%s%3N)
    spawn_wharf "$dir" "$wharf_port" "$binary"
  else
    stop_rabbit
    restart_ms=$(date +%s%3N)
    launch_rabbit "$dir" "$rabbit_port"
  fi
  first=$("$bench" --url "$url" --name s5 --phase probe 2>>"$work/bench.log" | tail -1)
  drain=$("$bench" --url "$url" --name s5 --phase drain --expect "$S5_MESSAGES" --consumers 1 2>>"$work/bench.log" | tail -1)
  if $is_wharf; then stop_wharf; else stop_rabbit; fi
  python3 - "$target" "$round" "$publish" "$after" "$restart_ms" "$first" "$drain" >>"$results" <<'PY'
import json, sys
target, round_, publish, after, restart_ms, first, drain = sys.argv[1:8]
publish, after, first, drain = json.loads(publish), json.loads(after), json.loads(first), json.loads(drain)
print(json.dumps({
    "scenario": "S5", "target": target, "round": int(round_),
    "publish_msgs_per_s": publish["msgs_per_s"], "rss_mib": after["rss_mib"],
    "serving_after_s": (first["first_message_epoch_ms"] - int(restart_ms)) / 1000,
    "drain_msgs_per_s": drain["msgs_per_s"], "missing": drain["missing"],
}))
PY
  echo "round $round S5 $target: $(tail -1 "$results")" >&2
  rm -rf "$dir"
}

run_idle_scale() { # TARGET ROUND
  local target=$1 round=$2 dir="$work/s7-$1-$2" url pid rss0 declared rss1 idle_line rss2 restart_ms first
  if [ "$target" = wharf ]; then start_wharf "$dir"; url=$wharf_url; pid=$wharf_pid; else start_rabbit "$dir"; url=$rabbit_url; pid=$rabbit_pid; fi
  rss0=$(sample "$pid")
  declared=$("$bench" --url "$url" --name s7 --phase declare --queues "$S7_QUEUES" 2>>"$work/bench.log" | tail -1)
  rss1=$(sample "$pid")
  # The idle connections stay open until the bench is killed; its first line says they are.
  # exec: the coprocess is the bench itself, so killing it closes the connections.
  coproc IDLE { exec "$bench" --url "$url" --name s7 --phase idle --queues "$S7_CONNECTIONS" 2>>"$work/bench.log"; }
  local idle_pid=$IDLE_PID
  read -r idle_line <&"${IDLE[0]}"
  rss2=$(sample "$pid")
  kill "$idle_pid" 2>/dev/null || true
  wait "$idle_pid" 2>/dev/null || true
  "$bench" --url "$url" --name s7 --phase declare --queues "$S7_QUEUES" --fill --size 100 >/dev/null 2>>"$work/bench.log"
  if [ "$target" = wharf ]; then
    stop_wharf
    restart_ms=$(date +%s%3N)
    spawn_wharf "$dir" "$wharf_port"
  else
    stop_rabbit
    restart_ms=$(date +%s%3N)
    launch_rabbit "$dir" "$rabbit_port"
  fi
  first=$("$bench" --url "$url" --name s7 --phase probe --queues "$S7_QUEUES" 2>>"$work/bench.log" | tail -1)
  if [ "$target" = wharf ]; then stop_wharf; else stop_rabbit; fi
  python3 - "$target" "$round" "$S7_QUEUES" "$rss0" "$declared" "$rss1" "$idle_line" "$rss2" "$restart_ms" "$first" "$S7_CONNECTIONS" >>"$results" <<'PY'
import json, sys
target, round_, queues = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rss0, declared, rss1, idle, rss2 = (json.loads(arg) for arg in sys.argv[4:9])
restart_ms, first, connections = int(sys.argv[9]), json.loads(sys.argv[10]), int(sys.argv[11])
print(json.dumps({
    "scenario": "S7", "target": target, "round": round_, "queues": queues, "connections": connections,
    "rss_start_mib": rss0["rss_mib"], "rss_queues_mib": rss1["rss_mib"], "rss_connections_mib": rss2["rss_mib"],
    "kib_per_idle_queue": (rss1["rss_mib"] - rss0["rss_mib"]) * 1024 / queues,
    "kib_per_idle_connection": (rss2["rss_mib"] - rss1["rss_mib"]) * 1024 / connections,
    "declare_s": declared["declare_s"], "open_connections_s": idle["open_s"],
    "restart_serving_s": (first["first_message_epoch_ms"] - restart_ms) / 1000,
}))
PY
  echo "round $round S7 $target: $(tail -1 "$results")" >&2
  rm -rf "$dir"
}

# failover_result TARGET ROUND KILL_MS OUT: F1's line from the publisher's output.
failover_result() {
  python3 - "$1" "$2" "$3" "$4" >>"$results" <<'PY'
import json, sys
target, round_, kill_ms = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(sys.argv[4]) as output:
    run = json.loads(output.read().strip().splitlines()[-1])
# The first confirm after the kill (the publish in flight then waited for the new leader).
after = [time for time in run["confirm_epoch_ms"] if time > kill_ms]
before = [time for time in run["confirm_epoch_ms"] if time <= kill_ms]
print(json.dumps({
    "scenario": "F1", "target": target, "round": round_, "confirms": run["confirms"],
    "max_gap_ms": run["max_gap_ms"],
    "failover_s": (after[0] - kill_ms) / 1000 if after else None,
    "last_confirm_before_kill_ms_ago": kill_ms - before[-1] if before else None,
}))
PY
  echo "round $2 F1 $1: $(tail -1 "$results")" >&2
}

# run_failover ROUND: F1 on a fresh three-node RabbitMQ cluster.
run_failover() {
  local round=$1 name="F1-quorum3-$1" out="$work/f1-$1.json" kill_ms leader_pid beam_pid
  start_rabbit_cluster "$work/f1-cluster-$round"
  "$bench" --url "${rabbit3_urls[1]}" --phase declare --queues 1 --queue-type quorum --name "$name" >/dev/null 2>>"$work/bench.log"
  "$bench" --url "${rabbit3_urls[2]}" --phase failover --queues 1 --name "$name" --duration-s "$F1_DURATION_S" >"$out" 2>>"$work/bench.log" &
  local bench_pid=$!
  sleep 3
  leader_pid=$(echo "$rabbit3_pids" | awk '{print $1}')
  # The Erlang VM's pid is found before the clock is read, and the kill is bash's builtin right
  # after it, as for Wharf: with `pkill` after the clock, its own start and /proc scan came
  # between the two, and confirms of that time counted as "after the kill".
  beam_pid=$(pgrep -P "$leader_pid" beam.smp)
  kill_ms=$(( ${EPOCHREALTIME/./} / 1000 ))
  kill -KILL "$beam_pid"
  wait "$bench_pid"
  failover_result quorum3 "$round" "$kill_ms" "$out"
  stop_rabbit_cluster
  unset rabbit3_pids
  rm -rf "$work/f1-cluster-$round"
}

# run_failover_wharf ROUND: F1 on a fresh three-node Wharf cluster: the publisher on a node that
# is not the queue's leader, the leader's process SIGKILLed 3 s in.
run_failover_wharf() {
  local round=$1 name="F1-wharf3-$1" out="$work/f1-wharf3-$1.json" kill_ms leader publisher_node
  start_wharf_cluster "$work/f1-wharf3-$round"
  "$bench" --url "$wharf3_url" --phase declare --queues 1 --queue-type quorum --name "$name" >/dev/null 2>>"$work/bench.log"
  leader=$(python3 - "${wharf3_http[1]}" "$name.q" <<'PY'
import base64, json, sys, time, urllib.request
request = urllib.request.Request(sys.argv[1] + "/api/cluster/queues")
request.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
while True:
    try:
        for queue in json.load(urllib.request.urlopen(request, timeout=5)):
            if queue["name"] == sys.argv[2] and queue.get("leader"):
                print(queue["leader"])
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.2)
PY
)
  publisher_node=$(( leader % 3 + 1 ))
  "$bench" --url "${wharf3_urls[publisher_node]}" --phase failover --queues 1 --name "$name" --duration-s "$F1_DURATION_S" >"$out" 2>>"$work/bench.log" &
  local bench_pid=$!
  sleep 3
  kill_ms=$(( ${EPOCHREALTIME/./} / 1000 ))
  kill -KILL "${wharf3_node_pids[leader]}"
  wait "$bench_pid"
  failover_result wharf3 "$round" "$kill_ms" "$out"
  stop_wharf_cluster
  unset wharf3_pids
  rm -rf "$work/f1-wharf3-$round"
}

echo "results: $results (logs in $work)" >&2
for round in $(seq 1 "$ROUNDS"); do
  if echo "$SCENARIOS" | grep -qwE 'S[1-4]|S3x30|S6|S8'; then
    wants wharf && start_wharf "$work/wharf-$round"
    wants baseline && start_baseline "$work/baseline-$round"
    wants_rabbit && start_rabbit "$work/rabbit-$round"
    wants quorum3 && start_rabbit_cluster "$work/rabbit3-$round"
    wants wharf3 && start_wharf_cluster "$work/wharf3-$round"
    for scenario in S1 S2 S3 S3x30 S4 S6 S8; do
      echo "$SCENARIOS" | grep -qw "$scenario" || continue
      # The two Wharf builds take turns going first, so neither always meets a warmer machine.
      if [ $((round % 2)) -eq 0 ] && wants baseline; then
        run_one "$scenario" baseline "$round" "$baseline_url" "$baseline_pid"
        wants wharf && run_one "$scenario" wharf "$round" "$wharf_url" "$wharf_pid"
      else
        wants wharf && run_one "$scenario" wharf "$round" "$wharf_url" "$wharf_pid"
        wants baseline && run_one "$scenario" baseline "$round" "$baseline_url" "$baseline_pid"
      fi
      wants classic && run_one "$scenario" classic "$round" "$rabbit_url" "$rabbit_pid"
      wants quorum && run_one "$scenario" quorum "$round" "$rabbit_url" "$rabbit_pid"
      wants quorum3 && run_one "$scenario" quorum3 "$round" "$rabbit3_url" "$rabbit3_pids"
      wants wharf3 && run_one "$scenario" wharf3 "$round" "$wharf3_url" "$wharf3_pids"
    done
    wants wharf && stop_wharf
    wants baseline && stop_baseline
    wants_rabbit && stop_rabbit
    wants quorum3 && stop_rabbit_cluster
    wants wharf3 && stop_wharf_cluster
    unset wharf_pid rabbit_pid baseline_pid rabbit3_pids wharf3_pids
    rm -rf "$work/wharf-$round" "$work/baseline-$round" "$work/rabbit-$round" "$work/rabbit3-$round" "$work/wharf3-$round"
  fi
  if echo "$SCENARIOS" | grep -qw S5; then
    for target in wharf baseline classic quorum; do
      wants "$target" && run_backlog "$target" "$round"
    done
    unset wharf_pid rabbit_pid
  fi
  if echo "$SCENARIOS" | grep -qw F1; then
    wants quorum3 && run_failover "$round"
    wants wharf3 && run_failover_wharf "$round"
  fi
  if echo "$SCENARIOS" | grep -qw S7; then
    for target in wharf classic; do
      wants "$target" && run_idle_scale "$target" "$round"
    done
    unset wharf_pid rabbit_pid
  fi
done

# M1-M3: bench/mqtt.sh measures them, in rounds of its own, into a results file of its own (its
# lines are not this script's); its progress goes to stderr with this script's.
mqtt_results=
if echo "$SCENARIOS" | grep -qwE 'M[1-3]'; then
  mqtt_results="${results%.jsonl}-mqtt.jsonl"
  ROUNDS="$ROUNDS" DURATION_S="$DURATION_S" SCENARIOS="$SCENARIOS" TARGETS="$MQTT_TARGETS" OUT="$mqtt_results" \
    bench/mqtt.sh >&2
fi

echo >&2
mosquitto_version=
[ -n "$mqtt_results" ] && mosquitto_version=" Mosquitto $(dpkg-query -W -f '${Version}' mosquitto 2>/dev/null || echo '?');"
echo "Machine: $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); $(uname -r);" \
  "RabbitMQ $(dpkg-query -W -f '${Version}' rabbitmq-server 2>/dev/null || echo '?');" \
  "Erlang $(dpkg-query -W -f '${Version}' erlang-base 2>/dev/null || echo '?');$mosquitto_version Wharf $(git rev-parse --short HEAD)" \
  "${WHARF_BASELINE:+(baseline: $WHARF_BASELINE)}"
if [ -s "$results" ] || [ -z "$mqtt_results" ]; then
  python3 bench/summarize.py "$results"
fi
if [ -n "$mqtt_results" ]; then
  echo
  echo "MQTT (M1-M3), one line per broker, scenario and round ($mqtt_results):"
  cat "$mqtt_results"
fi
