//! Retry backoff (`x-retry-backoff`): a message requeued by `nack`/`reject` comes back only after
//! the step for that attempt (the last step repeating), while other messages keep flowing; a
//! waiting message is durable and, after a crash, waits its step again before it is redelivered.
//! Time checks here are lower bounds ("not before its time"), which no slow machine can break.

use crate::common;

use common::*;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldArray};
use std::time::{Duration, Instant};
use wharf_store::CrashMode;

fn backoff(steps: &[i32]) -> lapin::types::FieldTable {
    let steps: Vec<AMQPValue> = steps.iter().map(|ms| AMQPValue::LongInt(*ms)).collect();
    arguments(&[("x-retry-backoff", AMQPValue::FieldArray(FieldArray::from(steps)))])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_requeue_waits_its_step_and_other_messages_keep_flowing() {
    let broker = TestBroker::start().await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    durable_queue(&channel, "work", backoff(&[200, 400])).await;
    assert!(publish_confirmed(&channel, "", "work", b"flaky", BasicProperties::default()).await);
    let mut work = consumer(&channel, "work").await;
    let mut delivery = next(&mut work).await;
    for (attempt, step_ms) in [(1, 200), (2, 400), (3, 400)] {
        let nacked_at = Instant::now();
        delivery.nack(BasicNackOptions { multiple: false, requeue: true }).await.unwrap();
        if attempt == 1 {
            // While "flaky" waits, a new message goes out at once.
            assert!(publish_confirmed(&channel, "", "work", b"other", BasicProperties::default()).await);
            let other = next(&mut work).await;
            assert_eq!(other.data, b"other");
            other.ack(BasicAckOptions::default()).await.unwrap();
        }
        delivery = next(&mut work).await;
        assert_eq!(delivery.data, b"flaky");
        assert!(delivery.redelivered);
        assert!(
            nacked_at.elapsed() >= Duration::from_millis(step_ms),
            "attempt {attempt}: redelivered after {:?}, before its {step_ms} ms step",
            nacked_at.elapsed()
        );
    }
    delivery.ack(BasicAckOptions::default()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_that_closes_requeues_at_once_without_backoff() {
    let broker = TestBroker::start().await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    durable_queue(&channel, "work", backoff(&[60_000])).await;
    assert!(publish_confirmed(&channel, "", "work", b"job", BasicProperties::default()).await);
    let holder = connection.create_channel().await.unwrap();
    let mut held = consumer(&holder, "work").await;
    let _delivery = next(&mut held).await;
    holder.close(200, "bye".into()).await.unwrap();
    // Backoff is for a consumer saying "not now"; a consumer that went away is not that.
    let mut work = consumer(&channel, "work").await;
    assert!(next(&mut work).await.redelivered);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_message_survives_a_crash_and_waits_its_step_again() {
    let mut broker = CrashableBroker::start(41, |_| {}).await;
    let restarted_at;
    {
        let connection = broker.connect().await;
        let channel = confirm_channel(&connection).await;
        durable_queue(&channel, "work", backoff(&[700])).await;
        assert!(publish_confirmed(&channel, "", "work", b"retry me", BasicProperties::default()).await);
        let mut work = consumer(&channel, "work").await;
        next(&mut work).await.nack(BasicNackOptions { multiple: false, requeue: true }).await.unwrap();
        // The second delivery's count is written before it goes out (a first delivery's is
        // written lazily, see the design note), so the crash below cannot lose it.
        let again = next(&mut work).await;
        again.nack(BasicNackOptions { multiple: false, requeue: true }).await.unwrap();
        // A round trip so the nack is processed before the crash. The broker is killed
        // (`kill -9`): what it wrote survives. (After a power loss within the ack log's lazy
        // sync interval the delivery count can be lost: the message is then redelivered
        // without waiting — never lost. See docs/durability.md.)
        channel.basic_qos(1, BasicQosOptions::default()).await.unwrap();
        // Measured from before the crash: the new broker starts the wait during recovery.
        restarted_at = Instant::now();
        broker.crash(CrashMode::KeepUnsynced).await;
    }
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    let mut work = consumer(&channel, "work").await;
    let delivery = next(&mut work).await;
    assert_eq!(delivery.data, b"retry me");
    assert!(delivery.redelivered);
    assert!(
        restarted_at.elapsed() >= Duration::from_millis(700),
        "redelivered {:?} after the restart",
        restarted_at.elapsed()
    );
    delivery.ack(BasicAckOptions::default()).await.unwrap();
    broker.stop().await;
}
