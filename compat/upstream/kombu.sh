#!/usr/bin/env bash
# kombu.sh CACHE_DIR AMQP_PORT AMQPS_PORT CERTS_DIR
#
# Runs the py-amqp-transport integration tests of the kombu 5.7.0 sdist
# (t/integration/test_py_amqp.py, the RabbitMQ ones), with kombu installed against the pinned
# py-amqp 5.4.2 (both from their PyPI sdists), against a broker already listening on
# 127.0.0.1:AMQP_PORT (guest/guest, vhost "/"). The other files in t/integration (redis, mongodb,
# sqs, kafka, pgmq) need other servers and are not run.
#
# How the suite finds its broker (t/integration/test_py_amqp.py): RABBITMQ_HOST (default
# localhost) and RABBITMQ_5672_TCP (default 5672), used as pyamqp://HOST:PORT (guest/guest, "/").
# The failover tests also use pyamqp://localhost:12345 as a dead first URL (must stay unused),
# and test_PyAMQPAutoRetry connects only to a port it reserved itself (no broker needed).
# There are no TLS tests in this file: AMQPS_PORT and CERTS_DIR are accepted and ignored.
#
# Output: pytest's verbose log, then a "skipped/deselected" line, then as the LAST line
#   kombu: N passed, M failed
# N counts PASSED (and XPASS); M counts FAILED and ERROR (a test that passes but errors in
# teardown counts once, as failed). Skipped and xfailed tests are counted in neither and are
# reported on the line before; deselected tests (kombu.exclude) too.
# pytest-rerunfailures is deliberately NOT installed: upstream marks the classes
# @flaky(reruns=5), which would hide intermittent failures; here each test runs once.
#
# Bounds: pytest-timeout (signal method) fails a single test after PER_TEST_TIMEOUT seconds
# (default 20); the whole pytest run is killed after TOTAL_TIMEOUT seconds (default 1200).
# Exit status: 0 when the tests ran (whatever their results), non-zero only if they could not.
set -u
SUITE=kombu
if [ $# -ne 4 ]; then
  echo "usage: $0 CACHE_DIR AMQP_PORT AMQPS_PORT CERTS_DIR" >&2; exit 2
fi
CACHE_DIR=$1 AMQP_PORT=$2 AMQPS_PORT=$3 CERTS_DIR=$4
PER_TEST_TIMEOUT=${PER_TEST_TIMEOUT:-20}
TOTAL_TIMEOUT=${TOTAL_TIMEOUT:-1200}
HERE=$(cd "$(dirname "$0")" && pwd)
EXCLUDE_FILE=$HERE/$SUITE.exclude

AMQP_VERSION=5.4.2
KOMBU_VERSION=5.7.0
PINS=(vine==5.1.0 pytest==9.1.1 pytest-timeout==2.4.0 iniconfig==2.3.1 packaging==26.4
      pluggy==1.7.0 Pygments==2.21.0)

die() { echo "$SUITE: cannot run: $*" >&2; exit 3; }

mkdir -p "$CACHE_DIR" || die "cannot create $CACHE_DIR"
CACHE_DIR=$(cd "$CACHE_DIR" && pwd)
BASE=$CACHE_DIR/kombu
VENV=$BASE/venv
SRC=$BASE/src/kombu-$KOMBU_VERSION
STAMP=$BASE/.installed-kombu$KOMBU_VERSION-amqp$AMQP_VERSION-$(echo "${PINS[*]}" | md5sum | cut -c1-8)

# ---- install (once) ---------------------------------------------------------------------
if [ ! -e "$STAMP" ]; then
  rm -rf "$BASE"; mkdir -p "$BASE/dl" "$BASE/src"
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    if command -v apt-get >/dev/null; then
      apt-get update -qq >/dev/null 2>&1; apt-get install -y -qq python3-venv >/dev/null 2>&1
    fi
    rm -rf "$VENV"; python3 -m venv "$VENV" || die "python3 -m venv failed"
  fi
  PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
  "${PIP[@]}" download --no-deps --no-binary :all: -d "$BASE/dl" \
    "amqp==$AMQP_VERSION" "kombu==$KOMBU_VERSION" || die "pip download of the sdists failed"
  tar -xzf "$BASE/dl/kombu-$KOMBU_VERSION.tar.gz" -C "$BASE/src" || die "cannot unpack sdist"
  "${PIP[@]}" install "${PINS[@]}" || die "pip install of test dependencies failed"
  "${PIP[@]}" install --no-deps "$BASE/dl/amqp-$AMQP_VERSION.tar.gz" "$SRC" \
    || die "pip install of the amqp/kombu sdists failed"
  "$VENV/bin/python" -c "import amqp, kombu; assert amqp.__version__ == '$AMQP_VERSION'" \
    || die "amqp $AMQP_VERSION / kombu not importable"
  touch "$STAMP"
fi
PY=$VENV/bin/python
[ -x "$PY" ] && [ -f "$SRC/t/integration/test_py_amqp.py" ] || die "broken cache in $BASE (delete it)"

# ---- broker reachable? ------------------------------------------------------------------
wait_port() {
  local i
  for i in $(seq 1 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  return 1
}
wait_port "$AMQP_PORT" || die "nothing listens on 127.0.0.1:$AMQP_PORT"

ARGS=()

# ---- exclusions ---------------------------------------------------------------------------
if [ -r "$EXCLUDE_FILE" ]; then
  while IFS= read -r line; do
    id=${line%%#*}; id=$(echo "$id" | xargs)
    [ -n "$id" ] && ARGS+=(--deselect "$id")
  done <"$EXCLUDE_FILE"
fi

# ---- run ------------------------------------------------------------------------------------
LOG=$(mktemp "${TMPDIR:-/tmp}/$SUITE.XXXXXX.log")
cd "$SRC" || die "cannot cd $SRC"
RABBITMQ_HOST=127.0.0.1 RABBITMQ_5672_TCP=$AMQP_PORT \
PYTHONDONTWRITEBYTECODE=1 \
  timeout -k 20 "$TOTAL_TIMEOUT" "$PY" -m pytest t/integration/test_py_amqp.py -v -p no:cacheprovider \
    -p no:rerunfailures -o addopts= -W ignore::pytest.PytestUnknownMarkWarning -o console_output_style=classic \
    --timeout="$PER_TEST_TIMEOUT" --timeout-method=signal -rfE --tb=short \
    "${ARGS[@]}" 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}

KILLED=0
case $rc in
  0|1) ;;
  124|137) KILLED=1
           echo; echo "$SUITE: WARNING: whole run killed after ${TOTAL_TIMEOUT}s; the test then running counts as failed, tests not reached are not counted" ;;
  *) echo "$SUITE: pytest exited $rc" >&2; rm -f "$LOG"; exit 4 ;;
