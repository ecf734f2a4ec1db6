//! The on-disk format, version 1: file headers and record frames. `docs/storage-format.md`
//! describes the same layout byte by byte; change both together, with a version bump.
//!
//! Every file starts with a 64-byte header (magic, format version, file kind, ids, header CRC).
//! Every record is a 40-byte frame header followed by a payload:
//!
//! ```text
//! 0   u32 record_bytes    whole record, header included (40 ..= RECORD_BYTES_MAX)
//! 4   u32 header_crc      CRC32C of bytes 0..4 and 8..40
//! 8   u32 payload_crc     CRC32C of bytes 40..record_bytes
//! 12  u8  kind            RecordKind
//! 13  u8  flags           0
//! 14  u16 reserved        0
//! 16  u32 aux             kind-specific (meta length, delivery count)
//! 20  u32 reserved        0
//! 24  u64 a               kind-specific (message seq, queue id)
//! 32  u64 b               kind-specific (timestamp, message seq)
//! 40  ..  payload
//! ```
//!
//! The header has its own checksum so that a length can be trusted before it is used to find the
//! payload, and so that a scan can step over a damaged record and find the next good one. The header
//! checksum is seeded with the file's random salt (from the file header): a message body that
//! happens to contain bytes shaped like a record can never pass for one while a scan resynchronises
//! after damage, because a publisher cannot know the salt.

use crate::error::{Result, StoreError};
use std::path::Path;

/// Current format version written into every file header.
pub const FORMAT_VERSION: u16 = 1;
/// Size of every file header.
pub const FILE_HEADER_BYTES: usize = 64;
/// Size of every record frame header.
pub const RECORD_HEADER_BYTES: usize = 40;
/// Largest message body the store accepts (RabbitMQ's own ceiling is 512 MiB; 128 MiB keeps a
/// single record well inside a segment and a `u32` length).
pub const BODY_BYTES_MAX: usize = 128 * 1024 * 1024;
/// Largest message meta (routing information and encoded properties) the store accepts.
pub const META_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Largest record that is ever read back; a length above it is corruption, not an allocation.
pub const RECORD_BYTES_MAX: usize = RECORD_HEADER_BYTES + META_BYTES_MAX + BODY_BYTES_MAX;
/// Largest metadata-log record (a batch of definition changes).
pub const META_RECORD_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Widest span of seqs one segment holds: every message in a segment has a seq below its base
/// seq plus this. Recovery keeps one bit per seq of this span for each segment, so a seq read back
/// is checked against it before it sizes anything (a record beyond it is damage). A segment holds
/// consecutive seqs (an append refused for lack of space takes none), so even the largest segment
/// (1 GiB) of the smallest records (40 bytes) stays within it; 32 Mi seqs cost at most 4 MiB of
/// bits for a segment.
pub const SEGMENT_SEQ_SPAN_MAX: u64 = 1 << 25;

/// Highest seq a queue ever assigns. Seqs count up from 1, one per message, so a real queue stays
/// far below it (2^62 messages at a million a second take 146,000 years); a segment base or an
/// ack record naming a seq above it is damage that kept its checksum, and recovery skips it as
/// such. The headroom above it is what keeps every later `seq + 1` from overflowing.
pub const SEQ_MAX: u64 = 1 << 62;

/// Magic of a queue's message segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"WHARFSEG";
/// Magic of an ack-log segment file.
pub const ACK_MAGIC: [u8; 8] = *b"WHARFACK";
/// Magic of the journal file (`journal.rs`).
pub const JOURNAL_MAGIC: [u8; 8] = *b"WHARFJNL";
/// Magic of the metadata log file.
pub const META_MAGIC: [u8; 8] = *b"WHARFMTA";

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// A message: `aux` = meta length, `a` = seq, `b` = timestamp (ms); payload = meta ++ body.
    Message = 1,
    /// A removal (ack, reject, expiry, dead-letter): `a` = queue id, `b` = seq; no payload.
    Removal = 2,
    /// A delivery count: `aux` = count, `a` = queue id, `b` = seq; no payload.
    DeliveryCount = 3,
    /// A batch of metadata changes: payload = encoded changes (see `meta.rs`).
    MetaBatch = 4,
    /// A segment write carried by the journal: `a` = queue id, `b` = offset in the segment;
    /// payload = generation (u64) ++ segment id (u64) ++ the segment's bytes (see `journal.rs`).
    JournalWrite = 5,
}

impl RecordKind {
    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(RecordKind::Message),
            2 => Some(RecordKind::Removal),
            3 => Some(RecordKind::DeliveryCount),
            4 => Some(RecordKind::MetaBatch),
            5 => Some(RecordKind::JournalWrite),
            _ => None,
        }
    }
}

