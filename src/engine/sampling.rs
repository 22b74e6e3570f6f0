//! Choosing the next token. Settings come from three places, later ones winning: llama.cpp's
//! well-known defaults (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, no repetition
//! penalty), the model's own generation_config.json, and the user's flags or `/set`. The chain
//! is llama.cpp's: repetition penalty, top-k, top-p, min-p (all three on the untempered
//! distribution), then temperature and a seeded draw; temperature 0 is greedy.
use crate::model::cpu_math::exp_nonpositive;
use crate::model::logits::{self, order_key, rank_order, top_k_of, TOP_K_MAX};
use candle_core::Tensor;
use crate::error::{Error, Result};
use crate::rng::Rng;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy decoding.
    pub temperature: f64,
    /// Nucleus sampling: the smallest set of tokens holding this probability mass (None: off).
    pub top_p: Option<f64>,
    /// Only the k most likely tokens (None: off).
    pub top_k: Option<usize>,
    /// Only tokens at least this fraction as likely as the most likely one (None: off).
    pub min_p: Option<f64>,
    /// 1.0 disables the penalty.
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    /// Subtracted from a token's logit once per time it occurs in the last `repeat_last_n`
    /// tokens (OpenAI's `frequency_penalty`; 0 disables it).
    pub frequency_penalty: f32,
    /// Subtracted once from the logit of every token that occurs there (`presence_penalty`).
    pub presence_penalty: f32,
    pub seed: u64,
    pub max_tokens: usize,
}

impl Default for SamplingParams {
    /// llama.cpp's defaults: they keep small models coherent (SmolLM2-135M samples nonsense from
    /// the whole vocabulary at temperature 0.7) and users of the field know them.
    fn default() -> Self {
        Self { temperature: 0.8, top_p: Some(0.95), top_k: Some(40), min_p: Some(0.05), repeat_penalty: 1.0, repeat_last_n: 64, frequency_penalty: 0.0, presence_penalty: 0.0, seed: 299792458, max_tokens: 512 }
    }
}

/// The settings `/set` and `/settings` know, in the order `/settings` lists them.
pub const SETTINGS: &[&str] = &["temperature", "top_p", "top_k", "min_p", "repeat_penalty", "max_tokens", "seed"];

