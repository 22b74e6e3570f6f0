//! With the `cuda` feature, compiles the CUDA kernels (the W4A16 linear in src/quant/cuda, the
//! fused decode-step kernels and the logits top-k in src/model/cuda, the AWQ clip search in src/awq) to PTX with nvcc for compute capability 8.0 and newer (`CUDA_COMPUTE_CAP`, default 80; the driver JIT-
//! compiles the PTX for newer cards, sm_90 included). A CPU-only build does nothing here.
use std::path::PathBuf;
use std::process::Command;

/// (source, PTX file name in OUT_DIR)
const KERNELS: [(&str, &str); 5] = [("src/quant/cuda/w4a16.cu", "w4a16.ptx"), ("src/quant/cuda/w4a16_skinny.cu", "w4a16_skinny.ptx"), ("src/model/cuda/decode.cu", "decode.ptx"), ("src/model/cuda/topk.cu", "topk.ptx"), ("src/awq/clip.cu", "clip.ptx")];
/// Headers the kernels include (src/cuda is on nvcc's include path).
const HEADERS: [&str; 5] = ["src/cuda/common.cuh", "src/quant/cuda/w4_dequant.cuh", "src/quant/cuda/w4_sets.cuh", "src/quant/cuda/w4_skinny.cuh", "src/quant/cuda/wgmma.cuh"];
/// Hopper-only kernels (wgmma): PTX for compute_90a when building for compute capability 9.0,
/// else empty files (the wrappers then never load them).
const SM90_KERNELS: [(&str, &str); 2] = [("src/quant/cuda/w4a16_sm90.cu", "w4a16_sm90.ptx"), ("src/quant/cuda/w4a16_skinny_sm90.cu", "w4a16_skinny_sm90.ptx")];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for (src, _) in KERNELS.iter().chain(SM90_KERNELS.iter()) {
        println!("cargo:rerun-if-changed={src}");
    }
    for header in HEADERS {
        println!("cargo:rerun-if-changed={header}");
    }
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap: String = cap.chars().filter(|c| c.is_ascii_digit()).collect();
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let compile = |src: &str, ptx: &str, arch: &str| {
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", "-Isrc/cuda"])
            .arg(format!("-arch={arch}"))
            .arg("-o")
            .arg(out_dir.join(ptx))
            .arg(src)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {nvcc} (needed by the cuda feature): {e}"));
        assert!(status.success(), "nvcc failed on {src}");
    };
    for (src, ptx) in KERNELS {
        compile(src, ptx, &format!("compute_{cap}"));
    }
    for (src, ptx) in SM90_KERNELS {
        if cap == "90" {
            compile(src, ptx, "compute_90a");
        } else {
            std::fs::write(out_dir.join(ptx), "").expect("write empty PTX");
        }
    }
}
