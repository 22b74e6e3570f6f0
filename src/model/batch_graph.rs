//! The server's batched decode step as CUDA graphs, one per (batch, table width) bucket. Issued
//! through candle, a step of a 7B model is some 400 launches with their allocations and layout
//! checks: at 16 sequences the host took longer to issue a step than the GPU took to run it
//! (BENCHMARKS.md), so batching bought little. Replayed, the step is one launch.
//!
//! What makes a step replayable (as for the single-sequence graph of [`super::graph`]): every
//! per-step input lives in one device buffer that the host overwrites before each launch (token
//! ids, positions, new rows, lengths and the row table of [`KvPool::decode_inputs`]); the pool's
//! buffers never move; the logits land in a buffer owned by the graph. Shapes are fixed per graph,
//! so a batch is padded up to its bucket with sequences that feed token 0 into the pool's scratch
//! row (their logits are dropped), and the row table is as wide as the bucket of the longest
//! sequence (the attention kernels read each sequence's own length and skip the rest).
//!
//! A bucket's first step runs eagerly with candle's upload cache on, then its body is captured
//! with the cache on (see [`super::graph`] for why). `AWQ_RUN_CUDA_GRAPH=0` runs every step
//! eagerly; a failed capture turns the graphs off for the pool, with a warning.
use super::graph::{capture, enabled, SendGraph};
use super::paged::{batch_bucket, width_bucket, DecodeTables, KvPool, SeqKv};
use super::Model;
use candle_core::cuda_backend::cudarc::driver::result::memcpy_htod_async;
use candle_core::cuda_backend::WrapErr;
use candle_core::{DType, Device, Result, Tensor};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The graphs of one pool, by (padded batch, table width).
#[derive(Default)]
pub struct BatchGraphs {
    graphs: Mutex<HashMap<(usize, usize), Arc<BatchGraph>>>,
    off: std::sync::atomic::AtomicBool,
}

struct BatchGraph {
    graph: Mutex<SendGraph>,
    /// u32, laid out as [`KvPool::decode_inputs`] writes it.
    inputs: Tensor,
    /// `[batch, vocab]` f32, written by the graph.
    logits: Tensor,
}

/// Runs the decode step of `seqs` (one new token each, `ids`) through its bucket's graph,
/// capturing the graph on the bucket's first step; `None`: run it eagerly. Returns the logits
/// `[seqs, vocab]` (f32); the caller counts the tokens in the pool.
pub fn forward(model: &Model, pool: &KvPool, seqs: &[&SeqKv], ids: &[u32]) -> Result<Option<Tensor>> {
    let g = &pool.graphs;
    if g.off.load(std::sync::atomic::Ordering::Relaxed) || !enabled() || !matches!(model.device, Device::Cuda(_)) {
        return Ok(None);
    }
    let longest = seqs.iter().map(|s| s.len() + 1).max().unwrap_or(1);
    let key = (batch_bucket(seqs.len()), width_bucket(longest));
    let inputs = pool.decode_inputs(seqs, ids, key.0, key.1)?;
    let ready = g.graphs.lock().unwrap_or_else(|e| e.into_inner()).get(&key).cloned();
    let logits = match ready {
        Some(graph) => graph.run(&inputs)?,
        None => match BatchGraph::prepare(model, pool, key, &inputs) {
            Ok((graph, logits)) => {
                g.graphs.lock().unwrap_or_else(|e| e.into_inner()).insert(key, Arc::new(graph));
                logits
            }
            Err(e) => {
                eprintln!("warning: capturing the batched decode step as a CUDA graph failed ({e}); batched decoding without graphs");
                g.off.store(true, std::sync::atomic::Ordering::Relaxed);
                return Ok(None);
            }
        },
    };
    logits.narrow(0, 0, seqs.len()).map(Some)
}

impl BatchGraph {
    /// Runs the bucket's first step eagerly from the graph's own buffers, then captures the same
    /// body. Returns the graph and this step's logits (padded batch).
    fn prepare(model: &Model, pool: &KvPool, (batch, width): (usize, usize), host: &[u32]) -> Result<(Self, Tensor)> {
        let Device::Cuda(dev) = &model.device else { candle_core::bail!("batched graph decode needs a CUDA device") };
        let inputs = Tensor::new(host, &model.device)?;
        let logits = Tensor::zeros((batch, model.vocab_size()), DType::F32, &model.device)?;
        let body = || -> Result<()> {
            let (tokens, tables) = DecodeTables::views(&inputs, batch, width)?;
            let l = model.decode_batch_body(pool, &tables, &tokens)?;
            logits.slice_set(&l, 0, 0)
        };
        let _uploads = dev.enable_cuda_graph_htod_cache();
        body()?;
        let out = logits.copy()?;
        model.device.synchronize()?;
        let graph = capture(dev, "batched decode", body)?;
        Ok((Self { graph: Mutex::new(SendGraph(graph)), inputs, logits }, out))
    }

    /// One step: the inputs copied in, the graph launched; a copy of the logits (the buffer is
    /// overwritten by the next step).
    fn run(&self, host: &[u32]) -> Result<Tensor> {
        let Device::Cuda(dev) = self.inputs.device() else { candle_core::bail!("batched graph decode needs a CUDA device") };
        let stream = dev.cuda_stream();
        let dst = crate::cuda::device_ptr(&self.inputs, &stream)?;
        if host.len() != self.inputs.elem_count() {
            candle_core::bail!("batched graph decode: {} inputs for a buffer of {}", host.len(), self.inputs.elem_count());
        }
        let graph = self.graph.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the copy fills exactly the inputs buffer (length checked above); pageable host
        // memory is staged before the call returns.
        unsafe { memcpy_htod_async(dst, host, stream.cu_stream()) }.w()?;
        graph.0.launch().w()?;
        drop(graph);
        self.logits.copy()
    }
}
