//! Shared code of Wharf's fuzz targets (issue #15): the properties each target checks, the input
//! formats that are more than raw bytes (a store directory image), and the makers of the seed
//! corpus. The targets in `fuzz_targets/` are thin: they hand libFuzzer's input to a `check_*`
//! function here, so the same checks also run as ordinary tests over the committed seeds
//! (`tests/seeds.rs`).
//!
//! Everything here is test code: a broken property is a panic, which libFuzzer reports as a crash
//! with the input that caused it.

pub mod cluster;
pub mod definitions;
pub mod frames;
pub mod mqtt;
pub mod seeds;
pub mod store_image;
pub mod tables;
