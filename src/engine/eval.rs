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

/// Perplexity of `model` on `tokens`, at most `max_windows` windows, `batch` windows per forward
/// pass (each still its own sequence: a GPU is busier with several; only `batch` windows'
/// logits are alive at a time); `on_window(i, n)` reports progress.
pub fn perplexity(model: &Model, tokens: &[u32], seqlen: usize, max_windows: Option<usize>, batch: usize, mut on_window: impl FnMut(usize, usize)) -> Result<Perplexity> {
    let t0 = std::time::Instant::now();
    let mut windows = check_windows(tokens.len(), seqlen, model.context_len())?;
    model.check_tokens(tokens)?;
    if let Some(m) = max_windows {
        windows = windows.min(m.max(1));
    }
    let batch = batch.max(1);
    let mut nll = 0f64;
    let mut w0 = 0;
    while w0 < windows {
        let b = batch.min(windows - w0);
        let chunk = &tokens[w0 * seqlen..(w0 + b) * seqlen];
        let input = Tensor::from_slice(chunk, (b, seqlen), &model.device)?;
        let logits = model.forward_all(&input)?;
        for i in 0..b {
            let w = w0 + i;
            let l = window_nll(&logits.get(i)?, &chunk[i * seqlen..(i + 1) * seqlen])?;
            if !l.is_finite() {
                return Err(Error::msg(format!("window {w}: the loss is {l} (NaN or inf in the logits)")));
            }
            nll += l;
        }
        w0 += b;
        on_window(w0, windows);
    }
    let scored = windows * (seqlen - 1);
    Ok(Perplexity { perplexity: (nll / scored as f64).exp(), windows, tokens_scored: scored, seqlen, seconds: t0.elapsed().as_secs_f64() })
}
