//! `awq-run bench --batch 1,16,64`: the server's batched decode step without the server, as
//! llama.cpp's `llama-batched-bench` measures it. Each batch size gets its own sequences over a
//! paged KV pool ([`awq_run::model::paged`]): every sequence's prompt is prefilled alone (not
//! timed), then `gen` steps advance all of them by one greedy token in one
//! [`Model::forward_batch`] each. What the server adds around that step (scheduling, prompt
//! chunks of newly admitted requests, sampling settings, HTTP) is left out, so this is the
//! ceiling of its aggregate decode rate, and the per-step cost of each batch size.
use anyhow::{bail, Context, Result};
use awq_run::model::batch::StepSeq;
use awq_run::model::paged::{KvPool, SeqKv};
use awq_run::model::Model;
use candle_core::DType;
use serde::Serialize;
use std::time::Instant;

#[derive(Serialize)]
pub struct BatchRow {
    pub batch: usize,
    /// Tokens all sequences decode per second together (batch × gen / decode seconds).
    pub decode_tok_s: f64,
    /// Milliseconds of one step (all sequences one token, the argmax read back included).
    pub step_ms: f64,
    /// `decode_tok_s` over the first batch size's.
    pub vs_first: f64,
}

/// The decode seconds of `gen` batched steps over `batch` sequences whose prompts are `prompt`
/// rotated by the sequence's index (so that their tokens and caches differ).
fn decode_seconds(model: &Model, pool: &mut KvPool, prompt: &[u32], gen: usize, batch: usize) -> Result<f64> {
    let mut kvs: Vec<SeqKv> = (0..batch).map(|_| SeqKv::default()).collect();
    let mut next = Vec::with_capacity(batch);
    for (i, kv) in kvs.iter_mut().enumerate() {
        let mut p = prompt.to_vec();
        p.rotate_left(i % prompt.len());
        pool.reserve(kv, p.len() + gen)?;
        let logits = model.forward_batch(pool, &mut [StepSeq { tokens: &p, kv }])?;
        next.push(logits.argmax(1)?.to_vec1::<u32>()?[0]);
    }
    model.device.synchronize()?;
    let t = Instant::now();
    for step in 0..gen {
        // With AWQ_RUN_PROFILE_RANGE set, a CUDA profiler records the second and third steps.
        #[cfg(feature = "cuda")]
        let _range = if (1..3).contains(&step) { awq_run::cuda::profiler_range() } else { None };
        #[cfg(not(feature = "cuda"))]
        let _ = step;
        let tokens: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let mut step: Vec<StepSeq> = tokens.iter().zip(kvs.iter_mut()).map(|(t, kv)| StepSeq { tokens: t, kv }).collect();
        let logits = model.forward_batch(pool, &mut step)?;
        next = logits.argmax(1)?.to_vec1::<u32>()?;
    }
    let secs = t.elapsed().as_secs_f64();
    for kv in kvs.iter_mut() {
        pool.release(kv);
    }
    Ok(secs)
}

/// One row per batch size: a warm-up run (which also captures the CUDA graphs of its step),
/// then the median of `repeats` timed runs.
pub fn run(model: &Model, kv_dtype: DType, prompt: &[u32], gen: usize, batches: &[usize], repeats: usize) -> Result<Vec<BatchRow>> {
    if batches.contains(&0) {
        bail!("--batch {batches:?}: every batch size must be at least 1");
    }
    let mut rows: Vec<BatchRow> = Vec::new();
    for &batch in batches {
        let blocks = batch * KvPool::blocks_for(prompt.len() + gen);
        let mut pool = KvPool::new(&model.cfg, blocks, kv_dtype, &model.device)
            .with_context(|| format!("a KV pool for {batch} sequences of {} positions", prompt.len() + gen))?;
        decode_seconds(model, &mut pool, prompt, gen.min(8), batch)?;
        let secs: Vec<f64> = (0..repeats.max(1)).map(|_| decode_seconds(model, &mut pool, prompt, gen, batch)).collect::<Result<_>>()?;
        let s = super::bench::median(secs);
        let decode_tok_s = (batch * gen) as f64 / s.max(1e-9);
        let vs_first = rows.first().map_or(1.0, |f| decode_tok_s / f.decode_tok_s);
        rows.push(BatchRow { batch, decode_tok_s, step_ms: 1000.0 * s / gen.max(1) as f64, vs_first });
    }
    Ok(rows)
}
