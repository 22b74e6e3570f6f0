//! libFuzzer entry of the `awq_linear` target (the body is `awq_run_fuzz::run("awq_linear", ..)`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    awq_run_fuzz::run("awq_linear", data);
});
