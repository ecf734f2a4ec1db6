// Wharf's web console: a single page over the management API (the same API rabbitmqadmin uses),
// with hash routes (#/queues, #/queues/<vhost>/<name>, …). Credentials are asked once and kept
// in this tab's sessionStorage; every request sends them as HTTP basic auth. No dependencies:
// the page loads nothing from the internet.
"use strict";

const state = { auth: sessionStorage.getItem("wharf-auth"), user: null, timer: null };

// ---- helpers -----------------------------------------------------------------------------

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "onclick" || key === "onsubmit" || key === "onchange" || key === "oninput") node[key] = value;
    // Through the CSSOM: the Content-Security-Policy refuses inline style attributes.
    else if (key === "style") node.style.cssText = value;
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const enc = encodeURIComponent;
const fmt = (n) => (typeof n === "number" ? n.toLocaleString("en-US", { maximumFractionDigits: 1 }) : n ?? "");
const bytes = (n) => (n >= 1 << 20 ? fmt(n / (1 << 20)) + " MiB" : n >= 1024 ? fmt(n / 1024) + " KiB" : fmt(n) + " B");

class ApiError extends Error {
  constructor(status, reason) { super(reason); this.status = status; }
}

async function api(method, path, body) {
  // X-Requested-With: a failed login is answered without a credentials challenge, so the
  // browser shows the console's login form rather than its own prompt.
  const headers = { Authorization: "Basic " + state.auth, "X-Requested-With": "XMLHttpRequest" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await response.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch { json = null; }
  if (response.status === 401 && json && json.error === "not_authorized") { showLogin("Login failed"); throw new ApiError(401, "Login failed"); }
  if (!response.ok) throw new ApiError(response.status, (json && json.reason) || response.statusText);
  return json;
}

function showError(target, error) {
  target.replaceChildren(el("p", { class: "error" }, error.message || String(error)));
}

// A sortable table: columns are [header, value(item) -> text|Node, {num: true}?].
function table(items, columns, sortable = true) {
  let sortIndex = -1, reverse = false;
  const body = el("tbody");
  const render = () => {
    let rows = items.slice();
    if (sortIndex >= 0) {
      const key = (item) => { const v = columns[sortIndex][1](item); return v instanceof Node ? v.textContent : v; };
      rows.sort((a, b) => { const x = key(a), y = key(b); return (x > y) - (x < y); });
      if (reverse) rows.reverse();
    }
    body.replaceChildren(...rows.map((item) => el("tr", {}, columns.map(([, value, options]) =>
      el("td", { class: options && options.num ? "num" : null }, value(item))))));
    if (!rows.length) body.append(el("tr", {}, el("td", { colspan: columns.length, class: "muted" }, "(none)")));
  };
  const head = el("tr", {}, columns.map(([header, , options], index) => el("th", {
    class: options && options.num ? "num" : null,
    onclick: sortable ? () => { reverse = sortIndex === index ? !reverse : false; sortIndex = index; render(); } : null,
  }, header)));
  render();
  return el("table", {}, el("thead", {}, head), body);
}

// A line chart of `series` ([{label, color, points: [[timestamp, value]]}]) as SVG.
function chart(title, series) {
  const width = 600, height = 180, pad = 28;
  const all = series.flatMap((s) => s.points);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const box = el("div", { class: "panel chart" }, el("h2", {}, title));
  if (all.length < 2) {
    box.append(el("p", { class: "muted" }, "Collecting samples (one every 5 s)…"));
    return box;
  }
  const minT = Math.min(...all.map((p) => p[0])), maxT = Math.max(...all.map((p) => p[0]));
  const maxV = Math.max(1, ...all.map((p) => p[1]));
  const x = (t) => pad + ((t - minT) / Math.max(1, maxT - minT)) * (width - pad - 4);
  const y = (v) => height - 18 - (v / maxV) * (height - 30);
  const line = (x1, y1, x2, y2, color) => {
    const l = document.createElementNS(svg.namespaceURI, "line");
    Object.entries({ x1, y1, x2, y2, stroke: color, "stroke-width": 1 }).forEach(([k, v]) => l.setAttribute(k, v));
    svg.append(l);
  };
  const label = (tx, ty, text) => {
    const t = document.createElementNS(svg.namespaceURI, "text");
    Object.entries({ x: tx, y: ty, "font-size": 10, fill: "#687182" }).forEach(([k, v]) => t.setAttribute(k, v));
    t.textContent = text;
    svg.append(t);
  };
  line(pad, y(0), width - 4, y(0), "#dfe3ea");
  line(pad, y(maxV), width - 4, y(maxV), "#eef1f5");
  label(2, y(maxV) + 4, fmt(maxV));
  label(2, y(0) + 4, "0");
  label(pad, height - 4, new Date(minT).toLocaleTimeString());
  label(width - 60, height - 4, new Date(maxT).toLocaleTimeString());
  for (const s of series) {
    const path = document.createElementNS(svg.namespaceURI, "polyline");
    path.setAttribute("points", s.points.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" "));
    Object.entries({ fill: "none", stroke: s.color, "stroke-width": 2 }).forEach(([k, v]) => path.setAttribute(k, v));
    svg.append(path);
  }
  box.append(svg, el("div", { class: "legend" }, series.map((s) => el("span", {}, el("i", { style: `background:${s.color}` }), s.label))));
  return box;
}

// Rates from a RabbitMQ `*_details.samples` list (newest first): per second between samples.
// A queue's rate of one of its message_stats (per second, over the broker's last sampling
// interval); 0 for a queue nothing passed through yet.
function rate(q, name) {
  const details = q.message_stats && q.message_stats[`${name}_details`];
  return details ? details.rate : 0;
}

