//! Counters of the serving engine, shared between the scheduler thread (which updates them) and
//! the server (which renders them as Prometheus text at `/metrics`).
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

/// Upper bounds (seconds) of the time-to-first-token histogram's buckets.
pub const TTFT_BUCKETS: [f64; 10] = [0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    pub requests: AtomicU64,
    pub requests_finished: AtomicU64,
    pub requests_cancelled: AtomicU64,
    pub requests_rejected: AtomicU64,
    pub requests_failed: AtomicU64,
    pub preemptions: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub steps: AtomicU64,
    /// Sequences in the last step's batch.
    pub batch_size: AtomicU64,
    /// Sequences over all steps (divided by `steps`: the mean batch size).
    pub batched_sequences: AtomicU64,
    pub waiting: AtomicU64,
    pub running: AtomicU64,
    pub kv_blocks_used: AtomicU64,
    pub kv_blocks_total: AtomicU64,
    /// Cached prefix blocks that no sequence holds.
    pub kv_blocks_cached: AtomicU64,
    /// Prompt tokens whose keys and values came from the prefix cache instead of a prefill.
    pub prefix_cache_hit_tokens: AtomicU64,
    /// Histogram of time to first token: counts per bucket of [`TTFT_BUCKETS`] (not cumulative)
    /// and the overflow, their sum in microseconds.
    ttft_counts: [AtomicU64; TTFT_BUCKETS.len() + 1],
    ttft_sum_us: AtomicU64,
    /// Generated tokens and busy time (microseconds) of the steps, for the decode rate.
    busy_us: AtomicU64,
    /// The steps' time split by [`StepPhase`] (microseconds).
    phase_us: [AtomicU64; 3],
}

/// Where a step's time goes: the batched forward pass (to the logits on the host), sampling the
/// next tokens, and emitting them (detokenizing, stop strings, sending to the clients).
#[derive(Debug, Clone, Copy)]
pub enum StepPhase {
    Forward = 0,
    Sampling = 1,
    Emit = 2,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            requests: AtomicU64::new(0),
            requests_finished: AtomicU64::new(0),
            requests_cancelled: AtomicU64::new(0),
            requests_rejected: AtomicU64::new(0),
            requests_failed: AtomicU64::new(0),
            preemptions: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            steps: AtomicU64::new(0),
            batch_size: AtomicU64::new(0),
            batched_sequences: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            running: AtomicU64::new(0),
            kv_blocks_used: AtomicU64::new(0),
            kv_blocks_total: AtomicU64::new(0),
            kv_blocks_cached: AtomicU64::new(0),
            prefix_cache_hit_tokens: AtomicU64::new(0),
            ttft_counts: Default::default(),
            ttft_sum_us: AtomicU64::new(0),
            busy_us: AtomicU64::new(0),
            phase_us: Default::default(),
        }
    }
}

impl Metrics {
    pub fn observe_ttft(&self, secs: f64) {
        let i = TTFT_BUCKETS.iter().position(|&b| secs <= b).unwrap_or(TTFT_BUCKETS.len());
        self.ttft_counts[i].fetch_add(1, Relaxed);
        self.ttft_sum_us.fetch_add((secs * 1e6) as u64, Relaxed);
    }

    pub fn add_busy(&self, secs: f64) {
        self.busy_us.fetch_add((secs * 1e6) as u64, Relaxed);
    }

    pub fn add_phase(&self, phase: StepPhase, secs: f64) {
        self.phase_us[phase as usize].fetch_add((secs * 1e6) as u64, Relaxed);
    }

    /// Generated tokens per second of time spent in steps.
    pub fn tokens_per_second(&self) -> f64 {
        let busy = self.busy_us.load(Relaxed) as f64 / 1e6;
        if busy > 0.0 {
            self.generated_tokens.load(Relaxed) as f64 / busy
        } else {
            0.0
        }
    }

