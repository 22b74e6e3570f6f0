//! A model's assets, wherever they came from: config, weights, tokenizer, chat template and the
//! special tokens, and building the [`Model`] from them.
pub mod gguf;
pub mod import;
pub mod source;
pub mod tokenizer;

use crate::checkpoint::{AtomicDir, QuantSpec};
use crate::error::{Error, Result};
use crate::linear::DenseLinear;
use crate::model::{Config, Model};
use serde_json::Value;
use self::source::{weight_files, ModelFiles, ModelSource};
use self::tokenizer::token_string;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// Files copied next to a checkpoint from the source model directory when present.
pub const COPIED_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

pub enum Weights {
    /// Memory-mapped safetensors files.
    Safetensors(Vec<PathBuf>),
    /// Tensors already in memory (a GGUF file, dequantized).
    Tensors(HashMap<String, Tensor>),
}

pub struct ModelAssets {
    /// What the user named, for messages.
    pub name: String,
    /// The HF-layout directory, when there is one (not for GGUF files).
    pub dir: Option<PathBuf>,
    pub config: Config,
    pub weights: Weights,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Every token id that ends a reply (config, generation config and tokenizer config together).
    pub eos_ids: Vec<u32>,
    pub tokenizer_config: serde_json::Value,
    pub generation_config: serde_json::Value,
}

fn read_optional_json(path: &Path) -> Result<serde_json::Value> {
    if path.exists() {
        crate::error::read_json(path)
    } else {
        Ok(serde_json::json!({}))
    }
}

/// Checks every safetensors file's header up front, so a corrupt file is named in the error.
fn check_safetensors(files: &[PathBuf]) -> Result<()> {
    for f in files {
        let file = std::fs::File::open(f).map_err(|e| Error::io(f, e))?;
        // SAFETY: the map is read-only and lives only for this check.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(f, e))?;
        if let Err(e) = safetensors::SafeTensors::read_metadata(&mmap) {
            return Err(Error::msg(match truncation(&mmap) {
                Some(what) => format!("{}: not a valid safetensors file: it is cut short ({what}); copy or write it again", f.display()),
                None => format!("{}: not a valid safetensors file: {e:?}", f.display()),
            }));
        }
    }
    Ok(())
}

/// What a safetensors file cut short lacks: its header, or the first tensor whose data runs past
/// the end. `None` when the file is not merely truncated.
fn truncation(bytes: &[u8]) -> Option<String> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let Some(header) = bytes.get(8..8usize.checked_add(n)?) else {
        return Some(format!("its header takes {n} bytes, only {} follow", bytes.len() - 8));
    };
    let header: serde_json::Value = serde_json::from_slice(header).ok()?;
    let data = bytes.len() - 8 - n;
    header
        .as_object()?
        .iter()
        .filter_map(|(name, t)| Some((name, t.get("data_offsets")?.get(1)?.as_u64()? as usize)))
        .filter(|&(_, end)| end > data)
        .min_by_key(|&(_, end)| end)
        .map(|(name, end)| format!("tensor {name} needs {end} bytes of data, the file holds {data}"))
}

impl ModelAssets {
    /// Loads everything but the model weights' data from a `--model` argument.
    pub fn load(spec: &str) -> Result<Self> {
        let files = ModelSource::parse(spec)?.resolve()?;
        match files {
            ModelFiles::Dir(dir) => Self::from_dir(spec, &dir),
            ModelFiles::Gguf(path) => Self::from_gguf(spec, &path),
        }
    }

