//! `awq-run bench-serve`: a load client for a running server. N clients each send streamed
//! completions one after another (fixed prompt and output lengths: `ignore_eos`), and the run
//! reports aggregate output tokens/s, time to first token and inter-token latency (p50 / p99),
//! and the server's mean batch size over the run (from its /metrics).
//!
//! Every request's prompt starts with its own number unless the prompt is to be shared, so that
//! a server's prefix cache serves none of it: the table then measures batching, not the cache.
use crate::error::{Error, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// One level of a run.
#[derive(Debug, Clone)]
pub struct LoadLevel {
    pub clients: usize,
    pub requests: usize,
    pub output_tokens: usize,
    /// The mean prompt length in the server's tokens (its `usage`): the load client's N short
    /// words are N tokens for SmolLM2's tokenizer, about 4 N for the dummy model's one per byte.
    pub prompt_tokens: f64,
    /// Of those, the mean the server took from its prefix cache (its /metrics; NaN if it does
    /// not say).
    pub cached_tokens: f64,
    pub wall_secs: f64,
    pub ttft: Vec<f64>,
    pub itl: Vec<f64>,
    pub mean_batch: f64,
    /// The server's mean step over the run in seconds: all of it, then its forward pass,
    /// sampling and emitting (NaN where /metrics does not say).
    pub step_secs: [f64; 4],
}

impl LoadLevel {
    pub fn tokens_per_second(&self) -> f64 {
        self.output_tokens as f64 / self.wall_secs.max(1e-9)
    }

    /// Aggregate decode throughput: the clients' streams each advance one token per mean
    /// inter-token gap, so together `clients / mean ITL` tokens a second while they decode (the
    /// prompts' prefill, which `tokens_per_second` counts in its wall time, left out).
    pub fn decode_tokens_per_second(&self) -> f64 {
        if self.itl.is_empty() {
            return f64::NAN;
        }
        let mean = self.itl.iter().sum::<f64>() / self.itl.len() as f64;
        self.clients as f64 / mean.max(1e-12)
    }
}

/// The `q`-quantile (0..=1) of `v`, by nearest rank.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1]
}

/// What one streamed request measured.
struct Sample {
    ttft: f64,
    gaps: Vec<f64>,
    tokens: usize,
    prompt_tokens: usize,
}

fn one_request(url: &str, model: &str, prompt: &str, gen: usize, key: Option<&str>) -> Result<Sample> {
    let body = json!({"model": model, "prompt": prompt, "max_tokens": gen, "ignore_eos": true, "temperature": 0.8,
                      "stream": true, "stream_options": {"include_usage": true}});
    let mut req = ureq::post(&format!("{url}/v1/completions")).timeout(Duration::from_secs(600));
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    let t0 = Instant::now();
    let resp = req.send_json(body).map_err(|e| Error::msg(format!("{url}: {e}")))?;
    let (mut first, mut last, mut gaps, mut tokens, mut prompt_tokens) = (None, None, Vec::new(), 0, 0);
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line.map_err(|e| Error::msg(format!("{url}: {e}")))?;
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).map_err(|e| Error::msg(format!("{url}: bad chunk {data}: {e}")))?;
        if let Some(e) = v.get("error") {
            return Err(Error::msg(format!("{url}: {e}")));
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = n as usize;
        }
        if let Some(n) = v["usage"]["prompt_tokens"].as_u64() {
            prompt_tokens = n as usize;
        }
        if v["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()) {
            let now = Instant::now();
            match last {
                None => first = Some(now.duration_since(t0).as_secs_f64()),
                Some(l) => gaps.push(now.duration_since(l).as_secs_f64()),
            }
            last = Some(now);
        }
    }
    Ok(Sample { ttft: first.unwrap_or(f64::NAN), gaps, tokens, prompt_tokens })
}

/// An `awq_run_NAME` sample of the server's /metrics (NaN where it cannot be read).
fn metric(url: &str, name: &str) -> f64 {
    metric_line(url, &format!("awq_run_{name}{{"))
}

