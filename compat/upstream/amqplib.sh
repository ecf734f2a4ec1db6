#!/usr/bin/env bash
# amqplib.sh CACHE_DIR AMQP_PORT AMQPS_PORT CERTS_DIR
#
# Runs the broker-facing tests of amqplib 2.1.0 (npm; the last release whose npm package still
# ships test/) against a broker on 127.0.0.1:AMQP_PORT (guest/guest, vhost "/").
#
# Runner: amqplib 2.1.0 uses Node's built-in runner (package.json: "test": "node --test
# --test-timeout=1000"; no mocha). Its test files need no npm packages except claire (only in the
# codec/frame/bitset/data property tests, which are not run here), so nothing is installed from
# npm beyond the amqplib tarball itself (`npm pack amqplib@2.1.0`, unless a copy is given in
# AMQPLIB_TGZ). Needs node >= 20.14 (--test-force-exit).
#
# Which tests: test/callback_api.test.js, test/channel_api.test.js and test/connect.test.js, the
# files that open connections to a broker. The others (channel, connection, codec, frame, mux,
# bitset, data, recovery, uri_spec) drive the library against in-process socket pairs only.
#
# Broker address: channel_api reads process.env.URL (set here), but callback_api and connect
# always dial amqp://localhost (port 5672) or amqp://[::1]. amqplib-support/preload.js, loaded
# with NODE_OPTIONS=--require into every test process, redirects sockets aimed at port 5672 of
# localhost/127.0.0.1/::1 to AMQP_PORT (5671 to AMQPS_PORT) and keeps the host. The same preload
# turns the ids listed in amqplib.exclude into skipped tests (they are not run).
#
# TLS: the suite has no TLS test against a broker, so AMQPS_PORT and CERTS_DIR are not used.
#
# Counting (amqplib-support/reporter.mjs): one id per test, "<file>: <suite> > ... > <test>".
# Passed = test:pass without skip/todo; skipped tests (including excluded ones) are counted in
# neither number; failed = test:fail, plus a failing suite (failing hook, crashed file) whose
# failure is not already charged to one of its tests.
#
# Time bounds: each test and each hook gets a timeout of ${PER_TEST}ms (set by preload.js; upstream
# uses --test-timeout=1000, but Node 20 applies that to each whole file too, so a file would be
# cut off with its remaining tests; 10 s also keeps a slow but correct answer from failing);
# --test-force-exit so an open handle cannot keep a file alive; each file runs in its own
# `node --test` under timeout(1) (${PER_FILE}s), and files not started within ${BUDGET}s count as
# failed.
set -u
if [ $# -ne 4 ]; then
  echo "usage: $0 CACHE_DIR AMQP_PORT AMQPS_PORT CERTS_DIR" >&2
  exit 2
fi
CACHE_DIR=$1 AMQP_PORT=$2 AMQPS_PORT=$3 CERTS_DIR=$4
HERE=$(cd "$(dirname "$0")" && pwd)
SUPPORT=$HERE/amqplib-support
EXCLUDE_FILE=$HERE/amqplib.exclude
PER_TEST=${AMQPLIB_PER_TEST_TIMEOUT_MS:-10000}
PER_FILE=${AMQPLIB_PER_FILE_TIMEOUT:-300}
BUDGET=${AMQPLIB_BUDGET:-600}
VERSION=2.1.0
FILES=(test/callback_api.test.js test/channel_api.test.js test/connect.test.js)

mkdir -p "$CACHE_DIR" || exit 2
CACHE_DIR=$(cd "$CACHE_DIR" && pwd)
command -v node >/dev/null && command -v npm >/dev/null || { echo "node and npm are needed" >&2; exit 2; }
node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>20||(a===20&&b>=14)?0:1)' \
  || { echo "node $(node --version) lacks --test-force-exit (needs >= 20.14)" >&2; exit 2; }

# --- source ----------------------------------------------------------------------------------------
W=$CACHE_DIR/amqplib-$VERSION
if [ ! -f "$W/package.json" ]; then
  tgz=${AMQPLIB_TGZ:-}
  if [ -z "$tgz" ]; then
    (cd "$CACHE_DIR" && npm pack "amqplib@$VERSION" >&2) || { echo "npm pack failed" >&2; exit 2; }
    tgz=$CACHE_DIR/amqplib-$VERSION.tgz
  fi
  rm -rf "$W.tmp" && mkdir -p "$W.tmp" && tar -xzf "$tgz" -C "$W.tmp" && mv "$W.tmp/package" "$W" && rm -rf "$W.tmp" \
    || { echo "cannot unpack $tgz" >&2; exit 2; }
fi
grep -q "\"version\": \"$VERSION\"" "$W/package.json" || { echo "$W is not amqplib $VERSION" >&2; exit 2; }
for f in "${FILES[@]}"; do [ -f "$W/$f" ] || { echo "missing $W/$f" >&2; exit 2; }; done

# --- run ---------------------------------------------------------------------------------------------
out=$CACHE_DIR/amqplib-run.log
: >"$out"
start=$(date +%s)
killed=()
for f in "${FILES[@]}"; do
  left=$((BUDGET - ($(date +%s) - start)))
  if [ $left -le 0 ]; then killed+=("$f (not started: ${BUDGET}s budget used up)"); continue; fi
  [ $left -gt "$PER_FILE" ] && left=$PER_FILE
  (
    cd "$W" && URL="amqp://guest:guest@127.0.0.1:$AMQP_PORT" AMQPLIB_TEST_PORT=$AMQP_PORT \
      AMQPLIB_TEST_TLS_PORT=$([ "$AMQPS_PORT" = none ] && echo "" || echo "$AMQPS_PORT") \
      AMQPLIB_EXCLUDE_FILE=$EXCLUDE_FILE AMQPLIB_TEST_FILE=$(basename "$f") AMQPLIB_TEST_TIMEOUT_MS=$PER_TEST \
      NODE_OPTIONS="--require $SUPPORT/preload.js" \
      timeout -k 10 "$left" node --test --test-force-exit --test-reporter="$SUPPORT/reporter.mjs" "$f"
  ) >>"$out" 2>&1
  rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then killed+=("$f (killed after ${left}s)"); fi
done
cat "$out"
# The reporter prints one "ok "/"FAIL "/"SKIP " line per test as it ends (its own RESULT line is
# usually lost: --test-force-exit ends the process before the reporter's last write).
passed=$(grep -c '^ok ' "$out"); failed=$(grep -c '^FAIL ' "$out"); skipped=$(grep -c '^SKIP ' "$out")
for k in "${killed[@]}"; do
  # tests of that file not reported above did not finish; the file counts as one failure
  failed=$((failed + 1)); echo "FAIL $k"
done
[ $((passed + failed + skipped)) -eq 0 ] && { echo "the node test runner reported nothing" >&2; exit 2; }
echo "skipped (not counted): $skipped"
echo "wall time: $(($(date +%s) - start))s"
echo "amqplib: $passed passed, $failed failed"
exit 0