/// The fixed fields of a decoded record frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// Whole record length.
    pub record_bytes: u32,
    /// Payload checksum.
    pub payload_crc: u32,
    /// What the record holds.
    pub kind: RecordKind,
    /// Kind-specific small field.
    pub aux: u32,
    /// Kind-specific first word.
    pub a: u64,
    /// Kind-specific second word.
    pub b: u64,
}

fn header_crc(salt: u32, header: &[u8]) -> u32 {
    let crc = crc32c::crc32c_append(crc32c::crc32c(&salt.to_le_bytes()), &header[0..4]);
    crc32c::crc32c_append(crc, &header[8..RECORD_HEADER_BYTES])
}

/// Appends one record to `out`. The payload is given in parts so meta and body need not be joined.
pub fn encode_record(out: &mut Vec<u8>, salt: u32, kind: RecordKind, aux: u32, a: u64, b: u64, payload: &[&[u8]]) {
    let payload_bytes: usize = payload.iter().map(|part| part.len()).sum();
    let record_bytes = RECORD_HEADER_BYTES + payload_bytes;
    debug_assert!(record_bytes <= RECORD_BYTES_MAX.max(META_RECORD_BYTES_MAX));
    let mut payload_crc = 0;
    for part in payload {
        payload_crc = crc32c::crc32c_append(payload_crc, part);
    }
    let start = out.len();
    out.extend_from_slice(&(record_bytes as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]); // header crc, filled below
    out.extend_from_slice(&payload_crc.to_le_bytes());
    out.push(kind as u8);
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&aux.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&a.to_le_bytes());
    out.extend_from_slice(&b.to_le_bytes());
    let crc = header_crc(salt, &out[start..start + RECORD_HEADER_BYTES]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    for part in payload {
        out.extend_from_slice(part);
    }
}

/// Rewrites word `a` of an encoded record (the message seq, known only once the caller holds the
/// queue's lock) and reseals the header checksum. The payload checksum is untouched.
pub fn set_record_word_a(record: &mut [u8], salt: u32, a: u64) {
    record[24..32].copy_from_slice(&a.to_le_bytes());
    let crc = header_crc(salt, &record[..RECORD_HEADER_BYTES]);
    record[4..8].copy_from_slice(&crc.to_le_bytes());
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

fn le_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

/// Why a frame header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameProblem {
    /// Fewer bytes than a frame header remain.
    Short,
    /// The header checksum does not match.
    HeaderChecksum,
    /// The header is intact but describes an impossible record (length, kind, reserved bits).
    Invalid,
}

/// Decodes and checks a frame header at the start of `bytes`. `record_bytes_max` is the named
/// limit for this kind of file; a longer record is refused before anything is allocated.
pub fn decode_header(bytes: &[u8], salt: u32, record_bytes_max: usize) -> Result<RecordHeader, FrameProblem> {
    if bytes.len() < RECORD_HEADER_BYTES {
        return Err(FrameProblem::Short);
    }
    let header = &bytes[..RECORD_HEADER_BYTES];
    if le_u32(header, 4) != header_crc(salt, header) {
        return Err(FrameProblem::HeaderChecksum);
    }
    let record_bytes = le_u32(header, 0);
    let kind = RecordKind::from_byte(header[12]).ok_or(FrameProblem::Invalid)?;
    let reserved_clear = header[13] == 0 && header[14] == 0 && header[15] == 0 && le_u32(header, 20) == 0;
    if (record_bytes as usize) < RECORD_HEADER_BYTES || record_bytes as usize > record_bytes_max || !reserved_clear {
        return Err(FrameProblem::Invalid);
    }
    Ok(RecordHeader {
        record_bytes,
        payload_crc: le_u32(header, 8),
        kind,
        aux: le_u32(header, 16),
        a: le_u64(header, 24),
        b: le_u64(header, 32),
    })
}

/// True if `payload` matches the header's checksum.
pub fn payload_matches(header: &RecordHeader, payload: &[u8]) -> bool {
    crc32c::crc32c(payload) == header.payload_crc
}

/// The header every store file starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileHeader {
    /// Which kind of file (its magic).
    pub magic: [u8; 8],
    /// The file's own id (segment id).
    pub file_id: u64,
    /// The owning queue, or 0 for files that belong to no queue.
    pub queue_id: u64,
    /// The first seq this segment may hold (0 where it does not apply).
    pub base_seq: u64,
    /// When the file was created (ms since the Unix epoch).
    pub created_ms: u64,
    /// Random per file; seeds every record header checksum in it.
    pub salt: u32,
}

