//! Fuzz target `field_table`: field tables in their wire and stored form, and the nesting walk
//! that guards the recursive parser (checks in `wharf_fuzz::tables`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wharf_fuzz::tables::check_field_table(data));
