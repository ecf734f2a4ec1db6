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

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// The broker at a glance: version, node, object and message totals.
    Overview,
    /// List queues, with their messages and consumers.
    Queues,
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
                    "\n#{}  id {}  {}  {} bytes  delivered {} times  from '{}' with key '{}'",
                    cell(item, "position"),
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
    }
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
}