esac

"$PY" - "$LOG" "$SUITE" "$KILLED" <<'PY'
import re, sys
log, suite, killed = sys.argv[1:4]
status = {}
rank = {"PASSED": 0, "XPASS": 0, "SKIPPED": 1, "XFAIL": 1, "FAILED": 2, "ERROR": 2}
# ids may contain spaces (parametrize values); classic style puts the status last, maybe
# followed by "(reason)" for skips/xfails.
pat = re.compile(r"^(t/.+?::.+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)(?: \(.*\))?\s*$")
desel = 0
running = None
for line in open(log, errors="replace"):
    if line.startswith("t/") and "::" in line:
        running = line.strip()
    m = pat.match(line)
    if m:
        nid, st = m.groups()
        if nid not in status or rank[st] > rank[status[nid]]:
            status[nid] = st
        running = None
    m = re.search(r"(\d+) deselected", line)
    if m and (line.startswith("=") or "collected" in line):
        desel = int(m.group(1))
if killed == "1" and running and running not in status:
    print(f"{suite}: killed while running {running}")
    status[running] = "FAILED"
p = sum(1 for s in status.values() if rank[s] == 0)
s = sum(1 for s in status.values() if rank[s] == 1)
f = sum(1 for s in status.values() if rank[s] == 2)
print(f"{suite}: skipped (not counted) {s}, deselected {desel}")
print(f"{suite}: {p} passed, {f} failed")
PY
rm -f "$LOG"
exit 0
