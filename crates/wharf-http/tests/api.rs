//! The management API against a real broker on 127.0.0.1:0, through a real HTTP client: every
//! answer is checked for the fields and status codes RabbitMQ's management API gives (the
//! captures of RabbitMQ 3.10.8 these follow are described in `docs/design/`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Harness, names};
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_follow_rabbitmqs_tag_rules() {
    let harness = Harness::start().await;
    let whoami = harness.guest().get("/api/whoami").await;
    assert_eq!((whoami.status, &whoami.body), (200, &json!({"name": "guest", "tags": ["administrator"]})));

    let wrong = harness.api("guest", "nope").get("/api/overview").await;
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.body, json!({"error": "not_authorized", "reason": "Login failed"}));
    assert_eq!(wrong.www_authenticate.as_deref(), Some("Basic realm=\"RabbitMQ Management\""));

    let untagged = harness.api("plain", "secret").get("/api/overview").await;
    assert_eq!((untagged.status, untagged.body["reason"].as_str()), (401, Some("Not management user")));

    let bob = harness.api("bob", "secret");
    let users = bob.get("/api/users").await;
    assert_eq!(users.status, 401);
    assert_eq!(users.body, json!({"error": "not_authorised", "reason": "Not administrator user"}));
    assert_eq!(users.www_authenticate, None, "a refusal by tag asks for no new credentials");
    assert_eq!(bob.get("/api/nodes").await.status, 401, "nodes are for monitors");
    let vhosts = bob.get("/api/vhosts").await;
    assert_eq!(names(&vhosts.body), ["/"], "a management user sees the vhosts it has permissions on");
    assert_eq!(bob.get("/api/queues/other").await.body["reason"], "User not authorised to access virtual host");

    let watcher = harness.api("watcher", "secret");
    assert_eq!(names(&watcher.get("/api/vhosts").await.body), ["/", "other"], "a monitor sees every vhost");
    assert_eq!(watcher.get("/api/nodes").await.status, 200);
    assert_eq!(watcher.get("/api/definitions").await.status, 401, "definitions are the administrator's");
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_are_declared_listed_paged_and_deleted() {
    let harness = Harness::start().await;
    let api = harness.guest();
    // rabbitmqadmin sends booleans as strings.
    let created = api
        .put(
            "/api/queues/%2F/orders",
            json!({"durable": "true", "auto_delete": "false", "arguments": {"x-max-priority": 5}}),
        )
        .await;
    assert_eq!(created.status, 201);
    assert_eq!(
        api.put("/api/queues/%2F/orders", json!({"durable": true, "arguments": {"x-max-priority": 5}})).await.status,
        204
    );
    let inequivalent =
        api.put("/api/queues/%2F/orders", json!({"durable": false, "arguments": {"x-max-priority": 5}})).await;
    assert_eq!(inequivalent.status, 400);
    assert_eq!(inequivalent.body["error"], "bad_request");
    assert!(
        inequivalent.body["reason"]
            .as_str()
            .unwrap()
            .starts_with("inequivalent arg 'durable' for queue 'orders' in vhost '/'"),
        "{}",
        inequivalent.body
    );
    let not_json = api.call("PUT", "/api/queues/%2F/x", Some(json!("not an object"))).await;
    assert_eq!(not_json.status, 201, "a JSON value that is not an object declares with defaults");
    for name in ["alpha", "beta", "gamma", "orders.dlq"] {
        assert_eq!(api.put(&format!("/api/queues/%2F/{name}"), json!({})).await.status, 201);
    }

    let queue = api.get("/api/queues/%2F/orders").await;
    assert_eq!(queue.status, 200);
    assert_eq!(queue.body["durable"], true);
    assert_eq!(queue.body["arguments"], json!({"x-max-priority": 5}));
    assert_eq!(queue.body["messages"], 0);
    assert_eq!(queue.body["vhost"], "/");
    assert_eq!(
        api.get("/api/queues/%2F/missing").await.body,
        json!({"error": "Object Not Found", "reason": "Not Found"})
    );

    let page = api.get("/api/queues?page=2&page_size=2&sort=name&sort_reverse=true").await.body;
    // x, orders.dlq | orders, gamma | beta, alpha
    assert_eq!(names(&page["items"]), ["orders", "gamma"]);
    assert_eq!(
        (page["page"].clone(), page["page_count"].clone(), page["total_count"].clone()),
        (json!(2), json!(3), json!(6))
    );
    let filtered = api.get("/api/queues?page=1&name=ORDERS").await.body;
    assert_eq!(names(&filtered["items"]), ["orders", "orders.dlq"]);
    let regex = api.get("/api/queues?page=1&name=%5Ea.*a%24&use_regex=true").await.body;
    assert_eq!(names(&regex["items"]), ["alpha"]);
    let columns = api.get("/api/queues?columns=name,arguments.x-max-priority").await.body;
    assert_eq!(columns[0], json!({"name": "alpha"}));
    assert!(columns.as_array().unwrap().contains(&json!({"name": "orders", "arguments": {"x-max-priority": 5}})));
    let out_of_range = api.get("/api/queues?page=9&page_size=2").await;
    assert_eq!((out_of_range.status, out_of_range.body["error"].as_str()), (400, Some("page_out_of_range")));
    assert_eq!(api.get("/api/queues?page=1&page_size=501").await.body["error"], "invalid_pagination_parameters");

    assert_eq!(api.delete("/api/queues/%2F/alpha").await.status, 204);
    assert_eq!(api.get("/api/queues/%2F/alpha").await.status, 404);
    assert_eq!(api.delete("/api/queues/%2F/alpha").await.status, 404);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_get_purge_and_bindings_work_like_rabbitmqs() {
    let harness = Harness::start().await;
    let api = harness.guest();
    assert_eq!(api.put("/api/exchanges/%2F/events", json!({"type": "topic", "durable": "true"})).await.status, 201);
    assert_eq!(api.put("/api/queues/%2F/audit", json!({"durable": true})).await.status, 201);
    let bound =
        api.post("/api/bindings/%2F/e/events/q/audit", json!({"routing_key": "order.*", "arguments": {}})).await;
    assert_eq!(bound.status, 201);
    assert_eq!(bound.location.as_deref(), Some("audit/order.*"), "RabbitMQ's relative location");
    let bindings = api.get("/api/queues/%2F/audit/bindings").await.body;
    let keys: Vec<&str> =
        bindings.as_array().unwrap().iter().map(|binding| binding["source"].as_str().unwrap()).collect();
    assert_eq!(keys, ["", "events"], "the default exchange's implicit binding comes first");
    assert_eq!(bindings[1]["properties_key"], "order.*");

    let published = api
        .post(
            "/api/exchanges/%2F/events/publish",
            json!({"routing_key": "order.created", "payload": "{\"id\":1}", "payload_encoding": "string",
                   "properties": {"delivery_mode": 2, "message_id": "m-1", "headers": {"tenant": "acme"}}}),
        )
        .await;
    assert_eq!((published.status, &published.body), (200, &json!({"routed": true})));
    let unrouted = api
        .post(
            "/api/exchanges/%2F/events/publish",
            json!({"routing_key": "other", "payload": "x", "payload_encoding": "string", "properties": {}}),
        )
        .await;
    assert_eq!(unrouted.body, json!({"routed": false}));
    let binary = api
        .post(
            "/api/exchanges/%2F/amq.default/publish",
            json!({"routing_key": "audit", "payload": "AP8=", "payload_encoding": "base64", "properties": {}}),
        )
        .await;
    assert_eq!(binary.body, json!({"routed": true}));
    let missing = api
        .post(
            "/api/exchanges/%2F/nowhere/publish",
            json!({"routing_key": "a", "payload": "x", "payload_encoding": "string", "properties": {}}),
        )
        .await;
    assert_eq!(missing.status, 404);

    // Peek with requeue (count as a string, as rabbitmqadmin sends it).
    let peeked = api
        .post("/api/queues/%2F/audit/get", json!({"count": "5", "ackmode": "ack_requeue_true", "encoding": "auto"}))
        .await
        .body;
    assert_eq!(peeked.as_array().unwrap().len(), 2);
    assert_eq!(peeked[0]["payload"], "{\"id\":1}");
    assert_eq!(peeked[0]["payload_encoding"], "string");
    assert_eq!(peeked[0]["exchange"], "events");
    assert_eq!(peeked[0]["routing_key"], "order.created");
    assert_eq!(
        peeked[0]["properties"],
        json!({"delivery_mode": 2, "message_id": "m-1", "headers": {"tenant": "acme"}})
    );
    assert_eq!(peeked[0]["message_count"], 1);
    assert_eq!(peeked[1]["payload"], "AP8=", "bytes that are not UTF-8 come back as base64");
    assert_eq!(peeked[1]["payload_encoding"], "base64");
    let again = api
        .post(
            "/api/queues/%2F/audit/get",
            json!({"count": 1, "ackmode": "ack_requeue_true", "encoding": "auto", "truncate": 3}),
        )
        .await
        .body;
    assert_eq!(again[0]["redelivered"], true, "a requeued message is marked redelivered");
    assert_eq!((again[0]["payload"].clone(), again[0]["payload_bytes"].clone()), (json!("{\"i"), json!(8)));
    let bad_mode = api.post("/api/queues/%2F/audit/get", json!({"count": 1, "ackmode": "keep"})).await;
    assert_eq!(bad_mode.status, 400);

    let taken = api
        .post("/api/queues/%2F/audit/get", json!({"count": 1, "ackmode": "ack_requeue_false", "encoding": "auto"}))
        .await
        .body;
    assert_eq!(taken.as_array().unwrap().len(), 1);
    assert_eq!(api.get("/api/queues/%2F/audit").await.body["messages"], 1, "an acked get removes the message");
    assert_eq!(api.delete("/api/queues/%2F/audit/contents").await.status, 204);
    assert_eq!(api.get("/api/queues/%2F/audit").await.body["messages"], 0);

    assert_eq!(api.delete("/api/bindings/%2F/e/events/q/audit/order.*").await.status, 204);
    assert_eq!(api.get("/api/queues/%2F/audit/bindings").await.body.as_array().unwrap().len(), 1);
    assert_eq!(api.delete("/api/bindings/%2F/e/events/q/audit/order.*").await.status, 404);
    let if_empty = api.put("/api/queues/%2F/busy", json!({})).await;
    assert_eq!(if_empty.status, 201);
    api.post(
        "/api/exchanges/%2F/amq.default/publish",
        json!({"routing_key": "busy", "payload": "x", "payload_encoding": "string", "properties": {}}),
    )
    .await;
    let refused = api.delete("/api/queues/%2F/busy?if-empty=true").await;
    assert_eq!((refused.status, refused.body["reason"].as_str()), (400, Some("queue 'busy' in vhost '/' not empty")));
    assert_eq!(api.delete("/api/exchanges/%2F/amq.direct").await.status, 401, "reserved exchanges cannot be deleted");
    assert_eq!(api.delete("/api/exchanges/%2F/events").await.status, 204);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_channels_and_consumers_are_listed_and_a_connection_can_be_closed() {
    let harness = Harness::start().await;
    let api = harness.guest();
    let connection = harness.amqp("billing-service").await;
    let channel = connection.create_channel().await.unwrap();
    channel.queue_declare("invoices".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    let _consumer = channel
        .basic_consume("invoices".into(), "invoicer".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();

    let connections = api.get("/api/connections").await.body;
    assert_eq!(connections.as_array().unwrap().len(), 1);
    let listed = &connections[0];
    assert_eq!(listed["user_provided_name"], "billing-service");
    assert_eq!(listed["user"], "guest");
    assert_eq!(listed["vhost"], "/");
    assert_eq!(listed["channels"], 1);
    assert_eq!(listed["protocol"], "AMQP 0-9-1");
    assert_eq!(listed["client_properties"]["connection_name"], "billing-service");
    let name = listed["name"].as_str().unwrap().to_owned();
    assert!(name.contains(" -> 127.0.0.1:"), "{name}");

    let channels = api.get("/api/channels").await.body;
    assert_eq!(channels[0]["name"], format!("{name} (1)"));
    assert_eq!(channels[0]["consumer_count"], 1);
    let consumers = api.get("/api/consumers/%2F").await.body;
    assert_eq!(consumers[0]["consumer_tag"], "invoicer");
    assert_eq!(consumers[0]["queue"], json!({"name": "invoices", "vhost": "/"}));
    assert_eq!(consumers[0]["channel_details"]["connection_name"], name);
    assert_eq!(api.get("/api/queues/%2F/invoices").await.body["consumers"], 1);
    let bob = harness.api("bob", "secret");
    assert_eq!(bob.get("/api/connections").await.body, json!([]), "a management user sees only its own connections");

    let encoded: String = name
        .bytes()
        .map(|byte| if byte.is_ascii_alphanumeric() { (byte as char).to_string() } else { format!("%{byte:02X}") })
        .collect();
    assert_eq!(api.get(&format!("/api/connections/{encoded}/channels")).await.body.as_array().unwrap().len(), 1);
    let mut events = Box::pin(connection.events_listener());
    assert_eq!(api.delete(&format!("/api/connections/{encoded}")).await.status, 204);
    // The client hears 320 CONNECTION_FORCED with the management plugin's reason.
    let error = loop {
        match futures_lite::StreamExt::next(&mut events).await {
            Some(lapin::Event::Error(error)) => break error,
            Some(_) => continue,
            None => panic!("the connection's events ended without an error"),
        }
    };
    let text = error.to_string();
    assert!(text.contains("CONNECTION_FORCED - Closed via management plugin"), "{text}");
    assert!(!connection.status().connected(), "the connection is closed");
    assert_eq!(api.delete("/api/connections/no%20such%20connection").await.status, 404);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overview_nodes_and_health_checks() {
    let harness = Harness::start().await;
    let api = harness.guest();
    api.put("/api/queues/%2F/q", json!({})).await;
    let overview = api.get("/api/overview").await.body;
    assert_eq!(overview["object_totals"]["queues"], 1);
    assert_eq!(overview["object_totals"]["connections"], 0);
    assert!(
        overview["object_totals"]["exchanges"].as_u64().unwrap() >= 7,
        "the default and amq.* exchanges of two vhosts"
    );
    assert_eq!(overview["queue_totals"]["messages"], 0);
    assert_eq!(overview["message_stats"]["publish"], 0);
    assert!(overview["message_stats"]["publish_details"]["rate"].is_number());
    let history = api.get("/api/overview?msg_rates_age=60&msg_rates_incr=5&lengths_age=60&lengths_incr=5").await.body;
    assert!(!history["message_stats"]["ack_details"]["samples"].as_array().unwrap().is_empty());
    assert!(!history["queue_totals"]["messages_details"]["samples"].as_array().unwrap().is_empty());
    let bob = harness.api("bob", "secret").get("/api/overview").await.body;
    assert_eq!(bob["message_stats"], serde_json::json!({}), "rates are the monitors'");
    let columns = api.get("/api/overview?columns=rabbitmq_version,object_totals.queues").await.body;
    assert_eq!(columns.as_object().unwrap().len(), 2, "{columns}");
    let node = overview["node"].as_str().unwrap().to_owned();
    assert!(node.starts_with("wharf@"));
    assert_eq!(names(&api.get("/api/nodes").await.body), std::slice::from_ref(&node));
    assert_eq!(api.get(&format!("/api/nodes/{node}")).await.body["running"], true);
    assert_eq!(api.get("/api/nodes/nobody@nowhere").await.status, 404);
    assert_eq!(api.get("/api/aliveness-test/%2F").await.body, json!({"status": "ok"}));
    assert_eq!(api.get("/api/health/checks/alarms").await.body, json!({"status": "ok"}));
    let amqp_port = harness.broker.as_ref().unwrap().local_addr().port();
    assert_eq!(api.get(&format!("/api/health/checks/port-listener/{amqp_port}")).await.status, 200);
    let missing = api.get("/api/health/checks/port-listener/1").await;
    assert_eq!((missing.status, missing.body["status"].as_str()), (503, Some("failed")));
    assert_eq!(api.get("/api/health/checks/protocol-listener/amqp").await.status, 200);
    assert_eq!(api.get("/api/no-such-endpoint").await.status, 404);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_export_and_import_round_trip() {
    let harness = Harness::start().await;
    let api = harness.guest();
    api.put("/api/exchanges/%2F/orders", json!({"type": "direct", "durable": true})).await;
    api.put("/api/queues/%2F/orders.email", json!({"durable": true, "arguments": {"x-delivery-limit": 3}})).await;
    api.put("/api/queues/%2F/transient", json!({"durable": false})).await;
    api.post("/api/bindings/%2F/e/orders/q/orders.email", json!({"routing_key": "created"})).await;
    let exported = api.get("/api/definitions").await.body;
    assert_eq!(names(&exported["queues"]), ["orders.email"], "only durable queues are definitions");
    assert_eq!(names(&exported["exchanges"]), ["orders"], "amq.* and the default exchange are not exported");
    assert_eq!(exported["bindings"][0]["routing_key"], "created");
    assert!(names(&exported["users"]).contains(&"guest".to_owned()));
    assert!(exported["users"][0]["password_hash"].as_str().is_some());
    let vhost_only = api.get("/api/definitions/%2F").await.body;
    assert_eq!(vhost_only["queues"][0].get("vhost"), None, "a vhost's definitions carry no vhost fields");

    // Into a fresh broker: the same file declares the same topology, and importing it twice
    // changes nothing.
    let fresh = Harness::start().await;
    let fresh_api = fresh.guest();
    assert_eq!(fresh_api.post("/api/definitions", exported.clone()).await.status, 204);
    assert_eq!(fresh_api.post("/api/definitions", exported.clone()).await.status, 204);
    assert_eq!(fresh_api.get("/api/queues/%2F/orders.email").await.body["arguments"], json!({"x-delivery-limit": 3}));
    assert_eq!(fresh_api.get("/api/exchanges/%2F/orders").await.body["type"], "direct");
    assert_eq!(fresh_api.get("/api/bindings/%2F/e/orders/q/orders.email").await.body[0]["routing_key"], "created");
    // Per vhost.
    assert_eq!(fresh_api.post("/api/definitions/other", vhost_only).await.status, 204);
    assert_eq!(fresh_api.get("/api/queues/other/orders.email").await.status, 200);

    // A file's users and permissions are set, durably, with their hashes: guest's hash under
    // another name logs in with guest's password.
    let mut with_user = exported.clone();
    let mut auditor =
        with_user["users"].as_array().unwrap().iter().find(|user| user["name"] == "guest").unwrap().clone();
    auditor["name"] = json!("auditor");
    auditor["tags"] = json!(["monitoring"]);
    with_user["users"].as_array_mut().unwrap().push(auditor);
    with_user["permissions"]
        .as_array_mut()
        .unwrap()
        .push(json!({"user": "auditor", "vhost": "/", "configure": "", "write": "", "read": ".*"}));
    assert_eq!(fresh_api.post("/api/definitions", with_user).await.status, 204);
    let whoami = fresh.api("auditor", "guest").get("/api/whoami").await;
    assert_eq!(whoami.body, json!({"name": "auditor", "tags": ["monitoring"]}));
    assert_eq!(fresh_api.get("/api/permissions/%2F/auditor").await.body["read"], ".*");

    // A file granting permissions on a vhost that neither exists nor is in the file is refused
    // whole.
    let mut changed = exported.clone();
    changed["permissions"]
        .as_array_mut()
        .unwrap()
        .push(json!({"user": "guest", "vhost": "nowhere", "configure": ".*", "write": ".*", "read": ".*"}));
    changed["queues"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "sneaky", "vhost": "/", "durable": true, "auto_delete": false, "arguments": {}}));
    let refused = fresh_api.post("/api/definitions", changed).await;
    assert_eq!(refused.status, 400);
    assert!(refused.body["reason"].as_str().unwrap().contains("nowhere"), "{}", refused.body);
    assert_eq!(fresh_api.get("/api/queues/%2F/sneaky").await.status, 404, "nothing of a refused file is declared");
    // A vhost the file names is created.
    let mut with_vhost = exported.clone();
    with_vhost["vhosts"].as_array_mut().unwrap().push(json!({"name": "nowhere"}));
    assert_eq!(fresh_api.post("/api/definitions", with_vhost).await.status, 204);
    assert_eq!(fresh_api.get("/api/vhosts/nowhere").await.status, 200);
    let not_json = fresh_api.call("POST", "/api/definitions", Some(json!([1, 2]))).await;
    assert_eq!(not_json.status, 400);
    fresh.stop().await;
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_and_permissions_are_changed_durably_and_removals_close_connections() {
    let mut harness = Harness::start().await;
    let api = harness.guest();
    assert_eq!(api.put("/api/users/carol", json!({"password": "pw", "tags": "management"})).await.status, 201);
    assert_eq!(
        api.put("/api/users/carol", json!({"tags": ["monitoring"]})).await.status,
        204,
        "tags only: the password stays"
    );
    assert_eq!(api.get("/api/users/carol").await.body["tags"], json!(["monitoring"]));
    assert_eq!(harness.api("carol", "pw").get("/api/whoami").await.status, 200);
    let refused =
        lapin::Connection::connect(&harness.amqp_url("carol", "pw"), lapin::ConnectionProperties::default()).await;
    assert!(refused.is_err(), "no permissions on / yet");

    let full = json!({"configure": ".*", "write": ".*", "read": ".*"});
    assert_eq!(api.put("/api/permissions/%2F/carol", full.clone()).await.status, 201);
    assert_eq!(api.put("/api/permissions/%2F/carol", full).await.status, 204);
    let bad = api.put("/api/permissions/%2F/carol", json!({"configure": "(", "write": "", "read": ""})).await;
    assert_eq!(bad.status, 400);
    assert!(bad.body["reason"].as_str().unwrap().contains("not a valid regular expression"), "{}", bad.body);
    assert_eq!(
        api.put("/api/permissions/nowhere/carol", json!({"configure": "", "write": "", "read": ""})).await.status,
        404
    );
    assert_eq!(
        api.put("/api/permissions/%2F/nobody", json!({"configure": "", "write": "", "read": ""})).await.status,
        400
    );
    let topic = json!({"exchange": "amq.topic", "write": "^carol\\.", "read": ".*"});
    assert_eq!(api.put("/api/topic-permissions/%2F/carol", topic).await.status, 201);
    assert_eq!(api.get("/api/topic-permissions/%2F/carol").await.body[0]["write"], "^carol\\.");
    assert_eq!(api.put("/api/users/dave", json!({"tags": ""})).await.status, 400, "a new user needs a password");
    // Over the API as over AMQP: topic permissions and the validated user id hold.
    let carol = harness.api("carol", "pw");
    let publish = |key: &str, properties: serde_json::Value| json!({"routing_key": key, "payload": "x", "payload_encoding": "string", "properties": properties});
    assert_eq!(
        carol.post("/api/exchanges/%2F/amq.topic/publish", publish("carol.orders", json!({}))).await.status,
        200
    );
    let refused = carol.post("/api/exchanges/%2F/amq.topic/publish", publish("bob.orders", json!({}))).await;
    assert_eq!(refused.status, 401, "{}", refused.body);
    let impersonating =
        carol.post("/api/exchanges/%2F/amq.default/publish", publish("q", json!({"user_id": "guest"}))).await;
    assert_eq!(impersonating.status, 400);
    assert!(impersonating.body["reason"].as_str().unwrap().contains("user_id property set to 'guest'"));
    // Users and permissions the configuration defines are changed there, not here.
    let configured = api.put("/api/users/bob", json!({"password": "x"})).await;
    assert_eq!(configured.status, 400);
    assert!(configured.body["reason"].as_str().unwrap().contains("defined by the broker's configuration"));
    assert_eq!(api.delete("/api/users/guest").await.status, 400);
    assert_eq!(api.delete("/api/permissions/%2F/bob").await.status, 400);
    assert_eq!(harness.api("bob", "secret").put("/api/users/eve", json!({"password": "x"})).await.status, 401);

    // Durable: after a restart carol logs in, over AMQP too, with her permissions.
    harness.restart().await;
    let api = harness.guest();
    assert_eq!(api.get("/api/users/carol").await.body["tags"], json!(["monitoring"]));
    assert_eq!(api.get("/api/topic-permissions/%2F/carol").await.status, 200);
    let connection =
        lapin::Connection::connect(&harness.amqp_url("carol", "pw"), lapin::ConnectionProperties::default())
            .await
            .unwrap();
    let mut events = Box::pin(connection.events_listener());

    // Removing her permissions on / closes her connection to it.
    assert_eq!(api.delete("/api/permissions/%2F/carol").await.status, 204);
    let error = loop {
        match futures_lite::StreamExt::next(&mut events).await {
            Some(lapin::Event::Error(error)) => break error,
            Some(_) => continue,
            None => panic!("the connection's events ended without an error"),
        }
    };
    assert!(error.to_string().contains("CONNECTION_FORCED"), "{error}");
    assert_eq!(api.get("/api/topic-permissions/%2F/carol").await.status, 404, "topic permissions went with them");
    assert_eq!(api.delete("/api/permissions/%2F/carol").await.status, 404);

    assert_eq!(api.delete("/api/users/carol").await.status, 204);
    assert_eq!(harness.api("carol", "pw").get("/api/whoami").await.status, 401);
    harness.restart().await;
    assert_eq!(harness.guest().get("/api/users/carol").await.status, 404, "the deletion is durable");
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_served_from_the_binary_without_credentials() {
    let harness = Harness::start().await;
    let api = harness.guest();
    let (status, content_type, page) = api.get_text("/").await;
    assert_eq!((status, content_type.as_str()), (200, "text/html; charset=utf-8"));
    assert!(page.contains("<script src=\"/console/console.js\">"), "{page}");
    assert!(!page.contains("http://") && !page.contains("https://"), "the page loads nothing from elsewhere");
    let (status, content_type, script) = api.get_text("/console/console.js").await;
    assert_eq!((status, content_type.as_str()), (200, "text/javascript; charset=utf-8"));
    assert!(script.contains("/api/whoami"));
    let (status, content_type, _) = api.get_text("/console/console.css").await;
    assert_eq!((status, content_type.as_str()), (200, "text/css; charset=utf-8"));
    assert_eq!(api.get_text("/console/missing.js").await.0, 404);
    harness.stop().await;
}
