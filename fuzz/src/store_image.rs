//! Store recovery over arbitrary bytes: the image format the `store_recovery` target reads, and
//! what it checks.
//!
//! An input is a data directory image, a series of entries:
//!
//! ```text
//! flags u8 | path_len u8 | path (UTF-8, relative to the data directory) | len u16 LE | contents
//! ```
//!
//! Flag bit 0 makes the entry a directory (its contents are ignored); bit 1 reseals the file's
//! checksums (the 64-byte file header's, then each record's header and payload checksums, with
//! the salt the header names) before it is written. Without resealing nearly every mutation only
//! reaches the checksum checks; with it the fuzzer gets to recovery's own logic (seq order, base
//! seqs, ack records naming queues and seqs, definition batches). The image is written into a
//! [`SimFs`], so nothing touches the disk and an execution costs microseconds.
//!
//! Properties: opening the definitions log and the store returns `Ok` or an error, never panics;
//! whatever opened lists only messages that read back (by `read` and `read_each`, with the meta
//! recovery kept); a clean close and a second open find the same definitions and the same
//! messages with the same delivery counts; and the reopened store still takes and returns a
//! message and a definition.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use wharf_store::format::{FILE_HEADER_BYTES, RECORD_HEADER_BYTES, set_record_word_a};
use wharf_store::{Fs, LogId, MetaStore, OpenMode, Recovered, SimFs, Store, StoreConfig};

/// Where the image is laid out in the simulated file system.
pub const DATA_DIR: &str = "/data";
/// Where the broker keeps the definitions log inside the data directory.
pub const META_SUBDIR: &str = "meta";

const FLAG_DIR: u8 = 1;
const FLAG_RESEAL: u8 = 2;

/// One entry of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative to the data directory.
    pub path: String,
    /// A directory (no contents) rather than a file.
    pub dir: bool,
    /// Reseal the file's checksums before writing it.
    pub reseal: bool,
    /// The file's bytes.
    pub contents: Vec<u8>,
}

/// Reads entries until the bytes run out; a truncated last entry keeps what is there.
pub fn parse(mut image: &[u8]) -> Vec<Entry> {
    let mut entries = Vec::new();
    while let [flags, path_len, rest @ ..] = image {
        let path_len = usize::from(*path_len).min(rest.len());
        let (path, rest) = rest.split_at(path_len);
        let (len, rest) = match rest {
            [low, high, rest @ ..] => (usize::from(u16::from_le_bytes([*low, *high])), rest),
            _ => (0, &[][..]),
        };
        let (contents, rest) = rest.split_at(len.min(rest.len()));
        entries.push(Entry {
            path: String::from_utf8_lossy(path).into_owned(),
            dir: flags & FLAG_DIR != 0,
            reseal: flags & FLAG_RESEAL != 0,
            contents: contents.to_vec(),
        });
        image = rest;
    }
    entries
}

/// Writes entries as an image (for seeds); `None` if a path or file is too long for the format.
pub fn encode(entries: &[Entry]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for entry in entries {
        let flags = if entry.dir { FLAG_DIR } else { 0 } | if entry.reseal { FLAG_RESEAL } else { 0 };
        out.push(flags);
        out.push(u8::try_from(entry.path.len()).ok()?);
        out.extend_from_slice(entry.path.as_bytes());
        out.extend_from_slice(&u16::try_from(entry.contents.len()).ok()?.to_le_bytes());
        out.extend_from_slice(&entry.contents);
    }
    Some(out)
}

/// Recomputes the checksums of a store file in place: the file header's, then every record's
/// that its length field frames, with the salt the header holds. Bytes that frame no record are
/// left as they are.
pub fn reseal(file: &mut [u8]) {
    if file.len() < FILE_HEADER_BYTES {
        return;
    }
    let crc = crc32c::crc32c(&file[..60]);
    file[60..64].copy_from_slice(&crc.to_le_bytes());
    let salt = u32::from_le_bytes([file[12], file[13], file[14], file[15]]);
    let mut offset = FILE_HEADER_BYTES;
    while file.len() - offset >= RECORD_HEADER_BYTES {
        let record = &mut file[offset..];
        let record_bytes = u32::from_le_bytes([record[0], record[1], record[2], record[3]]) as usize;
        if record_bytes < RECORD_HEADER_BYTES {
            return;
        }
        let end = record_bytes.min(record.len());
        let payload_crc = crc32c::crc32c(&record[RECORD_HEADER_BYTES..end]);
        record[8..12].copy_from_slice(&payload_crc.to_le_bytes());
        let a = u64::from_le_bytes([
            record[24], record[25], record[26], record[27], record[28], record[29], record[30], record[31],
        ]);
        // Rewrites word a with itself, resealing the header checksum.
        set_record_word_a(&mut record[..RECORD_HEADER_BYTES], salt, a);
        offset += end;
    }
}

/// Lays the image out under `root`. Entries that cannot be written (a path outside the data
/// directory, a file where a directory is, a name given twice) are skipped.
pub fn write_image(fs: &dyn Fs, root: &Path, image: &[u8]) {
    for mut entry in parse(image) {
        let relative = Path::new(&entry.path);
        if entry.path.is_empty() || !relative.components().all(|part| matches!(part, Component::Normal(_))) {
            continue;
        }
        let path = root.join(relative);
        if entry.dir {
            let _ = fs.create_dir_all(&path);
            continue;
        }
        if let Some(parent) = path.parent()
            && fs.create_dir_all(parent).is_err()
        {
            continue;
        }
        if entry.reseal {
            reseal(&mut entry.contents);
        }
        if let Ok(file) = fs.open(&path, OpenMode::CreateNew) {
            let _ = file.write_all_at(&entry.contents, 0);
        }
    }
}

