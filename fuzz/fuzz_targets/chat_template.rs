//! libFuzzer entry of the `chat_template` target (the body is `awq_run_fuzz::run("chat_template", ..)`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    awq_run_fuzz::run("chat_template", data);
});
