//! Declarations with RabbitMQ's rules and errors, and routing through every exchange type. Every
//! operation goes through `support::CheckedVhost`, which checks the vhost's invariants after it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::CheckedVhost;
use wharf_model::{ConnectionId, Destination, ExchangeDeclare, QueueDeclare};
use wharf_wire::reply_code;
use wharf_wire::types::{AMQPValue, FieldTable, ShortString};

const OWNER: ConnectionId = ConnectionId(1);
const OTHER: ConnectionId = ConnectionId(2);

fn exchange<'a>(name: &'a str, kind: &'a str, arguments: &'a FieldTable) -> ExchangeDeclare<'a> {
    ExchangeDeclare {
        name,
        kind,
        passive: false,
        durable: true,
        auto_delete: false,
        internal: false,
        arguments,
        store_log: None,
        dedup_log: None,
    }
}

fn queue<'a>(name: &'a str, arguments: &'a FieldTable) -> QueueDeclare<'a> {
    QueueDeclare {
        name,
        passive: false,
        durable: true,
        exclusive: false,
        auto_delete: false,
        arguments,
        connection: OWNER,
        store_log: None,
        dedup_log: None,
        server_named: false,
    }
}

fn bind(vhost: &mut CheckedVhost, source: &str, queue: &str, key: &str) {
    vhost.bind(source, Destination::Queue(queue.into()), key, &FieldTable::default(), OWNER).unwrap();
}

#[test]
fn the_food_delivery_fan_out_routes_each_order_to_each_service_once() {
    let none = FieldTable::default();
    let mut vhost = CheckedVhost::new("/", 1);
    vhost.declare_exchange(&exchange("orders", "topic", &none)).unwrap();
    for service in ["email", "inventory", "payment"] {
        vhost.declare_queue(&queue(service, &none)).unwrap();
        bind(&mut vhost, "orders", service, "order.received");
        // A second, overlapping binding must not double-deliver.
        bind(&mut vhost, "orders", service, "order.*");
    }
    assert_eq!(vhost.route("orders", "order.received", None).unwrap(), vec!["email", "inventory", "payment"]);
    assert!(vhost.route("orders", "invoice.sent", None).unwrap().is_empty());
}

#[test]
fn every_exchange_type_routes_as_rabbitmq_does() {
    let none = FieldTable::default();
    let mut vhost = CheckedVhost::new("/", 1);
    for name in ["a", "b", "c"] {
        vhost.declare_queue(&queue(name, &none)).unwrap();
    }
    // Default exchange: by queue name.
    assert_eq!(vhost.route("", "b", None).unwrap(), vec!["b"]);
    assert!(vhost.route("", "missing", None).unwrap().is_empty());
    // Direct.
    bind(&mut vhost, "amq.direct", "a", "k1");
    bind(&mut vhost, "amq.direct", "b", "k2");
    assert_eq!(vhost.route("amq.direct", "k2", None).unwrap(), vec!["b"]);
    // Fanout ignores the key.
    bind(&mut vhost, "amq.fanout", "a", "ignored");
    bind(&mut vhost, "amq.fanout", "c", "");
    assert_eq!(vhost.route("amq.fanout", "anything", None).unwrap(), vec!["a", "c"]);
    // Topic.
    bind(&mut vhost, "amq.topic", "a", "eu.#");
    bind(&mut vhost, "amq.topic", "b", "*.orders");
    assert_eq!(vhost.route("amq.topic", "eu.orders", None).unwrap(), vec!["a", "b"]);
    assert_eq!(vhost.route("amq.topic", "us.orders", None).unwrap(), vec!["b"]);
    // Headers.
    let mut arguments = FieldTable::default();
    arguments.insert(ShortString::from("x-match"), AMQPValue::LongString("any".into()));
    arguments.insert(ShortString::from("region"), AMQPValue::LongString("eu".into()));
    vhost.bind("amq.headers", Destination::Queue("c".into()), "", &arguments, OWNER).unwrap();
    let mut headers = FieldTable::default();
    headers.insert(ShortString::from("region"), AMQPValue::LongString("eu".into()));
    assert_eq!(vhost.route("amq.headers", "", Some(&headers)).unwrap(), vec!["c"]);
    assert!(vhost.route("amq.headers", "", None).unwrap().is_empty());
}

#[test]
fn exchange_to_exchange_bindings_route_and_cycles_end() {
    let none = FieldTable::default();
    let mut vhost = CheckedVhost::new("/", 1);
    vhost.declare_exchange(&exchange("front", "fanout", &none)).unwrap();
    vhost.declare_exchange(&exchange("back", "direct", &none)).unwrap();
    vhost.declare_queue(&queue("q", &none)).unwrap();
    vhost.bind("front", Destination::Exchange("back".into()), "", &none, OWNER).unwrap();
    vhost.bind("back", Destination::Exchange("front".into()), "k", &none, OWNER).unwrap();
    bind(&mut vhost, "back", "q", "k");
    assert_eq!(vhost.route("front", "k", None).unwrap(), vec!["q"]);
    assert!(vhost.route("front", "other", None).unwrap().is_empty());
}

