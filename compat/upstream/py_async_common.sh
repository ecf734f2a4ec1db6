# Shared part of aiormq.sh and aio-pika.sh (sourced, not run).
#
# The caller sets: SUITE (name in the output line), SDIST_NAME, SDIST_VERSION,
# SDIST_SHA256, SDIST_DIR (top directory inside the sdist), PYTEST_ARGS (array),
# RUN_TIMEOUT (seconds for the whole pytest run), then calls py_async_main "$@".
#
# Interface: <suite>.sh CACHE_DIR AMQP_PORT AMQPS_PORT CERTS_DIR
#   The broker already runs on 127.0.0.1:AMQP_PORT (guest/guest, vhost "/"),
#   and with TLS on AMQPS_PORT (or "none") using CERTS_DIR/{ca,server,client}.*
# Last line printed: "<suite>: N passed, M failed".
#   passed  = tests whose call phase passed and no phase (setup/call/teardown) failed
#   failed  = tests with a failed/errored phase, plus a test that was still
#             running when the whole-run timeout killed pytest
#   skipped tests (pytest.skip, skipif, "no AMQPS port") count as neither; they
#   are reported on the line before, as are deselected (excluded) tests.
# Exit status: 0 when the suite ran (whatever the results), non-zero only when
# it could not run (install failure, bad arguments, pytest did not start).

set -uo pipefail

UPSTREAM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# Pinned test dependencies (all from PyPI). aiormq/aio-pika themselves are
# installed from PyPI wheels at the same version as the sdist whose tests run
# (the tests need the package metadata: aiormq reads its own version).
PY_ASYNC_REQUIREMENTS=(
  "aiormq==7.2.4"
  "aio-pika==10.2.1"
  "pamqp==4.0.1"
  "yarl==1.25.1"
  "multidict==7.2.1"
  "propcache==0.5.4"
  "idna==3.20"
  "pytest==9.2.0"
  "pluggy==1.7.0"
  "iniconfig==2.3.1"
  "packaging==26.4"
  "Pygments==2.21.0"
  "pytest-timeout==2.4.0"
  "aiomisc==18.0.37"
  "aiomisc-pytest==2.0.0"
  "aiothreads==1.1.4"
  "colorlog==6.12.0"
  "logging-journald==0.6.12"
  "shortuuid==1.0.13"
  "timeout-decorator==0.5.0"
)

die() { echo "$SUITE: cannot run: $*" >&2; exit 2; }

py_async_setup() {
  local cache=$1 venv=$1/venv stamp want
  mkdir -p "$cache" || die "cannot create $cache"
  want=$(printf '%s\n' "${PY_ASYNC_REQUIREMENTS[@]}" | sha256sum | cut -c1-16)
  stamp="$venv/.py-async-$want"
  if [ ! -e "$stamp" ]; then
    rm -rf "$venv"
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
      # Debian's python3 lacks ensurepip until python3-venv is installed.
      if command -v apt-get >/dev/null; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv) >&2 \
          || die "apt-get install python3-venv failed"
      fi
      rm -rf "$venv"
      python3 -m venv "$venv" || die "python3 -m venv failed"
    fi
    "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
      || die "python >= 3.11 needed (aiormq 7.2 requires it)"
    "$venv/bin/pip" install -q --disable-pip-version-check --no-deps "${PY_ASYNC_REQUIREMENTS[@]}" >&2 \
      || die "pip install failed"
    "$venv/bin/pip" check >&2 || echo "$SUITE: warning: pip check reports problems" >&2
    touch "$stamp"
  fi
  PY=$venv/bin/python

  local sdists=$cache/sdists src=$cache/src
  local tarball=$sdists/$SDIST_DIR.tar.gz
  mkdir -p "$sdists" "$src"
  if [ ! -d "$src/$SDIST_DIR/tests" ]; then
    if [ ! -f "$tarball" ] || ! echo "$SDIST_SHA256  $tarball" | sha256sum -c --quiet 2>/dev/null; then
      rm -f "$tarball"
      # --no-binary for the package itself only: its build backend (uv_build)
      # may come as a wheel; pip needs it to read the sdist's metadata.
      "$venv/bin/pip" download -q --disable-pip-version-check --no-deps \
        --no-binary "$SDIST_NAME" "$SDIST_NAME==$SDIST_VERSION" -d "$sdists" >&2 \
        || die "pip download of the $SDIST_NAME sdist failed"
    fi
    echo "$SDIST_SHA256  $tarball" | sha256sum -c --quiet || die "sdist checksum mismatch"
    rm -rf "${src:?}/$SDIST_DIR"
    tar -xzf "$tarball" -C "$src" || die "cannot unpack $tarball"
  fi
  SRC=$src/$SDIST_DIR
}

