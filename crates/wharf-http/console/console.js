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
  const browse = el("div");
  const loadPage = async (page) => {
    const data = await api("GET", `${base}/messages?page=${page}&page_size=20`);
    browse.replaceChildren(
      el("p", { class: "muted" }, `${data.total_count} message${data.total_count === 1 ? "" : "s"}; page ${data.page} of ${Math.max(1, data.page_count)}`),
      ...data.items.map(messageView),
      el("div", { class: "pager" },
        el("button", { class: "secondary", onclick: () => loadPage(page - 1), disabled: page <= 1 ? "" : null }, "‹ Previous"),
        el("button", { class: "secondary", onclick: () => loadPage(page + 1), disabled: page >= data.page_count ? "" : null }, "Next ›")));
  };
  const stat = (label, value) => el("tr", {}, el("th", {}, label), el("td", {}, value));
  main.replaceChildren(
    el("h1", {}, `Queue ${name} `, el("span", { class: "muted" }, `in vhost ${vhost}`)),
    el("div", { class: "columns" },
      el("div", { class: "panel" }, el("table", {}, stat("Ready", fmt(queue.messages_ready)), stat("Unacked", fmt(queue.messages_unacknowledged)),
        stat("Total", fmt(queue.messages)), stat("Bytes", bytes(queue.message_bytes)), stat("Consumers", fmt(queue.consumers)),
        stat("Durable", String(queue.durable)), stat("Policy", queue.policy || "none"),
        stat("Arguments", el("pre", {}, JSON.stringify(queue.arguments, null, 2))),
        stat("Effective policy", el("pre", {}, JSON.stringify(queue.effective_policy_definition || {}, null, 2))))),
      el("div", {},
        el("h2", {}, "Consumers"),
        table(queue.consumer_details || [], [["Tag", (c) => c.consumer_tag], ["Channel", (c) => c.channel_details.name],
          ["Ack", (c) => (c.ack_required ? "manual" : "auto")], ["Prefetch", (c) => c.prefetch_count, { num: true }]]),
        el("h2", {}, "Bindings"),
        table(bindings, [["From", (b) => b.source || "(default exchange)"], ["Routing key", (b) => b.routing_key],
          ["Arguments", (b) => JSON.stringify(b.arguments)]]))),
    el("div", { class: "columns" }, publishForm(vhost, name), getForm(base)),
    el("div", { class: "panel" }, el("h2", {}, "Messages (browsed without consuming them)"), browse),
    el("div", { class: "toolbar" },
      el("button", { class: "danger", onclick: async () => { if (confirm(`Purge ${name}?`)) { await api("DELETE", `${base}/contents`); route(); } } }, "Purge"),
      el("button", { class: "danger", onclick: async () => { if (confirm(`Delete ${name}?`)) { await api("DELETE", base); location.hash = "#/queues"; } } }, "Delete queue")),
  );
  await loadPage(1);
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

async function admin(main) {
  const [users, permissions, policies] = await Promise.all([
    api("GET", "/api/users").catch((error) => error), api("GET", "/api/permissions").catch((error) => error), api("GET", "/api/policies")]);
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
  main.replaceChildren(el("h1", {}, "Users, permissions and policies"),
    ...section("Users", users, [["Name", (u) => u.name], ["Tags", (u) => u.tags.join(", ")],
      ["", (u) => el("button", { class: "danger", onclick: async () => { if (confirm(`Delete user ${u.name}?`)) { await api("DELETE", `/api/users/${enc(u.name)}`); route(); } } }, "Delete")]]),
    ...section("Permissions", permissions, [["User", (p) => p.user], ["Vhost", (p) => p.vhost], ["Configure", (p) => p.configure],
      ["Write", (p) => p.write], ["Read", (p) => p.read]]),
    ...section("Policies", policies, [["Vhost", (p) => p.vhost], ["Name", (p) => p.name], ["Pattern", (p) => p.pattern],
      ["Apply to", (p) => p["apply-to"]], ["Definition", (p) => JSON.stringify(p.definition)], ["Priority", (p) => p.priority, { num: true }]]),
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