function ratePoints(details) {
  const samples = (details && details.samples) || [];
  const points = [];
  for (let i = samples.length - 1; i > 0; i--) {
    const older = samples[i], newer = samples[i - 1];
    const seconds = (newer.timestamp - older.timestamp) / 1000;
    if (seconds > 0) points.push([newer.timestamp, Math.max(0, (newer.sample - older.sample) / seconds)]);
  }
  return points;
}

const levelPoints = (details) => ((details && details.samples) || []).slice().reverse().map((s) => [s.timestamp, s.sample]);
const queueLink = (vhost, name) => el("a", { href: `#/queues/${enc(vhost)}/${enc(name)}` }, name);

// ---- views -------------------------------------------------------------------------------

async function overview(main) {
  const data = await api("GET", "/api/overview?msg_rates_age=600&msg_rates_incr=5&lengths_age=600&lengths_incr=5");
  const totals = data.object_totals, queued = data.queue_totals, stats = data.message_stats || {};
  const tile = (label, value) => el("div", { class: "tile" }, el("div", { class: "value" }, fmt(value)), el("div", { class: "label" }, label));
  main.replaceChildren(
    el("h1", {}, `${data.product_name} ${data.product_version} on ${data.node}`),
    el("div", { class: "tiles" },
      tile("Messages", queued.messages), tile("Ready", queued.messages_ready), tile("Unacked", queued.messages_unacknowledged),
      tile("Publish /s", stats.publish_details ? stats.publish_details.rate : 0),
      tile("Deliver /s", stats.deliver_get_details ? stats.deliver_get_details.rate : 0),
      tile("Connections", totals.connections), tile("Channels", totals.channels), tile("Queues", totals.queues),
      tile("Consumers", totals.consumers), tile("Exchanges", totals.exchanges)),
    el("div", { class: "columns" },
      chart("Message rates (per second)", [
        { label: "publish", color: "#1f6feb", points: ratePoints(stats.publish_details) },
        { label: "deliver / get", color: "#2e7d32", points: ratePoints(stats.deliver_get_details) },
        { label: "ack", color: "#8250df", points: ratePoints(stats.ack_details) },
        { label: "redeliver", color: "#c62828", points: ratePoints(stats.redeliver_details) },
      ]),
      chart("Queued messages", [
        { label: "ready", color: "#1f6feb", points: levelPoints(queued.messages_ready_details) },
        { label: "unacked", color: "#c98500", points: levelPoints(queued.messages_unacknowledged_details) },
      ])),
    el("h2", {}, "Listeners"),
    table(data.listeners, [["Protocol", (l) => l.protocol], ["Address", (l) => l.ip_address], ["Port", (l) => l.port, { num: true }]]),
  );
}

async function connections(main) {
  const items = await api("GET", "/api/connections");
  main.replaceChildren(el("h1", {}, `Connections (${items.length})`), table(items, [
    ["Name", (c) => c.name], ["Client", (c) => c.user_provided_name || ""], ["User", (c) => c.user], ["Vhost", (c) => c.vhost],
    ["Channels", (c) => c.channels, { num: true }], ["TLS", (c) => (c.ssl ? "yes" : "")],
    ["Received", (c) => bytes(c.recv_oct || 0), { num: true }],
    ["", (c) => el("button", { class: "danger", onclick: async () => {
      if (!confirm(`Close connection ${c.name}?`)) return;
      await api("DELETE", `/api/connections/${enc(c.name)}`);
      route();
    } }, "Close")],
  ]));
}

async function channels(main) {
  const items = await api("GET", "/api/channels");
  main.replaceChildren(el("h1", {}, `Channels (${items.length})`), table(items, [
    ["Channel", (c) => c.name], ["User", (c) => c.user], ["Vhost", (c) => c.vhost],
    ["Prefetch", (c) => c.prefetch_count, { num: true }], ["Unacked", (c) => c.messages_unacknowledged, { num: true }],
    ["Consumers", (c) => c.consumer_count, { num: true }],
  ]));
}

async function exchanges(main) {
  const items = await api("GET", "/api/exchanges");
  main.replaceChildren(el("h1", {}, `Exchanges (${items.length})`), table(items, [
    ["Vhost", (x) => x.vhost], ["Name", (x) => x.name || "(AMQP default)"], ["Type", (x) => x.type],
    ["Durable", (x) => (x.durable ? "yes" : "")], ["Internal", (x) => (x.internal ? "yes" : "")], ["Policy", (x) => x.policy || ""],
  ]));
}

async function queues(main) {
  const query = new URLSearchParams(location.hash.split("?")[1] || "");
  const page = Number(query.get("page") || 1), name = query.get("name") || "";
  const data = await api("GET", `/api/queues?page=${page}&page_size=100&name=${enc(name)}&sort=name`);
  const filter = el("input", { placeholder: "Filter by name", value: name });
  const go = (p) => { location.hash = `#/queues?page=${p}&name=${enc(filter.value)}`; };
  filter.onchange = () => go(1);
  main.replaceChildren(
    el("h1", {}, `Queues (${data.filtered_count} of ${data.total_count})`),
    el("div", { class: "toolbar" }, filter),
    table(data.items, [
      ["Vhost", (q) => q.vhost], ["Name", (q) => queueLink(q.vhost, q.name)], ["Ready", (q) => q.messages_ready, { num: true }],
      ["Unacked", (q) => q.messages_unacknowledged, { num: true }], ["Total", (q) => q.messages, { num: true }],
      ["In /s", (q) => rate(q, "publish"), { num: true }], ["Out /s", (q) => rate(q, "deliver_get"), { num: true }],
      ["Ack /s", (q) => rate(q, "ack"), { num: true }],
      ["Consumers", (q) => q.consumers, { num: true }], ["Durable", (q) => (q.durable ? "yes" : "")], ["Policy", (q) => q.policy || ""],
    ]),
    el("div", { class: "pager" },
      el("button", { class: "secondary", onclick: () => go(page - 1), disabled: page <= 1 ? "" : null }, "‹ Previous"),
      el("span", {}, `page ${data.page} of ${Math.max(1, data.page_count)}`),
      el("button", { class: "secondary", onclick: () => go(page + 1), disabled: page >= data.page_count ? "" : null }, "Next ›")),
    declareQueueForm(),
  );
}

