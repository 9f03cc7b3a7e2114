//! `state_file`: see `hass_edge_fuzz::drive::state_file`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hass_edge_fuzz::drive::state_file(data));