/// The value of the first /metrics line starting with `prefix`.
fn metric_line(url: &str, prefix: &str) -> f64 {
    ureq::get(&format!("{url}/metrics"))
        .call()
        .ok()
        .and_then(|r| r.into_string().ok())
        .and_then(|t| t.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()?.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// Requests sent by this process so far: the number that makes each prompt its own.
static SENT: AtomicUsize = AtomicUsize::new(0);

/// The prompt of the next request: `prompt` itself if `shared`, else `prompt` after the
/// request's own number (a fixed width, so every prompt has the same length).
fn next_prompt(prompt: &str, shared: bool) -> String {
    let n = SENT.fetch_add(1, Ordering::Relaxed);
    if shared {
        prompt.to_string()
    } else {
        format!("{:05} {prompt}", n % 100_000)
    }
}

/// Runs `clients` clients of `per_client` requests each against `url`, each request with a
/// prompt of its own unless `shared` (see the module's note).
pub fn run_level(url: &str, clients: usize, per_client: usize, prompt: &str, shared: bool, gen: usize, key: Option<&str>) -> Result<LoadLevel> {
    let model: Value = ureq::get(&format!("{url}/v1/models")).call().map_err(|e| Error::msg(format!("{url}: {e}")))?.into_json().map_err(|e| Error::msg(e.to_string()))?;
    let model = model["data"][0]["id"].as_str().unwrap_or_default().to_string();
    let (steps0, seqs0) = (metric(url, "steps_total"), metric(url, "batched_sequences_total"));
    let cached0 = metric(url, "prefix_cache_hit_tokens_total");
    const PHASES: [&str; 4] = ["step_seconds_total", "step_forward_seconds_total", "step_sampling_seconds_total", "step_emit_seconds_total"];
    let phases0 = PHASES.map(|p| metric(url, p));
    let t0 = Instant::now();
    let samples: Vec<Result<Vec<Sample>>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..clients).map(|_| s.spawn(|| (0..per_client).map(|_| one_request(url, &model, &next_prompt(prompt, shared), gen, key)).collect::<Result<Vec<_>>>())).collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(Error::msg("a client thread panicked")))).collect()
    });
    let wall = t0.elapsed().as_secs_f64();
    let (steps, seqs) = (metric(url, "steps_total") - steps0, metric(url, "batched_sequences_total") - seqs0);
    let cached = metric(url, "prefix_cache_hit_tokens_total") - cached0;
    let mut step_secs = PHASES.map(|p| metric(url, p));
    for (v, v0) in step_secs.iter_mut().zip(phases0) {
        *v = (*v - v0) / steps;
    }
    let mut level = LoadLevel { clients, requests: 0, output_tokens: 0, prompt_tokens: 0.0, cached_tokens: 0.0, wall_secs: wall, ttft: vec![], itl: vec![], mean_batch: seqs / steps, step_secs };
    for s in samples {
        for r in s? {
            level.requests += 1;
            level.output_tokens += r.tokens;
            level.prompt_tokens += r.prompt_tokens as f64;
            level.ttft.push(r.ttft);
            level.itl.extend(r.gaps);
        }
    }
    level.prompt_tokens /= level.requests.max(1) as f64;
    level.cached_tokens = cached / level.requests.max(1) as f64;
    Ok(level)
}

/// What a soak run saw.
#[derive(Debug, Default, Clone)]
pub struct SoakReport {
    pub secs: f64,
    pub completed: usize,
    pub disconnected: usize,
    /// 429 / 503 answers (the intended refusals of a full queue or cache).
    pub refused: usize,
    /// Anything else: transport errors, other statuses, error chunks.
    pub errors: Vec<String>,
    pub output_tokens: usize,
    /// The server's resident memory (MiB) sampled every 2 s through the run.
    pub rss_mib: Vec<f64>,
    pub kv_blocks_used_after: f64,
    pub failed_after: f64,
}