impl SamplingParams {
    /// These settings with the sampling fields of a generation_config.json (`temperature`,
    /// `top_p`, `top_k`, `min_p`, `repetition_penalty`; `do_sample: false` means greedy) applied.
    /// A field of the wrong type is an error naming it; `origin` names the file.
    pub fn with_generation_config(mut self, g: &serde_json::Value, origin: &str) -> Result<Self> {
        let num = |key: &str| -> Result<Option<f64>> {
            match g.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => v.as_f64().map(Some).ok_or_else(|| Error::msg(format!("{origin}: {key} is {v}, not a number"))),
            }
        };
        if let Some(t) = num("temperature")? {
            self.temperature = t;
        }
        if let Some(p) = num("top_p")? {
            self.top_p = (p != 1.0).then_some(p);
        }
        if let Some(k) = num("top_k")? {
            self.top_k = (k >= 1.0).then_some(k as usize);
        }
        if let Some(p) = num("min_p")? {
            self.min_p = (p > 0.0).then_some(p);
        }
        if let Some(r) = num("repetition_penalty")? {
            self.repeat_penalty = r as f32;
        }
        if g.get("do_sample").and_then(serde_json::Value::as_bool) == Some(false) {
            self.temperature = 0.0;
        }
        self.validate().map_err(|e| Error::msg(format!("{origin}: {e}")))?;
        Ok(self)
    }

    /// Sets one of [`SETTINGS`] from text (`/set top_k 20`); `off` turns top_p, top_k and min_p
    /// off (as do top_p 1, top_k 0 and min_p 0). The settings stay valid: a bad value changes
    /// nothing.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let mut next = self.clone();
        let bad = |what: &str| Error::msg(format!("{key}: {value:?} is not {what}"));
        let off = value == "off" || value == "none";
        let float = || value.parse::<f64>().map_err(|_| bad("a number"));
        let int = || value.parse::<usize>().map_err(|_| bad("a whole number"));
        match key {
            "temperature" => next.temperature = float()?,
            "top_p" => next.top_p = if off { None } else { Some(float()?).filter(|p| *p != 1.0) },
            "top_k" => next.top_k = if off { None } else { Some(int()?).filter(|k| *k > 0) },
            "min_p" => next.min_p = if off { None } else { Some(float()?).filter(|p| *p > 0.0) },
            "repeat_penalty" => next.repeat_penalty = float()? as f32,
            "max_tokens" => next.max_tokens = int()?,
            "seed" => next.seed = value.parse::<u64>().map_err(|_| bad("a whole number"))?,
            _ => return Err(Error::msg(format!("unknown setting {key:?}; settings: {}", SETTINGS.join(", ")))),
        }
        next.validate()?;
        *self = next;
        Ok(())
    }

    /// Each of [`SETTINGS`] with its value as text.
    fn values(&self) -> [(&'static str, String); 7] {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "off".into());
        [
            ("temperature", self.temperature.to_string()),
            ("top_p", opt(self.top_p.map(|p| p.to_string()))),
            ("top_k", opt(self.top_k.map(|k| k.to_string()))),
            ("min_p", opt(self.min_p.map(|p| p.to_string()))),
            ("repeat_penalty", format!("{} (last {} tokens)", self.repeat_penalty, self.repeat_last_n)),
            ("max_tokens", self.max_tokens.to_string()),
            ("seed", self.seed.to_string()),
        ]
    }

    /// One line per setting, as `/settings` shows them.
    pub fn describe(&self) -> String {
        self.values().iter().map(|(k, v)| format!("{k:<16}{v}")).collect::<Vec<_>>().join("\n")
    }

    /// All settings on one line (`temperature 0.8, top_p 0.95, ...`), as chat and generate print
    /// them at start.
    pub fn summary(&self) -> String {
        self.values().iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
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
        if let Some(p) = self.min_p {
            if !(0.0..=1.0).contains(&p) {
                return Err(Error::msg("--min-p must be in [0, 1]"));
            }
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite()) {
            return Err(Error::msg("--repeat-penalty must be positive"));
        }
        for (name, v) in [("frequency_penalty", self.frequency_penalty), ("presence_penalty", self.presence_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(Error::msg(format!("{name} must be in [-2, 2]")));
            }
        }
        if self.max_tokens == 0 {
            return Err(Error::msg("--max-tokens must be positive"));
        }
        Ok(())
    }
}

