#!/usr/bin/env bash
# examples/polyglot/run.sh WHARF_BINARY [python] [node] [go]
#
# Runs each recipe (all three by default) against a real Wharf broker, `wharf relay` and a
# throwaway PostgreSQL, and checks its exactly-once property:
#   1. setup; a consumer that exits right after its 50th commit, before the ack (a crash there);
#   2. 200 orders placed, each with its outbox row in the same transaction;
#   3. the consumer restarted; every order is charged;
#   4. 20 sent outbox rows put back to pending, so the relay publishes them again with the same
#      message ids (the exchange does not de-duplicate: the copies reach the consumer);
#   5. then: exactly one payment per order, and exactly 21 copies absorbed by the inbox (the
#      redelivery after the crash, and the 20 re-published).
# Installs what it needs (PostgreSQL, psycopg and pika from PyPI, pg and amqplib from npm, Go with
# pgx and amqp091-go from Debian) when missing. Fails with the reason on any violation.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
wharf=$(cd "$(dirname "${1:?usage: run.sh WHARF_BINARY [python] [node] [go]}")" && pwd)/$(basename "$1")
shift
langs=("$@")
[ ${#langs[@]} -gt 0 ] || langs=(python node go)
orders=200

work=$(mktemp -d "${TMPDIR:-/tmp}/wharf-polyglot.XXXXXX")
# Apart from $work: PostgreSQL's own user must reach it (scripts/postgres.sh).
pg_dir=$(mktemp -d "${TMPDIR:-/tmp}/wharf-polyglot-pg.XXXXXX")
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  "$root/scripts/postgres.sh" stop "$pg_dir"
  rm -rf "$work"
}
trap cleanup EXIT
fail() {
  echo "polyglot: $*" >&2
  for log in "$work"/*.log; do echo "--- $log" >&2; tail -20 "$log" >&2; done
  exit 1
}

# Waits up to 120 s for a shell condition.
wait_for() {
  local what=$1 condition=$2 started=$SECONDS
  until eval "$condition"; do
    [ $((SECONDS - started)) -lt 120 ] || fail "timed out waiting for $what"
    sleep 0.1
  done
}

install() {
  local need=()
  case $1 in
    python)
      python3 -c 'import psycopg, pika' 2>/dev/null \
        || python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore 'psycopg[binary]==3.2.3' pika==1.3.2
      ;;
    node)
      (cd "$here/node" && npm install --no-audit --no-fund --loglevel=error >/dev/null)
      ;;
    go)
      command -v go >/dev/null 2>&1 || need+=(golang-go)
      [ -d /usr/share/gocode/src/github.com/rabbitmq/amqp091-go ] || need+=(golang-github-rabbitmq-amqp091-go-dev)
      [ -d /usr/share/gocode/src/github.com/jackc/pgx/v4 ] || need+=(golang-github-jackc-pgx-v4-dev)
      if [ ${#need[@]} -gt 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >/dev/null 2>&1 \
          || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >/dev/null; }
      fi
      # Debian's Go libraries are sources under /usr/share/gocode: built offline, in GOPATH mode.
      GO111MODULE=off GOPATH="$work/gopath:/usr/share/gocode" GOCACHE="$work/gocache" \
        go build -o "$work/shop-go" "$here/go/shop.go"
      ;;
  esac
}

recipe() {
  local lang=$1
  shift
  case $lang in
    python) python3 "$here/python/shop.py" "$@" ;;
    node) node "$here/node/shop.js" "$@" ;;
    go) "$work/shop-go" "$@" ;;
  esac
}

eval "$("$root/scripts/postgres.sh" start "$pg_dir")"
admin_url=$WHARF_TEST_POSTGRES_URL
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
"$wharf" serve --amqp-listen "127.0.0.1:$port" --http-listen none --mqtt-listen none --data-dir "$work/data" 2>"$work/broker.log" &
pids+=($!)
wait_for "the broker" "grep -q 'accepting AMQP' '$work/broker.log'"
export BROKER_URL="amqp://guest:guest@127.0.0.1:$port/%2f"

for lang in "${langs[@]}"; do
  echo "== polyglot: $lang"
  install "$lang"
  database=polyglot_$lang
  psql -q "$admin_url" -c "CREATE DATABASE $database"
  export DATABASE_URL="${admin_url%/*}/$database" QUEUE="payments-$lang"
  sql() { psql -qtA "$DATABASE_URL" -c "$1"; }
  "$wharf" relay --database-url "$DATABASE_URL" --broker-url "$BROKER_URL" --poll-interval-ms 50 \
    2>"$work/relay-$lang.log" &
  relay=$!
  pids+=($relay)
  wait_for "the relay's migration" "[ \"\$(sql 'SELECT MAX(version) FROM wharf_schema_versions' 2>/dev/null)\" = 4 ]"
  recipe "$lang" setup

  CRASH_AFTER_COMMIT=50 recipe "$lang" consume 2>"$work/consumer-$lang-1.log" &
  crashing=$!
  recipe "$lang" produce "$orders"
  status=0
  wait "$crashing" || status=$?
  [ "$status" = 3 ] || fail "$lang: the consumer was to exit with 3 after its 50th commit, not $status"

  recipe "$lang" consume 2>"$work/consumer-$lang-2.log" &
  consumer=$!
  pids+=($consumer)
  wait_for "$lang: $orders payments" "[ \"\$(sql 'SELECT COUNT(*) FROM payments')\" -ge $orders ]"
  wait_for "$lang: the outbox sent" "[ \"\$(sql 'SELECT COUNT(*) FROM wharf_outbox WHERE status <> 1')\" = 0 ]"
  sql "UPDATE wharf_outbox SET status = 0, sent_at = NULL WHERE seq IN (SELECT seq FROM wharf_outbox ORDER BY seq LIMIT 20)"
  wait_for "$lang: 21 copies absorbed" "[ \"\$(sql 'SELECT COUNT(*) FROM absorbed')\" -ge 21 ]"
  wait_for "$lang: the outbox sent again" "[ \"\$(sql 'SELECT COUNT(*) FROM wharf_outbox WHERE status <> 1')\" = 0 ]"

  payments=$(sql 'SELECT COUNT(*) FROM payments')
  charged=$(sql 'SELECT COUNT(DISTINCT order_id) FROM payments')
  unpaid=$(sql 'SELECT COUNT(*) FROM orders o WHERE NOT EXISTS (SELECT 1 FROM payments p WHERE p.order_id = o.id)')
  absorbed=$(sql 'SELECT COUNT(*) FROM absorbed')
  [ "$payments" = "$orders" ] && [ "$charged" = "$orders" ] && [ "$unpaid" = 0 ] \
    || fail "$lang: $payments payments for $charged orders of $orders, $unpaid unpaid"
  [ "$absorbed" = 21 ] || fail "$lang: $absorbed copies absorbed, 21 expected"
  echo "polyglot $lang: $orders orders, $payments payments, $absorbed copies absorbed by the inbox"
  kill "$consumer" "$relay"
  wait "$consumer" "$relay" 2>/dev/null || true
done
echo "polyglot: all passed (${langs[*]})"
