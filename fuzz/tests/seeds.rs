//! The seed corpus as a test: `WHARF_FUZZ_WRITE_SEEDS=1 cargo test --test seeds` (re)writes the
//! generated seeds to `fuzz/corpus/<target>/`; every run then feeds every committed file there
//! through its target's checks, so a seed that stopped being valid, or a regression input saved
//! there after a fix, fails a plain `cargo test` in `fuzz/`.

use std::path::{Path, PathBuf};
use wharf_fuzz::{cluster, definitions, frames, mqtt, seeds, store_image, tables};

type Check = fn(&[u8]);

fn targets() -> Vec<(&'static str, Vec<seeds::Seed>, Check)> {
    vec![
        ("frame", seeds::frame_seeds(), frames::check_stream as Check),
        ("field_table", seeds::field_table_seeds(), tables::check_field_table),
        ("sasl", seeds::sasl_seeds(), tables::check_sasl),
        ("store_recovery", seeds::store_seeds(), store_image::check_image),
        ("definitions", definitions::definitions_seeds(), definitions::check_definitions),
        ("mqtt_packet", mqtt::mqtt_seeds(), mqtt::check_mqtt),
        ("cluster_link", cluster::cluster_seeds(), cluster::check_cluster_link),
    ]
}

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target)
}

#[test]
fn every_committed_seed_passes_its_target() {
    let write = std::env::var_os("WHARF_FUZZ_WRITE_SEEDS").is_some();
    for (target, generated, check) in targets() {
        let dir = corpus_dir(target);
        if write {
            std::fs::create_dir_all(&dir).unwrap();
            for (name, bytes) in &generated {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
        }
        let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|entry| entry.unwrap().path()).collect();
        files.sort();
        assert!(!files.is_empty(), "no seeds for {target}");
        for file in files {
            let bytes = std::fs::read(&file).unwrap();
            check(&bytes);
        }
    }
}

#[test]
fn the_generated_seeds_are_real() {
    // Frames: the whole stream decodes, with no error and nothing left over.
    for (name, bytes) in seeds::frame_seeds() {
        let decoder = wharf_wire::FrameDecoder::new(wharf_wire::frame::FRAME_MAX_LIMIT);
        let (frames, error) = frames::decode_all(&decoder, &bytes[1..], bytes.len());
        assert_eq!(error, None, "{name}");
        assert!(frames.len() >= 2, "{name}");
    }
    for (name, bytes) in seeds::field_table_seeds() {
        assert!(wharf_wire::frame::decode_field_table(&bytes).is_some(), "{name}");
    }
    for (name, bytes) in seeds::sasl_seeds() {
        let mechanism = if bytes[0] == 0 { "PLAIN" } else { "AMQPLAIN" };
        let credentials = wharf_wire::sasl::parse_response(mechanism, &bytes[1..]).unwrap().unwrap();
        assert_eq!(credentials.username, "orders", "{name}");
    }
    // Store images: recovery finds the messages and definitions the seed left.
    for (name, bytes) in seeds::store_seeds() {
        let sim = wharf_store::SimFs::new(0);
        let root = Path::new(store_image::DATA_DIR);
        store_image::write_image(sim.shared().as_ref(), root, &bytes);
        let (_, definitions) = wharf_store::MetaStore::open(sim.shared(), root.join(store_image::META_SUBDIR)).unwrap();
        assert_eq!(definitions.entries.len(), 2, "{name}");
        let (_, recovered) = wharf_store::Store::open(sim.shared(), root, store_image::config()).unwrap();
        let live: usize = recovered.queues.values().map(Vec::len).sum();
        assert!(live >= 3, "{name}: {live} live messages");
        assert_eq!(recovered.clean_stop, name != "crashed", "{name}");
    }
}
