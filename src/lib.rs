//! awq-run: an end-to-end AWQ runner for LLaMA-family models on candle.
//!
//! The crate is a stack of rooms, each importing only the ones below it (docs/ARCHITECTURE.md
//! draws the graph; `tests/architecture.rs` fails on a back-edge):
//!
//! - [`server`]: the OpenAI-compatible HTTP server and its chat page, over the engine;
//! - [`awq`], [`engine`], [`selftest`]: the AWQ/RTN pass and its export; generation, chat
//!   templates, perplexity, device choice and the continuous-batching scheduler; the CUDA
//!   kernels' self-test and timings;
//! - [`assets`]: where models come from (hub, directory, GGUF) and how they load;
//! - [`checkpoint`]: the quantization config, reading and writing quantized checkpoints;
//! - [`model`]: the LLaMA-family decoder;
//! - [`linear`]: the linear-layer trait and its implementations;
//! - [`quant`]: quantization schemes, weight formats and their CPU/CUDA kernels;
//! - [`cuda`]: CUDA plumbing (pointers, limits, dispatch, L2 prefetch hints);
//! - [`error`], [`rng`]: the error type and a deterministic generator.
pub mod assets;
pub mod awq;
pub mod checkpoint;
pub mod cuda;
pub mod engine;
pub mod error;
pub mod linear;
pub mod model;
pub mod quant;
pub mod rng;
pub mod server;
#[cfg(feature = "cuda")]
pub mod selftest;

pub use assets::ModelAssets;
pub use error::{Error, Result};
