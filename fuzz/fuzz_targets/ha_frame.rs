//! `ha_frame`: see `hass_edge_fuzz::drive::ha_frame`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hass_edge_fuzz::drive::ha_frame(data));
