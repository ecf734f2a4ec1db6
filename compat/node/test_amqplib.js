// Wharf with Node's stock RabbitMQ client, amqplib: confirmed publishes, acked consumes,
// nack-requeue, basic.get and every exchange type. Exits non-zero on the first failure.
// Usage: node test_amqplib.js AMQP_PORT
"use strict";
const amqp = require("amqplib");
const assert = require("assert");

async function main(port) {
  const connection = await amqp.connect(`amqp://guest:guest@127.0.0.1:${port}/`);
  const channel = await connection.createConfirmChannel();

  // Confirmed persistent publishes to a durable queue.
  await channel.assertQueue("node.orders", { durable: true });
  for (let index = 0; index < 100; index++) {
    channel.sendToQueue("node.orders", Buffer.from(`order-${index}`), { persistent: true });
  }
  await channel.waitForConfirms();

  // Acked consumes, in order.
  await channel.prefetch(10);
  const received = [];
  await new Promise((resolve) => {
    channel.consume("node.orders", (message) => {
      // null: the server cancelled the consumer (the queue is deleted at the end).
      if (message === null) return;
      received.push(message.content.toString());
      channel.ack(message);
      if (received.length === 100) resolve();
    });
  });
  assert.deepStrictEqual(received, Array.from({ length: 100 }, (_, index) => `order-${index}`));

  // nack with requeue: redelivered; basic.get and get-empty.
  const other = await connection.createConfirmChannel();
  await other.assertQueue("node.retry", { durable: true });
  other.sendToQueue("node.retry", Buffer.from("retry-me"), { persistent: true });
  await other.waitForConfirms();
  let message = await other.get("node.retry");
  assert.strictEqual(message.content.toString(), "retry-me");
  assert.strictEqual(message.fields.redelivered, false);
  other.nack(message, false, true);
  message = await other.get("node.retry");
  assert.strictEqual(message.fields.redelivered, true);
  other.ack(message);
  assert.strictEqual(await other.get("node.retry"), false);

  // Every exchange type.
  await other.assertQueue("node.sink", { exclusive: true });
  const cases = [
    ["node.direct", "direct", "k", "k", {}, true],
    ["node.fanout", "fanout", "", "anything", {}, true],
    ["node.topic", "topic", "order.*", "order.received", {}, true],
    ["node.topic-miss", "topic", "order.*", "invoice.sent", {}, false],
    ["node.headers", "headers", "", "", { "x-match": "all", region: "eu" }, true],
  ];
  for (const [exchange, kind, bindingKey, routingKey, args, routed] of cases) {
    await other.assertExchange(exchange, kind);
    await other.bindQueue("node.sink", exchange, bindingKey, args);
    other.publish(exchange, routingKey, Buffer.from(exchange), { headers: kind === "headers" ? { region: "eu" } : {} });
    await other.waitForConfirms();
    const got = await other.get("node.sink", { noAck: true });
    if (routed) assert.strictEqual(got.content.toString(), exchange);
    else assert.strictEqual(got, false, exchange);
  }

  // A channel error closes the channel with RabbitMQ's code, not the connection.
  const bad = await connection.createChannel();
  bad.on("error", () => {});
  await assert.rejects(bad.assertQueue("node.orders", { durable: false }), /406/);
  await channel.deleteQueue("node.orders");
  await connection.close();
  console.log("amqplib: all checks passed");
}

main(Number(process.argv[2])).catch((error) => {
  console.error(error);
  process.exit(1);
});
