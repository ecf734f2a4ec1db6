//! The seed corpus: real inputs for each target, made with the code that makes them in
//! production (the broker's encoders, a stock client's SASL encoder, a real store on `SimFs`).
//! `tests/seeds.rs` writes them to `fuzz/corpus/<target>/` when asked, and otherwise runs every
//! committed seed through its target's checks.

use crate::store_image::{self, DATA_DIR, META_SUBDIR};
use amq_protocol::auth::{Credentials, SASLMechanism};
use bytes::BytesMut;
use std::path::Path;
use wharf_store::{CrashMode, MetaStore, SimFs, Store};
use wharf_wire::frame;
use wharf_wire::protocol::{AMQPClass, BasicProperties, basic, channel, confirm, connection, exchange, queue, tx};
use wharf_wire::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};

/// A named seed of one target.
pub type Seed = (&'static str, Vec<u8>);

fn table(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in entries {
        table.insert(ShortString::from(key), value);
    }
    table
}

fn long(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text))
}

/// Client properties as a stock client announces them (nested `capabilities`).
fn client_properties() -> FieldTable {
    table(vec![
        ("product", long("lapin")),
        ("version", long("4.12.0")),
        ("platform", long("rust")),
        ("connection_name", long("orders-service")),
        (
            "capabilities",
            AMQPValue::FieldTable(table(vec![
                ("publisher_confirms", AMQPValue::Boolean(true)),
                ("consumer_cancel_notify", AMQPValue::Boolean(true)),
                ("basic.nack", AMQPValue::Boolean(true)),
                ("connection.blocked", AMQPValue::Boolean(true)),
                ("authentication_failure_close", AMQPValue::Boolean(true)),
            ])),
        ),
    ])
}

/// Queue arguments of the kinds Wharf reads, one of every value type among them.
fn queue_arguments() -> FieldTable {
    table(vec![
        ("x-message-ttl", AMQPValue::LongInt(60_000)),
        ("x-max-length", AMQPValue::LongLongInt(10_000)),
        ("x-dead-letter-exchange", long("dlx")),
        ("x-dead-letter-routing-key", long("dead")),
        ("x-overflow", long("reject-publish")),
        ("x-max-priority", AMQPValue::ShortShortUInt(9)),
        // Not AMQPValue::ShortString: amq-protocol writes it with the tag '_', which no parser
        // (its own included) reads back; a peer never sends one.
        ("x-queue-mode", long("lazy")),
        ("x-single-active-consumer", AMQPValue::Boolean(true)),
        ("x-expires", AMQPValue::LongUInt(3_600_000)),
        ("x-ratio", AMQPValue::Double(0.5)),
        ("x-weight", AMQPValue::Float(1.5)),
        ("x-count", AMQPValue::ShortInt(-3)),
        ("x-port", AMQPValue::ShortUInt(5672)),
        ("x-small", AMQPValue::ShortShortInt(-1)),
        ("x-since", AMQPValue::Timestamp(1_700_000_000)),
        ("x-blob", AMQPValue::ByteArray(vec![0, 1, 2, 0xFF].into())),
        ("x-none", AMQPValue::Void),
        ("x-price", AMQPValue::DecimalValue(amq_protocol::types::DecimalValue { scale: 2, value: 1999 })),
    ])
}

/// Message headers as RabbitMQ writes them after a dead-lettering: `x-death`, an array of tables
/// holding an array (three levels).
fn death_headers() -> FieldTable {
    let death = table(vec![
        ("count", AMQPValue::LongLongInt(1)),
        ("reason", long("rejected")),
        ("queue", long("orders")),
        ("time", AMQPValue::Timestamp(1_700_000_000)),
        ("exchange", long("")),
        ("routing-keys", AMQPValue::FieldArray(FieldArray::from(vec![long("orders")]))),
    ]);
    table(vec![
        ("x-death", AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)]))),
        ("x-first-death-reason", long("rejected")),
        ("trace-id", long("4bf92f3577b34da6a3ce929d0e0e4736")),
    ])
}

fn method(out: &mut BytesMut, channel: u16, method: AMQPClass) {
    // The seeds are fixed values that encode; a failure is a bug in this file.
    frame::encode_method(out, channel, &method).expect("a seed method encodes");
}

