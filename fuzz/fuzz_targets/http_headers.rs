#![no_main]
// The http-gateway example's own header rules, the same file the gateway compiles (its
// package has no library to depend on).
#[allow(dead_code)]
#[path = "../../examples/http-gateway/headers.rs"]
mod headers;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = headers::fuzz::run(data);
});
