//! Fuzz target `frame`: the frame decoder with method and content-header parsing, fed a
//! connection's byte stream whole and in pieces (checks in `wharf_fuzz::frames`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wharf_fuzz::frames::check_stream(data));