/// A `frame` seed: the control byte, then the frames.
fn stream(control: u8, frames: BytesMut) -> Vec<u8> {
    let mut out = vec![control];
    out.extend_from_slice(&frames);
    out
}

/// Seeds of the `frame` target: a client's side of a connection, in a few pieces.
pub fn frame_seeds() -> Vec<Seed> {
    let response = Credentials::new("guest".into(), "guest".into()).sasl_auth_string(SASLMechanism::Plain);
    let mut handshake = BytesMut::new();
    method(
        &mut handshake,
        0,
        AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
            client_properties: client_properties(),
            mechanism: "PLAIN".into(),
            response,
            locale: "en_US".into(),
        })),
    );
    method(
        &mut handshake,
        0,
        AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
            channel_max: 2047,
            frame_max: 131_072,
            heartbeat: 60,
        })),
    );
    method(
        &mut handshake,
        0,
        AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open { virtual_host: "/".into() })),
    );
    method(&mut handshake, 1, AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})));

    let mut topology = BytesMut::new();
    method(
        &mut topology,
        1,
        AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
            exchange: "events".into(),
            kind: "headers".into(),
            passive: false,
            durable: true,
            auto_delete: false,
            internal: false,
            nowait: false,
            arguments: table(vec![("alternate-exchange", long("unrouted"))]),
        })),
    );
    method(
        &mut topology,
        1,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "orders".into(),
            passive: false,
            durable: true,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments: queue_arguments(),
        })),
    );
    method(
        &mut topology,
        1,
        AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
            queue: "orders".into(),
            exchange: "events".into(),
            routing_key: "".into(),
            nowait: false,
            arguments: table(vec![("x-match", long("any")), ("kind", long("order"))]),
        })),
    );
    method(
        &mut topology,
        1,
        AMQPClass::Exchange(exchange::AMQPMethod::Bind(exchange::Bind {
            destination: "events".into(),
            source: "amq.topic".into(),
            routing_key: "orders.#".into(),
            nowait: true,
            arguments: FieldTable::default(),
        })),
    );
    method(
        &mut topology,
        1,
        AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos { prefetch_count: 10, global: false })),
    );
    method(
        &mut topology,
        1,
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: "orders".into(),
            consumer_tag: "ctag-1".into(),
            no_local: false,
            no_ack: false,
            exclusive: false,
            nowait: false,
            arguments: table(vec![("x-priority", AMQPValue::LongInt(5))]),
        })),
    );

    let mut publish = BytesMut::new();
    method(&mut publish, 1, AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select { nowait: false })));
    let body = br#"{"order":42,"items":["tea","cake"]}"#;
    method(
        &mut publish,
        1,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "events".into(),
            routing_key: "orders.created".into(),
            mandatory: true,
            immediate: false,
        })),
    );
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_headers(death_headers())
        .with_delivery_mode(2)
        .with_priority(3)
        .with_correlation_id("c-1".into())
        .with_reply_to("amq.rabbitmq.reply-to".into())
        .with_expiration("60000".into())
        .with_message_id("m-1".into())
        .with_timestamp(1_700_000_000)
        .with_type("order.created".into())
        .with_user_id("guest".into())
        .with_app_id("shop".into());
    frame::encode_content_header(&mut publish, 1, body.len() as u64, &frame::encode_properties(&properties));
    // Split over two body frames, as a client with a small frame_max sends it.
    frame::encode_body(&mut publish, 1, &body[..20], 131_072);
    frame::encode_body(&mut publish, 1, &body[20..], 131_072);
    method(&mut publish, 1, AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack { delivery_tag: 1, multiple: true })));
    frame::encode_heartbeat(&mut publish);

    let mut closing = BytesMut::new();
    method(&mut closing, 2, AMQPClass::Tx(tx::AMQPMethod::Select(tx::Select {})));
    method(
        &mut closing,
        0,
        AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: 200,
            reply_text: "bye".into(),
            class_id: 0,
            method_id: 0,
        })),
    );

    vec![
        ("handshake", stream(0x00, handshake)),
        ("topology", stream(0x03, topology)),
        ("publish", stream(0x05, publish)),
        ("close", stream(0x81, closing)),
    ]
}

