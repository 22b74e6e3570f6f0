//! The decode step as one CUDA graph. A 7B decode step issues some 500 kernels through candle,
//! and issuing them (allocation, layout checks, launch) takes the host longer than the GPU takes
//! to run them. Captured once per cache, the whole step replays with one launch.
//!
//! What makes the capture replayable: everything position-dependent reads the position from a
//! device buffer (the rotary embedding, the KV-cache write and the attention length; see
//! `Attention::attend_at`), the KV buffers are allocated to the cache's capacity before capture so
//! they never move, and the logits land in a buffer owned here. Per step the host copies the token
//! id and position in, launches the graph and counts the token in the cache.
//!
//! Candle uploads some kernel parameters (shapes, strides) from host memory; a captured upload
//! would replay from a host buffer long freed. Candle's graph upload cache (enabled by a guard)
//! keeps such uploads on the device: the first single-token step of a cache runs the graph's body
//! eagerly with the guard on (filling that cache and loading every kernel module), then the body
//! is captured with the guard on, so every upload inside the capture is a device-to-device copy
//! from the cache (an upload it misses fails the capture instead of corrupting it).
//!
//! Set `AWQ_RUN_CUDA_GRAPH=0` to decode eagerly (for comparisons); a failed capture falls back to
//! eager decoding with a warning.
use super::layers::Cache;
use super::Model;
use candle_core::cuda_backend::cudarc::driver::result::{memcpy_dtod_async, memcpy_htod_async};
use candle_core::cuda_backend::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use candle_core::cuda_backend::cudarc::driver::CudaGraph;
use candle_core::cuda_backend::WrapErr;
use candle_core::{DType, Device, Result, Tensor};
use std::sync::Arc;

/// Where a cache stands with its graph.
#[derive(Clone, Default)]
pub enum GraphState {
    /// No graph yet.
    #[default]
    Fresh,
    Ready(Arc<DecodeGraph>),
    /// Graphs do not apply, or capturing failed.
    Off,
}

impl std::fmt::Debug for GraphState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GraphState::Fresh => "Fresh",
            GraphState::Ready(_) => "Ready",
            GraphState::Off => "Off",
        })
    }
}

/// A graph exec handle may be launched from any thread (cudarc binds the context on launch); the
/// mutex around it in [`DecodeGraph`] (and `batch_graph`'s graphs) keeps launches one at a time.
pub(super) struct SendGraph(pub(super) CudaGraph);
// SAFETY: see above; the handle is only used under its owner's mutex.
unsafe impl Send for SendGraph {}

pub struct DecodeGraph {
    graph: std::sync::Mutex<SendGraph>,
    /// u32 `[token, position]`, read by the graph.
    step: Tensor,
    /// `[1, vocab]` f32, written by the graph.
    logits: Tensor,
    /// Layer 0's K buffer address when captured: a different buffer means a stale graph.
    k0: u64,
}

/// Whether decode steps may replay as graphs (`AWQ_RUN_CUDA_GRAPH=0` turns them off).
pub(super) fn enabled() -> bool {
    std::env::var("AWQ_RUN_CUDA_GRAPH").map_or(true, |v| v != "0")
}

/// `body` captured on `dev`'s stream as a graph, instantiated to free its own allocations on the
/// next launch, and uploaded; `what` names it in errors. The capture always ends, so the stream
/// leaves capture mode whatever `body` did.
pub(super) fn capture(dev: &candle_core::CudaDevice, what: &str, body: impl FnOnce() -> Result<()>) -> Result<CudaGraph> {
    let stream = dev.cuda_stream();
    stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED).w()?;
    let captured = body();
    let graph = stream.end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH).w();
    captured?;
    let Some(graph) = graph? else { candle_core::bail!("the captured {what} graph is empty") };
    graph.upload().w()?;
    Ok(graph)
}

fn cuda(dev: &Device) -> Result<&candle_core::CudaDevice> {
    match dev {
        Device::Cuda(d) => Ok(d),
        _ => candle_core::bail!("graph decode needs a CUDA device"),
    }
}

