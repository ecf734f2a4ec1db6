//! `wharf admin`: the broker's administration from a terminal, through the management HTTP API
//! (so it works against a remote broker, and against RabbitMQ for the RabbitMQ-shaped commands).
//! Human tables by default, the API's JSON with `--json`; errors name the problem (a refused
//! login, an unknown queue, a broker that cannot be reached) and exit with status 1.

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use serde_json::Value;
use std::io::Write as _;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The management API's address.
    #[arg(long, env = "WHARF_ADMIN_URL", default_value = "http://127.0.0.1:15672")]
    url: String,
    /// User name (basic authentication).
    #[arg(long, short = 'u', env = "WHARF_ADMIN_USER", default_value = "guest")]
    user: String,
    /// Password.
    #[arg(long, short = 'p', env = "WHARF_ADMIN_PASSWORD", default_value = "guest", hide_env_values = true)]
    password: String,
    /// The vhost for commands about one object (default `/`); lists show every vhost unless given.
    #[arg(long, short = 'V')]
    vhost: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    command: AdminCommand,
}

/// A change to a quorum queue's replicas.
#[derive(Debug, Subcommand)]
enum ReplicaChange {
    /// Add a replica of QUEUE on node NODE (a member of the cluster); returns once it has
    /// caught up and votes.
    Add { queue: String, node: u64 },
    /// Remove QUEUE's replica on node NODE (refused for its last replica, or while consumers
    /// are attached through that node).
    Remove { queue: String, node: u64 },
    /// Make QUEUE's replica on node NODE its leader; returns once it leads (publishes wait
    /// about two seconds meanwhile).
    Leader { queue: String, node: u64 },
}

/// A change to the cluster's members.
#[derive(Debug, Subcommand)]
enum ClusterChange {
    /// Add a node, started with `wharf serve --cluster-join`: ID=HOST:PORT, its id and its
    /// --cluster-listen address as the others reach it. Returns once it has caught up and votes.
    Add { member: String },
    /// Remove a node (refused while it holds a replica of a quorum queue).
    Remove { node: u64 },
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// The broker at a glance: version, node, object and message totals.
    Overview,
    /// The cluster's members as this node sees them: address, link state, last answer; or add
    /// or remove a member.
    Cluster {
        #[command(subcommand)]
        change: Option<ClusterChange>,
    },
    /// List queues, with their messages and consumers.
    Queues,
    /// Add or remove a replica of a quorum queue, or move its leader (in --vhost, default `/`).
    Replica {
        #[command(subcommand)]
        change: ReplicaChange,
    },
    /// List exchanges.
    Exchanges,
    /// List client connections.
    Connections,
    /// List consumers.
    Consumers,
    /// Remove every ready message of a queue.
    Purge { queue: String },
    /// Delete a queue or an exchange.
    Delete {
        #[command(subcommand)]
        what: DeleteWhat,
    },
    /// Write the broker's definitions (RabbitMQ's format) to FILE, or to standard output.
    Export { file: Option<PathBuf> },
    /// Declare what a definitions file holds (an export of Wharf or RabbitMQ).
    Import { file: PathBuf },
    /// Show a queue's messages without consuming them (a dead-letter queue's, say): headers
    /// (`x-death`, `x-failure-reason`), size and body.
    Peek {
        queue: String,
        /// Which page (from 1).
        #[arg(long, default_value_t = 1)]
        page: usize,
        /// Messages per page (at most 500).
        #[arg(long, default_value_t = 20)]
        page_size: usize,
    },
    /// Send messages of a queue (a dead-letter queue's, say) back to where they died (the
    /// exchange and routing key of their newest `x-death`), or to a chosen exchange; each keeps
    /// its message id and headers and gains `x-replayed-count`. Crash-safe.
    Replay {
        queue: String,
        #[command(flatten)]
        selection: Chosen,
        /// Replay to this exchange instead ("" is the default exchange).
        #[arg(long)]
        exchange: Option<String>,
        /// The routing key for --exchange.
        #[arg(long, requires = "exchange")]
        routing_key: Option<String>,
    },
    /// Move messages of a queue to another queue, unchanged. Crash-safe.
    Move {
        queue: String,
        /// The queue they go to.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        selection: Chosen,
    },
    /// Show what happened to a message: its publish, each delivery that did not end in an ack
    /// and what became of it, dead-letter hops, replays. Finds every message with MESSAGE_ID in
    /// the vhost's queues, or one message by --queue and --entry.
    Trace {
        /// The message id (the AMQP `message-id` property).
        #[arg(required_unless_present = "entry")]
        message_id: Option<String>,
        /// The queue holding the message (with --entry).
        #[arg(long, requires = "entry")]
        queue: Option<String>,
        /// The message's entry id in --queue (as `peek` shows it).
        #[arg(long, requires = "queue")]
        entry: Option<u64>,
    },
}

