//! `--device` and `--dtype` parsing, with "the best available" as the default device.
use crate::error::{Error, Result};
use candle_core::{DType, Device};

/// Parses `cpu`, `cuda`, `cuda:N`, `metal`, `metal:N`; `None` picks CUDA, then Metal, then the CPU.
pub fn parse_device(spec: Option<&str>) -> Result<Device> {
    parse_device_inner(spec).map(single_stream)
}

/// Every tensor of a candle CUDA device lives on its one stream, so cudarc's cross-stream event
/// tracking (an event recorded, and possibly waited on, for every buffer of every op) only costs
/// host time in each decode step. Turning it off is sound with a single stream.
fn single_stream(d: Device) -> Device {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = &d {
        // SAFETY: all work of this device is ordered on its single stream (see above).
        unsafe { c.disable_event_tracking() };
    }
    d
}

fn parse_device_inner(spec: Option<&str>) -> Result<Device> {
    let Some(spec) = spec else {
        if candle_core::utils::cuda_is_available() {
            if let Ok(d) = Device::new_cuda(0) {
                return Ok(d);
            }
        }
        if candle_core::utils::metal_is_available() {
            if let Ok(d) = Device::new_metal(0) {
                return Ok(d);
            }
        }
        return Ok(Device::Cpu);
    };
    let (kind, idx) = match spec.split_once(':') {
        Some((k, i)) => {
            let i: usize = i.parse().map_err(|_| Error::msg(format!("--device {spec}: bad device index {i:?}")))?;
            (k, i)
        }
        None => (spec, 0),
    };
    match kind {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(idx).map_err(|e| {
            Error::msg(format!("--device {spec}: {e} (this build has CUDA support: {})", cfg!(feature = "cuda")))
        }),
        "metal" => Device::new_metal(idx).map_err(|e| {
            Error::msg(format!("--device {spec}: {e} (this build has Metal support: {})", cfg!(feature = "metal")))
        }),
        _ => Err(Error::msg(format!("--device {spec}: expected cpu, cuda[:N] or metal[:N]"))),
    }
}

/// Parses `f32`, `f16`, `bf16`; `None` gives f32 on the CPU and f16 on GPUs.
pub fn parse_dtype(spec: Option<&str>, device: &Device) -> Result<DType> {
    match spec {
        None => Ok(if device.is_cpu() { DType::F32 } else { DType::F16 }),
        Some("f32") | Some("float32") => Ok(DType::F32),
        Some("f16") | Some("float16") => Ok(DType::F16),
        Some("bf16") | Some("bfloat16") => Ok(DType::BF16),
        Some(other) => Err(Error::msg(format!("--dtype {other}: expected f32, f16 or bf16"))),
    }
}

/// The KV cache's dtype from `--kv-cache-dtype`: `auto` (None: the activation dtype), `f16`
/// or `f32` (whether it fits the model is [`crate::model::paged::KvPool::resolve_dtype`]'s call).
pub fn parse_kv_dtype(spec: &str) -> Result<Option<DType>> {
    match spec {
        "auto" => Ok(None),
        "f16" | "float16" => Ok(Some(DType::F16)),
        "f32" | "float32" => Ok(Some(DType::F32)),
        other => Err(Error::msg(format!("--kv-cache-dtype {other}: expected auto, f16 or f32"))),
    }
}

/// The serving step's prompt-token budget when `--prefill-chunk` is not given. On the CPU 512
/// tokens already take most of a second. On CUDA a burst of arrivals should be prefilled in as
/// few steps as possible, since the streams already decoding sit through every one: 8192 on
/// cards of 70 GiB or more (vLLM's server default on H100-class cards), where 64 arrivals of
/// 136-token prompts then take one step instead of three (H100, 64 streams: decode 18.4x ->
/// 20.1x one stream, inter-token p99 49.5 -> 17.0 ms; BENCHMARKS.md, session 21), else 4096.
pub fn default_prefill_chunk(device: &Device) -> usize {
    match device {
        Device::Cpu => 512,
        #[cfg(feature = "cuda")]
        Device::Cuda(d) if crate::cuda::total_memory(d).is_ok_and(|b| b >= 70 << 30) => 8192,
        _ => 4096,
    }
}

pub fn device_name(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}