#[test]
fn declare_errors_carry_rabbitmq_codes() {
    let none = FieldTable::default();
    let mut vhost = CheckedVhost::new("/", 1);
    let passive = ExchangeDeclare { passive: true, ..exchange("missing", "direct", &none) };
    assert_eq!(vhost.declare_exchange(&passive).unwrap_err().code, reply_code::NOT_FOUND);
    assert_eq!(
        vhost.declare_exchange(&exchange("amq.mine", "direct", &none)).unwrap_err().code,
        reply_code::ACCESS_REFUSED
    );
    assert_eq!(vhost.declare_exchange(&exchange("", "direct", &none)).unwrap_err().code, reply_code::ACCESS_REFUSED);
    let unknown_type = vhost.declare_exchange(&exchange("x", "nonsense", &none)).unwrap_err();
    assert_eq!((unknown_type.code, unknown_type.scope), (reply_code::COMMAND_INVALID, wharf_model::Scope::Connection));
    vhost.declare_exchange(&exchange("x", "direct", &none)).unwrap();
    assert!(!vhost.declare_exchange(&exchange("x", "direct", &none)).unwrap().created, "equivalent redeclare is fine");
    let different = vhost.declare_exchange(&exchange("x", "fanout", &none)).unwrap_err();
    assert_eq!(different.code, reply_code::PRECONDITION_FAILED);
    assert!(different.text.contains("inequivalent arg 'type'"), "{}", different.text);

    vhost.declare_queue(&queue("q", &none)).unwrap();
    let transient = QueueDeclare { durable: false, ..queue("q", &none) };
    let error = vhost.declare_queue(&transient).unwrap_err();
    assert_eq!(error.code, reply_code::PRECONDITION_FAILED);
    assert!(error.text.contains("inequivalent arg 'durable'"), "{}", error.text);
    let mut limited = FieldTable::default();
    limited.insert(ShortString::from("x-max-length"), AMQPValue::LongInt(5));
    assert_eq!(vhost.declare_queue(&queue("q", &limited)).unwrap_err().code, reply_code::PRECONDITION_FAILED);
    let passive = QueueDeclare { passive: true, ..queue("nope", &none) };
    let missing = vhost.declare_queue(&passive).unwrap_err();
    assert_eq!(missing.code, reply_code::NOT_FOUND);
    assert_eq!(missing.text, "NOT_FOUND - no queue 'nope' in vhost '/'");
    assert_eq!(vhost.declare_queue(&queue("amq.q", &none)).unwrap_err().code, reply_code::ACCESS_REFUSED);
}

#[test]
fn exclusive_queues_belong_to_their_connection() {
    let none = FieldTable::default();
    let mut vhost = CheckedVhost::new("/", 1);
    let exclusive = QueueDeclare { exclusive: true, ..queue("mine", &none) };
    vhost.declare_queue(&exclusive).unwrap();
    let from_other = QueueDeclare { connection: OTHER, ..exclusive.clone() };
    assert_eq!(vhost.declare_queue(&from_other).unwrap_err().code, reply_code::RESOURCE_LOCKED);
    let passive_other = QueueDeclare { passive: true, ..from_other };
    assert_eq!(vhost.declare_queue(&passive_other).unwrap_err().code, reply_code::RESOURCE_LOCKED);
    let bind_other = vhost.bind("amq.direct", Destination::Queue("mine".into()), "k", &none, OTHER);
    assert_eq!(bind_other.unwrap_err().code, reply_code::RESOURCE_LOCKED);
}

#[test]
fn server_named_queues_are_unique() {
    let none = FieldTable::default();
    let mut vhost = CheckedVhost::new("/", 0xABCD);
    let first = vhost.declare_queue(&queue("", &none)).unwrap();
    let second = vhost.declare_queue(&queue("", &none)).unwrap();
    assert!(first.name.starts_with("amq.gen-"));
    assert_ne!(first.name, second.name);
    // A server-named queue can be redeclared by its name despite the reserved prefix.
    assert!(!vhost.declare_queue(&queue(&first.name, &none)).unwrap().created);
}

#[test]
fn publishing_to_missing_or_internal_exchanges_is_refused() {
    let none = FieldTable::default();
    let mut vhost = CheckedVhost::new("/", 1);
    assert_eq!(vhost.route("missing", "k", None).unwrap_err().code, reply_code::NOT_FOUND);
    let internal = ExchangeDeclare { internal: true, ..exchange("inner", "fanout", &none) };
    vhost.declare_exchange(&internal).unwrap();
    assert_eq!(vhost.route("inner", "k", None).unwrap_err().code, reply_code::ACCESS_REFUSED);
}

#[test]
fn deleting_exchanges_and_queues_cleans_bindings_and_auto_deletes() {
    let none = FieldTable::default();
    let mut vhost = CheckedVhost::new("/", 1);
    let auto = ExchangeDeclare { auto_delete: true, ..exchange("auto", "fanout", &none) };
    vhost.declare_exchange(&auto).unwrap();
    vhost.declare_queue(&queue("q", &none)).unwrap();
    bind(&mut vhost, "auto", "q", "");
    assert_eq!(vhost.delete_exchange("auto", true).unwrap_err().code, reply_code::PRECONDITION_FAILED);
    // Removing the queue removes its binding, and the auto-delete exchange goes with it.
    vhost.remove_queue("q");
    assert!(vhost.exchange("auto").is_none());
    assert!(vhost.delete_exchange("never-existed", false).unwrap().is_none());
    assert_eq!(vhost.delete_exchange("amq.direct", false).unwrap_err().code, reply_code::ACCESS_REFUSED);
}
