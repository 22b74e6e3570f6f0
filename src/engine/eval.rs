//! Perplexity, following docs/AWQ.md ("Perplexity"): the text tokenized once, cut into
//! non-overlapping windows of `seqlen` tokens (the tail dropped), each window run on its own,
//! every predicted token scored with f32 cross-entropy, `ppl = exp(total NLL / tokens scored)`.
use crate::error::{Error, Result};
use crate::model::Model;
use candle_core::{DType, Tensor, D};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Perplexity {
    pub perplexity: f64,
    pub windows: usize,
    pub tokens_scored: usize,
    pub seqlen: usize,
    pub seconds: f64,
}

/// Sum of the negative log-likelihoods of `tokens[1..]` under `logits[..-1]` for one window;
/// `logits` is `[seq, vocab]`.
pub fn window_nll(logits: &Tensor, tokens: &[u32]) -> Result<f64> {
    let n = tokens.len();
    let lp = candle_nn::ops::log_softmax(&logits.narrow(0, 0, n - 1)?.to_dtype(DType::F32)?, D::Minus1)?;
    let targets = Tensor::new(&tokens[1..], logits.device())?.unsqueeze(1)?;
    let picked = lp.gather(&targets, 1)?.squeeze(1)?;
    Ok(-f64::from(picked.sum_all()?.to_scalar::<f32>()?))
}

/// Checks the window length against the text and the model before any work.
pub fn check_windows(n_tokens: usize, seqlen: usize, context: usize) -> Result<usize> {
    if seqlen < 2 {
        return Err(Error::msg(format!("--seqlen {seqlen}: a window needs at least 2 tokens")));
    }
    if seqlen > context {
        return Err(Error::msg(format!("--seqlen {seqlen} is beyond the model's context of {context} tokens")));
    }
    if n_tokens < seqlen {
        return Err(Error::msg(format!(
            "the text has {n_tokens} tokens, shorter than one window of --seqlen {seqlen}"
        )));
    }
    Ok(n_tokens / seqlen)
}

/// Perplexity of `model` on `tokens`, at most `max_windows` windows; `on_window(i, n)` reports
/// progress. Only one window's logits are alive at a time.
pub fn perplexity(model: &Model, tokens: &[u32], seqlen: usize, max_windows: Option<usize>, mut on_window: impl FnMut(usize, usize)) -> Result<Perplexity> {
    let t0 = std::time::Instant::now();
    let mut windows = check_windows(tokens.len(), seqlen, model.context_len())?;
    model.check_tokens(tokens)?;
    if let Some(m) = max_windows {
        windows = windows.min(m.max(1));
    }
    let mut nll = 0f64;
    for w in 0..windows {
        let chunk = &tokens[w * seqlen..(w + 1) * seqlen];
        let input = Tensor::new(chunk, &model.device)?.unsqueeze(0)?;
        let logits = model.forward_all(&input)?.squeeze(0)?;
        let l = window_nll(&logits, chunk)?;
        if !l.is_finite() {
            return Err(Error::msg(format!("window {w}: the loss is {l} (NaN or inf in the logits)")));
        }
        nll += l;
        on_window(w + 1, windows);
    }
    let scored = windows * (seqlen - 1);
    Ok(Perplexity { perplexity: (nll / scored as f64).exp(), windows, tokens_scored: scored, seqlen, seconds: t0.elapsed().as_secs_f64() })
}
