//! Retry backoff (`x-retry-backoff`): a message requeued by `nack`/`reject` comes back only after
//! the step for that attempt (the last step repeating), while other messages keep flowing; a
//! waiting message is durable and, after a crash, waits its step again before it is redelivered.
//! Time is the test's [`ManualClock`]: each step is shown unfinished one millisecond before its end
//! (the message still waiting, nothing delivered) and finished at its end.

use crate::common;

use common::*;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldArray};
use std::sync::Arc;
use wharf_broker::ManualClock;
use wharf_store::CrashMode;

fn backoff(steps: &[u64]) -> lapin::types::FieldTable {
    let steps: Vec<AMQPValue> = steps.iter().map(|ms| AMQPValue::LongInt(*ms as i32)).collect();
    arguments(&[("x-retry-backoff", AMQPValue::FieldArray(FieldArray::from(steps)))])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_requeue_waits_its_step_and_other_messages_keep_flowing() {
    let clock = Arc::new(ManualClock::starting_now());
    let broker = TestBroker::start_on(&clock).await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    durable_queue(&channel, "work", backoff(&[5_000, 60_000])).await;
    assert!(publish_confirmed(&channel, "", "work", b"flaky", BasicProperties::default()).await);
    let mut work = consumer(&channel, "work").await;
    let mut delivery = next(&mut work).await;
    for (attempt, step_ms) in [(1, 5_000), (2, 60_000), (3, 60_000)] {
        delivery.nack(BasicNackOptions { multiple: false, requeue: true }).await.unwrap();
        if attempt == 1 {
            // While "flaky" waits, a new message goes out at once (the clock has not moved).
            assert!(publish_confirmed(&channel, "", "work", b"other", BasicProperties::default()).await);
            let other = next(&mut work).await;
            assert_eq!(other.data, b"other");
            other.ack(BasicAckOptions::default()).await.unwrap();
        }
        // The nack has no reply: a round trip makes sure it was handled (its step started) before
        // the clock moves.
        assert_eq!(message_count(&channel, "work").await, 1, "attempt {attempt}: waiting");
        advance(broker.broker(), &clock, step_ms - 1).await;
        assert!(nothing_received(&channel, "work", &mut work).await, "attempt {attempt}: back before its step");
        assert_eq!(message_count(&channel, "work").await, 1, "attempt {attempt}: still waiting");
        advance(broker.broker(), &clock, 1).await;
        delivery = next(&mut work).await;
        assert_eq!(delivery.data, b"flaky");
        assert!(delivery.redelivered);
    }
    delivery.ack(BasicAckOptions::default()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_that_closes_requeues_at_once_without_backoff() {
    // The clock never moves: a backoff, had there been one, would never end.
    let clock = Arc::new(ManualClock::starting_now());
    let broker = TestBroker::start_on(&clock).await;
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
    const STEP_MS: u64 = 60_000;
    // The clock lives here, not in the broker: it goes on across the crash.
    let clock = Arc::new(ManualClock::starting_now());
    let mut broker = CrashableBroker::start(41, on_clock(&clock)).await;
    {
        let connection = broker.connect().await;
        let channel = confirm_channel(&connection).await;
        durable_queue(&channel, "work", backoff(&[STEP_MS])).await;
        assert!(publish_confirmed(&channel, "", "work", b"retry me", BasicProperties::default()).await);
        let mut work = consumer(&channel, "work").await;
        next(&mut work).await.nack(BasicNackOptions { multiple: false, requeue: true }).await.unwrap();
        // The round trip makes sure the nack was handled before the clock moves.
        message_count(&channel, "work").await;
        advance(broker.broker(), &clock, STEP_MS).await;
        // The second delivery's count is written before it goes out (a first delivery's is
        // written lazily, see the design note), so the crash below cannot lose it.
        let again = next(&mut work).await;
        again.nack(BasicNackOptions { multiple: false, requeue: true }).await.unwrap();
        // A round trip so the nack is processed before the crash. The broker is killed
        // (`kill -9`): what it wrote survives. (After a power loss within the ack log's lazy
        // sync interval the delivery count can be lost: the message is then redelivered
        // without waiting — never lost. See docs/durability.md.)
        channel.basic_qos(1, BasicQosOptions::default()).await.unwrap();
        // Half the step has passed when the broker is killed; the new broker cannot know how
        // long it had waited, so it waits the whole step again from its start.
        advance(broker.broker(), &clock, STEP_MS / 2).await;
        broker.crash(CrashMode::KeepUnsynced).await;
    }
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    let mut work = consumer(&channel, "work").await;
    advance(broker.broker(), &clock, STEP_MS - 1).await;
    assert!(nothing_received(&channel, "work", &mut work).await, "redelivered before a whole step since the restart");
    assert_eq!(message_count(&channel, "work").await, 1, "still waiting");
    advance(broker.broker(), &clock, 1).await;
    let delivery = next(&mut work).await;
    assert_eq!(delivery.data, b"retry me");
    assert!(delivery.redelivered);
    delivery.ack(BasicAckOptions::default()).await.unwrap();
    broker.stop().await;
}
