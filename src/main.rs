mod cli;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its option enum in v3's `mimalloc.h`; the sys crate names
/// no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() {
    // mimalloc gives freed memory back to the OS shortly after it is freed. A forward pass frees
    // its activations and the next one, milliseconds later, allocates them again, so every step
    // faulted its buffers in afresh and the kernel zeroed the pages (`clear_page_erms` was 9 % of
    // a 512-token CPU prefill's samples and 4 % of an 8-stream decode's). Without purging, six
    // SmolLM2 prefills of 512 tokens take 2,300 page faults instead of 13,000 (18,000 with a
    // delay of a second). Memory freed stays with the process for its next allocations: the peak
    // is what it was, and a server holds it between requests as llama-server holds its buffers.
    // The environment's MIMALLOC_PURGE_DELAY, if set, stays in charge.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one of mimalloc's options, a plain integer it reads when it purges.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
    if let Err(e) = cli::run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
