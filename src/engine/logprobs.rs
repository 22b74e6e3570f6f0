//! Log-probabilities of generated tokens, for the OpenAI API's `logprobs` and `top_logprobs`,
//! and of a prompt's own tokens (`echo`).
//!
//! They are the log-softmax of the model's raw logits at the step that produced the token:
//! before repetition penalties, temperature and the top-k/top-p/min-p filters, as vLLM reports
//! them by default. They say what the model thought of each candidate, whatever the sampling
//! settings did with it; a greedy token is then always the first of its alternatives (ties
//! aside).
use crate::error::Result;
use crate::model::logits::{top_k_of, top_k_rows};
use crate::model::Model;
use candle_core::{DType, Tensor, D};

/// Most alternatives a request may ask for per token (OpenAI's `top_logprobs` limit).
pub const TOP_LOGPROBS_MAX: usize = 20;

/// One generated token with its log-probability and the row's best alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// The `n` most likely tokens of the row with their log-probabilities, by falling
    /// log-probability then rising id (the generated token among them where it ranks).
    pub top: Vec<(u32, f32)>,
}

/// The log-probability of `token` and of the `top` most likely tokens under the softmax of
/// `row` (one position's logits). NaN logits count as impossible; a row with no finite logit
/// gives every token negative infinity.
pub fn of_row(row: &[f32], token: u32, top: usize) -> TokenLogprob {
    let lse = log_sum_exp(row);
    let lp = |l: f32| if l.is_nan() || lse == f64::NEG_INFINITY { f32::NEG_INFINITY } else { (f64::from(l) - lse) as f32 };
    let top = if top == 0 { Vec::new() } else { top_k_of(row, top.min(row.len())).into_iter().map(|(i, l)| (i, lp(l))).collect() };
    TokenLogprob { token, logprob: row.get(token as usize).map_or(f32::NEG_INFINITY, |&l| lp(l)), top }
}

/// The log-probability of each token of `prompt` after the first under the model given the
/// tokens before it, with the `top` most likely tokens at each position (the OpenAI API's
/// `echo` with `logprobs`: what scoring a text, lm-eval's loglikelihood, asks for). One forward
/// pass over the whole prompt; the softmax and the selection run where the logits are, and only
/// the picked values and the pairs come to the host.
pub fn of_prompt(model: &Model, prompt: &[u32], top: usize) -> Result<Vec<TokenLogprob>> {
    let n = prompt.len();
    if n < 2 {
        return Ok(Vec::new());
    }
    let input = Tensor::from_slice(prompt, (1, n), &model.device)?;
    let logits = model.forward_all(&input)?.get(0)?.narrow(0, 0, n - 1)?.to_dtype(DType::F32)?;
    let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?.contiguous()?;
    let targets = Tensor::new(&prompt[1..], &model.device)?.unsqueeze(1)?;
    let picked = lp.gather(&targets, 1)?.squeeze(1)?.to_vec1::<f32>()?;
    let tops = if top == 0 { vec![Vec::new(); n - 1] } else { top_k_rows(&lp, top)? };
    Ok(prompt[1..].iter().zip(picked).zip(tops).map(|((&token, logprob), top)| TokenLogprob { token, logprob, top }).collect())
}

/// ln Σ exp(row), in f64 around the row's maximum (NaN left out).
fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().filter(|l| !l.is_nan()).fold(f32::NEG_INFINITY, |m, &l| m.max(l));
    if max == f32::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    if max == f32::INFINITY {
        return f64::INFINITY;
    }
    let m = f64::from(max);
    let sum: f64 = row.iter().filter(|l| !l.is_nan()).map(|&l| (f64::from(l) - m).exp()).sum();
    m + sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_probabilities_match_a_direct_softmax() {
        let row = [2.0f32, -1.0, 0.5, 2.0, f32::NEG_INFINITY, f32::NAN, -30.0];
        let z: f64 = row.iter().filter(|l| l.is_finite()).map(|&l| f64::from(l).exp()).sum();
        let want = |l: f32| (f64::from(l).exp() / z).ln();
        let got = of_row(&row, 2, 3);
        assert!((f64::from(got.logprob) - want(0.5)).abs() < 1e-6, "{got:?}");
        // Ties rank by rising id; the generated token need not be among the alternatives.
        let ids: Vec<u32> = got.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![0, 3, 2]);
        for (i, l) in &got.top {
            assert!((f64::from(*l) - want(row[*i as usize])).abs() < 1e-6);
        }
        // The probabilities of the whole row add up to one.
        let all = of_row(&row, 0, row.len());
        let total: f64 = all.top.iter().map(|t| f64::from(t.1).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        assert_eq!(of_row(&row, 4, 0).logprob, f32::NEG_INFINITY);
        assert_eq!(of_row(&row, 5, 0).logprob, f32::NEG_INFINITY);
        assert!(of_row(&row, 0, 0).top.is_empty());
    }

    #[test]
    fn large_logits_do_not_overflow_and_empty_rows_are_impossible() {
        let row = [1000.0f32, 999.0, -1000.0];
        let got = of_row(&row, 1, 1);
        let want = -(1.0f64 + (-1.0f64).exp()).ln() - 1.0;
        assert!((f64::from(got.logprob) - want).abs() < 1e-5, "{got:?}");
        assert_eq!(got.top.len(), 1);
        let none = of_row(&[f32::NEG_INFINITY, f32::NAN], 0, 2);
        assert!(none.logprob == f32::NEG_INFINITY && none.top.iter().all(|t| t.1 == f32::NEG_INFINITY));
    }
}
