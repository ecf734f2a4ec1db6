//! The DLQ workbench's browse: a queue's messages page by page, bodies read back from the store
//! when paged out, without delivering, counting or moving any of them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Harness;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsing_pages_through_a_queue_without_touching_it() {
    // Every body beyond the first byte is paged out, so most pages are read back from disk.
    let harness = Harness::start_with(|config| config.queue_body_memory_bytes_max = 1).await;
    let api = harness.guest();
    api.put("/api/queues/%2F/orders.dlq", json!({"durable": true})).await;
    for index in 0..5 {
        let properties = json!({
            "delivery_mode": 2,
            "message_id": format!("m-{index}"),
            "headers": {"x-death": [{"queue": "orders", "reason": "rejected", "count": 1}], "x-failure-reason": "card declined"},
        });
        let payload = format!("{{\"order\": {index}}}");
        let published = api
            .post(
                "/api/exchanges/%2F/amq.default/publish",
                json!({"routing_key": "orders.dlq", "payload": payload, "payload_encoding": "string", "properties": properties}),
            )
            .await;
        assert_eq!(published.body, json!({"routed": true}));
    }

    let queue = api.get("/api/queues/%2F/orders.dlq").await.body;
    assert!(queue["message_bytes_paged_out"].as_u64().unwrap() > 0, "bodies are read back from disk: {queue}");
    let first = api.get("/api/queues/%2F/orders.dlq/messages?page=1&page_size=2").await;
    assert_eq!(first.status, 200);
    let body = &first.body;
    assert_eq!(
        (body["total_count"].clone(), body["page_count"].clone(), body["item_count"].clone()),
        (json!(5), json!(3), json!(2))
    );
    let item = &body["items"][0];
    assert_eq!(item["message_id"], "m-0");
    assert_eq!(item["state"], "ready");
    assert_eq!(item["payload"], "{\"order\": 0}");
    assert_eq!(item["payload_encoding"], "string");
    assert_eq!(item["payload_bytes"], 12);
    assert_eq!(item["delivery_count"], 0);
    assert_eq!(item["properties"]["headers"]["x-failure-reason"], "card declined");
    assert_eq!(item["properties"]["headers"]["x-death"][0]["reason"], "rejected");
    assert_eq!(body["items"][1]["message_id"], "m-1");
    let last = api.get("/api/queues/%2F/orders.dlq/messages?page=3&page_size=2&encoding=base64").await.body;
    assert_eq!(last["items"].as_array().unwrap().len(), 1);
    assert_eq!(last["items"][0]["message_id"], "m-4");
    assert_eq!(
        (last["items"][0]["payload"].clone(), last["items"][0]["payload_encoding"].clone()),
        (json!("eyJvcmRlciI6IDR9"), json!("base64"))
    );
    assert_eq!(last["items"][0]["position"], 4);

    // A consumer holds the first message unacknowledged: it is listed last, as such.
    let connection = harness.amqp("dlq-reader").await;
    let channel = connection.create_channel().await.unwrap();
    channel.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut consumer = channel
        .basic_consume("orders.dlq".into(), "reader".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let delivery = futures_lite::StreamExt::next(&mut consumer).await.unwrap().unwrap();
    assert_eq!(delivery.properties.message_id().as_ref().unwrap().as_str(), "m-0");
    let all = api.get("/api/queues/%2F/orders.dlq/messages?page_size=10").await.body;
    let states: Vec<(&str, &str)> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| (item["message_id"].as_str().unwrap(), item["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        states,
        [("m-1", "ready"), ("m-2", "ready"), ("m-3", "ready"), ("m-4", "ready"), ("m-0", "unacknowledged")]
    );
    assert_eq!(all["items"][4]["delivery_count"], 1);
    connection.close(200, "done".into()).await.unwrap();

    // Browsing delivered nothing: the next get is m-0's second delivery, m-1's first.
    let got = api.post("/api/queues/%2F/orders.dlq/get", json!({"count": 2, "ackmode": "ack_requeue_true"})).await.body;
    assert_eq!(
        (got[0]["properties"]["message_id"].clone(), got[0]["redelivered"].clone()),
        (json!("m-0"), json!(true))
    );
    assert_eq!(
        (got[1]["properties"]["message_id"].clone(), got[1]["redelivered"].clone()),
        (json!("m-1"), json!(false))
    );

    assert_eq!(api.get("/api/queues/%2F/missing/messages").await.status, 404);
    assert_eq!(api.get("/api/queues/%2F/orders.dlq/messages?page_size=501").await.status, 400);
    assert_eq!(harness.api("bob", "secret").get("/api/queues/other/orders.dlq/messages").await.status, 401);
    harness.stop().await;
}
