//! The fuzz targets' bodies: one function per parser that reads a user's file or a server
//! request. Each takes the
//! fuzzer's bytes and must return without panicking, whatever they are; errors are the expected
//! outcome for almost every input. `fuzz_targets/*.rs` hand them to libFuzzer, and the main
//! crate's `tests/fuzz_corpus.rs` runs the seeds and every saved crash input through them as
//! ordinary tests (the regression corpus), so CI needs no nightly toolchain.
//!
//! Inputs that hold several files use one framing: each section but the last is a little-endian
//! `u32` length and that many bytes; the last section is the rest (see [`sections`]).
use awq_run::assets::{gguf, tokenizer, ModelAssets};
use awq_run::checkpoint::{GptqFormat, QuantFormat, QuantSpec};
use awq_run::quant::format::gptq::ZeroStorage;
use awq_run::engine::chat_template::{ChatTemplate, Message};
use awq_run::engine::sampling::SamplingParams;
use awq_run::model::{Config, Model};
use awq_run::quant::QuantScheme;
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

/// The names of the targets, as `fuzz_targets/NAME.rs` and the corpus folders spell them.
pub const TARGETS: &[&str] = &["gguf", "model_dir", "awq_linear", "tokenizer", "chat_template", "configs", "request", "tool_calls"];

/// Runs target `name` on `data`; true when the input was accepted all the way (a model loaded
/// and ran, a template rendered, ...), which the seeds' test checks.
pub fn run(name: &str, data: &[u8]) -> bool {
    match name {
        "gguf" => gguf_file(data),
        "model_dir" => model_dir(data),
        "awq_linear" => awq_linear(data),
        "tokenizer" => tokenizer_json(data),
        "chat_template" => chat_template(data),
        "configs" => configs(data),
        "request" => request(data),
        "tool_calls" => tool_calls(data),
        other => panic!("no fuzz target {other}"),
    }
}

/// Splits `data` into `n` sections (see the module docs); missing sections are empty.
pub fn sections(mut data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.saturating_sub(1) {
        let len = data.get(..4).map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize).unwrap_or(0);
        data = data.get(4..).unwrap_or(&[]);
        let (head, rest) = data.split_at(len.min(data.len()));
        out.push(head);
        data = rest;
    }
    out.push(data);
    out
}

/// The inverse of [`sections`], for writing seeds.
pub fn frame(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        if i + 1 < parts.len() {
            out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(p);
    }
    out
}

/// Runs a loaded model on a few tokens, as chat would right after loading.
fn run_model(m: &Model) -> bool {
    let vocab = m.vocab_size() as u32;
    let ids: Vec<u32> = [0, 1, 5].iter().map(|&t| t % vocab.max(1)).collect();
    Tensor::new(ids.as_slice(), &Device::Cpu).and_then(|t| t.unsqueeze(0)).and_then(|t| m.forward_all(&t)).is_ok()
}

/// A GGUF file: metadata, tensor infos and data, the tokenizer built from its vocabulary, the
/// model built from its tensors.
pub fn gguf_file(data: &[u8]) -> bool {
    let path = Path::new("fuzz.gguf");
    let Ok(g) = gguf::read_from(&mut std::io::Cursor::new(data), path) else { return false };
    let Ok(assets) = ModelAssets::from_gguf_model("fuzz", path, g) else { return false };
    assets.load_model(&Device::Cpu, DType::F32).is_ok_and(|m| run_model(&m))
}

/// A scratch directory of this process and call, emptied for each input. The call number keeps
/// two threads apart: the corpus tests run targets in parallel, and one thread's cleanup under
/// another's memory-mapped safetensors file is a SIGBUS or a refused seed.
fn scratch() -> PathBuf {
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("awq-run-fuzz-{}-{call}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch directory");
    d
}

/// An HF-layout directory: sections config.json, tokenizer.json, model.safetensors (a full or an
/// AWQ checkpoint, as config.json's quantization_config says), loaded and run.
pub fn model_dir(data: &[u8]) -> bool {
    let parts = sections(data, 3);
    let dir = scratch();
    for (name, bytes) in ["config.json", "tokenizer.json", "model.safetensors"].iter().zip(&parts) {
        std::fs::write(dir.join(name), bytes).expect("scratch file");
    }
    let ran = ModelAssets::from_dir("fuzz", &dir).is_ok_and(|a| a.load_model(&Device::Cpu, DType::F32).is_ok_and(|m| run_model(&m)));
    let _ = std::fs::remove_dir_all(&dir);
    ran
}