impl SoakReport {
    pub fn ok(&self) -> bool {
        self.errors.is_empty() && self.kv_blocks_used_after == 0.0 && self.failed_after == 0.0
    }
}

/// One soak request: a random prompt and length, streamed or whole, and for about one in five
/// a client that goes away after a few chunks; about one in four asks for two choices, one in
/// four for log-probabilities, one in eight has its prompt echoed and scored (one in sixteen
/// with nothing generated), one in four is held to a grammar (a regex, a list of choices, a JSON
/// schema) or biases tokens.
fn soak_request(url: &str, model: &str, rng: &mut crate::rng::Rng, max_prompt: usize, max_gen: usize, r: &mut SoakReport) {
    let words = ["river", "stone", "light", "forest", "quiet", "engine", "paper", "window", "cloud", "garden"];
    let n = 1 + (rng.next_u64() as usize) % max_prompt;
    let prompt: Vec<&str> = (0..n).map(|_| words[(rng.next_u64() % 10) as usize]).collect();
    let gen = 1 + (rng.next_u64() as usize) % max_gen;
    let stream = !rng.next_u64().is_multiple_of(4);
    let leave_after = rng.next_u64().is_multiple_of(5).then(|| 1 + (rng.next_u64() % 8) as usize);
    let mut body = json!({"model": model, "prompt": prompt.join(" "), "max_tokens": gen, "temperature": 0.9,
                          "seed": rng.next_u64() >> 1, "stream": stream, "ignore_eos": rng.next_u64().is_multiple_of(2)});
    if rng.next_u64().is_multiple_of(4) {
        body["n"] = json!(2);
    }
    if rng.next_u64().is_multiple_of(4) {
        body["logprobs"] = json!(rng.next_u64() % 4);
    }
    if rng.next_u64().is_multiple_of(8) {
        body["echo"] = json!(true);
        body["logprobs"] = json!(1);
        if rng.next_u64().is_multiple_of(2) {
            body["max_tokens"] = json!(0);
        }
    }
    match rng.next_u64() % 16 {
        0 => body["guided_regex"] = json!("[a-z]+( [a-z]+){0,40}\\."),
        1 => body["guided_choice"] = json!(words),
        2 => {
            let schema = json!({"type": "object", "properties": {"word": {"enum": words}, "count": {"type": "integer"}}, "required": ["word", "count"]});
            body["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "soak", "schema": schema}});
        }
        3 => body["logit_bias"] = json!({"100": 5, "200": -100}),
        _ => {}
    }
    let resp = match ureq::post(&format!("{url}/v1/completions")).timeout(Duration::from_secs(300)).send_json(body) {
        Ok(resp) => resp,
        Err(ureq::Error::Status(429 | 503, _)) => {
            r.refused += 1;
            // As a polite client does with Retry-After, a little shorter.
            std::thread::sleep(Duration::from_millis(200));
            return;
        }
        Err(e) => {
            r.errors.push(e.to_string());
            return;
        }
    };
    if !stream {
        match resp.into_json::<Value>() {
            Ok(v) => {
                r.output_tokens += v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize;
                r.completed += 1;
            }
            Err(e) => r.errors.push(format!("bad body: {e}")),
        }
        return;
    }
    let mut chunks = 0;
    for line in BufReader::new(resp.into_reader()).lines() {
        let Ok(line) = line else {
            r.errors.push("the stream broke".into());
            return;
        };
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            r.completed += 1;
            return;
        }
        if data.contains("\"error\"") {
            r.errors.push(data.to_string());
            return;
        }
        chunks += 1;
        r.output_tokens += 1;
        if leave_after.is_some_and(|k| chunks >= k) {
            r.disconnected += 1;
            return; // dropping the reader closes the connection
        }
    }
    r.errors.push("the stream ended without [DONE]".into());
}

