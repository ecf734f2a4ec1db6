//! Fuzz target `definitions`: RabbitMQ definitions files as `--definitions` reads them (checks in
//! `wharf_fuzz::definitions::check_definitions`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wharf_fuzz::definitions::check_definitions(data));