/// Every file below `root` as an image entry (for seeds), leaving out the lock file.
pub fn read_image(sim: &SimFs, root: &Path) -> Vec<Entry> {
    let mut entries = Vec::new();
    for path in sim.list_files(root).unwrap_or_default() {
        let Ok(relative) = path.strip_prefix(root) else { continue };
        if relative == Path::new("LOCK") {
            continue;
        }
        let contents = sim.read_file(&path).unwrap_or_default();
        entries.push(Entry { path: relative.to_string_lossy().into_owned(), dir: false, reseal: false, contents });
    }
    entries
}

/// The store configuration the target opens with: the broker's, without the group-commit wait
/// (it only adds latency to every execution).
pub fn config() -> StoreConfig {
    StoreConfig { group_commit_delay_us: 0, ..StoreConfig::default() }
}

/// The `store_recovery` target.
pub fn check_image(image: &[u8]) {
    let sim = SimFs::new(0);
    let root = PathBuf::from(DATA_DIR);
    write_image(sim.shared().as_ref(), &root, image);
    check_definitions(&sim, &root.join(META_SUBDIR));
    check_store(&sim, &root);
}

fn check_definitions(sim: &SimFs, dir: &Path) {
    let Ok((meta, recovered)) = MetaStore::open(sim.shared(), dir) else { return };
    drop(meta);
    let (meta, again) = MetaStore::open(sim.shared(), dir).expect("a definitions log that opened does not reopen");
    assert_eq!(again.entries, recovered.entries, "a second open of the definitions log found other definitions");
    meta.put(b"fuzz/key", b"value").expect("a recovered definitions log does not take a definition");
    drop(meta);
    let (_, last) =
        MetaStore::open(sim.shared(), dir).expect("a definitions log that took a definition does not reopen");
    let mut expected = recovered.entries;
    expected.insert(b"fuzz/key".to_vec(), b"value".to_vec());
    assert_eq!(last.entries, expected, "a definition written after recovery was not kept, or others changed");
}

/// Per log: each live message's seq, delivery count, meta and body, as read back.
type Listing = BTreeMap<LogId, Vec<(u64, u32, Vec<u8>, Vec<u8>)>>;

fn check_store(sim: &SimFs, root: &Path) {
    let Ok((store, recovered)) = Store::open(sim.shared(), root, config()) else { return };
    let listing = read_back(&store, &recovered);
    store.close().expect("a recovered store does not close");
    let (store, again) = Store::open(sim.shared(), root, config()).expect("a store that opened does not reopen");
    assert!(again.clean_stop, "a clean close was not seen by the next open");
    assert_eq!(read_back(&store, &again), listing, "a second recovery found other messages");
    // A new log may be refused cleanly (ids run out, a directory in the way of a fresh id); then
    // an existing one must still take a message.
    let log = match store.create_log().and_then(|ticket| ticket.wait()) {
        Ok(log) => log,
        Err(error) => {
            assert!(!error.is_fatal(), "creating a log after recovery was fatal: {error}");
            match again.queues.keys().next() {
                Some(&log) => log,
                None => return,
            }
        }
    };
    let receipt = store
        .append(log, 1, b"meta", b"body")
        .and_then(|pending| pending.wait())
        .expect("a recovered store refuses an append");
    let message = store.read(log, &receipt.location).expect("a message appended after recovery does not read back");
    assert_eq!((&message.meta[..], &message.body[..]), (&b"meta"[..], &b"body"[..]));
    store.close().expect("a recovered store does not close after an append");
}

/// Reads every recovered message back, both ways, checking it against what recovery reported.
fn read_back(store: &Store, recovered: &Recovered) -> Listing {
    let mut listing = Listing::new();
    for (&log, messages) in &recovered.queues {
        assert!(messages.windows(2).all(|pair| pair[0].seq < pair[1].seq), "recovered seqs out of order in {log}");
        let mut read = Vec::with_capacity(messages.len());
        for message in messages {
            let stored = store
                .read(log, &message.location)
                .unwrap_or_else(|error| panic!("a recovered message does not read back ({error}): {message:?}"));
            assert_eq!(stored.seq, message.seq, "a recovered message reads back with another seq");
            assert_eq!(
                Some(&stored.meta[..]),
                recovered.meta(log, message),
                "the meta recovery kept is not the record's"
            );
            assert_eq!(stored.body.len() as u64, message.body_bytes(), "a recovered body length is wrong");
            read.push((message.seq, message.delivery_count, stored.meta, stored.body));
        }
        let locations: Vec<_> = messages.iter().map(|message| message.location).collect();
        let mut visited = 0;
        store.read_each(log, &locations, &mut |index, record| {
            let record = record.unwrap_or_else(|error| panic!("read_each refuses a recovered message: {error}"));
            assert_eq!(
                (record.meta, record.body),
                (&read[index].2[..], &read[index].3[..]),
                "read_each disagrees with read"
            );
            visited += 1;
        });
        assert_eq!(visited, messages.len(), "read_each skipped messages");
        listing.insert(log, read);
    }
    listing
}
