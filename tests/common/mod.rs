//! Test fixtures: tiny random LLaMA-family models built on the spot (config.json, safetensors,
//! a byte-level BPE tokenizer with ChatML special tokens), and the same model as a GGUF file.
#![allow(dead_code)]
use awq_run::model::Arch;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The real SmolLM2 directory made by scripts/fetch-models.sh, if present.
pub fn smollm2_dir() -> Option<PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/smollm2-135m-instruct");
    if d.join("model.safetensors").exists() {
        Some(d)
    } else {
        eprintln!("skipped: {} is missing (run scripts/fetch-models.sh)", d.display());
        None
    }
}

pub fn smollm2_gguf() -> Option<PathBuf> {
    let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/gguf/SmolLM2-135M-Instruct.Q4_1.gguf");
    if f.exists() {
        Some(f)
    } else {
        eprintln!("skipped: {} is missing (run scripts/fetch-models.sh)", f.display());
        None
    }
}

pub fn data_file(name: &str) -> Option<PathBuf> {
    let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/data").join(name);
    if f.exists() {
        Some(f)
    } else {
        eprintln!("skipped: {} is missing (run scripts/fetch-models.sh)", f.display());
        None
    }
}

/// The library's deterministic generator (xorshift64*), so fixtures do not depend on candle's
/// RNG, with a helper for random tensors.
pub use awq_run::rng::Rng;

pub trait RandomTensor {
    fn tensor(&mut self, shape: &[usize], std: f32) -> Tensor;
}

impl RandomTensor for Rng {
    fn tensor(&mut self, shape: &[usize], std: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.normal() * std).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }
}

/// GPT-2's byte-to-unicode table, as byte-level BPE vocabularies spell bytes.
pub fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec!['\0'; 256];
    for (b, c) in bs.iter().zip(cs) {
        table[*b as usize] = char::from_u32(c).unwrap();
    }
    table
}

/// Vocabulary of the tiny tokenizer: 3 specials, 256 bytes, a few merges.
pub fn tiny_vocab() -> (Vec<String>, Vec<i64>, Vec<String>) {
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into(), "<|im_end|>".into()];
    let mut types = vec![3i64, 3, 3];
    for c in byte_chars() {
        tokens.push(c.to_string());
        types.push(1);
    }
    let merges: Vec<String> = ["h e", "l l", "he ll", "Ġ t", "Ġt h", "Ġth e", "o r", "e r"].iter().map(|s| s.to_string()).collect();
    for m in &merges {
        tokens.push(m.replace(' ', ""));
        types.push(1);
    }
    (tokens, types, merges)
}

#[derive(Clone, Debug)]
pub struct TinySpec {
    pub arch: Arch,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub tie: bool,
    pub max_pos: usize,
    pub seed: u64,
}

impl TinySpec {
    pub fn new(arch: Arch) -> Self {
        Self { arch, hidden: 64, intermediate: 128, layers: 2, heads: 4, kv_heads: 2, tie: false, max_pos: 256, seed: 7 }
    }
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
    pub fn vocab(&self) -> usize {
        tiny_vocab().0.len()
    }

    pub fn config_json(&self) -> serde_json::Value {
        let mut c = json!({
            "architectures": [self.arch.hf_class()],
            "model_type": self.arch.model_type(),
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab(),
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": self.max_pos,
            "tie_word_embeddings": self.tie,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        });
        if self.arch == Arch::Qwen3 {
            c["head_dim"] = json!(self.head_dim());
        }
        c
    }