/// Seeds of the `field_table` target: whole tables in their stored form.
pub fn field_table_seeds() -> Vec<Seed> {
    let encode = |table: &FieldTable| frame::encode_field_table(table).expect("a seed table encodes");
    vec![
        ("queue-arguments", encode(&queue_arguments())),
        ("client-properties", encode(&client_properties())),
        ("death-headers", encode(&death_headers())),
        ("empty", encode(&FieldTable::default())),
    ]
}

/// Seeds of the `sasl` target: a selector byte (0 PLAIN, 1 AMQPLAIN), then the response a stock
/// client sends.
pub fn sasl_seeds() -> Vec<Seed> {
    let credentials = Credentials::new("orders".into(), "s3cret-pässword".into());
    let with = |selector: u8, mechanism| {
        let mut out = vec![selector];
        out.extend_from_slice(credentials.sasl_auth_string(mechanism).as_bytes());
        out
    };
    vec![("plain", with(0, SASLMechanism::Plain)), ("amqplain", with(1, SASLMechanism::AMQPlain))]
}

/// Seeds of the `store_recovery` target: small real data directories.
/// - `clean`: two queues (one message removed, one delivered twice), definitions, a clean close.
/// - `crashed`: the same work, then a process kill before the close (no clean-stop marker, the
///   last removal possibly not synced).
/// - `resealed`: `clean` with the reseal flag on every file, so mutations keep their checksums.
pub fn store_seeds() -> Vec<Seed> {
    let clean = real_store(false);
    let crashed = real_store(true);
    let mut resealed = clean.clone();
    for entry in &mut resealed {
        entry.reseal = true;
    }
    let encode = |entries: &[store_image::Entry]| store_image::encode(entries).expect("a seed image fits the format");
    vec![("clean", encode(&clean)), ("crashed", encode(&crashed)), ("resealed", encode(&resealed))]
}

fn real_store(crash: bool) -> Vec<store_image::Entry> {
    let sim = SimFs::new(1);
    let root = Path::new(DATA_DIR);
    let (meta, _) = MetaStore::open(sim.shared(), root.join(META_SUBDIR)).expect("a new definitions log opens");
    meta.put(b"vhost//", b"{}").expect("a definition is kept");
    meta.put(b"queue///orders", b"{\"durable\":true,\"arguments\":{}}").expect("a definition is kept");
    meta.put(b"queue///audit", b"{\"durable\":true}").expect("a definition is kept");
    meta.delete(b"queue///audit").expect("a definition is deleted");
    drop(meta);
    let (store, _) = Store::open(sim.shared(), root, store_image::config()).expect("a new store opens");
    let orders = store.create_log().and_then(|ticket| ticket.wait()).expect("a log is created");
    let audit = store.create_log().and_then(|ticket| ticket.wait()).expect("a log is created");
    let mut seqs = Vec::new();
    for (log, meta, body) in [
        (orders, &b"\x00\x06events\x0eorders.created"[..], &b"{\"order\":41}"[..]),
        (orders, b"\x00\x06events\x0eorders.created", b"{\"order\":42}"),
        (orders, b"\x00\x06events\x0eorders.created", b""),
        (audit, b"\x00\x00\x05audit", b"order 41 created"),
    ] {
        let receipt = store.append(log, 1_700_000_000_000, meta, body).and_then(|pending| pending.wait());
        seqs.push(receipt.expect("an append is durable").seq);
    }
    store.set_delivery_count(orders, seqs[1], 2).and_then(|ticket| ticket.wait()).expect("a delivery count is kept");
    store.remove(orders, seqs[0]).and_then(|ticket| ticket.wait()).expect("a removal is kept");
    if crash {
        store.remove_unawaited(audit, seqs[3]).expect("a removal is queued");
        sim.crash(CrashMode::KeepUnsynced);
        drop(store);
        return store_image::read_image(&sim.remount(), root);
    }
    store.close().expect("the store closes");
    store_image::read_image(&sim, root)
}
