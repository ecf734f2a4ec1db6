//! The phases besides a full run: `probe` (restart timing), `declare` and `idle` (the idle-scale
//! scenario: many queues, many connections held open), `drain` (consume a backlog), and
//! `failover` (the longest time without a confirm while a node is killed).

use super::*;

/// Waits (up to two minutes) until the broker accepts a connection and `basic.get` returns a
/// message from the queue, then prints the wall-clock time of that moment. The message is not
/// acknowledged: it goes back when the probe disconnects.
pub(crate) async fn probe(options: &Options) -> Result<()> {
    // Any single call may hang on a broker that is still starting: the whole probe has a deadline.
    match tokio::time::timeout(Duration::from_secs(130), probe_until_served(options)).await {
        Ok(outcome) => outcome,
        Err(_) => bail!("the broker did not serve a message within two minutes"),
    }
}

async fn probe_until_served(options: &Options) -> Result<()> {
    let Some(queue) = queue_names(options).pop() else { bail!("no queue to probe") };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if Instant::now() > deadline {
            bail!("the broker did not serve a message from {queue} within two minutes");
        }
        let Ok(connection) = Connection::connect(&options.url, ConnectionProperties::default()).await else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let Ok(channel) = connection.create_channel().await else { continue };
        loop {
            match channel.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false }).await {
                Ok(Some(_)) => {
                    println!("{{\"first_message_epoch_ms\":{}}}", epoch_ms());
                    let _ = connection.close(200, "probe done".into()).await;
                    return Ok(());
                }
                // Not declared yet (recovery still running) or empty: ask again.
                Ok(None) => tokio::time::sleep(Duration::from_millis(5)).await,
                Err(_) => break,
            }
            if Instant::now() > deadline {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Declares `--queues` durable queues from one connection, with `--fill` one persistent message
/// each (confirmed); prints how long it took.
pub(crate) async fn declare(options: &Options) -> Result<()> {
    let connection = connect(&options.url).await?;
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let arguments = queue_arguments(options);
    let started = Instant::now();
    let names = queue_names(options);
    for queue in &names {
        channel.queue_declare(queue.as_str().into(), QueueDeclareOptions::durable(), arguments.clone()).await?;
    }
    let declared_s = started.elapsed().as_secs_f64();
    if options.fill {
        let properties = BasicProperties::default().with_delivery_mode(2);
        let body = vec![0u8; options.size];
        let mut confirms = VecDeque::new();
        for queue in &names {
            let confirm = channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    properties.clone(),
                )
                .await?;
            confirms.push_back(confirm);
            if confirms.len() >= options.confirm_window
                && let Some(oldest) = confirms.pop_front()
            {
                oldest.await?;
            }
        }
        for confirm in confirms {
            if !confirm.await?.is_ack() {
                bail!("a fill message was nacked");
            }
        }
    }
    println!(
        "{{\"phase\":\"declare\",\"queues\":{},\"declare_s\":{declared_s:.3},\"seconds\":{:.3}}}",
        names.len(),
        started.elapsed().as_secs_f64()
    );
    connection.close(200, "declared".into()).await?;
    Ok(())
}

/// Opens `--queues` connections, each with one channel and one consumer on its own queue (the
/// queues must exist), at most 64 opening at a time, with the minimal client of `raw_idle.rs`;
/// prints how long opening them all took, then holds them open until the process is killed (the
/// caller samples the broker meanwhile).
pub(crate) async fn idle(options: Arc<Options>) -> Result<()> {
    let target = crate::raw_idle::Target::from_url(&options.url)?;
    let names = queue_names(&options);
    let opening = Arc::new(tokio::sync::Semaphore::new(64));
    let started = Instant::now();
    let mut opened = Vec::with_capacity(names.len());
    for queue in names {
        let (target, opening) = (target.clone(), Arc::clone(&opening));
        opened.push(tokio::spawn(async move {
            let _permit = opening.acquire_owned().await?;
            crate::raw_idle::open_consumer(&target, &queue).await
        }));
    }
    let mut held = Vec::with_capacity(opened.len());
    for connection in opened {
        held.push(connection.await??);
    }
    println!("{{\"phase\":\"idle\",\"connections\":{},\"open_s\":{:.3}}}", held.len(), started.elapsed().as_secs_f64());
    std::future::pending::<()>().await;
    Ok(())
}

