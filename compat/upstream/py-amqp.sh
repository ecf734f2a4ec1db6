#!/usr/bin/env bash
# py-amqp.sh CACHE_DIR AMQP_PORT AMQPS_PORT CERTS_DIR
#
# Runs the integration tests of the py-amqp 5.4.2 sdist (t/integration/: test_rmq.py needs a
# broker; test_integration.py is mock-only and runs without one, it is counted too because it
# is part of t/integration) against a broker already listening on 127.0.0.1:AMQP_PORT
# (guest/guest, vhost "/").
#
# How the suite finds its broker (t/integration/test_rmq.py): RABBITMQ_HOST (default localhost),
# RABBITMQ_5672_TCP (plain port, default 5672), RABBITMQ_5671_TCP (TLS port, default 5671).
# The TLS tests read client certificates from the relative paths t/certs/{ca_certificate,
# client_certificate,client_key}.pem and t/certs/client_{certificate,key}_broken.pem; the sdist
# does not ship t/certs, so this script fills it from CERTS_DIR (ca.pem, client.pem,
# client.key) and makes the *_broken files by corrupting the first base64 line of the good ones
# (as upstream's are). TLS tests verify the server certificate against ca.pem and do not check
# the host name. If AMQPS_PORT is "none" every test whose id contains "tls" is deselected.
#
# Output: pytest's verbose log, then a "skipped/deselected" line, then as the LAST line
#   py-amqp: N passed, M failed
# N counts PASSED (and XPASS); M counts FAILED and ERROR (a test that passes but errors in
# teardown counts once, as failed). Skipped and xfailed tests are counted in neither and are
# reported on the line before; deselected tests (py-amqp.exclude, TLS when AMQPS_PORT=none) too.
# pytest-rerunfailures is deliberately NOT installed: upstream marks every test
# @flaky(reruns=5), which would hide intermittent failures; here each test runs once.
#
# Bounds: pytest-timeout (signal method) fails a single test after PER_TEST_TIMEOUT seconds
# (default 20); the whole pytest run is killed after TOTAL_TIMEOUT seconds (default 900).
# Exit status: 0 when the tests ran (whatever their results), non-zero only if they could not.
set -u
SUITE=py-amqp
if [ $# -ne 4 ]; then
  echo "usage: $0 CACHE_DIR AMQP_PORT AMQPS_PORT CERTS_DIR" >&2; exit 2
fi
CACHE_DIR=$1 AMQP_PORT=$2 AMQPS_PORT=$3 CERTS_DIR=$4
PER_TEST_TIMEOUT=${PER_TEST_TIMEOUT:-20}
TOTAL_TIMEOUT=${TOTAL_TIMEOUT:-900}
HERE=$(cd "$(dirname "$0")" && pwd)
EXCLUDE_FILE=$HERE/$SUITE.exclude

AMQP_VERSION=5.4.2
PINS=(vine==5.1.0 pytest==8.0.0 pytest-timeout==2.4.0 iniconfig==2.0.0 packaging==24.2 pluggy==1.5.0)

die() { echo "$SUITE: cannot run: $*" >&2; exit 3; }

mkdir -p "$CACHE_DIR" || die "cannot create $CACHE_DIR"
CACHE_DIR=$(cd "$CACHE_DIR" && pwd)
BASE=$CACHE_DIR/py-amqp
VENV=$BASE/venv
SRC=$BASE/src/amqp-$AMQP_VERSION
STAMP=$BASE/.installed-amqp$AMQP_VERSION-$(echo "${PINS[*]}" | md5sum | cut -c1-8)

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
  "${PIP[@]}" download --no-deps --no-binary :all: -d "$BASE/dl" "amqp==$AMQP_VERSION" \
    || die "pip download amqp==$AMQP_VERSION failed"
  tar -xzf "$BASE/dl/amqp-$AMQP_VERSION.tar.gz" -C "$BASE/src" || die "cannot unpack sdist"
  "${PIP[@]}" install "${PINS[@]}" || die "pip install of test dependencies failed"
  "${PIP[@]}" install --no-deps "$SRC" || die "pip install of amqp sdist failed"
  touch "$STAMP"
fi
PY=$VENV/bin/python
[ -x "$PY" ] && [ -d "$SRC/t/integration" ] || die "broken cache in $BASE (delete it)"

# ---- broker reachable? ------------------------------------------------------------------
wait_port() {
  local i
  for i in $(seq 1 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  return 1
}
wait_port "$AMQP_PORT" || die "nothing listens on 127.0.0.1:$AMQP_PORT"

# ---- certificates for the TLS tests -----------------------------------------------------
ARGS=()
rm -rf "$SRC/t/certs"
if [ "$AMQPS_PORT" = none ]; then
  ARGS+=(-k "not tls")
else
  wait_port "$AMQPS_PORT" || die "nothing listens on 127.0.0.1:$AMQPS_PORT"
  for f in ca.pem client.pem client.key; do
    [ -r "$CERTS_DIR/$f" ] || die "missing $CERTS_DIR/$f"
  done
  mkdir -p "$SRC/t/certs"
  cp "$CERTS_DIR/ca.pem" "$SRC/t/certs/ca_certificate.pem"
  cp "$CERTS_DIR/client.pem" "$SRC/t/certs/client_certificate.pem"
  cp "$CERTS_DIR/client.key" "$SRC/t/certs/client_key.pem"
  # Broken copies: replace the first 6 base64 characters after the BEGIN line by "Broken".
  sed '2s/^....../Broken/' "$CERTS_DIR/client.pem" >"$SRC/t/certs/client_certificate_broken.pem"
  sed '2s/^....../Broken/' "$CERTS_DIR/client.key" >"$SRC/t/certs/client_key_broken.pem"
fi

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
RABBITMQ_5671_TCP=$([ "$AMQPS_PORT" = none ] && echo 1 || echo "$AMQPS_PORT") \
PYTHONDONTWRITEBYTECODE=1 \
  timeout -k 20 "$TOTAL_TIMEOUT" "$PY" -m pytest t/integration -v -p no:cacheprovider \
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