function declareQueueForm() {
  const form = el("form", { class: "grid" },
    el("label", {}, "Vhost"), el("input", { name: "vhost", value: "/" }),
    el("label", {}, "Name"), el("input", { name: "name", required: "" }),
    el("label", {}, "Durable"), el("select", { name: "durable" }, el("option", {}, "true"), el("option", {}, "false")),
    el("label", {}, "Arguments (JSON)"), el("textarea", { name: "arguments" }, "{}"),
    el("span"), el("button", { type: "submit" }, "Add queue"),
    el("span"), el("p", { class: "result" }));
  form.onsubmit = async (event) => {
    event.preventDefault();
    const data = new FormData(form), result = form.querySelector(".result");
    try {
      await api("PUT", `/api/queues/${enc(data.get("vhost"))}/${enc(data.get("name"))}`,
        { durable: data.get("durable") === "true", arguments: JSON.parse(data.get("arguments") || "{}") });
      route();
    } catch (error) { result.className = "result error"; result.textContent = error.message; }
  };
  return el("div", { class: "panel" }, el("h2", {}, "Add a queue"), form);
}

function propertiesText(properties) {
  return JSON.stringify(properties || {}, null, 2);
}

function messageView(message) {
  const headers = (message.properties && message.properties.headers) || {};
  const deaths = Array.isArray(headers["x-death"]) ? headers["x-death"] : [];
  let body = message.payload;
  if (message.payload_encoding === "string") { try { body = JSON.stringify(JSON.parse(body), null, 2); } catch { /* plain text */ } }
  return el("div", { class: "message" },
    el("header", {},
      el("strong", {}, message.message_id || message.properties?.message_id || "(no message id)"),
      message.state ? el("span", { class: `badge ${message.state}` }, message.state) : null,
      el("span", { class: "muted" }, `${bytes(message.payload_bytes)} · ` +
        (message.delivery_count !== undefined ? `delivered ${message.delivery_count} times` : message.redelivered ? "redelivered" : "first delivery") +
        (headers["x-replayed-count"] ? ` · replayed ${headers["x-replayed-count"]}×` : "") +
        ` · from '${message.exchange}' with key '${message.routing_key}'`)),
    headers["x-failure-reason"] ? el("p", { class: "error" }, "Failure: " + headers["x-failure-reason"]) : null,
    deaths.length ? el("p", { class: "muted" }, "x-death: " + deaths.map((d) => `${d.reason} from ${d.queue} (${d.count}×)`).join("; ")) : null,
    el("details", {}, el("summary", {}, "Properties and headers"), el("pre", {}, propertiesText(message.properties))),
    el("pre", { class: "body" }, body === null ? "(the message left the queue while it was read)" : `${body}`),
  );
}

async function queueDetail(main, vhost, name) {
  const base = `/api/queues/${enc(vhost)}/${enc(name)}`;
  const [queue, bindings] = await Promise.all([api("GET", base), api("GET", `${base}/bindings`)]);
  const stat = (label, value) => el("tr", {}, el("th", {}, label), el("td", {}, value));
  const statsTable = (q) => el("table", { id: "queue-stats" }, stat("Ready", fmt(q.messages_ready)), stat("Unacked", fmt(q.messages_unacknowledged)),
    stat("Total", fmt(q.messages)), stat("Bytes", bytes(q.message_bytes)), stat("Consumers", fmt(q.consumers)),
    stat("Rates /s", `in ${rate(q, "publish")} · out ${rate(q, "deliver_get")} · ack ${rate(q, "ack")} · redelivered ${rate(q, "redeliver")}`),
    stat("Durable", String(q.durable)), stat("Policy", q.policy || "none"),
    stat("Arguments", el("pre", {}, JSON.stringify(q.arguments, null, 2))),
    stat("Effective policy", el("pre", {}, JSON.stringify(q.effective_policy_definition || {}, null, 2))));
  const stats = el("div", { class: "panel" }, statsTable(queue));
  // After a workbench action: the queue's numbers as they are now.
  const refreshStats = async () => { stats.replaceChildren(statsTable(await api("GET", base))); };
  const bench = workbench(base, name, refreshStats);
  main.replaceChildren(
    el("h1", {}, `Queue ${name} `, el("span", { class: "muted" }, `in vhost ${vhost}`)),
    el("div", { class: "columns" },
      stats,
      el("div", {},
        el("h2", {}, "Consumers"),
        table(queue.consumer_details || [], [["Tag", (c) => c.consumer_tag], ["Channel", (c) => c.channel_details.name],
          ["Ack", (c) => (c.ack_required ? "manual" : "auto")], ["Prefetch", (c) => c.prefetch_count, { num: true }]]),
        el("h2", {}, "Bindings"),
        table(bindings, [["From", (b) => b.source || "(default exchange)"], ["Routing key", (b) => b.routing_key],
          ["Arguments", (b) => JSON.stringify(b.arguments)]]))),
    el("div", { class: "columns" }, publishForm(vhost, name), getForm(base)),
    el("div", { class: "panel" }, el("h2", {}, "Messages (browsed without consuming them)"), bench.element),
    el("div", { class: "toolbar" },
      el("button", { class: "danger", onclick: async () => { if (confirm(`Purge ${name}?`)) { await api("DELETE", `${base}/contents`); route(); } } }, "Purge"),
      el("button", { class: "danger", onclick: async () => { if (confirm(`Delete ${name}?`)) { await api("DELETE", base); location.hash = "#/queues"; } } }, "Delete queue")),
  );
  await bench.load(1);
}

