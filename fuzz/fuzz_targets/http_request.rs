//! `http_request`: see `hass_edge_fuzz::drive::http_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hass_edge_fuzz::drive::http_request(data));
