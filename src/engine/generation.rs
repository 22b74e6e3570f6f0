//! Token generation: sampling settings, the decode loop with streaming output, and statistics.
use crate::error::{Error, Result};
use crate::model::{Cache, Model};
use crate::assets::tokenizer::TokenStream;
use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tokenizers::Tokenizer;

#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 means greedy decoding.
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    /// 1.0 disables the penalty.
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    pub seed: u64,
    pub max_tokens: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.7, top_p: Some(0.9), top_k: None, repeat_penalty: 1.1, repeat_last_n: 64, seed: 299792458, max_tokens: 512 }
    }
}

impl SamplingParams {
    pub fn logits_processor(&self) -> LogitsProcessor {
        let t = self.temperature;
        let sampling = if t <= 0.0 {
            Sampling::ArgMax
        } else {
            match (self.top_k, self.top_p) {
                (None, None) => Sampling::All { temperature: t },
                (Some(k), None) => Sampling::TopK { k, temperature: t },
                (None, Some(p)) => Sampling::TopP { p, temperature: t },
                (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature: t },
            }
        };
        LogitsProcessor::from_sampling(self.seed, sampling)
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0) {
            return Err(Error::msg("--temperature must be >= 0"));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::msg("--top-p must be in (0, 1]"));
            }
        }
        if self.top_k == Some(0) {
            return Err(Error::msg("--top-k must be positive"));
        }
        if !(self.repeat_penalty > 0.0) {
            return Err(Error::msg("--repeat-penalty must be positive"));
        }
        if self.max_tokens == 0 {
            return Err(Error::msg("--max-tokens must be positive"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    /// Prompt tokens actually run (the rest came from the KV cache).
    pub prefilled_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    /// Why generation stopped.
    pub stop: StopReason,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StopReason {
    #[default]
    Eos,
    MaxTokens,
    ContextFull,
    Interrupted,
}

impl GenerationStats {
    pub fn prefill_tps(&self) -> f64 {
        self.prefilled_tokens as f64 / self.prefill_secs.max(1e-9)
    }
    /// Decode speed counts the tokens after the first (the first comes out of the prefill).
    pub fn decode_tps(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
    pub fn summary(&self) -> String {
        format!(
            "prompt: {} tokens ({} run), {:.1} tok/s | generation: {} tokens, {:.1} tok/s",
            self.prompt_tokens,
            self.prefilled_tokens,
            self.prefill_tps(),
            self.generated_tokens,
            self.decode_tps()
        )
    }
}

/// A generation session: the model, its tokenizer and a KV cache that remembers which tokens it
/// holds, so the next prompt that starts with them (a chat's next turn) reuses them.
pub struct Generator<'a> {
    pub model: &'a Model,
    pub tokenizer: &'a Tokenizer,
    pub eos_ids: Vec<u32>,
    cache: Cache,
    cached_tokens: Vec<u32>,
}

impl<'a> Generator<'a> {
    pub fn new(model: &'a Model, tokenizer: &'a Tokenizer, eos_ids: Vec<u32>) -> Self {
        let cache = model.new_cache(model.context_len());
        Self { model, tokenizer, eos_ids, cache, cached_tokens: Vec::new() }
    }

    pub fn context_len(&self) -> usize {
        self.cache.capacity
    }

    pub fn reset(&mut self) {
        self.cache.reset();
        self.cached_tokens.clear();
    }

    /// Generates a continuation of `prompt`, calling `on_text` with each piece of text as soon as
    /// it is complete. Stops at an end-of-sequence token, `max_tokens`, a full context, or when
    /// `stop` is set (Ctrl-C). Returns the generated token ids and statistics.
    pub fn generate(&mut self, prompt: &[u32], params: &SamplingParams, stop: Option<&AtomicBool>, mut on_text: impl FnMut(&str) -> Result<()>) -> Result<(Vec<u32>, GenerationStats)> {
        if prompt.is_empty() {
            return Err(Error::msg("the prompt is empty: nothing to generate from"));
        }
        params.validate()?;
        self.model.check_tokens(prompt)?;
        let cap = self.context_len();
        if prompt.len() >= cap {
            return Err(Error::msg(format!(
                "the prompt has {} tokens; the context holds {cap}",
                prompt.len()
            )));
        }
        // Reuse the longest cached prefix, but always run at least the last prompt token.
        let common = self.cached_tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        let reuse = common.min(prompt.len() - 1);
        self.cache.truncate(reuse);
        self.cached_tokens.truncate(reuse);

        let mut stats = GenerationStats { prompt_tokens: prompt.len(), prefilled_tokens: prompt.len() - reuse, ..Default::default() };
        let mut lp = params.logits_processor();
        let mut stream = TokenStream::new();
        let mut history: Vec<u32> = prompt.to_vec();
        let mut out = Vec::new();
        let dev = &self.model.device;

        let t0 = Instant::now();
        let input = Tensor::new(&prompt[reuse..], dev)?.unsqueeze(0)?;
        let mut logits = self.model.forward(&input, &mut self.cache)?;
        self.cached_tokens.extend_from_slice(&prompt[reuse..]);
        let mut t_decode = None;
        stats.stop = StopReason::MaxTokens;
        for i in 0..params.max_tokens {
            let l = logits.squeeze(0)?;
            let l = if params.repeat_penalty != 1.0 {
                let start = history.len().saturating_sub(params.repeat_last_n);
                candle_transformers::utils::apply_repeat_penalty(&l, params.repeat_penalty, &history[start..])?
            } else {
                l
            };
            let next = lp.sample(&l)?;
            if i == 0 {
                stats.prefill_secs = t0.elapsed().as_secs_f64();
                t_decode = Some(Instant::now());
            }
            if self.eos_ids.contains(&next) {
                stats.stop = StopReason::Eos;
                break;
            }
            out.push(next);
            history.push(next);
            if let Some(text) = stream.push(self.tokenizer, next)? {
                on_text(&text)?;
            }
            if stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
                stats.stop = StopReason::Interrupted;
                break;
            }
            if i + 1 == params.max_tokens {
                break;
            }
            if self.cache.len() + 1 > cap {
                stats.stop = StopReason::ContextFull;
                break;
            }
            let input = Tensor::new(&[next], dev)?.unsqueeze(0)?;
            logits = self.model.forward(&input, &mut self.cache)?;
            self.cached_tokens.push(next);
        }
        if let Some(text) = stream.finish(self.tokenizer)? {
            on_text(&text)?;
        }
        stats.generated_tokens = out.len();
        stats.decode_secs = t_decode.map_or(0.0, |t| t.elapsed().as_secs_f64());
        Ok((out, stats))
    }
}
