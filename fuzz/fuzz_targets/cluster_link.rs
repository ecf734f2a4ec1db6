//! Fuzz target `cluster_link`: the cluster link's handshake and frame decoder over arbitrary
//! bytes from another node (checks in `wharf_fuzz::cluster::check_cluster_link`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wharf_fuzz::cluster::check_cluster_link(data));
