#!/usr/bin/env bash
# Runs the published integration test suites of RabbitMQ client libraries against a broker:
# aiormq and aio-pika (Python asyncio), py-amqp and kombu (Celery's transport), amqp091-go (Go,
# Debian's package with its integration test) and amqplib (Node). Each suite's own script
# (`SUITE.sh` beside this one) installs the pinned release from its registry into a cache and
# runs its tests, less the exclusions in `SUITE.exclude` (each with its reason; see README.md).
#
# Usage: compat/upstream/run.sh BROKER [SUITE...]
#   BROKER: the path of a `wharf` binary, or `rabbitmq` for Debian's rabbitmq-server (installed
#   with apt-get if missing), to check that an exclusion fails there too.
#   SUITE: any of the suites above (default: all).
# Each suite gets a fresh broker on free loopback ports, AMQP and AMQP over TLS (certificates
# from ../make_certs.sh, client certificates optional). Prints one `SUITE: N passed, M failed`
# line per suite, then the total, and exits non-zero if any test failed or a suite did not run.
# The cache (installed clients) is $WHARF_COMPAT_CACHE, by default ~/.cache/wharf-compat.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
broker=${1:?usage: compat/upstream/run.sh WHARF_BINARY|rabbitmq [SUITE...]}
shift
suites=("$@")
[ ${#suites[@]} -gt 0 ] || suites=(aiormq aio-pika py-amqp kombu amqp091-go amqplib)
# Longest a suite may run before it counts as hung (its own tests have their own timeouts).
suite_timeout_s=${WHARF_COMPAT_SUITE_TIMEOUT_S:-1500}
cache=${WHARF_COMPAT_CACHE:-$HOME/.cache/wharf-compat}
work=$(mktemp -d "${TMPDIR:-/tmp}/wharf-upstream.XXXXXX")
mkdir -p "$cache"
"$here/../make_certs.sh" "$work/certs"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }
wait_port() { # port, pid, log: bounded, so a broken broker fails instead of hanging
  for _ in $(seq 1 600); do
    if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $1), 1).close()" 2>/dev/null; then
      return 0
    fi
    kill -0 "$2" 2>/dev/null || { tail -20 "$3"; echo "the broker exited"; return 1; }
    sleep 0.1
  done
  tail -20 "$3"; echo "the broker did not start"; return 1
}

rabbit_server=/usr/lib/rabbitmq/bin/rabbitmq-server
if [ "$broker" = rabbitmq ] && [ ! -x "$rabbit_server" ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y rabbitmq-server >/dev/null 2>&1 \
    || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y rabbitmq-server >/dev/null; }
fi
if [ "$broker" != rabbitmq ]; then broker=$(realpath "$broker"); fi

broker_pid=
# start_broker DIR: a fresh broker on new ports; sets port, tls_port, broker_pid, broker_log.
start_broker() {
  local dir=$1
  mkdir -p "$dir"
  port=$(free_port)
  tls_port=$(free_port)
  # Two free ports asked one after the other can be the same one (the first was released).
  while [ "$tls_port" = "$port" ]; do tls_port=$(free_port); done
  broker_log="$dir/broker.log"
  if [ "$broker" = rabbitmq ]; then
    cat >"$dir/rabbitmq.conf" <<CONF
listeners.tcp.default = 127.0.0.1:$port
listeners.ssl.default = 127.0.0.1:$tls_port
ssl_options.cacertfile = $work/certs/ca.pem
ssl_options.certfile = $work/certs/server.pem
ssl_options.keyfile = $work/certs/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
loopback_users = none
CONF
    echo "[]." >"$dir/enabled_plugins"
    HOME="$dir" RABBITMQ_NODENAME="wharfupstream@localhost" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
      RABBITMQ_NODE_PORT="$port" RABBITMQ_DIST_PORT="$(free_port)" RABBITMQ_MNESIA_BASE="$dir/mnesia" \
      RABBITMQ_LOG_BASE="$dir/log" RABBITMQ_CONFIG_FILE="$dir/rabbitmq" \
      RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" RABBITMQ_PID_FILE="$dir/pid" \
      "$rabbit_server" >"$broker_log" 2>&1 &
  else
    "$broker" serve --http-listen 127.0.0.1:0 --mqtt-listen none --amqp-listen "127.0.0.1:$port" --data-dir "$dir/data" --log warn \
      --amqps-listen "127.0.0.1:$tls_port" --tls-cert "$work/certs/server.pem" \
      --tls-key "$work/certs/server.key" --tls-ca-cert "$work/certs/ca.pem" >"$broker_log" 2>&1 &
  fi
  broker_pid=$!
  wait_port "$port" "$broker_pid" "$broker_log" && wait_port "$tls_port" "$broker_pid" "$broker_log"
}
stop_broker() {
  [ -n "$broker_pid" ] || return 0
  if [ "$broker" = rabbitmq ]; then
    pkill -TERM -P "$broker_pid" beam.smp 2>/dev/null || true
  fi
  kill -TERM "$broker_pid" 2>/dev/null || true
  wait "$broker_pid" 2>/dev/null || true
  broker_pid=
}
cleanup() { stop_broker; rm -rf "$work"; }
trap cleanup EXIT

passed_total=0
failed_total=0
broken=()
results=()
for suite in "${suites[@]}"; do
  script="$here/$suite.sh"
  [ -x "$script" ] || { echo "unknown suite '$suite' (no $script)"; exit 2; }
  started=$(date +%s)
  if ! start_broker "$work/$suite"; then
    broken+=("$suite"); results+=("$suite: the broker did not start"); continue
  fi
  out="$work/$suite.out"
  timeout --kill-after=30 "$suite_timeout_s" "$script" "$cache/$suite" "$port" "$tls_port" "$work/certs" \
    >"$out" 2>&1 || true
  stop_broker
  line=$(grep -E "^$suite: [0-9]+ passed, [0-9]+ failed" "$out" | tail -1 || true)
  if [ -z "$line" ]; then
    tail -40 "$out"
    broken+=("$suite"); results+=("$suite: did not run (see above)"); continue
  fi
  # The failures, for the log: each suite's script lists them before its count line.
  grep -E "^(FAILED|FAIL|not ok|--- FAIL|  [0-9]+\) )" "$out" | head -50 || true
  results+=("$line ($(( $(date +%s) - started )) s)")
  read -r passed failed < <(sed -E 's/^[^:]+: ([0-9]+) passed, ([0-9]+) failed.*/\1 \2/' <<<"$line")
  passed_total=$((passed_total + passed))
  failed_total=$((failed_total + failed))
done
printf '%s\n' "${results[@]}"
echo "upstream: $passed_total passed, $failed_total failed"
[ "$failed_total" -eq 0 ] && [ ${#broken[@]} -eq 0 ]
