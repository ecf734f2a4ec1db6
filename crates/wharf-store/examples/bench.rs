//! The store's benchmark: what the disk can do, and what the store makes of it, in one run on the
//! same disk. `cargo run --release -p wharf-store --example bench -- [--dir DIR] [--quick]`
//!
//! Prints progress, then one JSON line with `fsync_loop_per_s` (write 1 KiB + fdatasync in a loop,
//! the naive one-sync-per-message limit), `synced_seq_mb_per_s` (1 MiB writes each fdatasynced,
//! the disk's synced bandwidth), `appends_per_s_{1,8,64}` (durable 1 KiB appends to one queue by
//! that many concurrent appenders, each waiting for its confirm), `appends_per_s_64_queues` (64
//! appenders on 64 queues), `appends_per_s_1000_queues` (64 appenders going round 1,000 queues),
//! `appends_per_s_64_queues_in_flight` (64 appends in flight from one thread over 64 queues),
//! `large_batch_mb_per_s` (64 appenders of 64 KiB records) and
//! `recovery_1m_s` (opening a store that holds 1,000,000 live 100-byte messages),
//! `recovery_full_journal_s` (opening a store whose 64 MiB journal is full of records to replay)
//! and `journal_bytes` (the store's journal size; `--journal-bytes 0` runs the layout without the
//! shared journal, for a before-and-after in one run).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use wharf_store::{LogId, RealFs, Store, StoreConfig};

struct Options {
    dir: PathBuf,
    journal_bytes: u64,
    group_commit_delay_us: u64,
    phase: Duration,
    recovery_messages: u64,
}

fn options() -> Options {
    let mut dir = PathBuf::from("wharf-bench-data");
    let mut quick = false;
    let mut journal_bytes = StoreConfig::default().journal_bytes;
    let mut group_commit_delay_us = StoreConfig::default().group_commit_delay_us;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--dir" => dir = PathBuf::from(args.next().expect("--dir needs a path")),
            "--quick" => quick = true,
            "--group-commit-delay-us" => {
                group_commit_delay_us =
                    args.next().and_then(|us| us.parse().ok()).expect("--group-commit-delay-us needs a number")
            }
            "--journal-bytes" => {
                journal_bytes =
                    args.next().and_then(|bytes| bytes.parse().ok()).expect("--journal-bytes needs a number")
            }
            other => {
                eprintln!(
                    "unknown argument {other:?}; usage: bench [--dir DIR] [--quick] [--journal-bytes N] [--group-commit-delay-us N]"
                );
                std::process::exit(2);
            }
        }
    }
    Options {
        dir,
        journal_bytes,
        group_commit_delay_us,
        phase: if quick { Duration::from_millis(300) } else { Duration::from_secs(3) },
        recovery_messages: if quick { 20_000 } else { 1_000_000 },
    }
}

fn fsync_loop_per_s(dir: &Path, phase: Duration) -> f64 {
    let path = dir.join("fsync-loop");
    let file = OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
    let record = [0x5Au8; 1024];
    let start = Instant::now();
    let mut writes = 0u64;
    while start.elapsed() < phase {
        file.write_all_at(&record, writes * 1024).unwrap();
        file.sync_data().unwrap();
        writes += 1;
    }
    let rate = writes as f64 / start.elapsed().as_secs_f64();
    std::fs::remove_file(&path).unwrap();
    rate
}

fn synced_seq_mb_per_s(dir: &Path, phase: Duration) -> f64 {
    let path = dir.join("seq-write");
    let file = OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
    let chunk = vec![0xA5u8; 1024 * 1024];
    let start = Instant::now();
    let mut chunks = 0u64;
    while start.elapsed() < phase || chunks < 8 {
        file.write_all_at(&chunk, chunks * chunk.len() as u64).unwrap();
        file.sync_data().unwrap();
        chunks += 1;
    }
    let rate = chunks as f64 / start.elapsed().as_secs_f64();
    std::fs::remove_file(&path).unwrap();
    rate * 1.048_576
}

/// The store configuration every phase uses (the defaults, with `--journal-bytes`).
static CONFIG: std::sync::OnceLock<StoreConfig> = std::sync::OnceLock::new();

fn config() -> StoreConfig {
    CONFIG.get().cloned().unwrap_or_default()
}

fn fresh_store(dir: &Path, name: &str) -> (Store, PathBuf) {
    let path = dir.join(name);
    let _ = std::fs::remove_dir_all(&path);
    let (store, _) = Store::open(RealFs::shared(), &path, config()).unwrap();
    (store, path)
}

