"""Wharf's TLS listener with Python's stock RabbitMQ client, pika, under mutual TLS
(--tls-verify-peer): SASL EXTERNAL logs in as the client certificate's CN, PLAIN works over TLS
too, and a client without a certificate is refused. Exits non-zero on the first failure.

Usage: python3 test_pika_tls.py AMQPS_PORT CERT_DIR
CERT_DIR holds ca.pem, client.pem and client.key (a client certificate with CN=guest), as
compat/run.sh makes them.
"""
import os
import ssl
import sys

import pika


def context(cert_dir: str, with_certificate: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=os.path.join(cert_dir, "ca.pem"))
    if with_certificate:
        ctx.load_cert_chain(os.path.join(cert_dir, "client.pem"), os.path.join(cert_dir, "client.key"))
    return ctx


def params(port: int, ctx: ssl.SSLContext, credentials) -> pika.ConnectionParameters:
    return pika.ConnectionParameters(
        host="127.0.0.1",
        port=port,
        credentials=credentials,
        ssl_options=pika.SSLOptions(ctx, server_hostname="127.0.0.1"),
        connection_attempts=1,
    )


def round_trip(connection: pika.BlockingConnection, queue: str) -> None:
    channel = connection.channel()
    channel.confirm_delivery()
    channel.queue_declare(queue, exclusive=True)
    channel.basic_publish("", queue, b"over tls", mandatory=True)
    method, _, body = channel.basic_get(queue, auto_ack=True)
    assert method is not None and body == b"over tls", (method, body)


def main(port: int, cert_dir: str) -> None:
    # EXTERNAL: no password at all; the broker takes the user name (guest) from the certificate.
    external = pika.BlockingConnection(params(port, context(cert_dir, True), pika.credentials.ExternalCredentials()))
    round_trip(external, "pika.tls.external")
    external.close()

    # PLAIN over the same TLS listener, with the certificate the listener requires.
    plain = pika.BlockingConnection(params(port, context(cert_dir, True), pika.PlainCredentials("guest", "guest")))
    round_trip(plain, "pika.tls.plain")
    plain.close()

    # Without a client certificate the TLS handshake is refused: no AMQP at all.
    try:
        pika.BlockingConnection(params(port, context(cert_dir, False), pika.PlainCredentials("guest", "guest")))
        raise AssertionError("a client without a certificate must be refused under --tls-verify-peer")
    except pika.exceptions.AMQPConnectionError:
        pass
    print("pika over TLS: all checks passed")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