impl FileHeader {
    /// Encodes the 64-byte header.
    pub fn encode(&self) -> [u8; FILE_HEADER_BYTES] {
        let mut out = [0u8; FILE_HEADER_BYTES];
        out[0..8].copy_from_slice(&self.magic);
        out[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[10..12].copy_from_slice(&(FILE_HEADER_BYTES as u16).to_le_bytes());
        out[12..16].copy_from_slice(&self.salt.to_le_bytes());
        out[16..24].copy_from_slice(&self.file_id.to_le_bytes());
        out[24..32].copy_from_slice(&self.queue_id.to_le_bytes());
        out[32..40].copy_from_slice(&self.base_seq.to_le_bytes());
        out[40..48].copy_from_slice(&self.created_ms.to_le_bytes());
        let crc = crc32c::crc32c(&out[0..60]);
        out[60..64].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and checks a header read from `path`, which must carry `expected_magic`.
    pub fn decode(bytes: &[u8], expected_magic: [u8; 8], path: &Path) -> Result<FileHeader> {
        let corrupt =
            |reason: &str| StoreError::Corrupt { path: path.to_path_buf(), offset: 0, reason: reason.to_owned() };
        if bytes.len() < FILE_HEADER_BYTES {
            return Err(corrupt("file shorter than its 64-byte header"));
        }
        if le_u32(bytes, 60) != crc32c::crc32c(&bytes[0..60]) {
            return Err(corrupt("file header checksum mismatch"));
        }
        if bytes[0..8] != expected_magic {
            return Err(StoreError::Format {
                path: path.to_path_buf(),
                reason: format!("unexpected magic {:?}", String::from_utf8_lossy(&bytes[0..8])),
            });
        }
        let version = le_u16(bytes, 8);
        if version != FORMAT_VERSION || le_u16(bytes, 10) as usize != FILE_HEADER_BYTES {
            return Err(StoreError::Format {
                path: path.to_path_buf(),
                reason: format!("format version {version}; this build reads version {FORMAT_VERSION}"),
            });
        }
        Ok(FileHeader {
            magic: expected_magic,
            file_id: le_u64(bytes, 16),
            queue_id: le_u64(bytes, 24),
            base_seq: le_u64(bytes, 32),
            created_ms: le_u64(bytes, 40),
            salt: le_u32(bytes, 12),
        })
    }
}

/// One good record found by [`scan_records`].
#[derive(Debug, Clone, Copy)]
pub struct ScannedRecord {
    /// Offset of the record in the file.
    pub offset: u64,
    /// Its checked header.
    pub header: RecordHeader,
}

/// A damaged stretch found by [`scan_records`]: skipped, never returned as records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DamagedRange {
    /// Where the damage starts.
    pub offset: u64,
    /// How many bytes were skipped to the next good record.
    pub bytes: u64,
}

/// What a scan of a whole file found.
#[derive(Debug, Default)]
pub struct ScanResult {
    /// Good records in file order.
    pub records: Vec<ScannedRecord>,
    /// Damaged stretches between good records (corruption: reported, skipped).
    pub damaged: Vec<DamagedRange>,
    /// Where the last good record ends; bytes after it are a torn or damaged tail.
    pub valid_end: u64,
}

/// Scans `bytes` (a whole file, header included) for records. A record whose header is intact but
/// whose payload fails its checksum is skipped as one damaged record. A damaged header starts a
/// damaged range; the scan then looks byte by byte for the next offset where a whole record with both
/// checksums intact begins. Damage with no good record after it is the tail (`valid_end` stops
/// before it), left for the caller to truncate.
pub fn scan_records(bytes: &[u8], salt: u32, record_bytes_max: usize) -> ScanResult {
    let mut result = ScanResult { valid_end: FILE_HEADER_BYTES as u64, ..ScanResult::default() };
    let mut offset = FILE_HEADER_BYTES;
    let mut damage_start: Option<usize> = None;
    while offset < bytes.len() {
        let Ok(header) = decode_header(&bytes[offset..], salt, record_bytes_max) else {
            damage_start.get_or_insert(offset);
            offset += 1;
            continue;
        };
        let end = offset + header.record_bytes as usize;
        let Some(payload) = bytes.get(offset + RECORD_HEADER_BYTES..end) else {
            // A trusted header whose record runs past the end of the file: a torn write.
            damage_start.get_or_insert(offset);
            break;
        };
        if !payload_matches(&header, payload) {
            damage_start.get_or_insert(offset);
            offset = end;
            continue;
        }
        if let Some(start) = damage_start.take() {
            result.damaged.push(DamagedRange { offset: start as u64, bytes: (offset - start) as u64 });
        }
        result.records.push(ScannedRecord { offset: offset as u64, header });
        offset = end;
        result.valid_end = offset as u64;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const SALT: u32 = 0xA5A5_0001;

    fn file_with(records: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut out =
            FileHeader { magic: SEGMENT_MAGIC, file_id: 1, queue_id: 7, base_seq: 0, created_ms: 5, salt: SALT }
                .encode()
                .to_vec();
        for (seq, (meta, body)) in records.iter().enumerate() {
            encode_record(&mut out, SALT, RecordKind::Message, meta.len() as u32, seq as u64, 99, &[meta, body]);
        }
        out
    }

    #[test]
    fn file_header_round_trips_and_rejects_other_versions() {
        let header = FileHeader { magic: ACK_MAGIC, file_id: 3, queue_id: 0, base_seq: 0, created_ms: 1234, salt: 9 };
        let mut bytes = header.encode();
        let path = Path::new("x");
        assert_eq!(FileHeader::decode(&bytes, ACK_MAGIC, path).unwrap(), header);
        assert!(matches!(FileHeader::decode(&bytes, SEGMENT_MAGIC, path), Err(StoreError::Format { .. })));
        bytes[8] = 2;
        let crc = crc32c::crc32c(&bytes[0..60]);
        bytes[60..64].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(FileHeader::decode(&bytes, ACK_MAGIC, path), Err(StoreError::Format { .. })));
    }

    #[test]
    fn records_round_trip() {
        let bytes = file_with(&[(b"m1", b"body one"), (b"", b""), (b"meta", b"3")]);
        let scan = scan_records(&bytes, SALT, RECORD_BYTES_MAX);
        assert!(scan.damaged.is_empty());
        assert_eq!(scan.records.len(), 3);
        assert_eq!(scan.valid_end, bytes.len() as u64);
        let first = scan.records[0];
        let start = first.offset as usize + RECORD_HEADER_BYTES;
        assert_eq!(&bytes[start..start + 2], b"m1");
        assert_eq!(first.header.aux, 2);
    }

    #[test]
    fn every_flipped_bit_in_a_middle_record_is_skipped_and_neighbours_survive() {
        let clean = file_with(&[(b"a", b"first record"), (b"b", b"second record"), (b"c", b"third")]);
        let clean_scan = scan_records(&clean, SALT, RECORD_BYTES_MAX);
        let middle = clean_scan.records[1];
        let middle_end = middle.offset as usize + middle.header.record_bytes as usize;
        for byte in middle.offset as usize..middle_end {
            for bit in 0..8 {
                let mut bytes = clean.clone();
                bytes[byte] ^= 1 << bit;
                let scan = scan_records(&bytes, SALT, RECORD_BYTES_MAX);
                let seqs: Vec<u64> = scan.records.iter().map(|r| r.header.a).collect();
                assert_eq!(seqs, vec![0, 2], "byte {byte} bit {bit}");
                assert_eq!(
                    scan.damaged,
                    vec![DamagedRange { offset: middle.offset, bytes: middle.header.record_bytes as u64 }]
                );
            }
        }
    }

    #[test]
    fn torn_tail_is_not_a_record() {
        let bytes = file_with(&[(b"a", b"first"), (b"b", b"second")]);
        let full = scan_records(&bytes, SALT, RECORD_BYTES_MAX);
        for cut in (full.records[1].offset as usize + 1)..bytes.len() {
            let scan = scan_records(&bytes[..cut], SALT, RECORD_BYTES_MAX);
            assert_eq!(scan.records.len(), 1);
            assert_eq!(scan.valid_end, full.records[1].offset);
        }
    }

    #[test]
    fn a_record_inside_a_body_is_not_found_by_resync() {
        let mut forged = Vec::new();
        encode_record(&mut forged, SALT ^ 1, RecordKind::Message, 0, 42, 0, &[b"forged"]);
        let mut bytes = file_with(&[(b"", b"x"), (b"", &forged)]);
        // Damage the header of the carrier record: the scan must not pick up the forged one.
        let carrier = scan_records(&bytes, SALT, RECORD_BYTES_MAX).records[1].offset as usize;
        bytes[carrier + 5] ^= 0xFF;
        let scan = scan_records(&bytes, SALT, RECORD_BYTES_MAX);
        assert_eq!(scan.records.len(), 1);
        assert!(scan.records.iter().all(|r| r.header.a != 42));
    }

    #[test]
    fn length_over_the_limit_is_refused_before_reading() {
        let bytes = file_with(&[(b"", &[7u8; 100])]);
        let scan = scan_records(&bytes, SALT, RECORD_HEADER_BYTES + 50);
        assert!(scan.records.is_empty());
    }
}
