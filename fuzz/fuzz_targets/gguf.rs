//! libFuzzer entry of the `gguf` target (the body is `awq_run_fuzz::run("gguf", ..)`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    awq_run_fuzz::run("gguf", data);
});