/// Draws tokens with one [`SamplingParams`] and its own generator.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    pub fn new(params: &SamplingParams) -> Self {
        Self { params: params.clone(), rng: Rng::new(params.seed) }
    }

    /// The next token given the logits of the last position and the tokens so far (for the
    /// repetition penalty).
    /// `logits` is taken by value: the penalty rewrites it in place.
    pub fn sample(&mut self, mut logits: Vec<f32>, history: &[u32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::msg("sampling: no logits"));
        }
        let p = &self.params;
        if p.repeat_penalty != 1.0 || p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            let start = history.len().saturating_sub(p.repeat_last_n);
            let mut seen = history[start..].to_vec();
            seen.sort_unstable();
            for run in seen.chunk_by(|a, b| a == b) {
                if let Some(l) = logits.get_mut(run[0] as usize) {
                    // As llama.cpp and HF do: shrink positive logits, push negative ones down.
                    if p.repeat_penalty != 1.0 {
                        *l = if *l >= 0.0 { *l / p.repeat_penalty } else { *l * p.repeat_penalty };
                    }
                    *l -= run.len() as f32 * p.frequency_penalty + p.presence_penalty;
                }
            }
        }
        if p.temperature <= 0.0 {
            return Ok(argmax(&logits));
        }
        // Only candidates within reach of the maximum matter (NaN counts as -inf): a logit more
        // than NEGLIGIBLE·max(1, T) below it has relative weight under e^-40 before and after the
        // temperature, so dropping it changes no filter and no draw. Sorting a whole vocabulary
        // for every token of every sequence was most of a batched GPU server step, and selecting
        // top-k among (id, logit) pairs of all of it still 5 % of an 8-sequence CPU step.
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| if l > m { l } else { m });
        if max == f32::NEG_INFINITY {
            return Ok(argmax(&logits));
        }
        let mut cand = candidates(&logits, self.floor(max), p.top_k);
        // Ranked whenever a filter ranks them, so that the draw below walks the same list as
        // from `sample_top`'s pairs.
        if p.top_p.is_some() || p.top_k.is_some() {
            cand.sort_unstable_by(rank_order);
        }
        Ok(self.draw(cand, max))
    }

    /// What this sampler needs to see of a row of `vocab` logits: its best few (greedy, or top-k
    /// without penalties) or all of it.
    pub fn wants(&self, vocab: usize) -> Wants {
        let p = &self.params;
        if p.repeat_penalty != 1.0 || p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            return Wants::Whole;
        }
        if p.temperature <= 0.0 {
            return Wants::Top(GREEDY_TOP.min(vocab));
        }
        match p.top_k {
            Some(k) if k > 0 && k < vocab && k <= TOP_K_MAX => Wants::Top(k),
            _ => Wants::Whole,
        }
    }

    /// The token [`Sampler::sample`] draws from a row of `vocab` logits, given only the row's best
    /// (id, logit) pairs by falling logit then rising id, at least as many as [`Sampler::wants`]
    /// asked for ([`crate::model::logits::top_k_rows`]); the same draw from the same generator.
    /// `None` when they do not decide it (a greedy tie that may go on past them, no finite
    /// logit, settings that want the whole row): then [`Sampler::sample`] the whole row.
    pub fn sample_top(&mut self, top: &[(u32, f32)], vocab: usize) -> Option<u32> {
        let p = &self.params;
        let first = *top.first()?;
        if first.1.is_nan() || first.1 == f32::NEG_INFINITY || self.wants(vocab) == Wants::Whole {
            return None;
        }
        if p.temperature <= 0.0 {
            // argmax takes the last of the tied maxima: the highest id of the run of pairs equal
            // to the first, if the run ends inside the pairs.
            let key = order_key(first.1);
            let last = top.iter().rposition(|c| order_key(c.1) == key)?;
            if last + 1 == top.len() && top.len() < vocab {
                return None;
            }
            return Some(top[last].0);
        }
        let k = p.top_k?;
        if top.len() < k {
            return None;
        }
        let cand = at_or_above(top[..k].to_vec(), self.floor(first.1));
        Some(self.draw(cand, first.1))
    }

    /// Logits below this cannot be drawn (see `sample`).
    fn floor(&self, max: f32) -> f32 {
        const NEGLIGIBLE: f64 = 40.0;
        (f64::from(max) - NEGLIGIBLE * self.params.temperature.max(1.0)) as f32
    }

    /// top-p, min-p, temperature and one draw over `cand` (non-empty, the maximum `max` among
    /// them; ranked by [`rank_order`] when top-p is on).
    fn draw(&mut self, mut cand: Vec<(u32, f32)>, max: f32) -> u32 {
        let p = &self.params;
        // top-p and min-p on the untempered distribution.
        let probs: Vec<f64> = if p.top_p.is_some() || p.min_p.is_some() { cand.iter().map(|c| f64::from(c.1 - max).exp()).collect() } else { Vec::new() };
        let total: f64 = probs.iter().sum();
        let mut keep = cand.len();
        if let Some(top_p) = p.top_p {
            let mut mass = 0.0;
            for (i, q) in probs.iter().enumerate() {
                mass += q / total;
                if mass >= top_p {
                    keep = keep.min(i + 1);
                    break;
                }
            }
        }
        cand.truncate(keep);
        if let Some(min_p) = p.min_p {
            // The maximum's probability is exp(0) = 1, so it always stays.
            let mut i = 0;
            cand.retain(|_| {
                i += 1;
                probs[i - 1] >= min_p
            });
        }
        // Temperature last, then one draw.
        // (exp_nonpositive: 3e-7 relative, several times faster than libm's exp over a vocabulary)
        let inv_t = (1.0 / p.temperature) as f32;
        let weights: Vec<f64> = cand.iter().map(|c| f64::from(exp_nonpositive((c.1 - max) * inv_t))).collect();
        let total: f64 = weights.iter().sum();
        let mut u = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * total;
        for (c, w) in cand.iter().zip(&weights) {
            if u < *w {
                return c.0;
            }
            u -= w;
        }
        cand[cand.len() - 1].0
    }
}

