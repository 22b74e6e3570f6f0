//! `awq-run bench-serve`: concurrent streaming clients against a running server, as a table.
use anyhow::{bail, Result};
use awq_run::server::bench::{rounds_summary, run_level, table};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Concurrent clients, one level per value.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    pub clients: Vec<usize>,
    /// Requests each client sends, one after another.
    #[arg(long, default_value_t = 2)]
    pub requests_per_client: usize,
    /// Prompt length in words (about one token each).
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    /// Tokens generated per request (end-of-sequence tokens ignored, so every request is this long).
    #[arg(long, default_value_t = 128)]
    pub gen: usize,
    /// Send every request the same prompt, so that a server's prefix cache computes it once
    /// (by default each prompt starts with the request's number: the table measures batching).
    #[arg(long)]
    pub shared_prompt: bool,
    /// The server's --api-key, if it has one.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Run the levels in turn this many times (1, 8, 1, 8, ...): each round's table, then per
    /// level the medians over the rounds of tok/s and of each round's ratio to its first level
    /// (steadier where the machine's speed drifts between minutes).
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Instead of the table: a soak run of this many seconds (random prompt lengths up to
    /// --prompt-len, outputs up to --gen, streamed or whole, one client in five leaving early),
    /// failing unless it ends with no errors but 429/503, no KV blocks held and no failed request.
    #[arg(long)]
    pub soak: Option<f64>,
}

pub fn run(a: Args) -> Result<()> {
    if a.clients.contains(&0) || a.requests_per_client == 0 || a.gen == 0 || a.rounds == 0 {
        bail!("--clients, --requests-per-client, --gen and --rounds must be positive");
    }
    let url = a.url.trim_end_matches('/').to_string();
    if let Some(secs) = a.soak {
        let clients = a.clients.iter().copied().max().unwrap_or(32);
        eprintln!("{url}: soak for {secs} s with {clients} clients");
        let r = awq_run::server::bench::soak(&url, secs, clients, a.prompt_len, a.gen)?;
        // Memory after the first quarter (the KV pages and allocator pools touched once) against
        // the end: flat means no leak.
        let warm = r.rss_mib.get(r.rss_mib.len() / 4).copied().unwrap_or(f64::NAN);
        let (last, max) = (r.rss_mib.last().copied().unwrap_or(f64::NAN), r.rss_mib.iter().copied().fold(0.0, f64::max));
        println!("soak: {:.0} s, {clients} clients: {} completed, {} left early, {} refused (429/503), {} errors, {} output tokens", r.secs, r.completed, r.disconnected, r.refused, r.errors.len(), r.output_tokens);
        println!("after: {} KV blocks in use, {} failed requests; server RSS {warm:.0} MiB after a quarter of the run, {last:.0} MiB at the end, {max:.0} MiB at most", r.kv_blocks_used_after, r.failed_after);
        for e in r.errors.iter().take(10) {
            println!("  error: {e}");
        }
        if !r.ok() {
            bail!("the soak run failed");
        }
        return Ok(());
    }
    let words = ["the", "cat", "sat", "on", "a", "mat", "and", "looked", "at", "birds"];
    let prompt: Vec<&str> = (0..a.prompt_len).map(|i| words[i % words.len()]).collect();
    let prompt = prompt.join(" ");
    let whose = if a.shared_prompt { "one prompt for all" } else { "each after its request's number" };
    eprintln!("{url}: prompts of {} words ({whose}), {} tokens out per request, {} requests per client", a.prompt_len, a.gen, a.requests_per_client);
    // One request first, so the first level does not pay for a cold start.
    run_level(&url, 1, 1, &prompt, a.shared_prompt, 4.min(a.gen), a.api_key.as_deref())?;
    let mut rounds = Vec::new();
    for round in 1..=a.rounds {
        let mut levels = Vec::new();
        for &c in &a.clients {
            let l = run_level(&url, c, a.requests_per_client, &prompt, a.shared_prompt, a.gen, a.api_key.as_deref())?;
            eprintln!("{c:>3} clients: {:.1} output tok/s over {:.1} s", l.tokens_per_second(), l.wall_secs);
            levels.push(l);
        }
        if a.rounds > 1 {
            println!("round {round}:");
        }
        print!("{}", table(&levels));
        rounds.push(levels);
    }
    if a.rounds > 1 {
        print!("{}", rounds_summary(&rounds));
    }
    Ok(())
}
