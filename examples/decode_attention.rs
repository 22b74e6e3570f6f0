//! Times the CPU decode attention kernel ([`attend_heads`]) on one thread, for the shapes of a
//! batched step: one sequence's query heads over its f16 cache rows laid out as the paged cache
//! lays them (a position's rows of every KV head side by side). Prints the median and the
//! fastest µs per sequence and the rate of its multiply-adds, for head layouts of SmolLM2 (9
//! heads over 3), Llama-3 (32 over 8, scaled down to 8 over 2) and Llama-2 (one head per KV
//! head).
//!
//!   cargo run --release --example decode_attention -- [REPS]
use awq_run::model::attention_cpu::attend_heads;
use awq_run::rng::Rng;
use half::f16;
mod timing;

fn main() -> anyhow::Result<()> {
    let reps: usize = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(201);
    let mut rng = Rng::new(3);
    println!("| heads / KV heads × head dim | positions | µs per sequence (median) | fastest | GFLOP/s (median) |");
    println!("|---|---|---|---|---|");
    for (kvh, n_rep, d) in [(3usize, 3usize, 64usize), (2, 4, 128), (4, 1, 128)] {
        for len in [64usize, 128, 256, 1024] {
            let h = kvh * n_rep;
            let q: Vec<f32> = (0..h * d).map(|_| rng.unit()).collect();
            let k: Vec<f16> = (0..len * kvh * d).map(|_| f16::from_f32(rng.unit())).collect();
            let v: Vec<f16> = (0..len * kvh * d).map(|_| f16::from_f32(rng.unit())).collect();
            let mut out = vec![0f32; h * d];
            let (us, fastest) = timing::time_us(reps, || {
                out.fill(0.0);
                attend_heads(&q, 0..kvh, n_rep, 0..len, |j, p| &k[(p * kvh + j) * d..][..d], |j, p| &v[(p * kvh + j) * d..][..d], 0.125, &mut out);
                std::hint::black_box(&out);
            });
            // Scores and weighted values: 2 · h · len · d multiply-adds.
            let gflops = 4.0 * (h * len * d) as f64 / us / 1e3;
            println!("| {h} / {kvh} × {d} | {len} | {us:.1} | {fastest:.1} | {gflops:.1} |");
        }
    }
    Ok(())
}
