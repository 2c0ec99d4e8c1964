#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| aegis_layers::proxy_protocol::fuzz_logic::fuzz_entry(data));
