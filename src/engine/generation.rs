//! Token generation: the decode loop with streaming output, and statistics.
pub use super::sampling::SamplingParams;
use super::constraint::{Constraint, Next};
use super::sampling::{fetch_rows, RowLogits, Sampler, Wants};
use crate::assets::tokenizer::TokenStream;
use crate::error::{Error, Result};
use crate::model::{Cache, Model};
use candle_core::Tensor;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tokenizers::Tokenizer;

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
    /// The grammar replies are held to (`generate --json-schema` and the like), from its start
    /// at every call.
    constraint: Option<Constraint>,
}

impl<'a> Generator<'a> {
    pub fn new(model: &'a Model, tokenizer: &'a Tokenizer, eos_ids: Vec<u32>) -> Self {
        let cache = model.new_cache(model.context_len());
        Self { model, tokenizer, eos_ids, cache, cached_tokens: Vec::new(), constraint: None }
    }

    /// As [`Generator::new`] with the KV cache storing `kv_dtype` (None: the model's default,
    /// [`Model::new_cache`]); refused where the model cannot use it.
    pub fn with_kv_dtype(model: &'a Model, tokenizer: &'a Tokenizer, eos_ids: Vec<u32>, kv_dtype: Option<candle_core::DType>) -> Result<Self> {
        let cache = model.new_cache_with(model.context_len(), kv_dtype)?;
        Ok(Self { model, tokenizer, eos_ids, cache, cached_tokens: Vec::new(), constraint: None })
    }

    /// Holds every later reply to a grammar ([`crate::engine::constraint::Compiler::compile`]):
    /// tokens it does not allow are never drawn, and a reply ends where it is complete.
    pub fn set_constraint(&mut self, c: Option<Constraint>) {
        self.constraint = c;
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
        let mut sampler = Sampler::new(params);
        let mut stream = TokenStream::new();
        let mut history: Vec<u32> = prompt.to_vec();
        let mut out = Vec::new();
        let dev = &self.model.device;
        let mut constraint = self.constraint.clone();

        let t0 = Instant::now();
        let input = Tensor::new(&prompt[reuse..], dev)?.unsqueeze(0)?;
        let mut logits = self.model.forward(&input, &mut self.cache)?;
        self.cached_tokens.extend_from_slice(&prompt[reuse..]);
        let mut t_decode = None;
        stats.stop = StopReason::MaxTokens;
        for i in 0..params.max_tokens {
            // As much of the row as the sampler needs: on a GPU its best few pairs, where the
            // settings allow, instead of the vocabulary.
            let want = if constraint.is_some() { Wants::Whole } else { sampler.wants(logits.dim(1)?) };
            let row = fetch_rows(&logits, &[Some((0, want))])?.pop().flatten().ok_or_else(|| Error::msg("generation: no logits"))?;
            let next = match (&mut constraint, row) {
                // The row masked to what the grammar allows; complete, it allows only the end.
                (Some(c), RowLogits::Whole(mut row)) => match c.mask(&mut row, &[]).map_err(Error::Grammar)? {
                    Next::End(end) => end,
                    Next::Tokens => sampler.sample(row, &history)?,
                },
                (_, row) => sampler.sample_fetched(row, &logits, &history)?,
            };
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
            if let Some(c) = &mut constraint {
                if c.accept(next).map_err(Error::Grammar)? {
                    stats.stop = StopReason::Eos;
                    break;
                }
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