/// Whether the graph path can run this step at all.
fn applies(model: &Model, tokens: &Tensor, cache: &Cache) -> bool {
    let cfg = &model.cfg;
    let (h, kvh, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
    model.device.is_cuda()
        && tokens.dims() == [1, 1]
        && tokens.dtype() == DType::U32
        && !cache.is_empty()
        && cache.len() < cache.capacity
        // One query token never needs a mask while the window covers the whole cache.
        && cfg.sliding_window.is_none_or(|w| cache.capacity <= w)
        && h % kvh.max(1) == 0
        && super::cuda::attention_fits(hd)
        && matches!(model.dtype, DType::F16 | DType::BF16 | DType::F32)
}

/// Runs a single-token step through the graph where it applies; `None`: run it eagerly.
pub fn forward(model: &Model, tokens: &Tensor, cache: &mut Cache) -> Result<Option<Tensor>> {
    if matches!(cache.graph, GraphState::Off) || !applies(model, tokens, cache) {
        return Ok(None);
    }
    if !enabled() {
        cache.graph = GraphState::Off;
        return Ok(None);
    }
    if let GraphState::Ready(g) = &cache.graph {
        if g.k0 == k0_address(cache)? {
            let g = g.clone();
            return g.run(tokens, cache).map(Some);
        }
    }
    // This step runs the graph's body eagerly, then the body is captured for the next steps.
    match DecodeGraph::prepare(model, tokens, cache) {
        Ok((g, logits)) => {
            cache.graph = GraphState::Ready(Arc::new(g));
            Ok(Some(logits))
        }
        Err(e) => {
            eprintln!("warning: capturing the decode step as a CUDA graph failed ({e}); decoding without graphs");
            cache.graph = GraphState::Off;
            Ok(None)
        }
    }
}

fn k0_address(cache: &Cache) -> Result<u64> {
    let Some((k, _)) = cache.layers.first().and_then(|l| l.buffers()) else { return Ok(0) };
    let Device::Cuda(dev) = k.device() else { return Ok(0) };
    crate::cuda::device_ptr(k, &dev.cuda_stream())
}

impl DecodeGraph {
    /// Runs this step's body eagerly (cache buffers grown to capacity first), then captures it.
    /// Returns the graph and this step's logits. The cache counts the token.
    fn prepare(model: &Model, tokens: &Tensor, cache: &mut Cache) -> Result<(Self, Tensor)> {
        let dev = cuda(&model.device)?;
        // Buffers that never move: the KV caches at full capacity, the step and logits buffers.
        let cap = cache.capacity;
        for l in cache.layers.iter_mut() {
            l.reserve_capacity(cap)?;
        }
        let vocab = model.vocab_size();
        let step = Tensor::zeros(2, DType::U32, &model.device)?;
        let logits = Tensor::zeros((1, vocab), DType::F32, &model.device)?;
        let body = |cache: &mut Cache| -> Result<()> {
            let token = step.narrow(0, 0, 1)?.reshape((1, 1))?;
            let pos = step.narrow(0, 1, 1)?;
            let l = model.logits_at(&token, &pos, cache)?.reshape((1, vocab))?;
            logits.slice_set(&l, 0, 0)
        };
        let _uploads = dev.enable_cuda_graph_htod_cache();
        write_step(&step, tokens, cache.len())?;
        body(cache)?;
        let out = logits.copy()?;
        model.device.synchronize()?;
        let graph = capture(dev, "decode", || body(cache))?;
        cache.layers.iter_mut().for_each(|l| l.advance(1));
        let g = Self { graph: std::sync::Mutex::new(SendGraph(graph)), step, logits, k0: k0_address(cache)? };
        Ok((g, out))
    }

    /// One step: token id (on the device) and position in, launch, count the token.
    fn run(&self, tokens: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        write_step(&self.step, tokens, cache.len())?;
        self.graph.lock().unwrap_or_else(|e| e.into_inner()).0.launch().w()?;
        cache.layers.iter_mut().for_each(|l| l.advance(1));
        // A copy: the buffer is overwritten by the next step, the caller may keep its logits.
        self.logits.copy()
    }
}

/// Copies the token id (on the device) and the position into the step buffer.
fn write_step(step: &Tensor, tokens: &Tensor, pos: usize) -> Result<()> {
    let dev = cuda(tokens.device())?;
    let stream = dev.cuda_stream();
    let step = crate::cuda::device_ptr(step, &stream)?;
    let token = crate::cuda::device_ptr(&tokens.contiguous()?, &stream)?;
    let pos = [pos as u32];
    // SAFETY: both copies stay within the 8-byte step buffer and the 4-byte token; the host
    // source is copied out (pageable memory is staged) before the call returns.
    unsafe {
        memcpy_dtod_async(step, token, 4, stream.cu_stream()).w()?;
        memcpy_htod_async(step + 4, &pos, stream.cu_stream()).w()?;
    }
    Ok(())
}
