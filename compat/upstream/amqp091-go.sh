#!/usr/bin/env bash
# amqp091-go.sh CACHE_DIR AMQP_PORT AMQPS_PORT CERTS_DIR
#
# Runs the broker-facing tests of github.com/rabbitmq/amqp091-go 1.5.0 (Debian's
# golang-github-rabbitmq-amqp091-go-dev) against a broker on 127.0.0.1:AMQP_PORT (guest/guest, "/").
#
# Which tests: every Test* function in the files behind the `integration` build tag
# (integration_test.go, connection_test.go) plus ExampleConnection_reconnect (reconnect_test.go,
# the only example that reads AMQP_URL and has an `// Output:` block). The package's other tests
# (allocator, client, confirms, read, tls, uri, ...) talk to in-process fake servers and never touch
# the broker, so they are not run here.
#
# How: the source is copied to CACHE_DIR, go.mod is rewritten to use Debian's goleak
# (golang-uber-goleak-dev, via a `replace` to /usr/share/gocode) and built offline
# (GOFLAGS=-mod=mod GOPROXY=off) into one test binary; every test then runs in its own process
# (`-test.run '^Name$'`), so a hang costs one test (per-test timeout below) and goleak's
# VerifyTestMain (leaked goroutines at exit) is charged to the test that leaked.
#
# One source patch, two places: integrationRabbitMQ() returns nil unless server-properties.product
# == "RabbitMQ", which makes TestRabbitMQQueueTTLGet and TestRabbitMQQueueNackMultipleRequeue pass
# vacuously on any other broker; TestIntegrationRecoverNotImplemented has the same gate inline, and
# on another broker it then skips its own `defer c.Close()`, so goleak fails it for a leaked
# connection. Those gates check identity, not behaviour, so they are removed (the tests then
# exercise x-message-ttl, basic.nack and basic.recover(requeue=false) => 540 on any broker).
#
# TLS: the suite's own TLS tests (tls_test.go) use an in-process server with certificates embedded
# in the test, not the broker, so AMQPS_PORT/CERTS_DIR are not used by default. With
# AMQP091_TLS_PASS=1 (and AMQPS_PORT != none) the same test list is run a second time with
# AMQP_URL=amqps://...:AMQPS_PORT and SSL_CERT_FILE=CERTS_DIR/ca.pem; those results are named
# "<test>[tls]" and counted too.
#
# Counting: a test is "passed" when it prints --- PASS and its process exits 0; "--- SKIP" is a
# skip and is counted in neither number (listed on a "skipped:" line); anything else (--- FAIL,
# panic, goleak report, per-test timeout, binary crash) is "failed". Excluded tests
# (amqp091-go.exclude) are not run and not counted.
#
# Time bounds: each test gets -test.timeout ${PER_TEST}s and is killed by timeout(1) shortly after;
# once the whole run has used ${BUDGET}s the remaining tests are not started and count as failed.
set -u
if [ $# -ne 4 ]; then
  echo "usage: $0 CACHE_DIR AMQP_PORT AMQPS_PORT CERTS_DIR" >&2
  exit 2
fi
CACHE_DIR=$1 AMQP_PORT=$2 AMQPS_PORT=$3 CERTS_DIR=$4
HERE=$(cd "$(dirname "$0")" && pwd)
EXCLUDE_FILE=$HERE/amqp091-go.exclude
PER_TEST=${AMQP091_PER_TEST_TIMEOUT:-90}
BUDGET=${AMQP091_BUDGET:-900}
SRC=/usr/share/gocode/src/github.com/rabbitmq/amqp091-go
GOLEAK=/usr/share/gocode/src/go.uber.org/goleak

mkdir -p "$CACHE_DIR" || exit 2
CACHE_DIR=$(cd "$CACHE_DIR" && pwd)
[ "$CERTS_DIR" != none ] && [ -d "$CERTS_DIR" ] && CERTS_DIR=$(cd "$CERTS_DIR" && pwd)

# --- dependencies (Debian packages; installed only when missing) ---------------------------------
need=()
command -v go >/dev/null 2>&1 || need+=(golang-go)
[ -f "$SRC/go.mod" ] || need+=(golang-github-rabbitmq-amqp091-go-dev)
[ -f "$GOLEAK/go.mod" ] || need+=(golang-uber-goleak-dev)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]} with apt-get" >&2
  SUDO=; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get install -y --no-install-recommends "${need[@]}" >&2 || { echo "apt-get failed" >&2; exit 2; }
fi
ver=$(dpkg-query -W -f '${Version}' golang-github-rabbitmq-amqp091-go-dev 2>/dev/null || echo unknown)
case $ver in 1.5.0*) ;; *) echo "warning: golang-github-rabbitmq-amqp091-go-dev is $ver, not 1.5.0" >&2 ;; esac

# --- source copy + offline build ------------------------------------------------------------------
W=$CACHE_DIR/amqp091-go
export GOCACHE=$CACHE_DIR/gocache GOPATH=$CACHE_DIR/gopath GOFLAGS=-mod=mod GOPROXY=off \
  GOSUMDB=off GOTOOLCHAIN=local GO111MODULE=on