    pub fn from_dir(name: &str, dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        if !config_path.exists() {
            return Err(Error::Config(format!("{}: config.json is missing", dir.display())));
        }
        let config = Config::from_file(&config_path)?;
        let tokenizer = self::tokenizer::from_file(&dir.join("tokenizer.json"))?;
        let tokenizer_config = read_optional_json(&dir.join("tokenizer_config.json"))?;
        let generation_config = read_optional_json(&dir.join("generation_config.json"))?;
        let files = weight_files(dir)?;
        check_safetensors(&files)?;
        let mut assets = Self {
            name: name.to_string(),
            dir: Some(dir.to_path_buf()),
            config,
            weights: Weights::Safetensors(files),
            tokenizer,
            chat_template: None,
            bos_token: None,
            eos_token: None,
            eos_ids: vec![],
            tokenizer_config,
            generation_config,
        };
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            assets.chat_template = Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?);
        }
        assets.fill_special_tokens();
        Ok(assets)
    }

    pub fn from_gguf(name: &str, path: &Path) -> Result<Self> {
        Self::from_gguf_model(name, path, self::gguf::read(path)?)
    }

    /// The assets of a GGUF file already read (`path` names it in errors).
    pub fn from_gguf_model(name: &str, path: &Path, g: self::gguf::GgufModel) -> Result<Self> {
        let tokenizer = self::tokenizer::from_value(&g.tokenizer_json)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let mut assets = Self {
            name: name.to_string(),
            dir: None,
            config: g.config,
            weights: Weights::Tensors(g.tensors),
            tokenizer,
            chat_template: None,
            bos_token: None,
            eos_token: None,
            eos_ids: vec![],
            tokenizer_config: g.tokenizer_config,
            generation_config: g.generation_config,
        };
        assets.fill_special_tokens();
        Ok(assets)
    }

    /// Assets for a model of random weights of shape `config` (`--dummy-weights`): no weights to
    /// read, the tokenizer of [`tokenizer::byte_level_tokenizer`], no chat template
    /// (users of the assets fall back to ChatML, whose `<|im_end|>` ends a reply).
    pub fn for_dummy(name: &str, config: Config) -> Result<Self> {
        if config.vocab_size < 259 {
            return Err(Error::Config(format!("{name}: a vocabulary of {} is too small for the byte-level tokenizer (259)", config.vocab_size)));
        }
        let tokenizer = self::tokenizer::byte_level_tokenizer(config.vocab_size)?;
        Ok(Self {
            name: name.to_string(),
            dir: None,
            config,
            weights: Weights::Tensors(HashMap::new()),
            tokenizer,
            chat_template: None,
            bos_token: None,
            eos_token: Some(self::tokenizer::BYTE_LEVEL_SPECIALS[2].to_string()),
            eos_ids: vec![2],
            tokenizer_config: serde_json::json!({}),
            generation_config: serde_json::json!({}),
        })
    }

    fn fill_special_tokens(&mut self) {
        let tc = &self.tokenizer_config;
        if self.chat_template.is_none() {
            self.chat_template = match tc.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                // A list of named templates: take "default".
                Some(serde_json::Value::Array(a)) => a
                    .iter()
                    .find(|t| t["name"] == "default")
                    .or_else(|| a.first())
                    .and_then(|t| t["template"].as_str().map(str::to_string)),
                _ => None,
            };
        }
        self.bos_token = token_string(tc.get("bos_token"));
        self.eos_token = token_string(tc.get("eos_token"));
        let mut ids = self.config.eos_ids();
        if let Some(g) = self.generation_config.get("eos_token_id") {
            if let Ok(t) = serde_json::from_value::<crate::model::config::TokenIds>(g.clone()) {
                ids.extend(t.to_vec());
            }
        }
        if let Some(id) = self.eos_token.as_deref().and_then(|t| self.tokenizer.token_to_id(t)) {
            ids.push(id);
        }
        ids.sort_unstable();
        ids.dedup();
        self.eos_ids = ids;
    }

    /// The checkpoint's quantization (config.json's `quantization_config`, or a legacy
    /// `quant_config.json` / `quantize_config.json` beside it), or `None` for a full-precision
    /// model.
    pub fn quant_spec(&self) -> Result<Option<QuantSpec>> {
        if let Some(q) = &self.config.quantization_config {
            return QuantSpec::parse(q, &format!("{}: config.json quantization_config", self.name)).map(Some);
        }
        let Some(dir) = &self.dir else { return Ok(None) };
        for f in ["quant_config.json", "quantize_config.json"] {
            let p = dir.join(f);
            if p.exists() {
                let v: Value = crate::error::read_json(&p)?;
                return QuantSpec::parse(&v, &p.display().to_string()).map(Some);
            }
        }
        Ok(None)
    }

    /// Writes the tokenizer, its config and the generation config into `dir`: copies of the
    /// source directory's files, or for a GGUF model the ones built from it.
    pub fn write_tokenizer_files(&self, dir: &AtomicDir) -> Result<()> {
        match &self.dir {
            Some(src) => {
                for f in COPIED_FILES {
                    let from = src.join(f);
                    if from.exists() {
                        let to = dir.path().join(f);
                        std::fs::copy(&from, &to).map_err(|e| Error::io(&from, e))?;
                    }
                }
            }
            None => {
                let p = dir.path().join("tokenizer.json");
                self.tokenizer.save(&p, false).map_err(|e| Error::Tokenizer(format!("{}: {e}", p.display())))?;
                dir.write_json("tokenizer_config.json", &self.tokenizer_config)?;
                dir.write_json("generation_config.json", &self.generation_config)?;
            }
        }
        Ok(())
    }

    /// A VarBuilder over the weights, converting to `dtype` on `device`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'_>> {
        Ok(match &self.weights {
            // SAFETY: the files are memory-mapped read-only; modifying them while loaded is the
            // same hazard every mmap-based loader (candle, safetensors, llama.cpp) accepts.
            Weights::Safetensors(files) => unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device)? },
            Weights::Tensors(t) => VarBuilder::from_tensors(t.clone(), dtype, device),
        })
    }

    /// Builds the model in `dtype` on `device`; quantized checkpoints get their quantized layers.
    pub fn load_model(&self, device: &Device, dtype: DType) -> Result<Model> {
        let vb = self.var_builder(dtype, device)?;
        let quant = self.quant_spec()?;
        let loader = |vb: VarBuilder, i: usize, o: usize, b: bool| match &quant {
            None => Ok(DenseLinear::load(vb, i, o, b)?.into_linear()),
            Some(q) => crate::checkpoint::load_quant_linear(vb, i, o, b, q),
        };
        // Quantized checkpoints store embeddings and lm_head in f16: on the CPU, with f32
        // activations, they stay f16 (half the memory and half the lm_head's reads).
        let half_tables = quant.is_some() && device.is_cpu() && dtype == DType::F32;
        Model::load_with(vb, &self.config, &loader, half_tables).map_err(|e| Error::msg(format!("{}: {e}", self.name)))
    }

    /// Encodes a prompt. Chat-rendered prompts carry their own special tokens, so
    /// `add_special_tokens` is false for them (as transformers' apply_chat_template does).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true).map_err(|e| Error::Tokenizer(e.to_string()))
    }
}
