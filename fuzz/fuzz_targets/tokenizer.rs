//! libFuzzer entry of the `tokenizer` target (the body is `awq_run_fuzz::run("tokenizer", ..)`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    awq_run_fuzz::run("tokenizer", data);
});
