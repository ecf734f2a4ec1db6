#!/usr/bin/env bash
# Makes the test certificates the compatibility suites use, in DIR: a CA (ca.pem), a server
# certificate for 127.0.0.1 (server.pem, server.key) and a client certificate for guest
# (client.pem, client.key, CN=guest, for SASL EXTERNAL). EC keys, valid two days, made with the
# openssl CLI (installed from Debian if missing).
set -euo pipefail
certs=${1:?usage: compat/make_certs.sh DIR}
if ! command -v openssl >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y openssl >/dev/null 2>&1 \
    || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y openssl >/dev/null; }
fi
mkdir -p "$certs"
ec_key=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
openssl req -x509 "${ec_key[@]}" -keyout "$certs/ca.key" -out "$certs/ca.pem" -days 2 \
  -subj "/CN=Wharf compat CA" 2>/dev/null
issue() { # name, subject, extensions
  openssl req "${ec_key[@]}" -keyout "$certs/$1.key" -out "$certs/$1.csr" -subj "$2" 2>/dev/null
  printf '%b' "$3" >"$certs/$1.ext"
  openssl x509 -req -in "$certs/$1.csr" -CA "$certs/ca.pem" -CAkey "$certs/ca.key" -CAcreateserial \
    -out "$certs/$1.pem" -days 2 -extfile "$certs/$1.ext" 2>/dev/null
}
issue server "/CN=127.0.0.1" "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"
issue client "/CN=guest" "extendedKeyUsage=clientAuth"
# Readable by a broker running as another user (RabbitMQ's scripts may drop privileges).
chmod 644 "$certs"/*
