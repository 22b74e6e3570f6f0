//! With the `cuda` feature, compiles the W4A16 CUDA kernels (src/quant/cuda/*.cu) to PTX with
//! nvcc for compute capability 8.0 and newer (`CUDA_COMPUTE_CAP`, default 80; the driver JIT-
//! compiles the PTX for newer cards, sm_90 included). A CPU-only build does nothing here.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/quant/cuda/w4a16.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("w4a16.ptx");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap: String = cap.chars().filter(|c| c.is_ascii_digit()).collect();
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("-o")
        .arg(&out)
        .arg("src/quant/cuda/w4a16.cu")
        .status()
        .unwrap_or_else(|e| panic!("cannot run {nvcc} (needed by the cuda feature): {e}"));
    assert!(status.success(), "nvcc failed on src/quant/cuda/w4a16.cu");
}