/// Consumes an existing backlog of `--expect` messages with `--consumers` consumers and reports
/// the drain rate; fails unless every message (by producer and sequence) arrived.
pub(crate) async fn drain(options: Arc<Options>) -> Result<()> {
    if options.expect == 0 {
        bail!("--phase drain needs --expect (the number of messages in the backlog)");
    }
    let stats = Arc::new(Stats::new(true)?);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut consumers = Vec::new();
    for queue in queue_names(&options) {
        for _ in 0..options.consumers.max(1) {
            consumers.push(tokio::spawn(reported(
                "consumer",
                consume(Arc::clone(&options), vec![queue.clone()], Arc::clone(&stats), Arc::clone(&stop)),
            )));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(3600);
    while stats.consumed.load(Ordering::Relaxed) < options.expect && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for consumer in consumers {
        consumer.await??;
    }
    let mut unique = 0u64;
    {
        let mut seen = stats.seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        for received in seen.values_mut() {
            received.sort_unstable();
            let before = received.len();
            received.dedup();
            stats.duplicates.fetch_add((before - received.len()) as u64, Ordering::Relaxed);
            unique += received.len() as u64;
        }
    }
    let consumed = stats.consumed.load(Ordering::Relaxed);
    let missing = options.expect.saturating_sub(unique);
    println!(
        "{{\"phase\":\"drain\",\"expected\":{},\"consumed\":{consumed},\"duplicates\":{},\"missing\":{missing},\"seconds\":{:.3},\"msgs_per_s\":{:.0}}}",
        options.expect,
        stats.duplicates.load(Ordering::Relaxed),
        elapsed.as_secs_f64(),
        consumed as f64 / elapsed.as_secs_f64(),
    );
    if missing > 0 {
        bail!("{missing} messages of the backlog were never consumed");
    }
    Ok(())
}

/// Publishes one persistent message at a time to the queue, each confirmed before the next,
/// until `--duration-s` has passed, connecting again (to `--url`) whenever the connection or
/// channel breaks; prints the longest time between two confirms (or between the start and the
/// first), with when it began and ended (ms since the epoch), when each confirm came, and the
/// confirms counted.
pub(crate) async fn failover(options: &Options) -> Result<()> {
    let Some(queue) = queue_names(options).pop() else { bail!("no queue to publish to") };
    let body = vec![b'f'; options.size];
    let properties = BasicProperties::default().with_delivery_mode(2);
    let until = Instant::now() + Duration::from_secs(options.duration_s);
    let (mut confirms, mut last_ms) = (0u64, epoch_ms());
    let (mut gap_ms, mut gap_start_ms, mut gap_end_ms) = (0u64, last_ms, last_ms);
    // When each confirm came, so the caller can find the first after its kill (a run of 20 s
    // holds some tens of thousands).
    const CONFIRM_TIMES_MAX: usize = 1_000_000;
    let mut confirm_times_ms: Vec<u64> = Vec::new();
    while Instant::now() < until {
        let Ok(connection) = Connection::connect(&options.url, ConnectionProperties::default()).await else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let Ok(channel) = connection.create_channel().await else { continue };
        if channel.confirm_select(ConfirmSelectOptions::default()).await.is_err() {
            continue;
        }
        while Instant::now() < until {
            let published = channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    properties.clone(),
                )
                .await;
            let Ok(confirm) = published else { break };
            // A confirm that never comes (its node gone with the connection open) is waited for
            // only as long as the run lasts.
            let remaining = until.saturating_duration_since(Instant::now());
            match tokio::time::timeout(remaining, confirm).await {
                Ok(Ok(confirmation)) if confirmation.is_ack() => {
                    let now_ms = epoch_ms();
                    confirms += 1;
                    if now_ms - last_ms > gap_ms {
                        (gap_ms, gap_start_ms, gap_end_ms) = (now_ms - last_ms, last_ms, now_ms);
                    }
                    if confirm_times_ms.len() < CONFIRM_TIMES_MAX {
                        confirm_times_ms.push(now_ms);
                    }
                    last_ms = now_ms;
                }
                Ok(Ok(_)) => {}
                Ok(Err(_)) => break,
                Err(_) => break,
            }
        }
        let _ = connection.close(200, "failover done".into()).await;
    }
    let times: Vec<String> = confirm_times_ms.iter().map(u64::to_string).collect();
    println!(
        "{{\"confirms\":{confirms},\"max_gap_ms\":{gap_ms},\"gap_start_epoch_ms\":{gap_start_ms},\"gap_end_epoch_ms\":{gap_end_ms},\"confirm_epoch_ms\":[{}]}}",
        times.join(",")
    );
    Ok(())
}
