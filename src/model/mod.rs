//! The LLaMA-family model: configuration, layers and the decoder.
pub mod attention_cpu;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dummy;
#[cfg(feature = "cuda")]
pub mod graph;
pub mod layers;
pub mod linear;
pub mod llama;

pub use config::{Arch, Config};
pub use layers::Cache;
pub use linear::{DenseLinear, Linear, LinearLayer};
pub use llama::{Block, LinearInputs, Model};
