#!/usr/bin/env python3
"""The polyglot shop in Python (psycopg + pika), following docs/outbox-contract.md.

    shop.py setup            declare the exchange and queue, create the tables
    shop.py produce COUNT    place COUNT orders, each with its OrderReceived row in the outbox,
                             in one transaction (`wharf relay` publishes them)
    shop.py consume          charge each order once through the inbox; with
                             CRASH_AFTER_COMMIT=N, exit (status 3) right after the Nth commit,
                             before its ack, as a crash there would

DATABASE_URL (PostgreSQL) and BROKER_URL (AMQP) say where; QUEUE names the queue.
"""
import json
import os
import sys
import time
import uuid

import pika
import psycopg

DATABASE_URL = os.environ["DATABASE_URL"]
BROKER_URL = os.environ["BROKER_URL"]
QUEUE = os.environ.get("QUEUE", "payments-python")
CONSUMER = "payment-service"


def now_ms():
    return int(time.time() * 1000)


def setup():
    with pika.BlockingConnection(pika.URLParameters(BROKER_URL)) as connection:
        channel = connection.channel()
        channel.exchange_declare("shop", "topic", durable=True)
        channel.queue_declare(QUEUE, durable=True)
        channel.queue_bind(QUEUE, "shop", "order.#")
    with psycopg.connect(DATABASE_URL, autocommit=True) as db, db.transaction():
        db.execute("CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, customer TEXT NOT NULL, cents BIGINT NOT NULL)")
        db.execute("CREATE TABLE IF NOT EXISTS payments (order_id TEXT NOT NULL, message_id TEXT NOT NULL)")
        db.execute("CREATE TABLE IF NOT EXISTS absorbed (message_id TEXT NOT NULL)")
        # The inbox, as the contract gives it.
        db.execute(
            "CREATE TABLE IF NOT EXISTS wharf_inbox (consumer TEXT NOT NULL, message_id TEXT NOT NULL,"
            " processed_at BIGINT NOT NULL, PRIMARY KEY (consumer, message_id))"
        )


def produce(count):
    with psycopg.connect(DATABASE_URL, autocommit=True) as db:
        for index in range(count):
            order_id, customer = f"order-{index}", f"customer-{index % 7}"
            body = json.dumps({"order_id": order_id, "cents": 100 + index}).encode()
            with db.transaction():
                db.execute("INSERT INTO orders (id, customer, cents) VALUES (%s, %s, %s)", (order_id, customer, 100 + index))
                # Writers of one ordering key take turns, so seq order is commit order.
                db.execute("SELECT pg_advisory_xact_lock(hashtext('wharf_outbox'), hashtext(%s))", (customer,))
                db.execute(
                    "INSERT INTO wharf_outbox (id, exchange, routing_key, ordering_key, headers, content_type,"
                    " message_type, body, created_at)"
                    " VALUES (%s, 'shop', 'order.received', %s, %s, 'application/json', 'OrderReceived', %s, %s)"
                    " ON CONFLICT (id) DO NOTHING",
                    (str(uuid.uuid4()), customer, json.dumps({"source": "python"}), body, now_ms()),
                )
                db.execute("SELECT pg_notify('wharf_outbox', '')")


def consume(crash_after):
    db = psycopg.connect(DATABASE_URL, autocommit=True)
    connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=16)
    committed = 0
    for method, properties, body in channel.consume(QUEUE):
        message_id = properties.message_id
        if not message_id:
            # Cannot be de-duplicated, and a retry cannot give it an id.
            channel.basic_reject(method.delivery_tag, requeue=False)
            continue
        order = json.loads(body)
        with db.transaction():
            inserted = db.execute(
                "INSERT INTO wharf_inbox (consumer, message_id, processed_at) VALUES (%s, %s, %s)"
                " ON CONFLICT (consumer, message_id) DO NOTHING",
                (CONSUMER, message_id, now_ms()),
            ).rowcount
            if inserted == 1:
                db.execute("INSERT INTO payments (order_id, message_id) VALUES (%s, %s)", (order["order_id"], message_id))
            else:
                db.execute("INSERT INTO absorbed (message_id) VALUES (%s)", (message_id,))
        committed += 1
        if crash_after and committed == crash_after:
            os._exit(3)  # committed, not acknowledged: the broker redelivers it
        channel.basic_ack(method.delivery_tag)


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "setup":
        setup()
    elif command == "produce" and len(sys.argv) == 3:
        produce(int(sys.argv[2]))
    elif command == "consume":
        consume(int(os.environ.get("CRASH_AFTER_COMMIT", "0")))
    else:
        sys.exit(__doc__)
