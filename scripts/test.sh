#!/usr/bin/env bash
# Runs every test of the workspace, then the stock-client compatibility suites (Python's pika,
# Node's amqplib) and the client libraries' own integration suites against the built binary.
# Installs and starts whatever the tests need itself, so it passes on a fresh Debian machine that
# has only the Rust toolchain, Python and Node.
set -euo pipefail
cd "$(dirname "$0")/.."

# The crash property test's case count (the issue asks for at least 1,000 in CI).
export WHARF_PROPTEST_CASES="${WHARF_PROPTEST_CASES:-1000}"
# Every property test (proptest) starts from one fixed seed here, so CI runs the same fixed part
# on every run; a random search is scripts/proptest.sh, run by hand and recorded in
# docs/durability.md ("How this is tested"). A random seed in CI once failed a session's whole
# work on a case no change of that session had touched.
export PROPTEST_RNG_SEED="${PROPTEST_RNG_SEED:-20261206}"

# A throwaway PostgreSQL for the SDK's tests (installed from Debian if missing), stopped on exit.
pg_dir=$(mktemp -d "${TMPDIR:-/tmp}/wharf-postgres.XXXXXX")
trap 'scripts/postgres.sh stop "$pg_dir"' EXIT
eval "$(scripts/postgres.sh start "$pg_dir")"
# And a throwaway MariaDB (MySQL's protocol and SQL) for the SDK's MySQL tests.
mysql_dir=$(mktemp -d "${TMPDIR:-/tmp}/wharf-mariadb.XXXXXX")
trap 'scripts/postgres.sh stop "$pg_dir"; scripts/mariadb.sh stop "$mysql_dir"' EXIT
eval "$(scripts/mariadb.sh start "$mysql_dir")"
# Without a URL the PostgreSQL and MySQL tests skip (so a bare `cargo test --workspace` works);
# here they must run, so a missing URL fails them instead.
export WHARF_TEST_POSTGRES_REQUIRED=1 WHARF_TEST_MYSQL_REQUIRED=1

cargo test --workspace --all-targets --locked
# Doc tests (not part of --all-targets).
cargo test --workspace --doc --locked

cargo build -p wharf --locked
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
compat/run.sh "$target_dir/debug/wharf"
# pika against a three-node cluster, the quorum queue's leader killed while it is connected.
compat/cluster.sh "$target_dir/debug/wharf"
# Third-party MQTT clients (paho-mqtt 3.1.1 and 5.0, mosquitto_pub/sub) and AMQP interoperation,
# a persistent session across kill -9 among them (compat/mqtt.sh).
compat/mqtt.sh "$target_dir/debug/wharf"
# RabbitMQ's own management CLI against the management API (compat/rabbitmqadmin.sh).
compat/rabbitmqadmin.sh "$target_dir/debug/wharf"
# The web console in a real headless Chromium (Debian's), screenshots in target/console-screenshots.
compat/console.sh "$target_dir/debug/wharf"
# Exactly once from Python, Node and Go through `wharf relay` and the outbox/inbox contract
# (examples/polyglot/README.md): each recipe with a crash between commit and ack and re-published
# copies, checked for one payment per order.
examples/polyglot/run.sh "$target_dir/debug/wharf"
# The client libraries' own integration suites (compat/README.md): all six, aiormq's and
# aio-pika's in their fixed CI part (half their parametrized variants; the whole of both is
# `compat/upstream/run.sh BINARY`, recorded in compat/README.md), about 10 minutes in all with a
# cold cache (they install pinned releases from PyPI, npm and Debian).
WHARF_UPSTREAM_SUBSET=ci compat/upstream/run.sh "$target_dir/debug/wharf"

# The reference system under fire: 300 orders while a random process (the broker included) is
# killed with SIGKILL every 2 s; fails on any order lost, charged, stocked or mailed twice.
cargo build -p food-delivery --bins --locked
"$target_dir/debug/chaos" --orders 300 --rate 20 --kill-every-ms 2000 --seed "${WHARF_CHAOS_SEED:-$(date +%s)}"

# The telemetry system under fire (examples/telemetry): devices publish readings over MQTT QoS 1
# with persistent sessions while the broker, the ingestion and the alerting services are killed
# with SIGKILL every 1.5 s; fails on any acknowledged reading not stored exactly once or any alert
# not raised exactly once. CI's bounded runs: 100 devices, 40 readings each, on SQLite, then 50
# devices with the services on the throwaway PostgreSQL; the full one is
# `cargo run --release -p telemetry --bin telemetry-chaos` (1,000 devices), recorded in the README.
cargo build -p telemetry --bins --locked
"$target_dir/debug/telemetry-chaos" --devices 100 --readings 40 --interval-ms 200 --kill-every-ms 1500 --seed "${WHARF_CHAOS_SEED:-$(date +%s)}"
"$target_dir/debug/telemetry-chaos" --devices 50 --readings 30 --interval-ms 200 --kill-every-ms 1500 --seed "${WHARF_CHAOS_SEED:-$(date +%s)}" \
  --postgres-url "$WHARF_TEST_POSTGRES_URL"