/// `clients` clients sending random requests (see `soak_request`) for `secs` seconds; then waits
/// for the server to go idle and reads its KV blocks in use and failed requests.
pub fn soak(url: &str, secs: f64, clients: usize, max_prompt: usize, max_gen: usize) -> Result<SoakReport> {
    let model: Value = ureq::get(&format!("{url}/v1/models")).call().map_err(|e| Error::msg(format!("{url}: {e}")))?.into_json().map_err(|e| Error::msg(e.to_string()))?;
    let model = model["data"][0]["id"].as_str().unwrap_or_default().to_string();
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(secs);
    let done = std::sync::atomic::AtomicBool::new(false);
    let rss = std::sync::Mutex::new(Vec::new());
    let reports: Vec<SoakReport> = std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                rss.lock().unwrap().push(metric_line(url, "process_resident_memory_bytes ") / (1 << 20) as f64);
                std::thread::sleep(Duration::from_secs(2));
            }
        });
        let hs: Vec<_> = (0..clients)
            .map(|c| {
                let model = &model;
                s.spawn(move || {
                    let mut rng = crate::rng::Rng::new(1000 + c as u64);
                    let mut r = SoakReport::default();
                    while Instant::now() < deadline {
                        soak_request(url, model, &mut rng, max_prompt, max_gen, &mut r);
                    }
                    r
                })
            })
            .collect();
        let out = hs.into_iter().map(|h| h.join().unwrap_or_default()).collect();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        out
    });
    let mut total = SoakReport { secs: t0.elapsed().as_secs_f64(), ..Default::default() };
    for r in reports {
        total.completed += r.completed;
        total.disconnected += r.disconnected;
        total.refused += r.refused;
        total.output_tokens += r.output_tokens;
        total.errors.extend(r.errors);
    }
    // Cancelled sequences leave at the server's next step.
    let idle = Instant::now();
    while metric(url, "running_sequences") > 0.0 && idle.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
    }
    total.kv_blocks_used_after = metric(url, "kv_blocks_used");
    total.failed_after = metric(url, "requests_failed_total");
    total.rss_mib = rss.into_inner().unwrap_or_default();
    Ok(total)
}

/// The table of a run, in Markdown.
pub fn table(levels: &[LoadLevel]) -> String {
    let base = levels.first().map(|l| l.tokens_per_second()).unwrap_or(1.0);
    let base_decode = levels.first().map(|l| l.decode_tokens_per_second()).unwrap_or(1.0);
    let mut t = String::from("| clients | requests | prompt tokens (cached) | output tok/s | vs 1 client | decode tok/s | vs 1 client | mean batch | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | step ms (forward / sampling / emit) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for l in levels {
        let ms = |x: f64| format!("{:.1} ms", x * 1e3);
        t += &format!(
            "| {} | {} | {:.0} ({:.0}) | {:.1} | {:.2}× | {:.1} | {:.2}× | {:.1} | {} | {} | {} | {} | {:.2} ({:.2} / {:.2} / {:.2}) |\n",
            l.clients,
            l.requests,
            l.prompt_tokens,
            l.cached_tokens,
            l.tokens_per_second(),
            l.tokens_per_second() / base,
            l.decode_tokens_per_second(),
            l.decode_tokens_per_second() / base_decode,
            l.mean_batch,
            ms(quantile(&l.ttft, 0.5)),
            ms(quantile(&l.ttft, 0.99)),
            ms(quantile(&l.itl, 0.5)),
            ms(quantile(&l.itl, 0.99)),
            l.step_secs[0] * 1e3,
            l.step_secs[1] * 1e3,
            l.step_secs[2] * 1e3,
            l.step_secs[3] * 1e3,
        );
    }
    t
}

