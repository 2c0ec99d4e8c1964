#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| aegis_mqtt::fuzz_logic::io(data));
