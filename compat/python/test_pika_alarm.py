"""Wharf's memory alarm with Python's stock RabbitMQ client, pika: a publisher that fills memory
past the watermark is sent connection.blocked (pika's blocked callback fires, with RabbitMQ's
reason), a consumer on another connection drains meanwhile, and connection.unblocked follows;
then the publisher's connection works again. Exits non-zero on the first failure.

Usage: python3 test_pika_alarm.py AMQP_PORT   (a broker with --memory-high-watermark-bytes 1000000)
"""
import sys
import time

import pika

# A safety net so a broken broker fails the test instead of hanging it; never a timing claim.
PATIENCE_S = 30


def wait_for(connection, condition, what):
    deadline = time.monotonic() + PATIENCE_S
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {PATIENCE_S} s"
        connection.process_data_events(time_limit=0.1)


def main(port: int) -> None:
    params = pika.ConnectionParameters(host="127.0.0.1", port=port, credentials=pika.PlainCredentials("guest", "guest"))
    publisher = pika.BlockingConnection(params)
    events = []
    publisher.add_on_connection_blocked_callback(lambda _, frame: events.append(("blocked", frame.method.reason)))
    publisher.add_on_connection_unblocked_callback(lambda _, frame: events.append(("unblocked",)))
    channel = publisher.channel()
    channel.queue_declare("alarm.backlog")
    # 2 MB of transient bodies against a 1 MB watermark, nobody consuming.
    for _ in range(20):
        channel.basic_publish("", "alarm.backlog", b"x" * 100_000)

    # The broker checks its alarms every second; a connection that publishes while one is raised
    # is blocked. Publish a small message at a time until pika reports the block.
    def publish_and_see():
        if not events:
            channel.basic_publish("", "alarm.backlog", b"one more")
        return bool(events)

    wait_for(publisher, publish_and_see, "connection.blocked")
    assert events[0] == ("blocked", "low on memory"), events

    # Consumers keep draining: another connection empties the queue.
    consumer = pika.BlockingConnection(params)
    consumer_channel = consumer.channel()
    drained = 0
    while True:
        method, _, _ = consumer_channel.basic_get("alarm.backlog", auto_ack=True)
        if method is None:
            break
        drained += 1
    assert drained >= 20, drained

    wait_for(publisher, lambda: ("unblocked",) in events, "connection.unblocked")
    # Reading resumed: a round trip on the publisher's connection is answered.
    declared = channel.queue_declare("alarm.backlog", passive=True)
    assert declared.method.message_count >= 0
    consumer.close()
    publisher.close()
    print("pika: memory alarm, connection.blocked and unblocked ok")


if __name__ == "__main__":
    main(int(sys.argv[1]))