/// What a [`Sampler`] needs of a row of logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wants {
    /// The best `k` (id, logit) pairs ([`Sampler::sample_top`]).
    Top(usize),
    /// Every logit ([`Sampler::sample`]).
    Whole,
}

/// A row of a step's logits, brought to the host as its sampler asked ([`fetch_rows`]).
#[derive(Debug, Clone, PartialEq)]
pub enum RowLogits {
    /// The best pairs of row `row` (falling logit, rising id).
    Top { row: usize, pairs: Vec<(u32, f32)> },
    Whole(Vec<f32>),
}

/// Brings to the host what each sampler wants of its row of `logits` (`[rows, vocab]`, f32, on
/// any device); `wants[i]` is the row and the want of entry `i`, `None` where it predicts
/// nothing. The rows that want pairs share one top-k selection (k the largest asked: on a GPU a
/// kernel, and only the pairs are copied), the others one copy of just their rows.
pub fn fetch_rows(logits: &Tensor, wants: &[Option<(usize, Wants)>]) -> Result<Vec<Option<RowLogits>>> {
    let k = wants.iter().flatten().filter_map(|(_, w)| match w {
        Wants::Top(k) => Some(*k),
        Wants::Whole => None,
    });
    let mut tops = match k.max() {
        Some(k) => logits::top_k_rows(logits, k)?.into_iter().map(Some).collect(),
        None => Vec::new(),
    };
    let whole_rows: Vec<usize> = wants.iter().flatten().filter(|(_, w)| *w == Wants::Whole).map(|(r, _)| *r).collect();
    let mut whole = logits::rows(logits, &whole_rows)?.into_iter();
    let mut out = Vec::with_capacity(wants.len());
    for w in wants {
        out.push(match *w {
            None => None,
            Some((row, Wants::Top(_))) => {
                let pairs = tops.get_mut(row).and_then(Option::take).ok_or_else(|| Error::msg(format!("sampling: no logits row {row}")))?;
                Some(RowLogits::Top { row, pairs })
            }
            Some((row, Wants::Whole)) => Some(RowLogits::Whole(whole.next().ok_or_else(|| Error::msg(format!("sampling: no logits row {row}")))?)),
        });
    }
    Ok(out)
}

impl Sampler {
    /// The next token from what [`fetch_rows`] brought of its row of `logits` (`vocab` wide);
    /// pairs that do not decide it bring the whole row after all.
    pub fn sample_fetched(&mut self, got: RowLogits, logits: &Tensor, history: &[u32]) -> Result<u32> {
        match got {
            RowLogits::Whole(row) => self.sample(row, history),
            RowLogits::Top { row, pairs } => {
                let vocab = logits.dim(1)?;
                match self.sample_top(&pairs, vocab) {
                    Some(t) => Ok(t),
                    None => {
                        let whole = logits::rows(logits, &[row])?.pop().ok_or_else(|| Error::msg(format!("sampling: no logits row {row}")))?;
                        self.sample(whole, history)
                    }
                }
            }
        }
    }
}

