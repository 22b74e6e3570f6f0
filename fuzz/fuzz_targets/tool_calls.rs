//! libFuzzer entry of the `tool_calls` target (the body is `awq_run_fuzz::run("tool_calls", ..)`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    awq_run_fuzz::run("tool_calls", data);
});
