//! `config`: see `hass_edge_fuzz::drive::config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hass_edge_fuzz::drive::config(data));
