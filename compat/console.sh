#!/usr/bin/env bash
# Drives the web console in a real headless Chromium (Debian's `chromium`, installed with
# apt-get if missing) through playwright-core (npm; it downloads no browser): compat/console/
# console_test.js against the built `wharf` binary on free loopback ports. Screenshots are kept
# in $WHARF_CONSOLE_ARTIFACTS (default: target/console-screenshots).
#
# Usage: compat/console.sh PATH_TO_WHARF_BINARY
set -euo pipefail
wharf_bin=$(realpath "${1:?usage: compat/console.sh PATH_TO_WHARF_BINARY}")
cd "$(dirname "$0")"
artifacts=$(realpath -m "${WHARF_CONSOLE_ARTIFACTS:-../target/console-screenshots}")
mkdir -p "$artifacts"
if [ ! -x /usr/bin/chromium ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y chromium >/dev/null 2>&1 \
    || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium >/dev/null; }
fi
(cd console && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --no-audit --no-fund --loglevel=error >/dev/null)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }
port=$(free_port)
http_port=$(free_port)
# Two free ports asked one after the other can be the same one (the first was released).
while [ "$http_port" = "$port" ]; do http_port=$(free_port); done
work=$(mktemp -d "${TMPDIR:-/tmp}/wharf-console.XXXXXX")
"$wharf_bin" serve --amqp-listen "127.0.0.1:$port" --mqtt-listen none --http-listen "127.0.0.1:$http_port" \
  --data-dir "$work/data" --log info 2>"$work/wharf.log" &
wharf_pid=$!
trap 'kill $wharf_pid 2>/dev/null || true; wait $wharf_pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 600); do
  grep -q "management API listening" "$work/wharf.log" && break
  kill -0 "$wharf_pid" 2>/dev/null || { cat "$work/wharf.log"; echo "wharf exited"; exit 1; }
  sleep 0.1
done
node console/console_test.js "$http_port" "$artifacts"
