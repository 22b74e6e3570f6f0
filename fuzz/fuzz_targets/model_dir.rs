//! libFuzzer entry of the `model_dir` target (the body is `awq_run_fuzz::run("model_dir", ..)`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    awq_run_fuzz::run("model_dir", data);
});
