//! The LLaMA-family model: configuration, layers and the decoder, built from linear layers of
//! any kind ([`crate::linear`]).
pub mod attention_cpu;
pub mod causal_attention_cpu;
pub mod batch;
#[cfg(feature = "cuda")]
pub mod batch_graph;
pub mod config;
pub mod cpu_math;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dummy;
#[cfg(feature = "cuda")]
pub mod graph;
pub mod host_step;
pub mod kv_blocks;
pub mod layers;
pub mod llama;
pub mod logits;
pub mod paged;
pub mod proj;

pub use config::{Arch, Config};
pub use layers::Cache;
pub use llama::{Block, BlockContext, LinearInputs, Model};
pub use proj::Proj;
