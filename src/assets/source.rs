//! Where a model comes from: a Hugging Face hub id (through hf-hub and its cache), a local
//! directory in HF layout, or a GGUF file. Everything ends up as [`ModelFiles`].
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// The model a `--model` argument names.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    Dir(PathBuf),
    Gguf(PathBuf),
    Hub(String),
}

/// Files of an HF-layout model, all in one directory.
#[derive(Debug, Clone)]
pub enum ModelFiles {
    Dir(PathBuf),
    Gguf(PathBuf),
}

/// Weight files of an HF-layout directory: one `model.safetensors` or the shards an index names.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let v: serde_json::Value = crate::error::read_json(&index)?;
        let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
            Error::msg(format!("{}: no weight_map object", index.display()))
        })?;
        let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(str::to_string)).collect();
        files.sort();
        files.dedup();
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        for p in &paths {
            if !p.exists() {
                return Err(Error::msg(format!("{}: shard {} is missing", index.display(), p.display())));
            }
        }
        return Ok(paths);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(Error::msg(format!(
        "{}: no model.safetensors or model.safetensors.index.json (only safetensors weights are read)",
        dir.display()
    )))
}

impl ModelSource {
    /// Interprets a `--model` argument: an existing directory or `.gguf` file, else a hub id.
    pub fn parse(spec: &str) -> Result<Self> {
        let p = Path::new(spec);
        if p.is_dir() {
            return Ok(ModelSource::Dir(p.to_path_buf()));
        }
        if p.is_file() {
            if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
                return Ok(ModelSource::Gguf(p.to_path_buf()));
            }
            return Err(Error::msg(format!(
                "{spec}: a file that is not .gguf; give a model directory, a .gguf file or a hub id"
            )));
        }
        let looks_like_id = spec.split('/').count() == 2
            && !spec.starts_with('.')
            && !spec.starts_with('/')
            && spec.split('/').all(|s| !s.is_empty())
            && !spec.ends_with(".gguf");
        if looks_like_id {
            return Ok(ModelSource::Hub(spec.to_string()));
        }
        Err(Error::msg(format!(
            "{spec}: no such directory or .gguf file, and not a hub id of the form owner/name"
        )))
    }

    /// Makes the files available locally: a hub id is looked up in the HF cache first (no network
    /// access when everything is there), then downloaded with a progress bar.
    pub fn resolve(&self) -> Result<ModelFiles> {
        match self {
            ModelSource::Dir(d) => Ok(ModelFiles::Dir(d.clone())),
            ModelSource::Gguf(f) => Ok(ModelFiles::Gguf(f.clone())),
            ModelSource::Hub(id) => resolve_hub(id).map(ModelFiles::Dir),
        }
    }
}

const REQUIRED: &[&str] = &["config.json", "tokenizer.json"];
pub const OPTIONAL: &[&str] = &[
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "quant_config.json",
    "quantize_config.json",
];

/// The snapshot directory of a hub model in the HF cache if every needed file is there.
fn cached_snapshot(id: &str) -> Option<PathBuf> {
    let repo = hf_hub::Cache::from_env().model(id.to_string());
    let config = repo.get("config.json")?;
    let dir = config.parent()?.to_path_buf();
    if REQUIRED.iter().all(|f| dir.join(f).exists()) && weight_files(&dir).is_ok() {
        Some(dir)
    } else {
        None
    }
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0")
}

fn resolve_hub(id: &str) -> Result<PathBuf> {
    if let Some(dir) = cached_snapshot(id) {
        return Ok(dir);
    }
    let cache = hf_hub::Cache::from_env();
    if offline() {
        return Err(Error::msg(format!(
            "{id}: not complete in the HF cache at {} and HF_HUB_OFFLINE is set",
            cache.path().display()
        )));
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| Error::msg(format!("{id}: cannot set up the hub client: {e}")))?;
    let repo = api.model(id.to_string());
    let get = |f: &str| repo.get(f).map_err(|e| Error::msg(format!("{id}: cannot fetch {f}: {e}")));
    let config = get("config.json")?;
    for f in REQUIRED {
        get(f)?;
    }
    for f in OPTIONAL {
        let _ = repo.get(f); // absent in many repos
    }
    match repo.get("model.safetensors.index.json") {
        Ok(index) => {
            let v: serde_json::Value = crate::error::read_json(&index)?;
            let mut shards: Vec<String> = v["weight_map"]
                .as_object()
                .map(|m| m.values().filter_map(|s| s.as_str().map(str::to_string)).collect())
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for s in shards {
                get(&s)?;
            }
        }
        Err(_) => {
            get("model.safetensors")?;
        }
    }
    Ok(config.parent().map(Path::to_path_buf).unwrap_or_default())
}
