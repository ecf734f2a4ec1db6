#!/usr/bin/env bash
# Starts a throwaway MariaDB server (MySQL's protocol and SQL) for the SDK's tests and prints the
# line to export:
#   eval "$(scripts/mariadb.sh start DIR)"   ->  WHARF_TEST_MYSQL_URL=mysql://root@127.0.0.1:PORT/wharf
#   scripts/mariadb.sh stop DIR
# The server lives in DIR, listens on a free loopback port only and checks no passwords
# (--skip-grant-tables): it is for tests, never for data. Installs Debian's `mariadb-server`
# package if it is missing.
set -euo pipefail
action=${1:?usage: scripts/mariadb.sh start|stop DIR}
dir=${2:?usage: scripts/mariadb.sh start|stop DIR}

case $action in
  start)
    if ! command -v mariadbd >/dev/null 2>&1; then
      echo "installing MariaDB from Debian" >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mariadb-server >/dev/null 2>&1 \
        || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mariadb-server >/dev/null; }
    fi
    mkdir -p "$dir"
    user=$(id -un)
    mariadb-install-db --no-defaults --datadir="$dir/data" --user="$user" --auth-root-authentication-method=normal \
      --skip-test-db >"$dir/install.log" 2>&1
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
    mariadbd --no-defaults --datadir="$dir/data" --user="$user" --port="$port" --bind-address=127.0.0.1 \
      --socket="$dir/mariadb.sock" --pid-file="$dir/mariadb.pid" --skip-grant-tables \
      --innodb-flush-log-at-trx-commit=2 --max-connections=500 >"$dir/server.log" 2>&1 &
    for _ in $(seq 300); do
      mariadb --no-defaults -h127.0.0.1 -P"$port" -uroot -e "CREATE DATABASE IF NOT EXISTS wharf" >/dev/null 2>&1 && break
      sleep 0.1
    done
    mariadb --no-defaults -h127.0.0.1 -P"$port" -uroot -e "SELECT 1" >/dev/null \
      || { echo "MariaDB did not start; see $dir/server.log" >&2; exit 1; }
    echo "export WHARF_TEST_MYSQL_URL=mysql://root@127.0.0.1:$port/wharf"
    ;;
  stop)
    [ -f "$dir/mariadb.pid" ] && kill "$(cat "$dir/mariadb.pid")" 2>/dev/null || true
    for _ in $(seq 100); do [ -f "$dir/mariadb.pid" ] || break; sleep 0.1; done
    rm -rf "$dir"
    ;;
  *)
    echo "usage: scripts/mariadb.sh start|stop DIR" >&2
    exit 2
    ;;
esac