/// The summary of a run whose levels went in turn `rounds.len()` times (each round the same
/// levels in the same order): per level the median over the rounds of output and decode tok/s
/// and of each round's ratios to its own first level, in Markdown. On a machine whose speed
/// drifts, a ratio within one round compares levels minutes apart; the median of several
/// rounds' ratios is the steadier figure.
pub fn rounds_summary(rounds: &[Vec<LoadLevel>]) -> String {
    let median = |mut v: Vec<f64>| -> f64 {
        v.retain(|x| !x.is_nan());
        if v.is_empty() {
            return f64::NAN;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
    };
    let levels = rounds.first().map_or(0, Vec::len);
    let mut t = format!("medians over {} rounds:\n| clients | output tok/s | vs first level | decode tok/s | vs first level | each round's output ratio |\n|---|---|---|---|---|---|\n", rounds.len());
    for i in 0..levels {
        let of = |f: &dyn Fn(&[LoadLevel]) -> f64| -> Vec<f64> { rounds.iter().filter(|r| r.len() == levels).map(|r| f(r)).collect() };
        let out = of(&|r| r[i].tokens_per_second());
        let ratio = of(&|r| r[i].tokens_per_second() / r[0].tokens_per_second());
        let each: Vec<String> = ratio.iter().map(|x| format!("{x:.2}×")).collect();
        t += &format!(
            "| {} | {:.1} | {:.2}× | {:.1} | {:.2}× | {} |\n",
            rounds[0][i].clients,
            median(out),
            median(ratio),
            median(of(&|r| r[i].decode_tokens_per_second())),
            median(of(&|r| r[i].decode_tokens_per_second() / r[0].decode_tokens_per_second())),
            each.join(" "),
        );
    }
    t
}

#[cfg(test)]
mod tests {
    #[test]
    fn rounds_give_medians_of_each_rounds_ratio() {
        let level = |clients: usize, wall_secs: f64| super::LoadLevel { clients, requests: clients, output_tokens: 100 * clients, prompt_tokens: 12.0, cached_tokens: 0.0, wall_secs, ttft: vec![0.5], itl: vec![0.01], mean_batch: 1.0, step_secs: [0.01; 4] };
        // One stream at 100, 50 and 80 tok/s; eight at 400, 300 and 320: ratios 4, 6 and 4.
        let rounds = vec![vec![level(1, 1.0), level(8, 2.0)], vec![level(1, 2.0), level(8, 8.0 / 3.0)], vec![level(1, 1.25), level(8, 2.5)]];
        let t = super::rounds_summary(&rounds);
        assert!(t.starts_with("medians over 3 rounds:"), "{t}");
        assert!(t.contains("| 1 | 80.0 | 1.00× |"), "{t}");
        assert!(t.contains("| 8 | 320.0 | 4.00× | 800.0 | 8.00× | 4.00× 6.00× 4.00× |"), "{t}");
    }

    #[test]
    fn decode_throughput_is_clients_over_the_mean_gap() {
        let l = super::LoadLevel { clients: 4, requests: 4, output_tokens: 40, prompt_tokens: 12.0, cached_tokens: 0.0, wall_secs: 2.0, ttft: vec![0.5], itl: vec![0.01, 0.03], mean_batch: 4.0, step_secs: [0.01, 0.008, 0.001, 0.001] };
        assert!((l.decode_tokens_per_second() - 200.0).abs() < 1e-9);
        assert!((l.tokens_per_second() - 20.0).abs() < 1e-9);
        let t = super::table(&[l]);
        assert!(t.contains("| 4 | 4 | 12 (0) | 20.0 | 1.00× | 200.0 | 1.00× | 4.0 |"), "{t}");
        assert!(t.contains("| 10.00 (8.00 / 1.00 / 1.00) |"), "{t}");
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let v = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(super::quantile(&v, 0.5), 3.0);
        assert_eq!(super::quantile(&v, 0.99), 5.0);
        assert_eq!(super::quantile(&v, 0.0), 1.0);
        assert!(super::quantile(&[], 0.5).is_nan());
    }

    #[test]
    fn prompts_are_numbered_unless_shared() {
        let (a, b) = (super::next_prompt("the cat", false), super::next_prompt("the cat", false));
        assert!(a != b && a.len() == b.len() && a.ends_with(" the cat"), "{a} / {b}");
        assert_eq!(super::next_prompt("the cat", true), "the cat");
    }
}
