//! The `awq-run` command line: a thin layer over the library.
mod bench;
mod bench_batch;
mod bench_serve;
mod chat;
mod eval;
mod common;
mod generate;
mod import;
mod quantize;
mod selftest;
mod serve;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "awq-run", version, about = "AWQ 4-bit quantization and fast inference for LLaMA-family models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a reply to one prompt, streamed to stdout.
    Generate(generate::Args),
    /// Talk to a model in the terminal.
    Chat(chat::Args),
    /// Convert a GGUF file into an HF-layout directory.
    Import(import::Args),
    /// Perplexity of a model on a text (full precision, checkpoint or --fake-quant).
    Eval(eval::Args),
    /// Prefill and decode speed and peak memory (real or --dummy-weights model).
    Bench(bench::Args),
    /// Check the CUDA kernels against the CPU reference (and measure them with --bench).
    Selftest(selftest::Args),
    /// Quantize a model with AWQ (or RTN) and write a 4-bit AutoAWQ GEMM checkpoint.
    Quantize(quantize::Args),
    /// Serve the model over an OpenAI-compatible HTTP API with continuous batching and a chat page.
    Serve(serve::Args),
    /// Concurrent streaming clients against a running server: tokens/s, TTFT and ITL as a table.
    BenchServe(bench_serve::Args),
}

pub fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Chat(a) => chat::run(a),
        Command::Import(a) => import::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Selftest(a) => selftest::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Quantize(a) => quantize::run(a),
        Command::Serve(a) => serve::run(a),
        Command::BenchServe(a) => bench_serve::run(a),
    }
}