    /// Random weights under HF names (f32).
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        let mut r = Rng::new(self.seed);
        let (h, i, hd, v) = (self.hidden, self.intermediate, self.head_dim(), self.vocab());
        let mut t = HashMap::new();
        let std = 0.08;
        t.insert("model.embed_tokens.weight".to_string(), r.tensor(&[v, h], 0.5));
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            let ones_ish = |r: &mut Rng, n: usize| (r.tensor(&[n], 0.1) + 1.0).unwrap();
            t.insert(format!("{p}.input_layernorm.weight"), ones_ish(&mut r, h));
            t.insert(format!("{p}.post_attention_layernorm.weight"), ones_ish(&mut r, h));
            t.insert(format!("{p}.self_attn.q_proj.weight"), r.tensor(&[self.heads * hd, h], std));
            t.insert(format!("{p}.self_attn.k_proj.weight"), r.tensor(&[self.kv_heads * hd, h], std));
            t.insert(format!("{p}.self_attn.v_proj.weight"), r.tensor(&[self.kv_heads * hd, h], std));
            t.insert(format!("{p}.self_attn.o_proj.weight"), r.tensor(&[h, self.heads * hd], std));
            t.insert(format!("{p}.mlp.gate_proj.weight"), r.tensor(&[i, h], std));
            t.insert(format!("{p}.mlp.up_proj.weight"), r.tensor(&[i, h], std));
            t.insert(format!("{p}.mlp.down_proj.weight"), r.tensor(&[h, i], std));
            if self.arch == Arch::Qwen2 {
                t.insert(format!("{p}.self_attn.q_proj.bias"), r.tensor(&[self.heads * hd], 0.2));
                t.insert(format!("{p}.self_attn.k_proj.bias"), r.tensor(&[self.kv_heads * hd], 0.2));
                t.insert(format!("{p}.self_attn.v_proj.bias"), r.tensor(&[self.kv_heads * hd], 0.2));
            }
            if self.arch == Arch::Qwen3 {
                t.insert(format!("{p}.self_attn.q_norm.weight"), ones_ish(&mut r, hd));
                t.insert(format!("{p}.self_attn.k_norm.weight"), ones_ish(&mut r, hd));
            }
        }
        t.insert("model.norm.weight".to_string(), (r.tensor(&[h], 0.1) + 1.0).unwrap());
        if !self.tie {
            t.insert("lm_head.weight".to_string(), r.tensor(&[v, h], std));
        }
        t
    }

    pub fn tokenizer_json(&self) -> serde_json::Value {
        let (tokens, types, merges) = tiny_vocab();
        awq_run::assets::tokenizer::from_gguf_vocab("gpt2", "smollm", &tokens, &types, &merges).unwrap()
    }

    /// Writes an HF-layout directory; returns its path.
    pub fn write_dir(&self, dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let w = |name: &str, v: &serde_json::Value| std::fs::write(dir.join(name), serde_json::to_string_pretty(v).unwrap()).unwrap();
        w("config.json", &self.config_json());
        w("tokenizer.json", &self.tokenizer_json());
        w("tokenizer_config.json", &json!({
            "chat_template": CHATML_TEMPLATE, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
            "add_bos_token": false,
        }));
        w("generation_config.json", &json!({"bos_token_id": 1, "eos_token_id": 2}));
        candle_core::safetensors::save(&self.tensors(), dir.join("model.safetensors")).unwrap();
        dir.to_path_buf()
    }

    /// Writes the same model as a llama.cpp GGUF (q/k permuted for the llama arch).
    pub fn write_gguf(&self, path: &Path) {
        self.write_gguf_with(path, Vec::new())
    }

    /// [`TinySpec::write_gguf`] with `extra` metadata keys.
    pub fn write_gguf_with(&self, path: &Path, extra: Vec<(String, Value)>) {
        let arch = match self.arch {
            Arch::Llama | Arch::Mistral => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        };
        let mut md: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String(arch.into())),
            (format!("{arch}.block_count"), Value::U32(self.layers as u32)),
            (format!("{arch}.context_length"), Value::U32(self.max_pos as u32)),
            (format!("{arch}.embedding_length"), Value::U32(self.hidden as u32)),
            (format!("{arch}.feed_forward_length"), Value::U32(self.intermediate as u32)),
            (format!("{arch}.attention.head_count"), Value::U32(self.heads as u32)),
            (format!("{arch}.attention.head_count_kv"), Value::U32(self.kv_heads as u32)),
            (format!("{arch}.rope.freq_base"), Value::F32(10000.0)),
            (format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
            ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
            ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
            ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
            ("tokenizer.chat_template".into(), Value::String(CHATML_TEMPLATE.into())),
        ];
        let (tokens, types, merges) = tiny_vocab();
        md.push(("tokenizer.ggml.tokens".into(), Value::Array(tokens.into_iter().map(Value::String).collect())));
        md.push(("tokenizer.ggml.token_type".into(), Value::Array(types.into_iter().map(|t| Value::I32(t as i32)).collect())));
        md.push(("tokenizer.ggml.merges".into(), Value::Array(merges.into_iter().map(Value::String).collect())));
        md.extend(extra);
        let mut qt: Vec<(String, QTensor)> = Vec::new();
        for (name, t) in self.tensors() {
            let g = gguf_name(&name);
            let t = if arch == "llama" && g.ends_with("attn_q.weight") {
                awq_run::assets::gguf::permute_rows(&t, self.heads).unwrap()
            } else if arch == "llama" && g.ends_with("attn_k.weight") {
                awq_run::assets::gguf::permute_rows(&t, self.kv_heads).unwrap()
            } else {
                t
            };
            qt.push((g, QTensor::quantize(&t, GgmlDType::F32).unwrap()));
        }
        qt.sort_by(|a, b| a.0.cmp(&b.0));
        let mut f = std::fs::File::create(path).unwrap();
        let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = qt.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
    }
}

fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (idx, rest) = rest.split_once('.').unwrap();
    let (module, suffix) = rest.rsplit_once('.').unwrap();
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        m => panic!("unmapped {m}"),
    };
    format!("blk.{idx}.{g}.{suffix}")
}

/// Max relative difference `max|a-b| / max|b|` of two tensors.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    let num = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let den = b.iter().map(|y| y.abs()).fold(0f32, f32::max).max(1e-12);
    num / den
}

/// Path of the built `awq-run` binary (cargo builds it for integration tests).
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_awq-run"))
}

/// Starts `awq-run serve --model MODEL --device cpu --host 127.0.0.1 --port 0 EXTRA...` and waits
/// for the line it prints when it listens; returns the child and the base URL (`http://ip:port`).
pub fn spawn_server(model: &Path, extra: &[&str]) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(bin())
        .args(["serve", "--model", model.to_str().unwrap(), "--device", "cpu", "--host", "127.0.0.1", "--port", "0"])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.split("http://").nth(1).and_then(|r| r.split_whitespace().next()).unwrap_or_else(|| panic!("no address in {line:?}"));
    (child, format!("http://{addr}"))
}
