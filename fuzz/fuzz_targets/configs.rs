//! libFuzzer entry of the `configs` target (the body is `awq_run_fuzz::run("configs", ..)`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    awq_run_fuzz::run("configs", data);
});
