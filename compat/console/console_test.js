// Wharf's web console in a real headless Chromium (Debian's), driven by playwright-core:
// log in, look at every page, declare a queue and a dead-letter queue, publish a poison message
// from the console, see it reach the DLQ after a reject, and browse it there with its x-death
// header and body; follow its trace, replay it to its queue, move it and delete it with the DLQ
// workbench. Screenshots of each page go to the artifacts directory.
//
// Usage: node console_test.js HTTP_PORT ARTIFACTS_DIR
"use strict";

const { chromium } = require("playwright-core");
const assert = require("node:assert/strict");
const path = require("node:path");

const [port, artifacts] = process.argv.slice(2);
const base = `http://127.0.0.1:${port}`;
const auth = "Basic " + Buffer.from("guest:guest").toString("base64");

async function api(method, apiPath, body) {
  const response = await fetch(base + apiPath, {
    method,
    headers: { Authorization: auth, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  if (!response.ok) throw new Error(`${method} ${apiPath}: ${response.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

let checks = 0;
function check(condition, what) {
  assert.ok(condition, what);
  checks += 1;
}

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
  });
  const page = await browser.newPage({ viewport: { width: 1366, height: 900 } });
  const consoleErrors = [];
  page.on("console", (message) => { if (message.type() === "error") consoleErrors.push(message.text()); });
  page.on("pageerror", (error) => consoleErrors.push(String(error)));
  const external = [];
  page.on("request", (request) => { if (!request.url().startsWith(base) && !request.url().startsWith("blob:") && !request.url().startsWith("data:")) external.push(request.url()); });
  // From the top: the header is sticky, and a full-page shot taken scrolled down shows it mid-page.
  const shot = async (name) => {
    await page.evaluate(() => window.scrollTo(0, 0));
    await page.screenshot({ path: path.join(artifacts, `${name}.png`), fullPage: true });
  };

  // Logging in: a wrong password is refused with a message, the right one opens the overview.
  await page.goto(base + "/");
  await page.waitForSelector("#login[open]");
  await page.fill("input[name=user]", "guest");
  await page.fill("input[name=password]", "wrong");
  await page.click("#login-form button[type=submit]");
  await page.waitForFunction(() => document.getElementById("login-error").textContent.includes("Wrong user or password"));
  check(true, "a wrong password is refused");
  // The browser reports that refused request (401) as a failed load: expected here, and only here.
  consoleErrors.length = 0;
  await page.fill("input[name=password]", "guest");
  await page.click("#login-form button[type=submit]");
  await page.waitForSelector("h1:has-text('Wharf')");
  check((await page.textContent("#who")).includes("guest (administrator)"), "the user and tags are shown");
  await page.waitForSelector(".tile .label:has-text('Queues')");
  await shot("overview");

  // A queue whose rejected messages go to a dead-letter queue, declared from the console's form.
  await page.goto(base + "/#/queues");
  await page.waitForSelector("h1:has-text('Queues')");
  await page.fill("form.grid input[name=name]", "orders.dlq");
  await page.click("form.grid button[type=submit]");
  await page.waitForSelector("a:has-text('orders.dlq')");
  await page.fill("form.grid input[name=name]", "orders");
  await page.fill("form.grid textarea[name=arguments]", '{"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "orders.dlq"}');
  await page.click("form.grid button[type=submit]");
  await page.waitForSelector("td a:text-is('orders')");
  check(true, "queues are declared from the console");
  await shot("queues");
  check(await page.locator("th:text-is('In /s')").count() === 1, "the queues table shows each queue's rates");

  // A poison message, published from the queue's page, rejected by its consumer (here a get
  // with reject_requeue_false from the console's get form), reaches the DLQ.
  await page.click("td a:text-is('orders')");
  await page.waitForSelector("h1:has-text('Queue orders')");
  await page.fill("form textarea[name=properties]", '{"delivery_mode": 2, "message_id": "poison-1", "headers": {"x-failure-reason": "unknown item 42"}}');
  await page.fill("form textarea[name=payload]", '{"order": 42, "item": "unknown"}');
  await page.click("button:has-text('Publish to the default exchange')");
  await page.waitForSelector(".result.ok:has-text('routed')");
  check(true, "a message is published from the console");
  await page.selectOption("select[name=ackmode]", "reject_requeue_false");
  await page.click("button:has-text('Get messages')");
  await page.waitForSelector(".message strong:has-text('poison-1')");
  await shot("queue-orders");
  const dlq = await api("GET", "/api/queues/%2F/orders.dlq");
  check(dlq.messages === 1, "the rejected message is in the dead-letter queue");

  // The DLQ's page shows it without consuming it: its x-death, its failure reason, its body.
  await page.goto(base + "/#/queues/%2F/orders.dlq");
  // The page changes in place: wait for the DLQ's own page, or the orders page's got message
  // (the same id, without x-death) may still be the one found.
  await page.waitForSelector("h1:has-text('Queue orders.dlq')");
  await page.waitForSelector(".message strong:has-text('poison-1')");
  const browsed = await page.textContent(".message");
  check(browsed.includes("Failure: unknown item 42"), "the failure reason is shown");
  check(browsed.includes("x-death: rejected from orders"), "the x-death header is shown");
  check(browsed.includes('"item": "unknown"'), "the JSON body is shown, formatted");
  check((await api("GET", "/api/queues/%2F/orders.dlq")).messages_ready === 1, "browsing consumed nothing");
  await shot("queue-orders-dlq");

  // The DLQ workbench. The dead letter's trace tells its story as a timeline, oldest first:
  // published from the console (the management API) as guest, dead-lettered to orders.dlq.
  const row = (text) => page.locator("tr.msg-row", { has: page.locator(".message strong", { hasText: text }) });
  await row("poison-1").locator("button.msg-trace").click();
  const trace = page.locator("tr.trace-row .trace");
  await trace.locator("li.event-dead_lettered").waitFor();
  const kinds = await trace.locator("ol.timeline > li.event").evaluateAll((items) => items.map((item) => item.className));
  check(kinds[0] === "event event-published" && kinds[kinds.length - 1] === "event event-dead_lettered",
    `the timeline runs from the publish to the dead-letter hop: ${kinds.join(", ")}`);
  const publishedText = await trace.locator("li.event-published").textContent();
  check(publishedText.includes("Published by connection management API as user guest"), `the trace shows the publish: ${publishedText}`);
  check(/\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{3}/.test(publishedText), `events show their local time to the ms: ${publishedText}`);
  const deadText = await trace.locator("li.event-dead_lettered").textContent();
  check(deadText.includes("Dead-lettered (rejected) to exchange '' (the default exchange) with routing key orders.dlq"),
    `the trace shows the dead-letter hop: ${deadText}`);
  await shot("queue-orders-dlq-trace");

  // Replay sends it back where it was dead-lettered from: gone from the DLQ's browser and its
  // statistics, in orders again with x-replayed-count 1.
  await row("poison-1").locator("button.msg-replay").click();
  await page.waitForSelector("#wb-result.ok:has-text('Replayed 1 message')");
  await page.waitForSelector(".msg-count:has-text('0 messages')");
  check(await row("poison-1").count() === 0, "the DLQ's browser no longer shows the replayed message");
  await page.waitForFunction(() => [...document.querySelectorAll("#queue-stats tr")]
    .some((tr) => tr.querySelector("th").textContent === "Total" && tr.querySelector("td").textContent === "0"));
  check((await api("GET", "/api/queues/%2F/orders.dlq")).messages === 0, "the replayed message left the DLQ");
  await shot("queue-orders-dlq-replayed");
  check((await api("GET", "/api/queues/%2F/orders")).messages === 1, "the original queue has the message again");
  await page.goto(base + "/#/queues/%2F/orders");
  // Each page's heading first: the main area is replaced with it, rows of the page before gone.
  await page.waitForSelector("h1:has-text('Queue orders in vhost')");
  await row("poison-1").waitFor();
  check(await page.locator("#queue-stats th:text-is('Rates /s')").count() === 1, "a queue's page shows its rates");
  const replayedHeaders = await row("poison-1").locator("details pre").textContent();
  check(replayedHeaders.includes('"x-replayed-count": 1'), `the replayed message carries x-replayed-count 1: ${replayedHeaders}`);
  check((await row("poison-1").locator(".message header").textContent()).includes("replayed 1×"), "the browser says it was replayed once");
  await row("poison-1").locator("button.msg-trace").click();
  const replayedText = await page.locator("tr.trace-row li.event-replayed").textContent();
  check(replayedText.includes("Replayed by guest to exchange '' (the default exchange) with routing key orders"),
    `its trace shows the replay: ${replayedText}`);
  await shot("queue-orders-replayed");

  // Move selected: checked in the browser, moved to the DLQ by name; then deleted there.
  await row("poison-1").locator("input.msg-select").check();
  await page.waitForSelector("#wb-selected-count:text-is('1 selected')");
  await page.fill("#wb-move-queue", "orders.dlq");
  await page.click("#wb-move-selected");
  await page.waitForSelector("#wb-result.ok:has-text(\"Moved 1 message to queue 'orders.dlq'\")");
  check((await api("GET", "/api/queues/%2F/orders")).messages === 0 && (await api("GET", "/api/queues/%2F/orders.dlq")).messages === 1,
    "a selected message is moved to the queue named");
  await page.goto(base + "/#/queues/%2F/orders.dlq");
  await page.waitForSelector("h1:has-text('Queue orders.dlq in vhost')");
  await row("poison-1").waitFor();
  let asked = "";
  page.once("dialog", (dialog) => { asked = dialog.message(); dialog.accept(); });
  await row("poison-1").locator("button.msg-delete").click();
  await page.waitForSelector("#wb-result.ok:has-text('Deleted poison-1')");
  check(asked.includes("Delete poison-1 from orders.dlq"), `a delete asks first: ${asked}`);
  check((await api("GET", "/api/queues/%2F/orders.dlq")).messages === 0, "a deleted message is gone");

  // Every other page renders.
  for (const [route, heading] of [["connections", "Connections"], ["channels", "Channels"], ["exchanges", "Exchanges"],
    ["admin", "Users, permissions, policies and vhosts"], ["definitions", "Definitions"]]) {
    await page.goto(`${base}/#/${route}`);
    await page.waitForSelector(`h1:has-text('${heading}')`);
    await shot(route);
    checks += 1;
  }
  check((await page.textContent("main")).includes("Download definitions"), "the definitions page offers the export");

  // A policy set from the admin page applies to the queue it matches; deleting it takes it away.
  await page.goto(`${base}/#/admin`);
  await page.waitForSelector("#policy-name");
  await page.fill("#policy-name", "cap");
  await page.fill("#policy-pattern", "^orders$");
  await page.fill("#policy-definition", '{"max-length": 100}');
  await page.click("button:has-text('Set policy')");
  await page.waitForSelector("td:has-text('cap')");
  check((await api("GET", "/api/queues/%2F/orders")).policy === "cap", "the policy applies to the existing queue");
  page.once("dialog", (dialog) => dialog.accept());
  await page.locator("tr:has(td:has-text('cap')) button.policy-delete").click();
  await page.waitForFunction(() => !document.querySelector("main").textContent.includes('"max-length":100'));
  check((await api("GET", "/api/queues/%2F/orders")).policy === null, "a deleted policy no longer applies");

  check(external.length === 0, `the console loaded nothing from elsewhere: ${external.join(", ")}`);
  check(consoleErrors.length === 0, `no errors in the page: ${consoleErrors.join(" | ")}`);
  await browser.close();
  console.log(`console: ${checks} checks passed, screenshots in ${artifacts}`);
})().catch((error) => {
  console.error(error);
  process.exit(1);
});
