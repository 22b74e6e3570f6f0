//! libFuzzer entry of the `request` target (the body is `awq_run_fuzz::run("request", ..)`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    awq_run_fuzz::run("request", data);
});
