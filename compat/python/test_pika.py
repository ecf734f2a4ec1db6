"""Wharf with Python's stock RabbitMQ client, pika: confirmed publishes, acked consumes,
nack-requeue, basic.get and every exchange type. Exits non-zero on the first failure.

Usage: python3 test_pika.py AMQP_PORT
"""
import sys

import pika


def main(port: int) -> None:
    params = pika.ConnectionParameters(host="127.0.0.1", port=port, credentials=pika.PlainCredentials("guest", "guest"))
    connection = pika.BlockingConnection(params)
    channel = connection.channel()
    channel.confirm_delivery()

    # Confirmed persistent publishes to a durable queue; publish raises if nacked or unroutable.
    channel.queue_declare("pika.orders", durable=True)
    for index in range(100):
        channel.basic_publish("", "pika.orders", f"order-{index}".encode(), pika.BasicProperties(delivery_mode=2), mandatory=True)

    # Acked consumes, in order.
    received = []

    def on_message(ch, method, properties, body):
        received.append(body.decode())
        ch.basic_ack(method.delivery_tag)
        if len(received) == 100:
            ch.stop_consuming()

    channel.basic_qos(prefetch_count=10)
    channel.basic_consume("pika.orders", on_message)
    channel.start_consuming()
    assert received == [f"order-{index}" for index in range(100)], received[:5]

    # nack with requeue: the message comes back marked redelivered.
    channel.basic_publish("", "pika.orders", b"retry-me", pika.BasicProperties(delivery_mode=2))
    method, _, body = channel.basic_get("pika.orders")
    assert body == b"retry-me" and not method.redelivered
    channel.basic_nack(method.delivery_tag, requeue=True)
    method, _, body = channel.basic_get("pika.orders")
    assert body == b"retry-me" and method.redelivered, method
    channel.basic_ack(method.delivery_tag)
    method, _, _ = channel.basic_get("pika.orders")
    assert method is None, "basic.get-empty"

    # Every exchange type.
    channel.queue_declare("pika.sink", exclusive=True)
    cases = [
        ("pika.direct", "direct", "k", "k", None, True),
        ("pika.fanout", "fanout", "", "anything", None, True),
        ("pika.topic", "topic", "order.*", "order.received", None, True),
        ("pika.topic-miss", "topic", "order.*", "invoice.sent", None, False),
        ("pika.headers", "headers", "", "", {"x-match": "all", "region": "eu"}, True),
    ]
    for exchange, kind, binding_key, routing_key, arguments, routed in cases:
        channel.exchange_declare(exchange, exchange_type=kind)
        channel.queue_bind("pika.sink", exchange, routing_key=binding_key, arguments=arguments)
        headers = {"region": "eu"} if kind == "headers" else None
        channel.basic_publish(exchange, routing_key, exchange.encode(), pika.BasicProperties(headers=headers))
        method, _, body = channel.basic_get("pika.sink", auto_ack=True)
        if routed:
            assert body == exchange.encode(), (exchange, body)
        else:
            assert method is None, exchange

    # A channel error closes the channel with RabbitMQ's code, not the connection.
    bad = connection.channel()
    try:
        bad.queue_declare("pika.orders", durable=False)
        raise AssertionError("redeclaring with other properties must fail")
    except pika.exceptions.ChannelClosedByBroker as error:
        assert error.reply_code == 406, error
    assert connection.is_open

    channel.queue_delete("pika.orders")
    connection.close()
    print("pika: all checks passed")


if __name__ == "__main__":
    main(int(sys.argv[1]))
