//! Fuzz target `sasl`: SASL responses from `connection.start-ok` under PLAIN, AMQPLAIN and
//! mechanisms the server does not offer (checks in `wharf_fuzz::tables::check_sasl`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wharf_fuzz::tables::check_sasl(data));