if [ ! -x "$W/amqp091.test" ] || [ "$SRC/integration_test.go" -nt "$W/amqp091.test" ] || [ "$0" -nt "$W/amqp091.test" ]; then
  rm -rf "$W" && mkdir -p "$W" && cp -r "$SRC"/. "$W"/ && chmod -R u+w "$W" || exit 2
  cat >"$W/go.mod" <<EOF
module github.com/rabbitmq/amqp091-go

go 1.17

require go.uber.org/goleak v1.1.12

replace go.uber.org/goleak => $GOLEAK
EOF
  rm -f "$W/go.sum"
  # drop the product == "RabbitMQ" gate (see header)
  python3 - "$W/integration_test.go" <<'PY' || exit 2
import sys
p = sys.argv[1]
s = open(p).read()
old = 'if server, ok := conn.Properties["product"]; ok && server == "RabbitMQ" {'
assert old in s, "integrationRabbitMQ gate not found"
s = s.replace(old, 'if _, ok := conn.Properties["product"]; ok || true { // patched: identity gate removed')
old2 = 'if product, ok := c.Properties["product"]; ok && product.(string) == "RabbitMQ" {'
assert old2 in s, "TestIntegrationRecoverNotImplemented gate not found"
s = s.replace(old2, 'if _, ok := c.Properties["product"]; ok || true { // patched: identity gate removed')
open(p, "w").write(s)
PY
  (cd "$W" && go test -tags integration -c -o amqp091.test . >&2) || { echo "go test -c failed" >&2; exit 2; }
fi

# --- test list --------------------------------------------------------------------------------------
mapfile -t TESTS < <(cd "$W" && grep -h -o '^func Test[A-Za-z0-9_]*' connection_test.go integration_test.go \
  | sed 's/^func //' | grep -v '^TestMain$'; echo ExampleConnection_reconnect)
declare -A EXCL=()
if [ -f "$EXCLUDE_FILE" ]; then
  while read -r id _; do
    case $id in ''|'#'*) continue ;; esac
    EXCL[$id]=1
  done <"$EXCLUDE_FILE"
fi

LOGDIR=$CACHE_DIR/amqp091-go-logs
rm -rf "$LOGDIR"; mkdir -p "$LOGDIR"
passed=0 failed=0 skipped=() failures=()
start=$(date +%s)

run_list() { # run_list URL SUFFIX [extra env...]
  local url=$1 sfx=$2; shift 2
  local t id log rc res now
  for t in "${TESTS[@]}"; do
    id=$t$sfx
    [ -n "${EXCL[$id]:-}" ] && continue
    now=$(date +%s)
    if [ $((now - start)) -ge "$BUDGET" ]; then
      failed=$((failed + 1)); failures+=("$id (not started: ${BUDGET}s suite budget used up)")
      echo "FAIL $id (budget)"; continue
    fi
    log=$LOGDIR/$id.log
    (cd "$W" && env "$@" AMQP_URL="$url" timeout -k 5 $((PER_TEST + 10)) ./amqp091.test -test.v \
      -test.run "^${t}\$" -test.timeout "${PER_TEST}s" -test.count 1 >"$log" 2>&1)
    rc=$?
    if grep -q -- "^--- SKIP: $t " "$log"; then
      skipped+=("$id"); echo "SKIP $id"
    elif [ $rc -eq 0 ] && grep -q -- "^--- PASS: $t " "$log"; then
      passed=$((passed + 1)); echo "ok   $id"
    else
      res="rc=$rc"
      [ $rc -eq 124 ] || [ $rc -eq 137 ] && res="killed after $((PER_TEST + 10))s"
      grep -q "^panic: test timed out" "$log" && res="test timed out after ${PER_TEST}s"
      grep -q "goleak" "$log" && grep -q -- "^--- PASS: $t " "$log" && res="passed but goleak found leaked goroutines"
      grep -q -- "^--- FAIL: $t " "$log" && res="--- FAIL"
      failed=$((failed + 1)); failures+=("$id ($res; log: $log)")
      echo "FAIL $id ($res)"
      sed -n '1,400p' "$log" | grep -v '^=== RUN' | sed 's/^/      | /' | head -40
    fi
  done
}

run_list "amqp://guest:guest@127.0.0.1:$AMQP_PORT/" ""
if [ "${AMQP091_TLS_PASS:-0}" = 1 ] && [ "$AMQPS_PORT" != none ]; then
  run_list "amqps://guest:guest@127.0.0.1:$AMQPS_PORT/" "[tls]" SSL_CERT_FILE="$CERTS_DIR/ca.pem"
fi

echo "--- summary"
[ ${#skipped[@]} -gt 0 ] && echo "skipped (not counted): ${skipped[*]}"
for f in "${failures[@]}"; do echo "failed: $f"; done
echo "wall time: $(($(date +%s) - start))s (excluding build)"
echo "amqp091-go: $passed passed, $failed failed"
exit 0
