#!/bin/bash
# Runs aio-pika 10.2.1's own test suite (from its PyPI sdist) against a running broker.
#   aio-pika.sh CACHE_DIR AMQP_PORT AMQPS_PORT CERTS_DIR
# The sdist's tests/conftest.py starts a docker container (`docker` and
# `rabbitmq_container` fixtures, and a pytest_configure() that aborts without a
# docker daemon). py_async_broker_plugin.py (loaded with -p) patches that
# conftest module object when pytest registers it: check_docker_available() ->
# no-op, rabbitmq_container -> the running broker. No upstream file is edited.
# TLS: tests/test_amqps.py connects with CERT_NONE and no client certificate,
# so CERTS_DIR's CA is not even needed; AMQPS_PORT=none skips it.
# See py_async_common.sh for how results are counted.
SUITE=aio-pika
SDIST_NAME=aio-pika
SDIST_VERSION=10.2.1
SDIST_SHA256=e4f77afd9179a3cca5a904c3b0a1190256a36d9f90650db908b1b2245eb27487
SDIST_DIR=aio_pika-10.2.1
PYTEST_ARGS=(tests)
RUN_TIMEOUT=3000
source "$(dirname "${BASH_SOURCE[0]}")/py_async_common.sh"
py_async_main "$@"