    /// The Prometheus text exposition of every metric, labelled with `model`.
    pub fn render(&self, model: &str) -> String {
        let label = format!("{{model=\"{}\"}}", model.replace('\\', "\\\\").replace('"', "\\\""));
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            out += &format!("# HELP awq_run_{name} {help}\n# TYPE awq_run_{name} {kind}\nawq_run_{name}{label} {value}\n");
        };
        let c = |a: &AtomicU64| a.load(Relaxed).to_string();
        metric("requests_total", "counter", "Requests accepted.", c(&self.requests));
        metric("requests_finished_total", "counter", "Requests that ran to their end.", c(&self.requests_finished));
        metric("requests_cancelled_total", "counter", "Requests whose client went away first.", c(&self.requests_cancelled));
        metric("requests_rejected_total", "counter", "Requests refused with 429/503 (queue or KV cache full).", c(&self.requests_rejected));
        metric("requests_failed_total", "counter", "Requests ended by an engine error.", c(&self.requests_failed));
        metric("preemptions_total", "counter", "Sequences swapped out of a full KV cache and recomputed later.", c(&self.preemptions));
        metric("prompt_tokens_total", "counter", "Prompt tokens of the requests accepted.", c(&self.prompt_tokens));
        metric("generation_tokens_total", "counter", "Tokens generated.", c(&self.generated_tokens));
        metric("steps_total", "counter", "Batched forward steps run.", c(&self.steps));
        metric("batch_size", "gauge", "Sequences in the last step.", c(&self.batch_size));
        metric("batched_sequences_total", "counter", "Sequences over all steps (over steps_total: the mean batch size).", c(&self.batched_sequences));
        metric("queue_depth", "gauge", "Requests waiting to be admitted.", c(&self.waiting));
        metric("running_sequences", "gauge", "Sequences being generated.", c(&self.running));
        metric("kv_blocks_used", "gauge", "KV cache blocks in use.", c(&self.kv_blocks_used));
        metric("kv_blocks_total", "gauge", "KV cache blocks in all.", c(&self.kv_blocks_total));
        metric("kv_blocks_cached", "gauge", "Cached prompt-prefix blocks held by no sequence (reused by prompts that start the same way, evicted when the pool runs short).", c(&self.kv_blocks_cached));
        metric("prefix_cache_hit_tokens_total", "counter", "Prompt tokens taken from the prefix cache instead of computed.", c(&self.prefix_cache_hit_tokens));
        metric("generation_tokens_per_second", "gauge", "Tokens generated per second of engine busy time.", format!("{:.3}", self.tokens_per_second()));
        let secs = |a: &AtomicU64| format!("{:.6}", a.load(Relaxed) as f64 / 1e6);
        metric("step_seconds_total", "counter", "Time spent in steps.", secs(&self.busy_us));
        metric("step_forward_seconds_total", "counter", "Time of the steps' batched forward passes, to the logits on the host.", secs(&self.phase_us[0]));
        metric("step_sampling_seconds_total", "counter", "Time of the steps' sampling.", secs(&self.phase_us[1]));
        metric("step_emit_seconds_total", "counter", "Time of the steps' detokenizing, stop strings and sending to clients.", secs(&self.phase_us[2]));
        metric("uptime_seconds", "gauge", "Seconds since the engine started.", format!("{:.3}", self.started.elapsed().as_secs_f64()));
        if let Some(rss) = resident_bytes() {
            out += &format!("# HELP process_resident_memory_bytes Resident memory of the server process.\n# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {rss}\n");
        }
        out += "# HELP awq_run_time_to_first_token_seconds Time from a request's arrival to its first token.\n";
        out += "# TYPE awq_run_time_to_first_token_seconds histogram\n";
        let inner = &label[1..label.len() - 1];
        let mut cumulative = 0;
        for (i, b) in TTFT_BUCKETS.iter().enumerate() {
            cumulative += self.ttft_counts[i].load(Relaxed);
            out += &format!("awq_run_time_to_first_token_seconds_bucket{{{inner},le=\"{b}\"}} {cumulative}\n");
        }
        cumulative += self.ttft_counts[TTFT_BUCKETS.len()].load(Relaxed);
        out += &format!("awq_run_time_to_first_token_seconds_bucket{{{inner},le=\"+Inf\"}} {cumulative}\n");
        out += &format!("awq_run_time_to_first_token_seconds_sum{label} {:.6}\n", self.ttft_sum_us.load(Relaxed) as f64 / 1e6);
        out += &format!("awq_run_time_to_first_token_seconds_count{label} {cumulative}\n");
        out
    }
}

/// The process's resident memory (Linux: VmRSS of /proc/self/status), the standard Prometheus
/// process metric, so a soak run can see memory stay flat.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text_with_a_cumulative_histogram() {
        let m = Metrics::default();
        m.requests.fetch_add(3, Relaxed);
        m.observe_ttft(0.03);
        m.observe_ttft(0.2);
        m.observe_ttft(100.0);
        let t = m.render("tiny \"x\"");
        assert!(t.contains("awq_run_requests_total{model=\"tiny \\\"x\\\"\"} 3\n"), "{t}");
        assert!(t.contains("le=\"0.05\"} 1\n") && t.contains("le=\"0.25\"} 2\n") && t.contains("le=\"+Inf\"} 3\n"), "{t}");
        assert!(t.contains("awq_run_time_to_first_token_seconds_count{model=\"tiny \\\"x\\\"\"} 3\n"));
        // Every sample line is `name{labels} number`.
        for line in t.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
