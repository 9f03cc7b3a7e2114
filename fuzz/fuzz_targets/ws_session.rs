//! `ws_session`: see `hass_edge_fuzz::drive::ws_session`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hass_edge_fuzz::drive::ws_session(data));
