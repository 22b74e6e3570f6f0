use awq_run::assets::ModelAssets;
use awq_run::model::batch::StepSeq;
use awq_run::model::paged::{KvPool, SeqKv};
use candle_core::{DType, Device};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    awq_run::quant::cpu::set_default_numerics(awq_run::quant::cpu::Numerics::W4A8);
    awq_run::quant::cpu::set_default_head(awq_run::quant::cpu::HeadFormat::Int8);
    let a = ModelAssets::load("models/smollm2-135m-instruct-awq")?;
    let model = a.load_model(&Device::Cpu, DType::F32)?;
    let mut tot = [0f64; 2];
    let mut agree = 0usize;
    let mut n = 0usize;
    for file in ["wiki", "c4", "code"] {
        let text = std::fs::read_to_string(format!("models/data/{file}.utf8"))?;
        let ids = a.tokenizer.encode(&text[..6000.min(text.len())], false).map_err(anyhow::Error::msg)?.get_ids()[..400].to_vec();
        let mut argmaxes = [vec![], vec![]];
        for (di, dt) in [DType::F32, DType::F16].into_iter().enumerate() {
            let mut pool = KvPool::new(&model.cfg, 64, dt, &Device::Cpu)?;
            let mut kv = SeqKv::default();
            pool.reserve(&mut kv, ids.len())?;
            // 16-token prompt, then one token at a time (teacher forced).
            let mut pos = 16;
            let mut l = model.forward_batch(&pool, &mut [StepSeq { tokens: &ids[..16], kv: &mut kv }])?;
            while pos < ids.len() {
                let row = l.get(0)?.to_vec1::<f32>()?;
                let m = row.iter().cloned().fold(f32::MIN, f32::max);
                let lse = m as f64 + row.iter().map(|&x| ((x - m) as f64).exp()).sum::<f64>().ln();
                tot[di] += lse - row[ids[pos] as usize] as f64;
                argmaxes[di].push(row.iter().enumerate().fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0);
                l = model.forward_batch(&pool, &mut [StepSeq { tokens: &ids[pos..pos + 1], kv: &mut kv }])?;
                pos += 1;
            }
        }
        agree += argmaxes[0].iter().zip(&argmaxes[1]).filter(|(a, b)| a == b).count();
        n += argmaxes[0].len();
    }
    println!("tokens {n}: ppl f32 cache {:.4}, f16 cache {:.4}; argmax agreement {agree}/{n}", (tot[0] / n as f64).exp(), (tot[1] / n as f64).exp());
    Ok(())
}
