//! Checkpoint I/O for 4-bit models in the AutoAWQ GEMM and GPTQ layouts (ours and others'): the
//! quantization config ([`spec`]), reading linear layers ([`read`]), writing shards and blocks
//! ([`write`]) and the atomic output directory every writer uses ([`atomic`]). What is written
//! comes from above (the export in `crate::awq::export`); nothing here runs a quantization.
pub mod atomic;
pub mod read;
pub mod spec;
pub mod write;

pub use atomic::{check_out_dir, AtomicDir};
pub use read::{load_quant_linear, read_awq_weight, read_gptq_weight};
pub use spec::{GptqFormat, QuantFormat, QuantSpec};
pub use write::{block_tensors, ShardWriter};