# count RESULTS_FILE -> prints "passed failed skipped" and the failed ids to stderr-file
py_async_count() {
  "$PY" - "$1" "$2" <<'PY'
import sys
results, failed_list = sys.argv[1], sys.argv[2]
order, started, phases = [], set(), {}
with open(results) as fp:
    for line in fp:
        parts = line.rstrip("\n").split(" ", 2)
        if parts[0] == "start" and len(parts) >= 2:
            nodeid = line.rstrip("\n")[6:]
            if nodeid not in started:
                started.add(nodeid)
                order.append(nodeid)
            continue
        if len(parts) != 3:
            continue
        when, outcome, nodeid = parts
        phases.setdefault(nodeid, []).append((when, outcome))
        if nodeid not in started:
            started.add(nodeid)
            order.append(nodeid)
passed = failed = skipped = 0
with open(failed_list, "w") as out:
    for nodeid in order:
        ph = phases.get(nodeid, [])
        outcomes = {o for _, o in ph}
        calls = [o for w, o in ph if w == "call"]
        done = any(w == "teardown" for w, _ in ph)
        if "failed" in outcomes:
            failed += 1
            out.write(nodeid + "\n")
        elif calls and calls[-1] == "passed" and done:
            passed += 1
        elif not done:
            failed += 1  # killed while running (whole-run timeout)
            out.write(nodeid + "  (did not finish)\n")
        else:
            skipped += 1
print(passed, failed, skipped)
PY
}

py_async_main() {
  [ $# -eq 4 ] || { echo "usage: $0 CACHE_DIR AMQP_PORT AMQPS_PORT CERTS_DIR" >&2; exit 2; }
  local cache amqp_port=$2 amqps_port=$3 certs=$4
  mkdir -p "$1" || die "cannot create $1"
  cache=$(cd "$1" && pwd)
  [[ $amqp_port =~ ^[0-9]+$ ]] || die "bad AMQP_PORT $amqp_port"
  [[ $amqps_port =~ ^([0-9]+|none)$ ]] || die "bad AMQPS_PORT $amqps_port"
  if [ "$amqps_port" != none ]; then
    certs=$(cd "$certs" && pwd) || die "bad CERTS_DIR"
    for f in ca.pem client.pem client.key; do
      [ -r "$certs/$f" ] || die "missing $certs/$f"
    done
  fi

  py_async_setup "$cache"

  local out=$cache/run-$SUITE
  rm -rf "$out"; mkdir -p "$out"
  local results=$out/results.txt log=$out/pytest.log
  : >"$results"

  export PYASYNC_AMQP_PORT=$amqp_port PYASYNC_AMQPS_PORT=$amqps_port PYASYNC_CERTS_DIR=$certs
  export PYASYNC_EXCLUDE=$UPSTREAM_DIR/$SUITE.exclude PYASYNC_RESULTS=$results
  export PYTHONPATH=$UPSTREAM_DIR PYTHONDONTWRITEBYTECODE=1
  unset PYTEST_ADDOPTS DOCKER_HOST

  # Per-test bound: pytest-timeout (signal method: fails that test, the run
  # goes on). Whole-run bound: timeout(1) with TERM, then KILL 30 s later.
  (cd "$SRC" && timeout -k 30 "$RUN_TIMEOUT" "$PY" -m pytest -p py_async_broker_plugin \
      -p no:cacheprovider --timeout=60 --timeout-method=signal -q -rfE \
      -o log_cli=false --junitxml="$out/junit.xml" "${PYTEST_ARGS[@]}") >"$log" 2>&1
  local rc=$?
  tail -n 60 "$log"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    echo "$SUITE: whole run killed after ${RUN_TIMEOUT}s" >&2
  elif [ $rc -ge 2 ] && [ ! -s "$results" ]; then
    die "pytest did not run (exit $rc), see $log"
  fi
  local counts passed failed skipped deselected
  counts=$(py_async_count "$results" "$out/failed.txt") || die "cannot count results"
  read -r passed failed skipped <<<"$counts"
  deselected=$(grep -o '[0-9]* deselected' "$log" | tail -1 | cut -d' ' -f1)
  if [ -s "$out/failed.txt" ]; then
    echo "failed tests:"; sed 's/^/  /' "$out/failed.txt"
  fi
  echo "$SUITE: ${skipped} skipped (not counted), ${deselected:-0} excluded; log $log"
  echo "$SUITE: $passed passed, $failed failed"
  exit 0
}
