//! awq-run: an end-to-end AWQ runner for LLaMA-family models on candle.
//!
//! - [`model`]: our LLaMA-family decoder with interchangeable linear layers;
//! - [`source`] / [`assets`] / [`gguf`]: where models come from and how they load;
//! - [`generation`] / [`chat_template`]: sampling, streaming and chat rendering;
//! - [`quant`] / [`awq`] / [`checkpoint`]: quantization, the AWQ search and AWQ checkpoints.
pub mod assets;
pub mod awq;
pub mod chat_template;
pub mod checkpoint;
pub mod device;
pub mod error;
pub mod eval;
pub mod generation;
pub mod gguf;
pub mod import;
pub mod model;
pub mod quant;
pub mod source;
pub mod tokenizer;

pub use assets::ModelAssets;
pub use error::{Error, Result};
