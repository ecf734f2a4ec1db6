#!/usr/bin/env bash
# Runs RabbitMQ's own management CLI, `rabbitmqadmin` from Debian's rabbitmq-server package,
# unchanged against the built `wharf` binary's management API: declare, list, publish, get,
# purge, close a connection, delete, export and import, and the errors it reports. The script is
# taken out of the Debian package without installing the package (it is plain Python 3; the
# server and Erlang are not needed), cached in $WHARF_COMPAT_CACHE (~/.cache/wharf-compat).
#
# Usage: compat/rabbitmqadmin.sh PATH_TO_WHARF_BINARY
set -euo pipefail
wharf_bin=$(realpath "${1:?usage: compat/rabbitmqadmin.sh PATH_TO_WHARF_BINARY}")
cd "$(dirname "$0")"
cache=${WHARF_COMPAT_CACHE:-$HOME/.cache/wharf-compat}
admin="$cache/rabbitmqadmin"
if [ -x /usr/bin/rabbitmqadmin ]; then
  admin=/usr/bin/rabbitmqadmin
elif [ ! -x "$admin" ]; then
  mkdir -p "$cache"
  unpack=$(mktemp -d "${TMPDIR:-/tmp}/wharf-rabbitmqadmin.XXXXXX")
  (cd "$unpack" && { apt-get download rabbitmq-server >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get download rabbitmq-server >/dev/null; }; })
  dpkg-deb -x "$unpack"/rabbitmq-server_*.deb "$unpack/root"
  found=$(find "$unpack/root" -path '*/cli/rabbitmqadmin' -type f | head -1)
  [ -n "$found" ] || { echo "rabbitmqadmin is not in Debian's rabbitmq-server package"; exit 1; }
  install -m 0755 "$found" "$admin"
  rm -rf "$unpack"
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }
port=$(free_port)
http_port=$(free_port)
# Two free ports asked one after the other can be the same one (the first was released).
while [ "$http_port" = "$port" ]; do http_port=$(free_port); done
work=$(mktemp -d "${TMPDIR:-/tmp}/wharf-rabbitmqadmin.XXXXXX")
"$wharf_bin" serve --amqp-listen "127.0.0.1:$port" --mqtt-listen none --http-listen "127.0.0.1:$http_port" \
  --data-dir "$work/data" --log info 2>"$work/wharf.log" &
