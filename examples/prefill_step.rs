//! Times the server's prompt step on the CPU: `Model::forward_batch` over fresh sequences of a
//! paged KV cache, for several (sequences × prompt tokens) shapes of SmolLM2 AWQ; prints the
//! median of REPS runs after a warm-up. Run it once as it is and once with
//! `AWQ_RUN_HOST_STEP=0` to compare the host step's prompt chunks with the general path.
//!
//!   cargo run --release --example prefill_step -- [REPS] [MODEL] [SHAPES, e.g. 8x69,1x512]
use awq_run::assets::ModelAssets;
use awq_run::model::batch::StepSeq;
use awq_run::model::paged::{KvPool, SeqKv};
use awq_run::quant::cpu::{set_default_head, set_default_numerics, HeadFormat, Numerics};
use candle_core::{DType, Device};
use std::time::Instant;

// The binary's allocator, which keeps freed memory (see `src/main.rs`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let reps: usize = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(7).max(1);
    let dir = std::env::args().nth(2).unwrap_or_else(|| "models/smollm2-135m-instruct-awq".into());
    // SAFETY: mimalloc's purge delay (option 15) set to never, as the binary does.
    unsafe { libmimalloc_sys::mi_option_set(15, -1) };
    // The CLI's defaults: W4A8 decoder layers, the int8 head.
    set_default_numerics(Numerics::W4A8);
    set_default_head(HeadFormat::Int8);
    let model = ModelAssets::load(&dir)?.load_model(&Device::Cpu, DType::F32)?;
    let mut pool = KvPool::new(&model.cfg, 2048, DType::F32, &Device::Cpu)?;
    let vocab = model.cfg.vocab_size as u32;
    let shapes: Vec<(usize, usize)> = match std::env::args().nth(3) {
        Some(list) => list
            .split(',')
            .map(|s| {
                let (a, b) = s.split_once('x').ok_or_else(|| anyhow::anyhow!("shape {s:?}: expected SEQSxTOKENS"))?;
                Ok((a.trim().parse()?, b.trim().parse()?))
            })
            .collect::<anyhow::Result<_>>()?,
        None => vec![(8, 69), (4, 128), (1, 69), (1, 128), (1, 256), (1, 512)],
    };
    for (seqs, len) in shapes {
        let mut ms = Vec::with_capacity(reps);
        for rep in 0..=reps {
            // Different tokens every run and sequence, so nothing is shared.
            let prompts: Vec<Vec<u32>> = (0..seqs).map(|s| (0..len).map(|t| ((t * 37 + s * 101 + rep * 7) as u32) % vocab).collect()).collect();
            let mut kvs: Vec<SeqKv> = (0..seqs).map(|_| SeqKv::default()).collect();
            for kv in kvs.iter_mut() {
                pool.reserve(kv, len)?;
            }
            let t = Instant::now();
            let mut step: Vec<StepSeq> = prompts.iter().zip(kvs.iter_mut()).map(|(p, kv)| StepSeq { tokens: p, kv }).collect();
            model.forward_batch(&pool, &mut step)?;
            if rep > 0 {
                ms.push(t.elapsed().as_secs_f64() * 1e3);
            }
            for kv in kvs.iter_mut() {
                pool.release(kv);
            }
        }
        ms.sort_by(f64::total_cmp);
        let med = ms[ms.len() / 2];
        println!("{seqs} × {len:>3} tokens: {med:7.1} ms, {:6.0} tok/s", (seqs * len) as f64 / med * 1e3);
    }
    Ok(())
}