/// Which messages of a queue: `--ids` (entry ids, as `peek` shows them) or `--all`.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct Chosen {
    /// Entry ids, comma-separated (as `peek` shows them).
    #[arg(long, value_delimiter = ',')]
    ids: Vec<u64>,
    /// Every ready message of the queue.
    #[arg(long)]
    all: bool,
}

#[derive(Debug, Subcommand)]
enum DeleteWhat {
    Queue {
        name: String,
        /// Only if it has no consumers.
        #[arg(long)]
        if_unused: bool,
        /// Only if it holds no messages.
        #[arg(long)]
        if_empty: bool,
    },
    Exchange {
        name: String,
        #[arg(long)]
        if_unused: bool,
    },
    /// One message of a queue, by its entry id (as `peek` shows it).
    Message { queue: String, entry: u64 },
}

/// Percent-encodes a path segment (a vhost `/` becomes `%2F`).
fn segment(text: &str) -> String {
    let mut encoded = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// The API client: one agent, errors turned into sentences.
struct Client {
    agent: ureq::Agent,
    base: String,
    user: String,
    authorization: String,
}

impl Client {
    fn new(args: &AdminArgs) -> Client {
        use base64::Engine as _;
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(60)))
            .build()
            .into();
        let credentials = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", args.user, args.password));
        Client {
            agent,
            base: args.url.trim_end_matches('/').to_owned(),
            user: args.user.clone(),
            authorization: format!("Basic {credentials}"),
        }
    }

    /// Sends a request; answers the body (JSON, or `Null` when empty) of a 2xx, an error
    /// naming the problem otherwise.
    fn call(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let response = match method {
            "GET" => self.agent.get(&url).header("authorization", &self.authorization).call(),
            "DELETE" => self.agent.delete(&url).header("authorization", &self.authorization).call(),
            "PUT" => self
                .agent
                .put(&url)
                .header("authorization", &self.authorization)
                .header("content-type", "application/json")
                .send(body.unwrap_or(b"{}")),
            "POST" if body.is_none() => bail!("a POST needs a body"),
            "POST" => self
                .agent
                .post(&url)
                .header("authorization", &self.authorization)
                .header("content-type", "application/json")
                .send(body.unwrap_or(b"{}")),
            other => bail!("no HTTP method {other}"),
        };
        let mut response = response.map_err(|error| match error {
            ureq::Error::Io(error) => {
                anyhow!(
                    "cannot reach the management API at {}: {error} (is wharf running, with --http-listen?)",
                    self.base
                )
            }
            other => anyhow!("cannot reach the management API at {}: {other}", self.base),
        })?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        let json: Value =
            if text.trim().is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::Null) };
        let reason = json.get("reason").and_then(Value::as_str).unwrap_or("").to_owned();
        match status {
            200..=299 => Ok(json),
            401 if json.get("error").and_then(Value::as_str) == Some("not_authorised") => {
                bail!("user '{}' may not do this: {reason}", self.user)
            }
            401 => bail!(
                "the broker refused the login of user '{}' (wrong user or password, or guest from another host)",
                self.user
            ),
            404 => bail!("not found: {}", describe(path)),
            _ if !reason.is_empty() => bail!("the broker refused it ({status}): {reason}"),
            _ => bail!("the broker answered {status} for {method} {path}"),
        }
    }
}

