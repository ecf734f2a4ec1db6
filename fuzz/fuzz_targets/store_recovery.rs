//! Fuzz target `store_recovery`: opening the store and the definitions log over a data directory
//! image of arbitrary bytes, in memory (format and checks in `wharf_fuzz::store_image`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wharf_fuzz::store_image::check_image(data));
