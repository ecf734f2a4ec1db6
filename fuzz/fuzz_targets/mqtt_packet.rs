//! Fuzz target `mqtt_packet`: the MQTT packet decoder over arbitrary client bytes, in 3.1.1,
//! 5.0, and before CONNECT (checks in `wharf_fuzz::mqtt::check_mqtt`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wharf_fuzz::mqtt::check_mqtt(data));