wharf_pid=$!
client_pid=
cleanup() {
  [ -z "$client_pid" ] || kill "$client_pid" 2>/dev/null || true
  kill "$wharf_pid" 2>/dev/null || true
  wait "$wharf_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 1 600); do
  grep -q "management API listening" "$work/wharf.log" && break
  kill -0 "$wharf_pid" 2>/dev/null || { cat "$work/wharf.log"; echo "wharf exited"; exit 1; }
  sleep 0.1
done

passed=0
run() { "$admin" -H 127.0.0.1 -P "$http_port" -u guest -p guest "$@"; }
# expect DESCRIPTION PATTERN COMMAND...: the command succeeds and prints PATTERN.
expect() {
  local what=$1 pattern=$2 output
  shift 2
  if ! output=$(run "$@" 2>&1); then echo "FAIL: $what: exit status $? from rabbitmqadmin $*"; echo "$output"; exit 1; fi
  if ! grep -q -- "$pattern" <<<"$output"; then echo "FAIL: $what: no '$pattern' in:"; echo "$output"; exit 1; fi
  passed=$((passed + 1))
}
# refuse DESCRIPTION PATTERN COMMAND...: the command fails (exit 1) and prints PATTERN.
refuse() {
  local what=$1 pattern=$2 output
  shift 2
  if output=$(run "$@" 2>&1); then echo "FAIL: $what: rabbitmqadmin $* succeeded"; echo "$output"; exit 1; fi
  if ! grep -q -- "$pattern" <<<"$output"; then echo "FAIL: $what: no '$pattern' in:"; echo "$output"; exit 1; fi
  if grep -q "Traceback" <<<"$output"; then echo "FAIL: $what: rabbitmqadmin crashed:"; echo "$output"; exit 1; fi
  passed=$((passed + 1))
}

expect "declare exchange" "exchange declared" declare exchange name=orders type=topic
expect "declare queue" "queue declared" declare queue name=orders.email durable=true arguments='{"x-max-priority": 5}'
expect "declare binding" "binding declared" declare binding source=orders destination=orders.email routing_key='order.*'
expect "list queues" "orders.email" list queues
expect "list queues with a dotted column" "| orders.email | 5 " list queues name arguments.x-max-priority
expect "list exchanges" "orders" list exchanges
expect "list bindings" "order\.\*" list bindings
expect "list vhosts" "| / " list vhosts
expect "list users" "administrator" list users
expect "show overview" "Wharf\|[0-9]" show overview
expect "publish" "Message published$" publish exchange=orders routing_key=order.created payload='{"order": 1}' \
  properties='{"message_id": "m-1", "delivery_mode": 2}'
expect "publish unrouted" "NOT routed" publish exchange=orders routing_key=nobody.listens payload=x
expect "get (requeue)" '{"order": 1}' get queue=orders.email ackmode=ack_requeue_true
expect "get (ack), redelivered after the requeue" "| True " get queue=orders.email ackmode=ack_requeue_false
expect "get (empty)" "No items" get queue=orders.email
expect "purge" "queue purged" purge queue name=orders.email

# A live client connection, listed, then closed through the API.
python3 -m pip install --quiet --disable-pip-version-check pika==1.3.2 2>/dev/null \
  || python3 -m pip install --quiet --disable-pip-version-check pika
python3 - "$port" >"$work/client.log" 2>&1 <<'PY' &
import sys, time, pika
params = pika.ConnectionParameters("127.0.0.1", int(sys.argv[1]), client_properties={"connection_name": "admin-test-client"})
connection = pika.BlockingConnection(params)
print("connected", flush=True)
try:
    while True:
        connection.process_data_events(time_limit=1)
except pika.exceptions.ConnectionClosedByBroker as closed:
    print("closed by broker:", closed.reply_code, closed.reply_text, flush=True)
PY
client_pid=$!
for _ in $(seq 1 300); do grep -q connected "$work/client.log" && break; sleep 0.1; done
expect "list connections" "guest" list connections
name=$(run -f tsv -q list connections name | head -1)
expect "close connection" "connection closed" close connection name="$name"
wait "$client_pid" || true
client_pid=
grep -q "closed by broker: 320 CONNECTION_FORCED - Closed via management plugin" "$work/client.log" \
  || { echo "FAIL: the client was not closed with 320:"; cat "$work/client.log"; exit 1; }
passed=$((passed + 1))

expect "export" "Exported definitions" export "$work/definitions.json"
grep -q '"orders.email"' "$work/definitions.json" || { echo "FAIL: the export lacks the queue"; exit 1; }
expect "delete binding" "binding deleted" delete binding source=orders destination_type=queue destination=orders.email properties_key='order.*'
expect "delete queue" "queue deleted" delete queue name=orders.email
expect "delete exchange" "exchange deleted" delete exchange name=orders
expect "import" "Uploaded definitions" import "$work/definitions.json"
expect "import restored the queue" "orders.email" list queues
expect "import restored the binding" "order\.\*" list bindings

expect "declare user" "user declared" declare user name=ops password=pw tags=monitoring
expect "declare permission" "permission declared" declare permission vhost=/ user=ops configure='^ops\.' write='.*' read='.*'
expect "list users" "monitoring" list users
expect "list permissions" "ops" list permissions
"$admin" -H 127.0.0.1 -P "$http_port" -u ops -p pw list queues >/dev/null \
  || { echo "FAIL: the declared user cannot log in"; exit 1; }
passed=$((passed + 1))
expect "delete user" "user deleted" delete user name=ops

expect "declare policy" "policy declared" declare policy name=cap pattern='^orders\.' definition='{"max-length": 1000}' apply-to=queues
expect "list policies" "cap" list policies
expect "the policy applies to the queue" "cap" list queues name policy
expect "delete policy" "policy deleted" delete policy name=cap
expect "declare vhost" "vhost declared" declare vhost name=staging
expect "list vhosts" "staging" list vhosts
expect "delete vhost" "vhost deleted" delete vhost name=staging

refuse "inequivalent redeclare" "inequivalent arg 'durable' for queue 'orders.email'" declare queue name=orders.email durable=false
refuse "unknown queue" "Not found" delete queue name=no-such-queue
refuse "wrong password" "Access refused" -p wrong list queues
refuse "bad argument" "x-max-priority" declare queue name=bad arguments='{"x-max-priority": "five"}'

echo "rabbitmqadmin: $passed checks passed"