// ---- the DLQ workbench: the browser, with replay, move, delete and per-message traces -----

const pad = (n, width = 2) => String(n).padStart(width, "0");
const plural = (n, word) => `${fmt(n)} ${word}${n === 1 ? "" : "s"}`;

// Local date and time, to the millisecond: traces are read event by event.
function localTime(ms) {
  const d = new Date(ms);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

function elapsed(ms) {
  if (ms < 1000) return `+${ms} ms`;
  if (ms < 60000) return `+${(ms / 1000).toFixed(1)} s`;
  if (ms < 3600000) return `+${(ms / 60000).toFixed(1)} min`;
  if (ms < 86400000) return `+${(ms / 3600000).toFixed(1)} h`;
  return `+${(ms / 86400000).toFixed(1)} d`;
}

// A name in a sentence: set apart, and '' for an empty one (the default exchange, an empty key).
const named = (text) => el("code", {}, text === "" || text === null || text === undefined ? "''" : text);
const exchangeNamed = (exchange) => (exchange ? [named(exchange)] : [named(""), " (the default exchange)"]);

const DEATH_REASONS = { rejected: "rejected", expired: "expired", maxlen: "queue length limit", delivery_limit: "delivery limit" };
const REQUEUE_CAUSES = { nack: "the consumer sent basic.nack with requeue", reject: "the consumer sent basic.reject with requeue",
  recover: "the consumer sent basic.recover", lease_expired: "delivery lease expired", channel_closed: "channel closed" };

// One trace event as a sentence (text and <code> names).
function eventSentence(event) {
  switch (event.event) {
    case "published":
      return ["Published by connection ", named(event.connection), " as user ", named(event.user)];
    case "delivered": {
      const on = event.connection ? [" on connection ", named(event.connection)] : [];
      return event.consumer_tag === null || event.consumer_tag === undefined
        ? ["Fetched by a basic.get", ...on] : ["Delivered to consumer ", named(event.consumer_tag), ...on];
    }
    case "requeued":
      return [`Came back: ${REQUEUE_CAUSES[event.cause] || event.cause}`];
    case "rejected":
      return [`Rejected, not requeued (${event.method || "basic.reject"})`];
    case "dead_lettered":
      return [`Dead-lettered (${DEATH_REASONS[event.reason] || event.reason}) to exchange `, ...exchangeNamed(event.exchange),
        " with routing key ", named(event.routing_key)];
    case "replayed":
      return ["Replayed by ", named(event.user), " to exchange ", ...exchangeNamed(event.exchange), " with routing key ", named(event.routing_key)];
    case "moved":
      return ["Moved to queue ", named(event.to_queue), " by ", named(event.user)];
    default:
      return [`${event.event}: `, named(JSON.stringify(event))];
  }
}

// A message's trace as a vertical timeline, oldest first.
async function traceView(base, entryId) {
  const trace = await api("GET", `${base}/messages/${enc(entryId)}/trace`);
  const events = trace.events || [];
  const dropped = trace.events_dropped || 0;
  const items = [];
  events.forEach((event, index) => {
    items.push(el("li", { class: `event event-${event.event}` },
      el("div", { class: "when" },
        el("time", { datetime: new Date(event.at).toISOString() }, localTime(event.at)),
        index > 0 ? el("span", { class: "delta" }, elapsed(Math.max(0, event.at - events[index - 1].at))) : null),
      el("div", { class: "what" },
        el("span", { class: "sentence" }, eventSentence(event)),
        event.queue ? el("span", { class: "badge queue", title: "queue" }, event.queue) : null)));
    // The trace keeps its first event (the publish) and drops the oldest after it.
    if (index === 0 && dropped > 0) {
      items.push(el("li", { class: "event gap" }, el("div", { class: "when" }),
        el("div", { class: "what muted" }, `… ${plural(dropped, "older event")} dropped here …`)));
    }
  });
  return el("div", { class: "trace", "data-entry-id": entryId },
    el("div", { class: "trace-head" },
      el("strong", {}, `Trace of ${trace.message_id || `entry ${trace.entry_id}`}`),
      el("span", { class: "muted" }, `entry ${trace.entry_id} in ${trace.queue} · ${trace.state} · delivered ${plural(trace.delivery_count, "time")}` +
        (trace.redelivered ? " · redelivered" : ""))),
    trace.traces_enabled === false ? el("p", { class: "note trace-off" },
      "Message traces are off on this broker (--message-trace-events-max 0): no new events are recorded. Events recorded before they were turned off are still shown.") : null,
    dropped > 0 ? el("p", { class: "note trace-dropped" },
      `${plural(dropped, "event")} dropped to keep this trace bounded: it keeps the publish and the most recent events.`) : null,
    events.length ? el("ol", { class: "timeline" }, items) : el("p", { class: "muted" }, "No events recorded for this message."));
}

// The queue's messages a page at a time (browsing consumes nothing), with checkboxes and the
// workbench's actions. `onChange` runs after each action (the page's queue statistics).
function workbench(base, queueName, onChange) {
  let current = { page: 1, items: [], total: 0 };
  const selected = new Set();
  const browse = el("div", { class: "wb-browse" });
  const result = el("div", { id: "wb-result", class: "wb-result", role: "status", "aria-live": "polite" });
  const count = el("span", { id: "wb-selected-count", class: "muted" }, "0 selected");
  const originTitle = "Leave both empty to send each message back to the exchange and routing key it was dead-lettered from (its newest x-death entry)";
  const exchange = el("input", { id: "wb-exchange", placeholder: "exchange", size: "16", title: originTitle, "aria-label": "Replay to exchange" });
  const routingKey = el("input", { id: "wb-routing-key", placeholder: "routing key", size: "16", title: originTitle, "aria-label": "Replay with routing key" });
  const moveQueue = el("input", { id: "wb-move-queue", placeholder: "queue", size: "16", "aria-label": "Move to queue" });
  const replaySelected = el("button", { id: "wb-replay-selected", onclick: () => replay([...selected]) }, "Replay selected");
  const replayAll = el("button", { id: "wb-replay-all", class: "secondary", onclick: () => {
    if (confirm(`Replay all ${plural(current.total, "message")} of ${queueName}${targetText() || " to where each was dead-lettered from"}?`)) replay(null);
  } }, "Replay all");
  const moveSelected = el("button", { id: "wb-move-selected", class: "secondary", onclick: () => move([...selected]) }, "Move selected to…");
  moveQueue.onkeydown = (event) => { if (event.key === "Enter" && selected.size) move([...selected]); };
  const selectAll = el("input", { id: "wb-select-all", type: "checkbox", title: "Select every message on this page" });
  selectAll.onchange = () => {
    for (const message of current.items) selectAll.checked ? selected.add(message.entry_id) : selected.delete(message.entry_id);
    renderSelection();
  };

  const target = () => {
    if (exchange.value === "" && routingKey.value === "") return null;
    return { exchange: exchange.value, routing_key: routingKey.value };
  };
  const targetText = () => {
    const chosen = target();
    return chosen ? ` to exchange '${chosen.exchange}' with routing key '${chosen.routing_key}'` : null;
  };

  function renderSelection() {
    count.textContent = `${fmt(selected.size)} selected`;
    replaySelected.disabled = moveSelected.disabled = selected.size === 0;
    replayAll.disabled = current.total === 0;
    browse.querySelectorAll("tr.msg-row").forEach((row) => {
      const on = selected.has(Number(row.dataset.entryId));
      row.classList.toggle("selected", on);
      row.querySelector("input.msg-select").checked = on;
    });
    const onPage = current.items.filter((message) => selected.has(message.entry_id)).length;
    selectAll.checked = current.items.length > 0 && onPage === current.items.length;
    selectAll.indeterminate = onPage > 0 && onPage < current.items.length;
  }

  function showResult(kind, ...content) {
    result.className = `wb-result ${kind}`;
    result.replaceChildren(...content.filter((part) => part !== null && part !== undefined));
  }

  function showReport(verb, answer, ids, whereText) {
    const { moved, skipped, remaining, stalled } = answer;
    const lines = [];
    if (moved === 0 && skipped.length === 0) {
      lines.push(el("strong", {}, ids === null ? `Nothing to ${verb.name.toLowerCase()}: the queue has no ready messages.` : `Nothing ${verb.done.toLowerCase()}.`));
    } else if (moved === 0) {
      lines.push(el("strong", {}, `Nothing ${verb.done.toLowerCase()}.`), ` Skipped ${plural(skipped.length, "message")}:`);
    } else {
      const where = typeof whereText === "function" ? whereText(moved) : whereText;
      lines.push(el("strong", {}, `${verb.done} ${plural(moved, "message")}${moved ? where : ""}.`));
      if (skipped.length) lines.push(` Skipped ${plural(skipped.length, "message")}:`);
    }
    if (remaining > 0) lines.push(` ${plural(remaining, "message")} not looked at${stalled ? " (the last request moved none)" : ""}.`);
    const shown = skipped.slice(0, 20);
    const list = shown.length ? el("ul", { class: "skipped" },
      shown.map((skip) => el("li", { "data-entry-id": skip.id }, el("code", {}, `entry ${skip.id}`), `: ${skip.reason}`)),
      skipped.length > shown.length ? el("li", { class: "muted" }, `… and ${fmt(skipped.length - shown.length)} more`) : null) : null;
    showResult(skipped.length || remaining > 0 ? "warn" : "ok", el("p", {}, lines), list);
  }

  // Runs a replay or move of `ids` (null: every message, request after request while the
  // broker reports some `remaining`), then shows what happened and refreshes the page.
  async function relocate(verb, path, body, ids, whereText) {
    const buttons = [replaySelected, replayAll, moveSelected];
    buttons.forEach((button) => { button.disabled = true; });
    showResult("busy", `${verb.doing}…`);
    const total = { moved: 0, skipped: [], remaining: 0, stalled: false };
    try {
      // An "all" repeated covers the ids of the first answer only (`max_id`): copies a replay put
      // back into this queue get higher ids and are not taken again.
      let maxId = null;
      for (;;) {
        const selection = ids === null ? { all: true, ...(maxId === null ? {} : { max_id: maxId }) } : { ids };
        const answer = await api("POST", path, { ...body, ...selection });
        if (maxId === null) maxId = answer.max_id;
        total.moved += answer.moved_count;
        // Moved messages leave the selection; skipped ones stay, to try again (another target).
        for (const id of answer.moved) selected.delete(id);
        total.skipped.push(...answer.skipped);
        total.remaining = answer.remaining;
        if (ids !== null || answer.remaining === 0) break;
        // Messages skipped stay in the queue and come first again: stop when nothing moves.
        if (answer.moved_count === 0) { total.stalled = true; break; }
      }
      showReport(verb, total, ids, whereText);
    } catch (error) {
      showResult("error", el("strong", {}, `${verb.name} failed: `), error.message,
        total.moved ? ` (after ${plural(total.moved, "message")} moved)` : "");
    }
    await refresh();
  }

  function replay(ids) {
    const chosen = target();
    const where = targetText() || ((moved) => ` to where ${moved === 1 ? "it" : "each"} was dead-lettered from`);
    return relocate({ name: "Replay", doing: "Replaying", done: "Replayed" }, `${base}/messages/replay`, chosen || {}, ids, where);
  }

  function move(ids) {
    const to = moveQueue.value.trim();
    if (!to) { showResult("error", "Name the queue to move the selected messages to."); moveQueue.focus(); return; }
    return relocate({ name: "Move", doing: "Moving", done: "Moved" }, `${base}/messages/move`, { queue: to }, ids, ` to queue '${to}'`);
  }

  async function remove(message) {
    const label = message.message_id || message.properties?.message_id || `entry ${message.entry_id}`;
    if (!confirm(`Delete ${label} from ${queueName}? This cannot be undone.`)) return;
    try {
      await api("DELETE", `${base}/messages/${enc(message.entry_id)}`);
      selected.delete(message.entry_id);
      showResult("ok", el("strong", {}, `Deleted ${label}.`));
    } catch (error) {
      showResult("error", el("strong", {}, "Delete failed: "), error.message);
    }
    await refresh();
  }

  async function toggleTrace(message, row, button) {
    const open = row.nextElementSibling && row.nextElementSibling.classList.contains("trace-row") ? row.nextElementSibling : null;
    if (open) { open.remove(); button.textContent = "Trace"; button.setAttribute("aria-expanded", "false"); return; }
    const cell = el("td", { colspan: 4 }, el("p", { class: "muted" }, "Loading the trace…"));
    row.after(el("tr", { class: "trace-row", "data-entry-id": message.entry_id }, cell));
    button.textContent = "Hide trace";
    button.setAttribute("aria-expanded", "true");
    try { cell.replaceChildren(await traceView(base, message.entry_id)); } catch (error) { showError(cell, error); }
  }

  function messageRow(message) {
    const checkbox = el("input", { type: "checkbox", class: "msg-select", title: "Select this message" });
    checkbox.onchange = () => { checkbox.checked ? selected.add(message.entry_id) : selected.delete(message.entry_id); renderSelection(); };
    const row = el("tr", { class: "msg-row", "data-entry-id": message.entry_id });
    const traceButton = el("button", { class: "secondary small msg-trace", "aria-expanded": "false" }, "Trace");
    traceButton.onclick = () => toggleTrace(message, row, traceButton);
    row.append(
      el("td", { class: "select" }, checkbox),
      el("td", { class: "num position" }, fmt(message.position)),
      el("td", { class: "card" }, messageView(message)),
      el("td", { class: "actions" },
        traceButton,
        el("button", { class: "small msg-replay", title: "Replay this message (to the target above, or to where it was dead-lettered from)",
          onclick: () => replay([message.entry_id]) }, "Replay"),
        el("button", { class: "danger small msg-delete", onclick: () => remove(message) }, "Delete")));
    return row;
  }

  async function load(page) {
    const data = await api("GET", `${base}/messages?page=${page}&page_size=20`);
    // The page may have emptied (the last messages of the last page moved): show the new last.
    if (page > 1 && data.items.length === 0 && data.page_count > 0) return load(data.page_count);
    current = { page, items: data.items, total: data.total_count };
    browse.replaceChildren(
      el("p", { class: "muted msg-count" }, `${plural(data.total_count, "message")}; page ${data.page} of ${Math.max(1, data.page_count)}`),
      data.items.length ? el("table", { class: "msg-table" },
        el("thead", {}, el("tr", {},
          el("th", { class: "select" }, selectAll), el("th", { class: "num" }, "#"), el("th", {}, "Message"), el("th", { class: "actions" }, ""))),
        el("tbody", {}, data.items.map(messageRow))) : el("p", { class: "empty" }, "No messages in this queue."),
      el("div", { class: "pager" },
        el("button", { class: "secondary", onclick: () => load(page - 1), disabled: page <= 1 ? "" : null }, "‹ Previous"),
        el("button", { class: "secondary", onclick: () => load(page + 1), disabled: page >= data.page_count ? "" : null }, "Next ›")));
    renderSelection();
  }

  async function refresh() {
    try { await Promise.all([load(current.page), onChange()]); } catch (error) { showError(browse, error); }
    renderSelection();
  }

  const element = el("div", { class: "workbench" },
    el("div", { class: "wb-toolbar" },
      el("div", { class: "wb-group" }, count),
      el("div", { class: "wb-group" },
        replaySelected, replayAll,
        el("span", { class: "wb-label" }, "to (optional)"), exchange, routingKey),
      el("div", { class: "wb-group" }, moveSelected, moveQueue)),
    el("p", { class: "muted wb-hint" }, "A replay sends each message back to the exchange and routing key it was dead-lettered from " +
      "(its newest x-death entry), or to the exchange and routing key given (a routing key alone: the default exchange). " +
      "It keeps the message id and headers and adds x-replayed-count. Messages a consumer holds unacknowledged are skipped."),
    result, browse);
  return { element, load };
}

function publishForm(vhost, queue) {
  const form = el("form", { class: "grid" },
    el("label", {}, "Routing key"), el("input", { name: "routing_key", value: queue }),
    el("label", {}, "Properties (JSON)"), el("textarea", { name: "properties" }, '{"delivery_mode": 2}'),
    el("label", {}, "Payload"), el("textarea", { name: "payload" }),
    el("span"), el("button", { type: "submit" }, "Publish to the default exchange"),
    el("span"), el("p", { class: "result" }));
  form.onsubmit = async (event) => {
    event.preventDefault();
    const data = new FormData(form), result = form.querySelector(".result");
    try {
      const answer = await api("POST", `/api/exchanges/${enc(vhost)}/amq.default/publish`, {
        routing_key: data.get("routing_key"), payload: data.get("payload"), payload_encoding: "string",
        properties: JSON.parse(data.get("properties") || "{}") });
      result.className = "result ok";
      result.textContent = answer.routed ? "Published (and routed)." : "Published, but routed to no queue.";
    } catch (error) { result.className = "result error"; result.textContent = error.message; }
  };
  return el("div", { class: "panel" }, el("h2", {}, "Publish a message"), form);
}

function getForm(base) {
  const out = el("div");
  const form = el("form", { class: "grid" },
    el("label", {}, "Ack mode"), el("select", { name: "ackmode" },
      el("option", { value: "ack_requeue_true" }, "Requeue (counts as a delivery)"),
      el("option", { value: "ack_requeue_false" }, "Acknowledge (removes them)"),
      el("option", { value: "reject_requeue_false" }, "Reject (dead-letters them)")),
    el("label", {}, "Messages"), el("input", { name: "count", type: "number", value: "1", min: "1" }),
    el("span"), el("button", { type: "submit" }, "Get messages"));
  form.onsubmit = async (event) => {
    event.preventDefault();
    const data = new FormData(form);
    try {
      const messages = await api("POST", `${base}/get`, { count: Number(data.get("count")), ackmode: data.get("ackmode"), encoding: "auto" });
      out.replaceChildren(...(messages.length ? messages.map(messageView) : [el("p", { class: "muted" }, "The queue is empty.")]));
    } catch (error) { showError(out, error); }
  };
  return el("div", { class: "panel" }, el("h2", {}, "Get messages"), form, out);
}

// A small form that sends one request and shows its error, or reloads the page.
function actionForm(fields, label, send) {
  const form = el("form", { class: "grid" }, ...fields, el("span"), el("button", { type: "submit" }, label), el("span"), el("p", { class: "result" }));
  form.onsubmit = async (event) => {
    event.preventDefault();
    const result = form.querySelector(".result");
    try { await send(new FormData(form)); route(); } catch (error) { result.className = "result error"; result.textContent = error.message; }
  };
  return form;
}

async function admin(main) {
  const [users, permissions, policies, vhosts] = await Promise.all([
    api("GET", "/api/users").catch((error) => error), api("GET", "/api/permissions").catch((error) => error), api("GET", "/api/policies"),
    api("GET", "/api/vhosts")]);
  const policyForm = actionForm([
    el("label", {}, "Vhost"), el("input", { name: "vhost", value: "/", required: "" }),
    el("label", {}, "Name"), el("input", { name: "name", required: "", id: "policy-name" }),
    el("label", {}, "Pattern"), el("input", { name: "pattern", required: "", placeholder: "^orders\\.", id: "policy-pattern" }),
    el("label", {}, "Apply to"), el("select", { name: "apply_to" }, el("option", { value: "queues" }, "queues"), el("option", { value: "exchanges" }, "exchanges"), el("option", { value: "all" }, "all")),
    el("label", {}, "Priority"), el("input", { name: "priority", type: "number", value: "0" }),
    el("label", {}, "Definition (JSON)"), el("textarea", { name: "definition", rows: "3", placeholder: '{"max-length": 10000, "dead-letter-exchange": "dlx"}', id: "policy-definition" }),
  ], "Set policy", async (data) => {
    let definition;
    try { definition = JSON.parse(data.get("definition") || "{}"); } catch { throw new Error("The definition is not JSON."); }
    await api("PUT", `/api/policies/${enc(data.get("vhost"))}/${enc(data.get("name"))}`,
      { pattern: data.get("pattern"), "apply-to": data.get("apply_to"), priority: Number(data.get("priority") || 0), definition });
  });
  const vhostForm = actionForm([el("label", {}, "Name"), el("input", { name: "name", required: "" }),
    el("label", {}, "Description"), el("input", { name: "description" })], "Add vhost",
  (data) => api("PUT", `/api/vhosts/${enc(data.get("name"))}`, { description: data.get("description") }));
  const section = (title, data, columns) => [el("h2", {}, title),
    data instanceof Error ? el("p", { class: "muted" }, data.message) : table(data, columns)];
  const form = el("form", { class: "grid" },
    el("label", {}, "Name"), el("input", { name: "name", required: "" }),
    el("label", {}, "Password"), el("input", { name: "password", type: "password", required: "" }),
    el("label", {}, "Tags"), el("input", { name: "tags", placeholder: "administrator, monitoring, management, policymaker" }),
    el("label", {}, "Full access to vhost"), el("input", { name: "vhost", value: "/" }),
    el("span"), el("button", { type: "submit" }, "Add user"), el("span"), el("p", { class: "result" }));
  form.onsubmit = async (event) => {
    event.preventDefault();
    const data = new FormData(form), result = form.querySelector(".result");
    try {
      await api("PUT", `/api/users/${enc(data.get("name"))}`, { password: data.get("password"), tags: data.get("tags") });
      if (data.get("vhost")) await api("PUT", `/api/permissions/${enc(data.get("vhost"))}/${enc(data.get("name"))}`, { configure: ".*", write: ".*", read: ".*" });
      route();
    } catch (error) { result.className = "result error"; result.textContent = error.message; }
  };
  main.replaceChildren(el("h1", {}, "Users, permissions, policies and vhosts"),
    ...section("Users", users, [["Name", (u) => u.name], ["Tags", (u) => u.tags.join(", ")],
      ["", (u) => el("button", { class: "danger", onclick: async () => { if (confirm(`Delete user ${u.name}?`)) { await api("DELETE", `/api/users/${enc(u.name)}`); route(); } } }, "Delete")]]),
    ...section("Permissions", permissions, [["User", (p) => p.user], ["Vhost", (p) => p.vhost], ["Configure", (p) => p.configure],
      ["Write", (p) => p.write], ["Read", (p) => p.read]]),
    ...section("Policies", policies, [["Vhost", (p) => p.vhost], ["Name", (p) => p.name], ["Pattern", (p) => p.pattern],
      ["Apply to", (p) => p["apply-to"]], ["Definition", (p) => JSON.stringify(p.definition)], ["Priority", (p) => p.priority, { num: true }],
      ["", (p) => el("button", { class: "danger policy-delete", onclick: async () => { if (confirm(`Delete policy ${p.name}?`)) { try { await api("DELETE", `/api/policies/${enc(p.vhost)}/${enc(p.name)}`); route(); } catch (error) { alert(error.message); } } } }, "Delete")]]),
    el("div", { class: "panel" }, el("h2", {}, "Set a policy"),
      el("p", { class: "muted" }, "Applies at once to the queues and exchanges it matches; a lower max-length drops their oldest messages now."), policyForm),
    ...section("Vhosts", vhosts, [["Name", (v) => v.name], ["Messages", (v) => v.messages, { num: true }],
      ["", (v) => (v.name === "/" ? "" : el("button", { class: "danger", onclick: async () => { if (confirm(`Delete vhost ${v.name} and everything in it?`)) { try { await api("DELETE", `/api/vhosts/${enc(v.name)}`); route(); } catch (error) { alert(error.message); } } } }, "Delete"))]]),
    users instanceof Error ? null : el("div", { class: "panel" }, el("h2", {}, "Add a vhost"), vhostForm),
    users instanceof Error ? null : el("div", { class: "panel" }, el("h2", {}, "Add a user"), form));
}

async function definitions(main) {
  const result = el("p");
  const file = el("input", { type: "file", accept: "application/json" });
  main.replaceChildren(el("h1", {}, "Definitions"),
    el("div", { class: "panel" }, el("h2", {}, "Export"),
      el("p", { class: "muted" }, "Users, vhosts, permissions, policies, durable exchanges, queues and bindings, in RabbitMQ's format."),
      el("button", { onclick: async () => {
        try {
          const data = await api("GET", "/api/definitions");
          const link = el("a", { href: URL.createObjectURL(new Blob([JSON.stringify(data, null, 2)], { type: "application/json" })), download: "wharf-definitions.json" });
          document.body.append(link); link.click(); link.remove();
        } catch (error) { showError(result, error); }
      } }, "Download definitions")),
    el("div", { class: "panel" }, el("h2", {}, "Import"),
      el("p", { class: "muted" }, "A file exported from Wharf or RabbitMQ."), file,
      el("button", { onclick: async () => {
        try {
          if (!file.files.length) throw new Error("Choose a file first.");
          await api("POST", "/api/definitions", JSON.parse(await file.files[0].text()));
          result.className = "ok"; result.textContent = "Imported.";
        } catch (error) { result.className = "error"; result.textContent = error.message; }
      } }, "Import"), result));
}

// ---- routing and login -------------------------------------------------------------------

const routes = { overview, connections, channels, exchanges, queues, admin, definitions };

async function route() {
  clearInterval(state.timer);
  const main = document.getElementById("main");
  const path = (location.hash.replace(/^#\/?/, "").split("?")[0] || "overview").split("/");
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.getAttribute("href") === `#/${path[0]}`));
  if (!state.auth) { showLogin(""); return; }
  try {
    if (path[0] === "queues" && path.length === 3) await queueDetail(main, decodeURIComponent(path[1]), decodeURIComponent(path[2]));
    else await (routes[path[0]] || overview)(main);
    // Lists refresh themselves every 5 s, as the statistics do; pages with forms do not.
    if (["overview", "connections", "channels", "exchanges"].includes(path[0]) || path[0] === "") state.timer = setInterval(() => (routes[path[0]] || overview)(main).catch(() => {}), 5000);
  } catch (error) {
    if (error.status !== 401 || !document.getElementById("login").open) showError(main, error);
  }
}

function showLogin(message) {
  const dialog = document.getElementById("login");
  document.getElementById("login-error").textContent = message;
  if (!dialog.open) dialog.showModal();
}

document.getElementById("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  state.auth = btoa(`${form.get("user")}:${form.get("password")}`);
  try {
    const me = await api("GET", "/api/whoami");
    sessionStorage.setItem("wharf-auth", state.auth);
    state.user = me;
    document.getElementById("login").close();
    renderWho();
    route();
  } catch (error) {
    state.auth = null;
    document.getElementById("login-error").textContent = error.status === 401 ? "Wrong user or password, or this user may not use the console." : error.message;
  }
});

function renderWho() {
  const who = document.getElementById("who");
  who.replaceChildren(state.user ? `${state.user.name} (${state.user.tags.join(", ") || "no tags"})` : "",
    el("button", { class: "secondary", onclick: () => { sessionStorage.removeItem("wharf-auth"); state.auth = null; state.user = null; renderWho(); showLogin(""); } }, "Log out"));
}

window.addEventListener("hashchange", route);
(async () => {
  if (state.auth) {
    try { state.user = await api("GET", "/api/whoami"); renderWho(); } catch { state.auth = null; }
  }
  route();
})();
