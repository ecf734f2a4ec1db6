#!/usr/bin/env node
// The polyglot shop in Node (pg + amqplib), following docs/outbox-contract.md.
//
//   node shop.js setup            declare the exchange and queue, create the tables
//   node shop.js produce COUNT    place COUNT orders, each with its OrderReceived row in the
//                                 outbox, in one transaction (`wharf relay` publishes them)
//   node shop.js consume          charge each order once through the inbox; with
//                                 CRASH_AFTER_COMMIT=N, exit (status 3) right after the Nth
//                                 commit, before its ack, as a crash there would
//
// DATABASE_URL (PostgreSQL) and BROKER_URL (AMQP) say where; QUEUE names the queue.
'use strict';

const crypto = require('node:crypto');
const amqp = require('amqplib');
const { Client } = require('pg');

const DATABASE_URL = process.env.DATABASE_URL;
const BROKER_URL = process.env.BROKER_URL;
const QUEUE = process.env.QUEUE || 'payments-node';
const CONSUMER = 'payment-service';

async function database() {
  const client = new Client({ connectionString: DATABASE_URL });
  await client.connect();
  return client;
}

async function setup() {
  const connection = await amqp.connect(BROKER_URL);
  const channel = await connection.createChannel();
  await channel.assertExchange('shop', 'topic', { durable: true });
  await channel.assertQueue(QUEUE, { durable: true });
  await channel.bindQueue(QUEUE, 'shop', 'order.#');
  await connection.close();
  const db = await database();
  await db.query('BEGIN');
  await db.query('CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, customer TEXT NOT NULL, cents BIGINT NOT NULL)');
  await db.query('CREATE TABLE IF NOT EXISTS payments (order_id TEXT NOT NULL, message_id TEXT NOT NULL)');
  await db.query('CREATE TABLE IF NOT EXISTS absorbed (message_id TEXT NOT NULL)');
  // The inbox, as the contract gives it.
  await db.query(`CREATE TABLE IF NOT EXISTS wharf_inbox (consumer TEXT NOT NULL, message_id TEXT NOT NULL,
    processed_at BIGINT NOT NULL, PRIMARY KEY (consumer, message_id))`);
  await db.query('COMMIT');
  await db.end();
}

async function produce(count) {
  const db = await database();
  for (let index = 0; index < count; index++) {
    const orderId = `order-${index}`;
    const customer = `customer-${index % 7}`;
    const body = Buffer.from(JSON.stringify({ order_id: orderId, cents: 100 + index }));
    await db.query('BEGIN');
    await db.query('INSERT INTO orders (id, customer, cents) VALUES ($1, $2, $3)', [orderId, customer, 100 + index]);
    // Writers of one ordering key take turns, so seq order is commit order.
    await db.query("SELECT pg_advisory_xact_lock(hashtext('wharf_outbox'), hashtext($1))", [customer]);
    await db.query(
      `INSERT INTO wharf_outbox (id, exchange, routing_key, ordering_key, headers, content_type, message_type, body, created_at)
       VALUES ($1, 'shop', 'order.received', $2, $3, 'application/json', 'OrderReceived', $4, $5)
       ON CONFLICT (id) DO NOTHING`,
      [crypto.randomUUID(), customer, JSON.stringify({ source: 'node' }), body, Date.now()],
    );
    await db.query("SELECT pg_notify('wharf_outbox', '')");
    await db.query('COMMIT');
  }
  await db.end();
}

async function consume(crashAfter) {
  const db = await database();
  const connection = await amqp.connect(BROKER_URL);
  const channel = await connection.createChannel();
  await channel.prefetch(16);
  let committed = 0;
  // One message at a time: the next waits for the previous one's transaction.
  let previous = Promise.resolve();
  await channel.consume(QUEUE, (message) => {
    previous = previous.then(async () => {
      const messageId = message.properties.messageId;
      if (!messageId) {
        // Cannot be de-duplicated, and a retry cannot give it an id.
        channel.reject(message, false);
        return;
      }
      const order = JSON.parse(message.content.toString());
      await db.query('BEGIN');
      const inserted = await db.query(
        `INSERT INTO wharf_inbox (consumer, message_id, processed_at) VALUES ($1, $2, $3)
         ON CONFLICT (consumer, message_id) DO NOTHING`,
        [CONSUMER, messageId, Date.now()],
      );
      if (inserted.rowCount === 1) {
        await db.query('INSERT INTO payments (order_id, message_id) VALUES ($1, $2)', [order.order_id, messageId]);
      } else {
        await db.query('INSERT INTO absorbed (message_id) VALUES ($1)', [messageId]);
      }
      await db.query('COMMIT');
      committed += 1;
      if (crashAfter && committed === crashAfter) {
        process.exit(3); // committed, not acknowledged: the broker redelivers it
      }
      channel.ack(message);
    }).catch((error) => {
      console.error(error);
      process.exit(1);
    });
  });
}

async function main() {
  const [command, argument] = process.argv.slice(2);
  if (command === 'setup') {
    await setup();
  } else if (command === 'produce' && argument) {
    await produce(Number(argument));
  } else if (command === 'consume') {
    await consume(Number(process.env.CRASH_AFTER_COMMIT || '0'));
  } else {
    console.error('usage: node shop.js setup | produce COUNT | consume');
    process.exit(2);
  }
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