/// What a path names, for a 404: "queue 'orders' in vhost '/'".
fn describe(path: &str) -> String {
    let parts: Vec<String> =
        path.trim_start_matches("/api/").split('?').next().unwrap_or("").split('/').map(percent_decode).collect();
    match parts.as_slice() {
        [kind, vhost, name, ..] if kind == "queues" => format!("queue '{name}' in vhost '{vhost}'"),
        [kind, vhost, name, ..] if kind == "exchanges" => format!("exchange '{name}' in vhost '{vhost}'"),
        [_, vhost] => format!("vhost '{vhost}'"),
        _ => path.to_owned(),
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%'
            && let Some(byte) = text.get(index + 1..index + 3).and_then(|hex| u8::from_str_radix(hex, 16).ok())
        {
            decoded.push(byte);
            index += 3;
            continue;
        }
        decoded.push(bytes[index]);
        index += 1;
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// A cell of a table: strings as they are, numbers and booleans as text, missing as blank.
fn cell(item: &Value, path: &str) -> String {
    match path.split('.').try_fold(item, |value, key| value.get(key)) {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
    }
}

/// Prints rows under headers, columns padded to their widest cell.
fn print_table(items: &[Value], columns: &[(&str, &str)]) {
    let rows: Vec<Vec<String>> =
        items.iter().map(|item| columns.iter().map(|(_, path)| cell(item, path)).collect()).collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(index, (header, _))| {
            rows.iter().map(|row| row[index].chars().count()).chain([header.len()]).max().unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(text, width)| format!("{text:<width$}")).collect();
        padded.join("  ").trim_end().to_owned()
    };
    println!("{}", line(columns.iter().map(|(header, _)| *header).collect()));
    for row in &rows {
        println!("{}", line(row.iter().map(String::as_str).collect()));
    }
    if rows.is_empty() {
        println!("(none)");
    }
}

fn print_json(value: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Runs one `wharf admin` command.
pub fn run(args: AdminArgs) -> Result<()> {
    let client = Client::new(&args);
    let vhost = args.vhost.clone().unwrap_or_else(|| "/".to_owned());
    let listed = |kind: &str| match &args.vhost {
        Some(vhost) => format!("/api/{kind}/{}", segment(vhost)),
        None => format!("/api/{kind}"),
    };
    let list = |path: String, columns: &[(&str, &str)]| -> Result<()> {
        let items = client.call("GET", &path, None)?;
        if args.json {
            return print_json(&items);
        }
        print_table(items.as_array().map(Vec::as_slice).unwrap_or(&[]), columns);
        Ok(())
    };
    match &args.command {
        AdminCommand::Cluster { change: Some(ClusterChange::Add { member }) } => {
            let Some((node, address)) = member.split_once('=') else {
                bail!("'{member}' is not ID=HOST:PORT");
            };
            let node: u64 = node.trim().parse().map_err(|_| anyhow!("'{node}' in '{member}' is not a node id"))?;
            let body = serde_json::to_vec(&serde_json::json!({ "address": address.trim() }))?;
            client.call("PUT", &format!("/api/cluster/members/{node}"), Some(&body))?;
            println!("node {node} added at {}", address.trim());
            Ok(())
        }
        AdminCommand::Cluster { change: Some(ClusterChange::Remove { node }) } => {
            client.call("DELETE", &format!("/api/cluster/members/{node}"), None)?;
            println!("node {node} removed");
            Ok(())
        }
        AdminCommand::Replica { change } => {
            let (queue, node, action, done) = match change {
                ReplicaChange::Add { queue, node } => (queue, node, "replicas/add", "replica added"),
                ReplicaChange::Remove { queue, node } => (queue, node, "replicas/delete", "replica removed"),
                ReplicaChange::Leader { queue, node } => (queue, node, "leader", "now the leader"),
            };
            let path = format!("/api/queues/quorum/{}/{}/{action}", segment(&vhost), segment(queue));
            let body = serde_json::to_vec(&serde_json::json!({ "node": node }))?;
            client.call("POST", &path, Some(&body))?;
            println!("queue '{queue}': node {node}: {done}");
            Ok(())
        }
        AdminCommand::Cluster { change: None } => list(
            "/api/cluster/members".to_owned(),
            &[
                ("node", "node"),
                ("address", "address"),
                ("this", "this_node"),
                ("linked", "outbound_connected"),
                ("inbound", "inbound_links"),
                ("last answer ms", "last_answer_ms_ago"),
                ("failures", "consecutive_failures"),
                ("last error", "last_error"),
                ("metadata leader", "metadata_leader"),
                ("metadata lag", "metadata_lag"),
            ],
        ),
        AdminCommand::Overview => {
            let overview = client.call("GET", "/api/overview", None)?;
            if args.json {
                return print_json(&overview);
            }
            for (label, path) in [
                ("product", "product_name"),
                ("version", "product_version"),
                ("node", "node"),
                ("connections", "object_totals.connections"),
                ("channels", "object_totals.channels"),
                ("queues", "object_totals.queues"),
                ("consumers", "object_totals.consumers"),
                ("messages", "queue_totals.messages"),
                ("ready", "queue_totals.messages_ready"),
                ("unacknowledged", "queue_totals.messages_unacknowledged"),
            ] {
                println!("{label:<15} {}", cell(&overview, path));
            }
            Ok(())
        }
        AdminCommand::Queues => list(
            listed("queues"),
            &[
                ("vhost", "vhost"),
                ("name", "name"),
                ("messages", "messages"),
                ("ready", "messages_ready"),
                ("unacked", "messages_unacknowledged"),
                ("consumers", "consumers"),
                ("durable", "durable"),
                ("policy", "policy"),
            ],
        ),
        AdminCommand::Exchanges => list(
            listed("exchanges"),
            &[("vhost", "vhost"), ("name", "name"), ("type", "type"), ("durable", "durable"), ("internal", "internal")],
        ),
        AdminCommand::Connections => list(
            match &args.vhost {
                Some(vhost) => format!("/api/vhosts/{}/connections", segment(vhost)),
                None => "/api/connections".to_owned(),
            },
            &[
                ("name", "name"),
                ("client", "user_provided_name"),
                ("user", "user"),
                ("vhost", "vhost"),
                ("channels", "channels"),
                ("tls", "ssl"),
            ],
        ),
        AdminCommand::Consumers => list(
            listed("consumers"),
            &[
                ("vhost", "queue.vhost"),
                ("queue", "queue.name"),
                ("tag", "consumer_tag"),
                ("connection", "channel_details.connection_name"),
                ("ack", "ack_required"),
                ("prefetch", "prefetch_count"),
            ],
        ),
        AdminCommand::Purge { queue } => {
            client.call("DELETE", &format!("/api/queues/{}/{}/contents", segment(&vhost), segment(queue)), None)?;
            println!("purged queue '{queue}' in vhost '{vhost}'");
            Ok(())
        }
        AdminCommand::Delete { what: DeleteWhat::Queue { name, if_unused, if_empty } } => {
            let path =
                format!("/api/queues/{}/{}?if-unused={if_unused}&if-empty={if_empty}", segment(&vhost), segment(name));
            client.call("DELETE", &path, None)?;
            println!("deleted queue '{name}' in vhost '{vhost}'");
            Ok(())
        }
        AdminCommand::Delete { what: DeleteWhat::Exchange { name, if_unused } } => {
            client.call(
                "DELETE",
                &format!("/api/exchanges/{}/{}?if-unused={if_unused}", segment(&vhost), segment(name)),
                None,
            )?;
            println!("deleted exchange '{name}' in vhost '{vhost}'");
            Ok(())
        }
        AdminCommand::Export { file } => {
            let path = match &args.vhost {
                Some(vhost) => format!("/api/definitions/{}", segment(vhost)),
                None => "/api/definitions".to_owned(),
            };
            let definitions = client.call("GET", &path, None)?;
            let text = serde_json::to_string_pretty(&definitions)?;
            match file {
                Some(file) => {
                    std::fs::write(file, text.as_bytes()).with_context(|| format!("writing {}", file.display()))?;
                    eprintln!("exported definitions to {}", file.display());
                }
                None => println!("{text}"),
            }
            Ok(())
        }
        AdminCommand::Import { file } => {
            let body = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
            serde_json::from_slice::<Value>(&body).with_context(|| format!("{} is not JSON", file.display()))?;
            let path = match &args.vhost {
                Some(vhost) => format!("/api/definitions/{}", segment(vhost)),
                None => "/api/definitions".to_owned(),
            };
            client.call("POST", &path, Some(&body))?;
            println!("imported definitions from {}", file.display());
            Ok(())
        }
        AdminCommand::Peek { queue, page, page_size } => {
            let path = format!(
                "/api/queues/{}/{}/messages?page={page}&page_size={page_size}",
                segment(&vhost),
                segment(queue)
            );
            let browsed = client.call("GET", &path, None)?;
            if args.json {
                return print_json(&browsed);
            }
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "queue '{queue}' in vhost '{vhost}': {} messages, page {} of {}",
                cell(&browsed, "total_count"),
                cell(&browsed, "page"),
                cell(&browsed, "page_count")
            )?;
            for item in browsed["items"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
                writeln!(
                    out,
                    "\n#{}  entry {}  id {}  {}  {} bytes  delivered {} times  from '{}' with key '{}'",
                    cell(item, "position"),
                    cell(item, "entry_id"),
                    match cell(item, "message_id") {
                        id if id.is_empty() => "(none)".to_owned(),
                        id => id,
                    },
                    cell(item, "state"),
                    cell(item, "payload_bytes"),
                    cell(item, "delivery_count"),
                    cell(item, "exchange"),
                    cell(item, "routing_key"),
                )?;
                if let Some(reason) = item.pointer("/properties/headers/x-failure-reason").and_then(Value::as_str) {
                    writeln!(out, "  failure: {reason}")?;
                }
                if let Some(deaths) = item.pointer("/properties/headers/x-death").and_then(Value::as_array) {
                    for death in deaths {
                        writeln!(
                            out,
                            "  x-death: {} from queue '{}' ({} times)",
                            cell(death, "reason"),
                            cell(death, "queue"),
                            cell(death, "count")
                        )?;
                    }
                }
                writeln!(out, "  body ({}): {}", cell(item, "payload_encoding"), cell(item, "payload"))?;
            }
            Ok(())
        }
        AdminCommand::Delete { what: DeleteWhat::Message { queue, entry } } => {
            client.call(
                "DELETE",
                &format!("/api/queues/{}/{}/messages/{entry}", segment(&vhost), segment(queue)),
                None,
            )?;
            println!("deleted message {entry} of queue '{queue}' in vhost '{vhost}'");
            Ok(())
        }
        AdminCommand::Replay { queue, selection, exchange, routing_key } => {
            let mut request = selection.body();
            if let Some(exchange) = exchange {
                request["exchange"] = Value::from(exchange.as_str());
                request["routing_key"] = Value::from(routing_key.clone().unwrap_or_default());
            }
            let path = format!("/api/queues/{}/{}/messages/replay", segment(&vhost), segment(queue));
            let report = moved(&client, &path, &request)?;
            report_moves(&report, args.json, "replayed", queue)
        }
        AdminCommand::Move { queue, to, selection } => {
            let mut request = selection.body();
            request["queue"] = Value::from(to.as_str());
            let path = format!("/api/queues/{}/{}/messages/move", segment(&vhost), segment(queue));
            let report = moved(&client, &path, &request)?;
            report_moves(&report, args.json, &format!("moved to '{to}'"), queue)
        }
        AdminCommand::Trace { message_id, queue, entry } => {
            let traces = match (queue, entry) {
                (Some(queue), Some(entry)) => {
                    let path = format!("/api/queues/{}/{}/messages/{entry}/trace", segment(&vhost), segment(queue));
                    let trace = client.call("GET", &path, None)?;
                    serde_json::json!({"items": [trace], "complete": true, "traces_enabled": trace["traces_enabled"]})
                }
                _ => {
                    let id = message_id.as_deref().unwrap_or_default();
                    client.call("GET", &format!("/api/traces/{}?message_id={}", segment(&vhost), segment(id)), None)?
                }
            };
            if args.json {
                return print_json(&traces);
            }
            print_traces(&traces, message_id.as_deref())
        }
    }
}

impl Chosen {
    fn body(&self) -> Value {
        if self.all { serde_json::json!({"all": true}) } else { serde_json::json!({"ids": self.ids}) }
    }
}

/// Sends a replay or move, again while the broker says messages remain (it takes at most
/// 50,000 per request); the reports added up.
fn moved(client: &Client, path: &str, request: &Value) -> Result<Value> {
    let mut total = serde_json::json!({"moved": [], "skipped": []});
    let mut request = request.clone();
    loop {
        let report = client.call("POST", path, Some(request.to_string().as_bytes()))?;
        // Repeated, an "all" covers the ids of the first answer only: copies a replay put back
        // into the same queue get higher ids and are not taken again.
        if request.get("all").is_some() && request.get("max_id").is_none() {
            request["max_id"] = report["max_id"].clone();
        }
        for key in ["moved", "skipped"] {
            if let (Some(all), Some(more)) = (total[key].as_array_mut(), report[key].as_array()) {
                all.extend(more.iter().cloned());
            }
        }
        let moved_now = report["moved_count"].as_u64().unwrap_or(0);
        // With nothing moved, what remains would only be skipped again.
        if report["remaining"].as_u64().unwrap_or(0) == 0 || request.get("all").is_none() || moved_now == 0 {
            break;
        }
    }
    total["moved_count"] = Value::from(total["moved"].as_array().map_or(0, Vec::len));
    Ok(total)
}

fn report_moves(report: &Value, json: bool, what: &str, queue: &str) -> Result<()> {
    if json {
        return print_json(report);
    }
    println!("{} messages of queue '{queue}' {what}", cell(report, "moved_count"));
    let skipped = report["skipped"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    if !skipped.is_empty() {
        println!("{} left where they are:", skipped.len());
        for item in skipped {
            println!("  entry {}: {}", cell(item, "id"), cell(item, "reason"));
        }
    }
    Ok(())
}

fn print_traces(traces: &Value, message_id: Option<&str>) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if traces["traces_enabled"] == Value::Bool(false) {
        writeln!(out, "(the broker keeps no delivery traces: it runs with --message-trace-events-max 0)")?;
    }
    let items = traces["items"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    if items.is_empty() {
        writeln!(out, "no message with id '{}' in the queues you may read", message_id.unwrap_or_default())?;
    }
    for item in items {
        writeln!(
            out,
            "message {} in queue '{}' (entry {}, {}, delivered {} times)",
            match cell(item, "message_id") {
                id if id.is_empty() => "(no id)".to_owned(),
                id => format!("'{id}'"),
            },
            cell(item, "queue"),
            cell(item, "entry_id"),
            cell(item, "state"),
            cell(item, "delivery_count"),
        )?;
        if item["events_dropped"].as_u64().unwrap_or(0) > 0 {
            writeln!(out, "  ({} older events were dropped to keep the trace bounded)", cell(item, "events_dropped"))?;
        }
        for event in item["events"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            let at = event["at"].as_u64().map(utc).unwrap_or_default();
            writeln!(out, "  {at}  {:<20} {}", cell(event, "queue"), describe_event(event))?;
        }
    }
    if traces["complete"] == Value::Bool(false) {
        writeln!(out, "(the search stopped at {} messages; more queues were not looked at)", cell(traces, "scanned"))?;
    }
    Ok(())
}

/// One trace event as a sentence.
fn describe_event(event: &Value) -> String {
    let field = |name: &str| cell(event, name);
    match field("event").as_str() {
        "published" => format!("published by connection '{}' as user '{}'", field("connection"), field("user")),
        "delivered" => {
            let to = match field("consumer_tag") {
                tag if tag.is_empty() => "a basic.get".to_owned(),
                tag => format!("consumer '{tag}'"),
            };
            match field("connection") {
                connection if connection.is_empty() => format!("delivered to {to}"),
                connection => format!("delivered to {to} on connection '{connection}'"),
            }
        }
        "requeued" => match field("cause").as_str() {
            "lease_expired" => "came back: its lease (consumer timeout) ran out".to_owned(),
            "channel_closed" => "came back: the channel closed before it was settled".to_owned(),
            "recover" => "came back: the consumer sent basic.recover".to_owned(),
            cause => format!("came back: the consumer sent basic.{cause} with requeue"),
        },
        "rejected" => format!("rejected by the consumer with {} (no requeue)", field("method")),
        "dead_lettered" => format!(
            "dead-lettered ({}) to exchange '{}' with routing key '{}'",
            field("reason"),
            field("exchange"),
            field("routing_key")
        ),
        "replayed" => format!(
            "replayed by '{}' to exchange '{}' with routing key '{}'",
            field("user"),
            field("exchange"),
            field("routing_key")
        ),
        "moved" => format!("moved by '{}' to queue '{}'", field("user"), field("to_queue")),
        other => other.to_owned(),
    }
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS.mmm` UTC (days to a civil date by
/// Howard Hinnant's algorithm, to spare a date crate).
fn utc(ms: u64) -> String {
    let days = (ms / 86_400_000) as i64;
    let in_day = ms % 86_400_000;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03}",
        in_day / 3_600_000,
        in_day / 60_000 % 60,
        in_day / 1000 % 60,
        in_day % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_of_a_404_are_named() {
        assert_eq!(describe("/api/queues/%2F/orders/contents"), "queue 'orders' in vhost '/'");
        assert_eq!(describe("/api/exchanges/v2/x?if-unused=false"), "exchange 'x' in vhost 'v2'");
        assert_eq!(segment("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn times_are_shown_in_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00.000");
        assert_eq!(utc(951_782_400_123), "2000-02-29 00:00:00.123");
        assert_eq!(utc(1_796_388_098_637), "2026-12-04 12:41:38.637");
    }
}