/// Reads bytes one at a time, then zeros.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn byte(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map(|(b, r)| (*b, r)).unwrap_or((0, &[]));
        self.0 = rest;
        b
    }
}

/// One 4-bit linear whose `qweight` / `qzeros` / `scales` (and bias, and `g_idx`) have shapes and
/// dtypes the bytes choose, consistent or not with the layer's in/out features and group size,
/// in the layout the last byte picks (AWQ GEMM, GPTQ, GPTQ v2): read into the 4-bit layer and run.
pub fn awq_linear(data: &[u8]) -> bool {
    let mut b = Bytes(data);
    let in_f = [8, 16, 24, 64, 72, 128, 7, 0][b.byte() as usize % 8];
    let out_f = [8, 16, 40, 64, 9, 0][b.byte() as usize % 6];
    let group = [0, 8, 16, 32, 64, 128, 7, 24][b.byte() as usize % 8];
    let bias = b.byte() % 2 == 1;
    let mut tensors = std::collections::HashMap::new();
    for name in ["qweight", "qzeros", "scales", "bias", "g_idx"] {
        let code = b.byte();
        if code % 5 == 0 {
            continue; // missing
        }
        let dims: Vec<usize> = (0..1 + code as usize % 3).map(|_| b.byte() as usize % 160).collect();
        let n: usize = dims.iter().product();
        let raw: Vec<u8> = (0..n * 4).map(|_| b.byte()).collect();
        let t = match (code / 5) % 3 {
            0 => Tensor::from_vec(raw.chunks(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect::<Vec<_>>(), dims, &Device::Cpu),
            1 => Tensor::from_vec(raw.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect::<Vec<_>>(), dims, &Device::Cpu),
            _ => Tensor::from_vec(raw.chunks(4).map(|c| half::f16::from_le_bytes([c[0], c[1]])).collect::<Vec<_>>(), dims, &Device::Cpu),
        };
        if let Ok(t) = t {
            tensors.insert(format!("layer.{name}"), t);
        }
    }
    let Ok(scheme) = QuantScheme::new(4, group) else { return false };
    let gptq = |zeros| QuantFormat::Gptq(GptqFormat { zeros, sym: false, desc_act: true, static_groups: false, true_sequential: true, damp_percent: 0.01 });
    let format = match b.byte() % 3 {
        0 => QuantFormat::AwqGemm,
        1 => gptq(ZeroStorage::MinusOne),
        _ => gptq(ZeroStorage::Plain),
    };
    let spec = QuantSpec { scheme, format, skip: vec![] };
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let Ok(layer) = awq_run::checkpoint::load_quant_linear(vb.pp("layer"), in_f, out_f, bias, &spec) else { return false };
    Tensor::ones((1, 3, in_f), DType::F32, &Device::Cpu).and_then(|x| layer.forward(&x)).is_ok()
}

/// A tokenizer.json: parsed, then used to encode, decode and stream a text with special tokens.
pub fn tokenizer_json(data: &[u8]) -> bool {
    let Ok(tok) = tokenizer::from_bytes(data) else { return false };
    let Ok(enc) = tok.encode("Hello <|im_start|>user\nwörld 123 ☃<|im_end|>", true) else { return false };
    let ids = enc.get_ids();
    let decoded = tok.decode(ids, true).is_ok();
    let mut stream = tokenizer::TokenStream::new();
    let streamed = ids.iter().all(|&id| stream.push(&tok, id).is_ok()) && stream.finish(&tok).is_ok();
    decoded && streamed
}

/// A chat template (first section) rendered over messages (the rest, split at NUL bytes, with
/// the roles taking turns), with and without the generation prompt.
pub fn chat_template(data: &[u8]) -> bool {
    let parts = sections(data, 2);
    let Ok(template) = std::str::from_utf8(parts[0]) else { return false };
    let Ok(t) = ChatTemplate::new(template, Some("<s>"), Some("</s>")) else { return false };
    let text = String::from_utf8_lossy(parts[1]);
    let roles = ["system", "user", "assistant", "tool"];
    let messages: Vec<Message> = text.split('\0').enumerate().map(|(i, c)| Message::new(roles[i % 4], c)).collect();
    let full = t.render(&messages, true).is_ok();
    let first = t.render(&messages[..messages.len().min(1)], false).is_ok();
    full && first
}

/// JSON configs: the bytes as config.json (parsed and validated), as a quantization config
/// (config.json's `quantization_config` or a legacy quant_config.json) and as
/// generation_config.json (the sampling settings taken from it).
pub fn configs(data: &[u8]) -> bool {
    let mut accepted = false;
    if let Ok(cfg) = serde_json::from_slice::<Config>(data) {
        if cfg.validate().is_ok() {
            let _ = (cfg.head_dim(), cfg.num_kv_heads(), cfg.qkv_bias(), cfg.eos_ids());
            accepted = true;
            if let Some(q) = &cfg.quantization_config {
                accepted &= QuantSpec::parse(q, "config.json").is_ok();
            }
        }
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else { return false };
    accepted |= QuantSpec::parse(&v, "quant_config.json").is_ok();
    accepted |= SamplingParams::default().with_generation_config(&v, "generation_config.json").is_ok();
    accepted
}

/// A server request's body: parsed as the chat and completion handlers parse it, every field
/// reader in turn (sampling, log-probabilities, refused fields, `logit_bias`, structured output,
/// tools with each parser, messages, prompts); true when its endpoint (chat where it has
/// `messages`, else completions) would accept it.
pub fn request(data: &[u8]) -> bool {
    use awq_run::server::openai;
    use awq_run::server::tool_parser::ToolParser;
    let Ok(o) = openai::parse_body(data) else { return false };
    let vocab = 1000;
    let chat = o.contains_key("messages");
    let common = openai::common(&o, &SamplingParams::default(), vocab).is_ok();
    let logprobs = [openai::logprobs(&o, true).is_ok(), openai::logprobs(&o, false).is_ok()];
    let allowed = [openai::refuse_unsupported(&o, true).is_ok(), openai::refuse_unsupported(&o, false).is_ok()];
    let bias = openai::logit_bias(&o, vocab).is_ok();
    let grammar = openai::grammar(&o).is_ok();
    let mut tools = false;
    for parser in [None, Some(ToolParser::Hermes), Some(ToolParser::Llama3Json), Some(ToolParser::Mistral)] {
        if let Ok((_, calls)) = openai::tools(&o, parser) {
            let _ = calls.as_ref().map(openai::ToolCalls::grammar);
            tools = true;
        }
    }
    let messages = openai::messages(&o).is_ok();
    let prompts = openai::prompts(&o, vocab).is_ok();
    let endpoint = if chat { logprobs[0] && allowed[0] && tools && messages } else { logprobs[1] && allowed[1] && prompts };
    common && bias && grammar && endpoint
}

/// A reply's text read for tool calls: the first byte picks the parser, the second the size of
/// the streamed pieces, the rest is the text. Streamed in those pieces, the scanner must give the
/// text and calls that the whole reply gives (a difference panics, for the fuzzer to report);
/// true when the text holds calls.
pub fn tool_calls(data: &[u8]) -> bool {
    use awq_run::server::tool_parser::{join, parse, Scanner, ToolParser};
    let mut b = Bytes(data);
    let parser = [ToolParser::Hermes, ToolParser::Llama3Json, ToolParser::Mistral][b.byte() as usize % 3];
    let step = 1 + b.byte() as usize % 16;
    let text = String::from_utf8_lossy(b.0);
    let (whole_text, whole_calls) = parse(parser, &text);
    let chars: Vec<char> = text.chars().collect();
    let mut s = Scanner::new(parser);
    let mut pieces = Vec::new();
    for chunk in chars.chunks(step) {
        pieces.extend(s.push(&chunk.iter().collect::<String>()));
    }
    pieces.extend(s.finish());
    assert_eq!(join(pieces), (whole_text, whole_calls.clone()), "{parser:?}: streamed in pieces of {step} characters");
    !whole_calls.is_empty()
}
