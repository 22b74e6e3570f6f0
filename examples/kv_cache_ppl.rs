//! The KV cache's dtype against quality on the CPU: perplexity of SmolLM2 AWQ teacher-forced one
//! token at a time through the server's step ([`Model::forward_batch`] over a paged cache), with
//! the cache in f32 and in f16, over the first 400 tokens of three of the fetched texts; and how
//! often the two caches give the same most likely next token.
//!
//!   cargo run --release --example kv_cache_ppl -- [MODEL]
use awq_run::assets::ModelAssets;
use awq_run::model::batch::StepSeq;
use awq_run::model::paged::{KvPool, SeqKv};
use awq_run::model::Model;
use awq_run::quant::cpu::{set_default_head, set_default_numerics, HeadFormat, Numerics};
use candle_core::{DType, Device};

// The binary's allocator (see `src/main.rs`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Summed negative log-likelihood of `ids[16..]` after a 16-token prompt, and each step's argmax.
fn teacher_forced(model: &Model, ids: &[u32], kv_dtype: DType) -> anyhow::Result<(f64, Vec<usize>)> {
    let mut pool = KvPool::new(&model.cfg, ids.len().div_ceil(16), kv_dtype, &Device::Cpu)?;
    let mut kv = SeqKv::default();
    pool.reserve(&mut kv, ids.len())?;
    let (mut nll, mut best) = (0f64, Vec::new());
    let mut logits = model.forward_batch(&pool, &mut [StepSeq { tokens: &ids[..16], kv: &mut kv }])?;
    for pos in 16..ids.len() {
        let row = logits.get(0)?.to_vec1::<f32>()?;
        let max = row.iter().copied().fold(f32::MIN, f32::max);
        let lse = f64::from(max) + row.iter().map(|&x| f64::from(x - max).exp()).sum::<f64>().ln();
        nll += lse - f64::from(row[ids[pos] as usize]);
        best.push(row.iter().enumerate().fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0);
        logits = model.forward_batch(&pool, &mut [StepSeq { tokens: &ids[pos..pos + 1], kv: &mut kv }])?;
    }
    Ok((nll, best))
}

fn main() -> anyhow::Result<()> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "models/smollm2-135m-instruct-awq".into());
    set_default_numerics(Numerics::W4A8);
    set_default_head(HeadFormat::Int8);
    let assets = ModelAssets::load(&dir)?;
    let model = assets.load_model(&Device::Cpu, DType::F32)?;
    let (mut nll, mut same, mut n) = ([0f64; 2], 0, 0);
    for text in ["wiki", "c4", "code"] {
        let path = format!("models/data/{text}.utf8");
        let body = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("{path}: {e} (run scripts/fetch-models.sh)"))?;
        let ids = assets.tokenizer.encode(body.as_str(), false).map_err(anyhow::Error::msg)?.get_ids().iter().take(400).copied().collect::<Vec<u32>>();
        let (a, best_a) = teacher_forced(&model, &ids, DType::F32)?;
        let (b, best_b) = teacher_forced(&model, &ids, DType::F16)?;
        nll[0] += a;
        nll[1] += b;
        same += best_a.iter().zip(&best_b).filter(|(x, y)| x == y).count();
        n += best_a.len();
    }
    let ppl = |s: f64| (s / n as f64).exp();
    println!("{n} tokens: perplexity {:.4} with the f32 cache, {:.4} with f16 ({:+.3} %); the same argmax at {same} of {n} positions", ppl(nll[0]), ppl(nll[1]), 100.0 * (ppl(nll[1]) / ppl(nll[0]) - 1.0));
    Ok(())
}