/// Pairs a greedy sampler asks for: enough that a tie for the maximum almost always ends
/// inside them (else the whole row is fetched).
const GREEDY_TOP: usize = 8;

/// The (id, logit) pairs at or above `floor` (NaN never), cut to the best `top_k` of them in
/// [`rank_order`] (then ranked; without `top_k` in id order). The k best at or above the floor
/// are the first of the k best of the whole row ([`top_k_of`]): with k or more above the floor
/// the k best are all above it, with fewer all of those are among the k.
fn candidates(logits: &[f32], floor: f32, top_k: Option<usize>) -> Vec<(u32, f32)> {
    match top_k.filter(|&k| k > 0 && k < logits.len()) {
        Some(k) => at_or_above(top_k_of(logits, k), floor),
        None => logits.iter().enumerate().filter(|(_, &l)| l >= floor).map(|(i, &l)| (i as u32, l)).collect(),
    }
}

/// The leading pairs of `ranked` (in [`rank_order`]) at or above `floor`.
fn at_or_above(mut ranked: Vec<(u32, f32)>, floor: f32) -> Vec<(u32, f32)> {
    let n = ranked.iter().take_while(|c| c.1 >= floor).count();
    ranked.truncate(n);
    ranked
}

/// The index of the largest value, the last one on a tie (as candle's greedy sampler chose, so
/// greedy outputs stay what they were); NaN never wins.
fn argmax(v: &[f32]) -> u32 {
    let key = |x: f32| if x.is_nan() { f32::NEG_INFINITY } else { x };
    v.iter().enumerate().max_by(|a, b| key(*a.1).total_cmp(&key(*b.1))).map_or(0, |(i, _)| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f64, top_k: Option<usize>, top_p: Option<f64>, min_p: Option<f64>) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, min_p, ..Default::default() }
    }

    /// How often each token is drawn in `n` draws.
    fn histogram(p: &SamplingParams, logits: &[f32], n: usize) -> Vec<usize> {
        let mut s = Sampler::new(p);
        let mut h = vec![0; logits.len()];
        for _ in 0..n {
            h[s.sample(logits.to_vec(), &[]).unwrap() as usize] += 1;
        }
        h
    }

    #[test]
    fn greedy_takes_the_last_maximum() {
        let mut s = Sampler::new(&params(0.0, None, None, None));
        assert_eq!(s.sample(vec![0.1, 2.0, 2.0, -1.0], &[]).unwrap(), 2);
        assert_eq!(s.sample(vec![f32::NAN, 0.5, 0.2], &[]).unwrap(), 1);
    }

    #[test]
    fn each_filter_removes_what_it_should() {
        // probabilities ∝ exp(logit): 0.64, 0.24, 0.09, 0.03 (roughly)
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let n = 4000;
        // top-k 2: only the two best.
        let h = histogram(&params(1.0, Some(2), None, None), &logits, n);
        assert!(h[0] > 0 && h[1] > 0 && h[2] == 0 && h[3] == 0, "{h:?}");
        // top-p 0.7: 0.64 is not enough, 0.64 + 0.24 is.
        let h = histogram(&params(1.0, None, Some(0.7), None), &logits, n);
        assert!(h[1] > 0 && h[2] == 0 && h[3] == 0, "{h:?}");
        // min-p 0.2: p / p_max = 1, 0.37, 0.14, 0.05.
        let h = histogram(&params(1.0, None, None, Some(0.2)), &logits, n);
        assert!(h[1] > 0 && h[2] == 0 && h[3] == 0, "{h:?}");
        // Nothing off: every token is drawn, in proportion.
        let h = histogram(&params(1.0, None, None, None), &logits, n);
        assert!(h.iter().all(|&c| c > 0), "{h:?}");
        let share = h[0] as f64 / n as f64;
        assert!((share - 0.644).abs() < 0.03, "{share}");
    }

    #[test]
    fn temperature_sharpens_after_the_filters() {
        let logits = [1.0f32, 0.0];
        let cold = histogram(&params(0.25, None, None, None), &logits, 4000);
        let hot = histogram(&params(4.0, None, None, None), &logits, 4000);
        assert!(cold[0] > 3800, "{cold:?}");
        assert!(hot[1] > 1400, "{hot:?}");
    }

    /// The pruning pass against a plain top-k over the whole vocabulary cut at the floor, on
    /// vocabularies with ties, NaN and values below the floor.
    #[test]
    fn candidates_are_the_plain_top_k() {
        let mut r = crate::rng::Rng::new(3);
        for n in [1usize, 7, 100, 5000] {
            let mut logits: Vec<f32> = (0..n).map(|_| (r.normal() * 4.0).round() / 2.0).collect();
            if n > 3 {
                logits[2] = f32::NAN;
            }
            for k in [None, Some(1), Some(5), Some(40), Some(n + 3)] {
                for floor in [f32::NEG_INFINITY, -1.0, 3.0] {
                    let mut got = candidates(&logits, floor, k);
                    got.sort_unstable_by(rank_order);
                    let mut want: Vec<(u32, f32)> = logits.iter().enumerate().filter(|(_, &l)| l >= floor).map(|(i, &l)| (i as u32, l)).collect();
                    want.sort_unstable_by(rank_order);
                    if let Some(k) = k {
                        want.truncate(k);
                    }
                    assert_eq!(got, want, "n={n} k={k:?} floor={floor}");
                }
            }
        }
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 / 20.0).collect();
        let p = SamplingParams::default();
        let (mut a, mut b) = (Sampler::new(&p), Sampler::new(&p));
        for _ in 0..50 {
            assert_eq!(a.sample(logits.clone(), &[]).unwrap(), b.sample(logits.clone(), &[]).unwrap());
        }
    }

    #[test]
    fn repeat_penalty_demotes_seen_tokens() {
        let p = SamplingParams { temperature: 0.0, repeat_penalty: 2.0, ..Default::default() };
        let mut s = Sampler::new(&p);
        assert_eq!(s.sample(vec![2.0, 1.5], &[]).unwrap(), 0);
        assert_eq!(s.sample(vec![2.0, 1.5], &[0]).unwrap(), 1);
        // Frequency counts occurrences, presence counts once.
        let freq = SamplingParams { temperature: 0.0, frequency_penalty: 0.3, ..Default::default() };
        assert_eq!(Sampler::new(&freq).sample(vec![2.0, 1.5], &[0]).unwrap(), 0);
        assert_eq!(Sampler::new(&freq).sample(vec![2.0, 1.5], &[0, 0]).unwrap(), 1);
        let pres = SamplingParams { temperature: 0.0, presence_penalty: 0.6, ..Default::default() };
        assert_eq!(Sampler::new(&pres).sample(vec![2.0, 1.5], &[0]).unwrap(), 1);
        assert!(SamplingParams { presence_penalty: 3.0, ..Default::default() }.validate().is_err());
    }

    #[test]
    fn generation_config_and_set() {
        let g = serde_json::json!({"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.05, "do_sample": true});
        let p = SamplingParams::default().with_generation_config(&g, "generation_config.json").unwrap();
        assert_eq!((p.temperature, p.top_p, p.top_k, p.min_p, p.repeat_penalty), (0.6, Some(0.9), Some(20), Some(0.05), 1.05));
        let greedy = SamplingParams::default().with_generation_config(&serde_json::json!({"do_sample": false}), "g").unwrap();
        assert_eq!(greedy.temperature, 0.0);
        let e = SamplingParams::default().with_generation_config(&serde_json::json!({"top_k": "many"}), "x/generation_config.json").unwrap_err().to_string();
        assert!(e.contains("x/generation_config.json") && e.contains("top_k"), "{e}");
        let mut p = SamplingParams::default();
        p.set("temperature", "0.2").unwrap();
        p.set("top_k", "off").unwrap();
        p.set("min_p", "0").unwrap();
        assert_eq!((p.temperature, p.top_k, p.min_p), (0.2, None, None));
        assert!(p.set("top_p", "2").unwrap_err().to_string().contains("--top-p"));
        assert!(p.set("colour", "1").unwrap_err().to_string().contains("unknown setting"));
        assert!(p.set("seed", "x").unwrap_err().to_string().contains("seed"));
        assert_eq!(p.temperature, 0.2, "a refused /set changes nothing");
        assert!(p.describe().contains("top_k           off"));
        assert!(p.summary().starts_with("temperature 0.2, top_p 0.95, top_k off, min_p off, repeat_penalty 1 (last 64 tokens)"), "{}", p.summary());
    }

    /// From the best pairs of a row, `sample_top` draws what `sample` draws from the whole row,
    /// with the same generator, whenever it decides; and it decides unless a greedy tie runs to
    /// the end of the pairs or nothing is finite.
    #[test]
    fn sampling_from_the_best_pairs_draws_what_the_whole_row_draws() {
        let mut rng = Rng::new(5);
        let settings = [
            params(0.0, None, None, None),
            params(0.8, Some(40), Some(0.95), Some(0.05)),
            params(0.8, Some(40), None, None),
            params(1.5, Some(3), None, Some(0.2)),
            params(0.3, Some(1), Some(0.5), None),
            params(2.0, Some(100), Some(0.99), None),
        ];
        let mut decided = 0;
        for vocab in [2usize, 9, 150, 4000] {
            for case in 0..12 {
                let row: Vec<f32> = (0..vocab)
                    .map(|_| match case % 4 {
                        // Ties everywhere, the maximum's included.
                        0 => (rng.next_u64() % 4) as f32,
                        1 => match rng.next_u64() % 20 {
                            0 => f32::NAN,
                            1 => f32::NEG_INFINITY,
                            _ => rng.normal() * 3.0,
                        },
                        2 => rng.normal() * 30.0,
                        _ => rng.normal(),
                    })
                    .collect();
                for p in &settings {
                    let seed = rng.next_u64();
                    let mut whole = Sampler::new(&SamplingParams { seed, ..p.clone() });
                    let mut top = Sampler::new(&SamplingParams { seed, ..p.clone() });
                    let Wants::Top(k) = whole.wants(vocab) else {
                        assert!(p.top_k.is_none_or(|k| k >= vocab), "{p:?} over {vocab} wants the whole row");
                        continue;
                    };
                    for _ in 0..3 {
                        let want = whole.sample(row.clone(), &[]).unwrap();
                        match top.sample_top(&top_k_of(&row, k), vocab) {
                            Some(got) => {
                                assert_eq!(got, want, "{p:?}, vocab {vocab}, case {case}");
                                decided += 1;
                            }
                            None => {
                                let tie_at_the_end = p.temperature == 0.0 && (case % 4 == 0 || row.iter().all(|v| !v.is_finite()));
                                assert!(tie_at_the_end, "undecided: {p:?}, vocab {vocab}, case {case}");
                                // The caller then samples the whole row; the generators stay in step.
                                assert_eq!(top.sample(row.clone(), &[]).unwrap(), want);
                            }
                        }
                    }
                }
            }
        }
        assert!(decided > 300, "{decided}");
        let penalized = SamplingParams { repeat_penalty: 1.1, ..Default::default() };
        assert_eq!(Sampler::new(&penalized).wants(100), Wants::Whole);
        assert_eq!(Sampler::new(&penalized).sample_top(&[(0, 1.0)], 100), None);
        assert_eq!(Sampler::new(&params(0.8, None, Some(0.9), None)).wants(100), Wants::Whole);
        assert_eq!(Sampler::new(&params(0.0, None, None, None)).wants(5), Wants::Top(5));
    }
}
