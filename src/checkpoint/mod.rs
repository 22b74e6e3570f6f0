//! Checkpoint I/O for 4-bit models in the AutoAWQ GEMM layout (ours and others'): the
//! quantization config ([`spec`]), reading linear layers ([`read`]), writing shards and blocks
//! ([`write`]) and the atomic output directory every writer uses ([`atomic`]). What is written
//! comes from above (the AWQ export in `crate::awq::export`); nothing here runs a quantization.
pub mod atomic;
pub mod read;
pub mod spec;
pub mod write;

pub use atomic::{check_out_dir, AtomicDir};
pub use read::{load_awq_linear, read_awq_weight};
pub use spec::QuantSpec;
pub use write::{block_tensors, ShardWriter};
