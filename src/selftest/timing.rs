//! The timing harness of the benchmarks: CUDA events around calls, CUDA-graph replays (kernel
//! time without the host's cost of issuing each call), and several kernels timed in alternation
//! so that clock drift falls on all alike. Medians throughout.
use candle_core::{Device, Result};

/// Median GPU time of `f` in seconds: each of `reps` samples times `iters` calls between two CUDA
/// events, after a warm-up.
pub fn time_events(device: &Device, reps: usize, iters: usize, mut f: impl FnMut(usize) -> Result<()>) -> Result<f64> {
    let Device::Cuda(dev) = device else { candle_core::bail!("CUDA timing on a non-CUDA device") };
    let stream = dev.cuda_stream();
    use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
    use candle_core::cuda_backend::WrapErr;
    for i in 0..iters.min(8) {
        f(i)?;
    }
    device.synchronize()?;
    let mut samples = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).w()?;
        for i in 0..iters {
            f(i)?;
        }
        let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).w()?;
        samples.push(start.elapsed_ms(&end).w()? as f64 / 1e3 / iters as f64);
    }
    Ok(median(samples))
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
}

/// Median GPU time of one call of `f`, with `iters` calls captured in a CUDA graph and the graph
/// replayed `reps` times between events: kernel time without the host's cost of issuing each call.
pub fn time_graph(device: &Device, reps: usize, iters: usize, f: impl FnMut(usize) -> Result<()>) -> Result<f64> {
    let graph = capture(device, iters, f)?;
    Ok(median((0..reps).map(|_| replay_secs(device, &graph, iters)).collect::<Result<Vec<_>>>()?))
}

/// As [`time_graph`] for several kernels timed against each other: each round replays every
/// graph once, in an order that rotates, so the clock and temperature drift of a long run (an
/// H100 under tensor-core load slows by several percent within seconds) falls on all of them
/// alike. Medians per kernel, in the order given.
pub fn time_graphs_interleaved(device: &Device, rounds: usize, iters: usize, fs: Vec<Box<dyn FnMut(usize) -> Result<()> + '_>>) -> Result<Vec<f64>> {
    let graphs = fs.into_iter().map(|f| capture(device, iters, f)).collect::<Result<Vec<_>>>()?;
    let mut samples = vec![Vec::with_capacity(rounds); graphs.len()];
    for r in 0..rounds {
        for j in 0..graphs.len() {
            let g = (j + r) % graphs.len();
            samples[g].push(replay_secs(device, &graphs[g], iters)?);
        }
    }
    Ok(samples.into_iter().map(median).collect())
}

/// `iters` calls of `f` captured in a CUDA graph, after a warm-up, and replayed once.
fn capture(device: &Device, iters: usize, mut f: impl FnMut(usize) -> Result<()>) -> Result<candle_core::cuda_backend::cudarc::driver::CudaGraph> {
    use candle_core::cuda_backend::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    use candle_core::cuda_backend::WrapErr;
    let Device::Cuda(dev) = device else { candle_core::bail!("CUDA timing on a non-CUDA device") };
    let stream = dev.cuda_stream();
    for i in 0..iters.min(8) {
        f(i)?;
    }
    device.synchronize()?;
    stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED).w()?;
    let body = (0..iters).try_for_each(&mut f);
    let graph = stream.end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH).w();
    body?;
    let Some(graph) = graph? else { candle_core::bail!("empty graph") };
    graph.launch().w()?;
    device.synchronize()?;
    Ok(graph)
}

/// Seconds per call of one timed replay of `graph` (`iters` calls).
fn replay_secs(device: &Device, graph: &candle_core::cuda_backend::cudarc::driver::CudaGraph, iters: usize) -> Result<f64> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
    use candle_core::cuda_backend::WrapErr;
    let Device::Cuda(dev) = device else { candle_core::bail!("CUDA timing on a non-CUDA device") };
    let stream = dev.cuda_stream();
    let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).w()?;
    graph.launch().w()?;
    let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).w()?;
    Ok(start.elapsed_ms(&end).w()? as f64 / 1e3 / iters as f64)
}
