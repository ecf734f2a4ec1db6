"""Wharf's cluster with Python's stock RabbitMQ client, pika (issue #19): a quorum queue declared
through one node; publishers with confirms on two nodes, one of them connected to the queue's
leader; the leader's process is SIGKILLed while they are connected. The publisher on the killed
node reconnects to another node and publishes again what was never confirmed; the other keeps
publishing (a nack, when the group lost a publish with its leader, is published again). At the end
a consumer on a third node gets every confirmed message, each redelivery marked. Exits non-zero
on the first failure.

Before that, a classic queue reached through the cluster: declared on node 1 (its home), published
to with confirms through node 2, consumed with acks on node 3, every message once and in order.

Usage: python3 test_pika_cluster.py AMQP_PORT,HTTP_PORT,PID AMQP_PORT,HTTP_PORT,PID AMQP_PORT,HTTP_PORT,PID
(node 1, 2, 3 in order)
"""
import base64
import json
import os
import signal
import sys
import time
import urllib.request

import pika

QUEUE = "pika.cluster"


def connect(port: int) -> pika.BlockingConnection:
    params = pika.ConnectionParameters(
        host="127.0.0.1", port=port, credentials=pika.PlainCredentials("guest", "guest"), heartbeat=10
    )
    return pika.BlockingConnection(params)


def queue_leader(http_port: int) -> int | None:
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}/api/cluster/queues")
    request.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    for queue in json.load(urllib.request.urlopen(request, timeout=10)):
        if queue["name"] == QUEUE:
            return queue.get("leader")
    return None


def wait_for(what: str, check, seconds: float = 120.0):
    """Asks again until `check` answers something true; fails after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            answer = check()
        except OSError:
            answer = None
        if answer:
            return answer
        time.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


class Publisher:
    """Publishes with confirms through one node; on a lost connection, through `fallback`."""

    def __init__(self, name: str, port: int, fallback: int):
        self.name, self.port, self.fallback = name, port, fallback
        self.confirmed: list[str] = []
        self.sequence = 0
        self.reconnects = 0
        self.nacks = 0
        self._open(port)

    def _open(self, port: int) -> None:
        self.connection = connect(port)
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()

    def publish(self) -> None:
        body = f"{self.name}-{self.sequence}"
        while True:
            try:
                self.channel.basic_publish("", QUEUE, body.encode(), pika.BasicProperties(delivery_mode=2))
                break
            except pika.exceptions.NackError:
                self.nacks += 1  # not taken: publish it again
            except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError, ConnectionError):
                # Its node is gone (or the channel closed): reconnect elsewhere and publish again.
                self.reconnects += 1
                wait_for("a reconnect", lambda: self._reopen(self.fallback))
        self.confirmed.append(body)
        self.sequence += 1

    def _reopen(self, port: int) -> bool:
        try:
            self._open(port)
            return True
        except pika.exceptions.AMQPConnectionError:
            return False


def classic_through_other_nodes(nodes: list[tuple[int, int, int]]) -> None:
    """A durable classic queue lives on node 1 and is used through nodes 2 and 3."""
    name = "pika.classic"
    connect(nodes[0][0]).channel().queue_declare(name, durable=True)

    def known_on(port: int) -> bool:
        try:
            connect(port).channel().queue_declare(name, durable=True, passive=True)
            return True
        except pika.exceptions.ChannelClosedByBroker:
            return False

    # The declaration reaches the other nodes through the metadata group, a moment later.
    for node in nodes[1:]:
        wait_for(f"the classic queue on the node of port {node[0]}", lambda: known_on(node[0]))
    publisher = connect(nodes[1][0]).channel()
    publisher.confirm_delivery()
    bodies = [f"classic-{n}" for n in range(100)]
    for body in bodies:
        publisher.basic_publish("", name, body.encode(), pika.BasicProperties(delivery_mode=2))
    counted = connect(nodes[2][0]).channel().queue_declare(name, durable=True, passive=True)
    assert counted.method.message_count == 100, counted.method.message_count
    consumer = connect(nodes[2][0]).channel()
    consumer.basic_qos(prefetch_count=20)
    received: list[str] = []

    def on_message(channel, method, properties, body):
        assert not method.redelivered, body
        received.append(body.decode())
        channel.basic_ack(method.delivery_tag)
        if len(received) == len(bodies):
            channel.stop_consuming()

    consumer.basic_consume(name, on_message)
    consumer.connection.call_later(120, consumer.stop_consuming)
    consumer.start_consuming()
    assert received == bodies, f"through node 3: {received[:5]}... ({len(received)} of {len(bodies)})"
    print(f"pika cluster: a classic queue on node 1, {len(bodies)} published through node 2, consumed on node 3 in order")


def main(nodes: list[tuple[int, int, int]]) -> None:
    classic_through_other_nodes(nodes)
    setup = connect(nodes[0][0]).channel()
    setup.queue_declare(QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
    leader = wait_for("the queue's leader", lambda: queue_leader(nodes[0][1]))
    others = [index for index in range(3) if index + 1 != leader]
    leader_index = leader - 1
    on_leader = Publisher("on-leader", nodes[leader_index][0], nodes[others[0]][0])
    on_follower = Publisher("on-follower", nodes[others[0]][0], nodes[others[0]][0])
    for _ in range(50):
        on_leader.publish()
        on_follower.publish()

    # The leader's process dies while both are connected.
    os.kill(nodes[leader_index][2], signal.SIGKILL)
    for _ in range(50):
        on_leader.publish()
        on_follower.publish()
    assert on_leader.reconnects >= 1, "the publisher on the killed node never noticed"
    new_leader = wait_for("a new leader", lambda: (queue_leader(nodes[others[0]][1]) or 0) not in (0, leader) and True)
    assert new_leader

    # Every confirmed message reaches a consumer on the third node.
    confirmed = set(on_leader.confirmed) | set(on_follower.confirmed)
    consumer = connect(nodes[others[1]][0]).channel()
    consumer.basic_qos(prefetch_count=50)
    received: set[str] = set()
    deadline = time.monotonic() + 120

    def on_message(channel, method, properties, body):
        received.add(body.decode())
        channel.basic_ack(method.delivery_tag)
        if confirmed <= received or time.monotonic() > deadline:
            channel.stop_consuming()

    consumer.basic_consume(QUEUE, on_message)
    consumer.connection.call_later(120, consumer.stop_consuming)
    consumer.start_consuming()
    missing = sorted(confirmed - received)
    assert not missing, f"confirmed but never delivered: {missing[:10]} ({len(missing)})"
    unknown = sorted(received - {f"{p.name}-{n}" for p in (on_leader, on_follower) for n in range(p.sequence + 1)})
    assert not unknown, f"delivered but never published: {unknown[:10]}"
    print(
        f"pika cluster: {len(confirmed)} confirmed, all delivered; the publisher on the killed leader reconnected "
        f"{on_leader.reconnects}x, nacks published again: {on_leader.nacks + on_follower.nacks}"
    )


if __name__ == "__main__":
    main([tuple(int(part) for part in argument.split(",")) for argument in sys.argv[1:4]])