/// `appenders` threads append `record_bytes` bodies, each waiting for its confirm before the next.
/// With more queues than appenders, each thread goes round its share of them (thread `i` takes
/// queues `i`, `i + appenders`, …), so every queue is written. Returns (appends per second,
/// batches per second).
fn append_rate(dir: &Path, appenders: usize, queues: usize, record_bytes: usize, phase: Duration) -> (f64, f64) {
    let (store, path) = fresh_store(dir, &format!("appends-{appenders}-{queues}-{record_bytes}"));
    let queue_ids: Vec<LogId> = (0..queues).map(|_| store.create_log().unwrap().wait().unwrap()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let batches_before = store.stats().batches;
    let start = Instant::now();
    let threads: Vec<_> = (0..appenders)
        .map(|index| {
            let (store, stop, done) = (store.clone(), Arc::clone(&stop), Arc::clone(&done));
            let own: Vec<LogId> = queue_ids.iter().skip(index % queue_ids.len()).step_by(appenders).copied().collect();
            std::thread::spawn(move || {
                let body = vec![index as u8; record_bytes];
                for queue in own.iter().cycle() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    store.append(*queue, 0, b"", &body).unwrap().wait().unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(phase);
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        thread.join().unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let batches = store.stats().batches - batches_before;
    drop(store);
    std::fs::remove_dir_all(path).unwrap();
    (done.load(Ordering::Relaxed) as f64 / elapsed, batches as f64 / elapsed)
}

/// CPU seconds (user + system) this process has used so far, from `/proc/self/stat`.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may contain spaces).
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |index: usize| fields.get(index).and_then(|field| field.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// One submitting thread keeps `in_flight` appends outstanding, replacing each as it completes:
/// the load 64 publishers multiplexed on an async runtime present, without 64 OS threads to wake.
/// The appends go round `queues` queues.
fn in_flight_rate(dir: &Path, in_flight: usize, queues: usize, phase: Duration) -> f64 {
    let (store, path) = fresh_store(dir, &format!("in-flight-{in_flight}-{queues}"));
    let queue_ids: Vec<LogId> = (0..queues).map(|_| store.create_log().unwrap().wait().unwrap()).collect();
    let mut next_queue = queue_ids.iter().cycle();
    let body = vec![1u8; 1024];
    let mut window = std::collections::VecDeque::with_capacity(in_flight);
    let start = Instant::now();
    let mut done = 0u64;
    while start.elapsed() < phase {
        while window.len() < in_flight {
            let queue = *next_queue.next().unwrap();
            window.push_back(store.append(queue, 0, b"", &body).unwrap());
        }
        if let Some(oldest) = window.pop_front() {
            oldest.wait().unwrap();
            done += 1;
        }
    }
    let rate = done as f64 / start.elapsed().as_secs_f64();
    for pending in window {
        pending.wait().unwrap();
    }
    drop(store);
    std::fs::remove_dir_all(path).unwrap();
    rate
}

/// Fills a store with `messages` live 100-byte messages, closes it, and times the reopen.
fn recovery_seconds(dir: &Path, messages: u64) -> f64 {
    let (store, path) = fresh_store(dir, "recovery");
    let queue = store.create_log().unwrap().wait().unwrap();
    let body = [7u8; 100];
    let window = 10_000;
    let mut written = 0;
    while written < messages {
        let count = window.min(messages - written);
        let pending: Vec<_> = (0..count).map(|_| store.append(queue, 0, b"", &body).unwrap()).collect();
        for append in pending {
            append.wait().unwrap();
        }
        written += count;
    }
    store.close().unwrap();
    let start = Instant::now();
    let (store, recovered) = Store::open(RealFs::shared(), &path, config()).unwrap();
    let elapsed = start.elapsed().as_secs_f64();
    assert_eq!(recovered.queues[&queue].len() as u64, messages, "every message recovered");
    drop(store);
    std::fs::remove_dir_all(path).unwrap();
    elapsed
}

/// Fills the journal with batches over 64 queues, copies the data directory as it is (the
/// segments' last writes are in the journal only), and times opening the copy, which replays it.
/// `None` without a journal.
fn recovery_full_journal_seconds(dir: &Path) -> Option<f64> {
    let journal_bytes = config().journal_bytes;
    if journal_bytes == 0 {
        return None;
    }
    let (store, path) = fresh_store(dir, "recovery-journal");
    let queues: Vec<LogId> = (0..64).map(|_| store.create_log().unwrap().wait().unwrap()).collect();
    let body = [7u8; 1024];
    let fill = (journal_bytes * 9 / 10) / (body.len() as u64 + 100);
    let mut written = 0u64;
    let checkpoints_before = store.stats().checkpoints;
    while written < fill {
        let pending: Vec<_> = queues.iter().map(|queue| store.append(*queue, 0, b"", &body).unwrap()).collect();
        for append in pending {
            append.wait().unwrap();
        }
        written += queues.len() as u64;
    }
    assert_eq!(store.stats().checkpoints, checkpoints_before, "the journal was filled, not started over");
    let copy = dir.join("recovery-journal-copy");
    let _ = std::fs::remove_dir_all(&copy);
    let copied = std::process::Command::new("cp").arg("-a").arg(&path).arg(&copy).status().unwrap();
    assert!(copied.success());
    std::fs::remove_file(copy.join("LOCK")).ok();
    drop(store);
    std::fs::remove_dir_all(path).unwrap();
    let start = Instant::now();
    let (store, recovered) = Store::open(RealFs::shared(), &copy, config()).unwrap();
    let elapsed = start.elapsed().as_secs_f64();
    let recovered_messages: usize = recovered.queues.values().map(Vec::len).sum();
    assert_eq!(recovered_messages as u64, written, "every message recovered");
    drop(store);
    std::fs::remove_dir_all(copy).unwrap();
    Some(elapsed)
}

fn main() {
    let options = options();
    let config = StoreConfig {
        journal_bytes: options.journal_bytes,
        group_commit_delay_us: options.group_commit_delay_us,
        ..StoreConfig::default()
    };
    CONFIG.set(config).unwrap();
    std::fs::create_dir_all(&options.dir).unwrap();
    let dir = options.dir.as_path();
    println!("wharf-store bench in {} (phase {:?})", dir.display(), options.phase);

    let fsync_loop = fsync_loop_per_s(dir, options.phase);
    println!("write 1 KiB + fdatasync loop:        {fsync_loop:>10.0} /s");
    let seq = synced_seq_mb_per_s(dir, options.phase);
    println!("1 MiB writes, each fdatasynced:      {seq:>10.1} MB/s");

    let mut appends = Vec::new();
    for appenders in [1, 8, 64] {
        let cpu_before = cpu_seconds();
        let (rate, batches) = append_rate(dir, appenders, 1, 1024, options.phase);
        let cpu = (cpu_seconds() - cpu_before) / options.phase.as_secs_f64();
        println!(
            "{appenders:>2} appender threads, 1 queue, 1 KiB: {rate:>10.0} appends/s ({:.1} per batch, {:.1}x the sync loop, {:.0}% CPU)",
            rate / batches.max(1.0),
            rate / fsync_loop,
            cpu * 100.0
        );
        appends.push(rate);
    }
    let cpu_before = cpu_seconds();
    let in_flight = in_flight_rate(dir, 64, 1, options.phase);
    let cpu = (cpu_seconds() - cpu_before) / options.phase.as_secs_f64();
    println!(
        "64 in flight from one thread, 1 KiB:  {in_flight:>10.0} appends/s ({:.1}x the sync loop, {:.0}% CPU)",
        in_flight / fsync_loop,
        cpu * 100.0
    );
    let (spread, _) = append_rate(dir, 64, 64, 1024, options.phase);
    println!(
        "64 appenders, 64 queues, 1 KiB:      {spread:>10.0} appends/s ({:.1}x the sync loop)",
        spread / fsync_loop
    );
    let (spread_1000, _) = append_rate(dir, 64, 1000, 1024, options.phase);
    println!(
        "64 appenders, 1,000 queues, 1 KiB:   {spread_1000:>10.0} appends/s ({:.1}x the sync loop)",
        spread_1000 / fsync_loop
    );
    let in_flight_queues = in_flight_rate(dir, 64, 64, options.phase);
    println!(
        "64 in flight over 64 queues, 1 KiB:  {in_flight_queues:>10.0} appends/s ({:.1}x the sync loop)",
        in_flight_queues / fsync_loop
    );
    let (large, _) = append_rate(dir, 64, 1, 64 * 1024, options.phase);
    let large_mb = large * 64.0 * 1024.0 / 1e6;
    println!(
        "64 appenders, 1 queue, 64 KiB:       {large_mb:>10.1} MB/s ({:.0}% of synced sequential)",
        100.0 * large_mb / seq
    );
    let recovery = recovery_seconds(dir, options.recovery_messages);
    println!("recovery of {} live messages:  {recovery:>10.3} s", options.recovery_messages);
    let recovery_journal = recovery_full_journal_seconds(dir);
    if let Some(seconds) = recovery_journal {
        println!("recovery replaying a full journal:   {seconds:>10.3} s");
    }
    let recovery_journal = recovery_journal.map_or("null".to_owned(), |seconds| format!("{seconds:.3}"));

    println!(
        "{{\"fsync_loop_per_s\":{fsync_loop:.0},\"synced_seq_mb_per_s\":{seq:.1},\"appends_per_s_1\":{:.0},\"appends_per_s_8\":{:.0},\"appends_per_s_64\":{:.0},\"appends_per_s_64_in_flight\":{in_flight:.0},\"appends_per_s_64_queues\":{spread:.0},\"appends_per_s_1000_queues\":{spread_1000:.0},\"appends_per_s_64_queues_in_flight\":{in_flight_queues:.0},\"large_batch_mb_per_s\":{large_mb:.1},\"recovery_1m_s\":{recovery:.3},\"recovery_messages\":{},\"recovery_full_journal_s\":{recovery_journal},\"journal_bytes\":{}}}",
        appends[0], appends[1], appends[2], options.recovery_messages, options.journal_bytes
    );
}
