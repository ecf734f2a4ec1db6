#!/bin/bash
# Runs aiormq 7.2.4's own test suite (from its PyPI sdist) against a running broker.
#   aiormq.sh CACHE_DIR AMQP_PORT AMQPS_PORT CERTS_DIR
# The sdist's tests/conftest.py expects `rabbitmq_container`/`amqp_direct_url`
# fixtures from a docker container; py_async_broker_plugin.py (loaded with -p)
# provides them for the running broker and points the conftest's cert_path() at
# CERTS_DIR. No upstream file is edited. TLS: the suite connects with
# no_verify_ssl=1, with and without a client certificate; CERTS_DIR's
# ca.pem/client.pem/client.key replace the suite's own tests/certs (the broker
# would not trust the suite's client certificate). AMQPS_PORT=none: the TLS
# variants are skipped. See py_async_common.sh for how results are counted.
SUITE=aiormq
SDIST_NAME=aiormq
SDIST_VERSION=7.2.4
SDIST_SHA256=5fd20bb9583d73de85572198496b65cf028f27527c1733c9840d458e0b40e8fa
SDIST_DIR=aiormq-7.2.4
PYTEST_ARGS=(tests)
RUN_TIMEOUT=2400   # about 6.5 min against RabbitMQ 3.10 on 2 cores
source "$(dirname "${BASH_SOURCE[0]}")/py_async_common.sh"
py_async_main "$@"
