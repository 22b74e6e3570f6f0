//! Continuous batching: one thread owns the model and the paged KV cache and runs steps. At
//! every step it takes new requests from the queue while the batch has room, then runs one
//! batched forward pass ([`Model::forward_batch`]) that advances every running sequence: one
//! token for those that decode, a chunk of at most `prefill_chunk` prompt tokens (shared by all
//! that prefill) for the others, so that a long prompt never stalls the streams already running.
//! Sequences leave the batch the moment they finish or their client goes away, and their KV
//! blocks go back to the pool at once.
//!
//! When the pool cannot give a running sequence its next block, the most recently admitted
//! sequence is preempted (vLLM's recompute policy): its blocks are freed and it goes back to the
//! front of the queue with its prompt and the tokens generated so far, to be prefilled again.
use super::constraint::{Compiler, Constraint, Grammar, Next};
use super::logprobs::{self, TokenLogprob};
use super::metrics::{Metrics, StepPhase};
use super::sampling::{fetch_rows, RowLogits, Sampler, SamplingParams, Wants};
use super::stop::StopMatcher;
use crate::assets::tokenizer::TokenStream;
use crate::error::{Error, Result};
use crate::model::batch::StepSeq;
use crate::model::paged::{KvPool, SeqKv, BLOCK_TOKENS};
use crate::model::Model;
use rayon::prelude::*;
use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;
use tokenizers::Tokenizer;

/// Limits of the engine.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Sequences in one step at most.
    pub max_batch: usize,
    /// Requests waiting for admission at most; more are refused ([`SubmitError::QueueFull`]).
    pub max_queue: usize,
    /// KV cache blocks (see [`crate::model::paged`]).
    pub kv_blocks: usize,
    /// Prompt tokens prefilled in one step at most (over all prefilling sequences).
    pub prefill_chunk: usize,
    /// The KV cache's dtype (None: f16 on the CPU, else the activation dtype; see
    /// [`KvPool::resolve_dtype`]).
    pub kv_dtype: Option<candle_core::DType>,
    /// Keep finished sequences' whole KV blocks for later prompts that start with the same
    /// tokens (see [`crate::model::kv_blocks`]).
    pub prefix_cache: bool,
}

/// What the engine tells a request's client.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A piece of the reply.
    Text(String),
    /// The log-probabilities of a generated token (requests that ask for them), sent before
    /// the text the token completes; a token whose text is held back (part of a character, a
    /// possible stop string) comes before the piece that holds it.
    Logprobs(TokenLogprob),
    /// The log-probabilities of the prompt's tokens after the first (requests that ask for
    /// them), before anything else.
    PromptLogprobs(Vec<TokenLogprob>),
    /// The reply is complete.
    Done(Finish),
    /// The engine failed on this request (the message says why).
    Failed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the end of the context.
    Length,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finish {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// Where a request's events go. `send` returns false, and `is_closed` true, once the client
/// is gone: the sequence is then cancelled at the next step.
pub trait EventSink: Send {
    fn send(&mut self, event: Event) -> bool;
    fn is_closed(&self) -> bool;
}

impl EventSink for mpsc::Sender<Event> {
    fn send(&mut self, event: Event) -> bool {
        mpsc::Sender::send(self, event).is_ok()
    }
    fn is_closed(&self) -> bool {
        false
    }
}

pub struct Request {
    pub prompt: Vec<u32>,
    /// Sampling settings, `max_tokens` and the seed among them.
    pub params: SamplingParams,
    pub stop: Vec<String>,
    /// Go on past end-of-sequence tokens until `max_tokens` (vLLM's `ignore_eos`, for
    /// benchmarks with fixed output lengths).
    pub ignore_eos: bool,
    /// Tokens that end the reply as an end-of-sequence token does, not part of it (vLLM's
    /// `stop_token_ids`; `ignore_eos` does not cover them).
    pub stop_token_ids: Vec<u32>,
    /// Generated tokens before an end-of-sequence or stop token may come (vLLM's
    /// `min_tokens`): until then they are never drawn.
    pub min_tokens: usize,
    /// Report each generated token's log-probability with this many alternatives (at most
    /// [`logprobs::TOP_LOGPROBS_MAX`]); `None`: none.
    pub logprobs: Option<usize>,
    /// Score the prompt's own tokens, with this many alternatives each ([`Event::PromptLogprobs`]);
    /// with it `max_tokens` may be 0 (score only).
    pub prompt_logprobs: Option<usize>,
    /// Added to these tokens' logits before every draw (OpenAI's `logit_bias`; −100 bans a
    /// token, +100 all but forces it). Log-probabilities stay those of the raw logits.
    pub logit_bias: Vec<(u32, f32)>,
    /// The grammar the reply is held to ([`Engine::compile`]); its end ends the reply, before
    /// `min_tokens` if it comes sooner.
    pub constraint: Option<Constraint>,
    pub sink: Box<dyn EventSink>,
}

/// Why a request was refused before it was queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full ({0} requests are waiting); retry later")]
    QueueFull(usize),
    #[error("the prompt has {prompt} tokens; the context holds {context}, and at least one token must be generated")]
    PromptTooLong { prompt: usize, context: usize },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("{0}")]
    BadParams(String),
    #[error("the engine has stopped")]
    Stopped,
}

/// The handle of a running engine: submit requests, read its metrics.
pub struct Engine {
    tx: mpsc::Sender<Request>,
    pub metrics: Arc<Metrics>,
    /// The longest sequence served: the model's context, or the whole KV cache where that is
    /// smaller (as vLLM caps max_model_len), so one sequence always fits in the pool.
    pub context_len: usize,
    /// Whether the KV cache, not the model, sets `context_len`.
    pub context_by_cache: bool,
    /// Token ids the model takes: `0 .. vocab_size`.
    pub vocab_size: usize,
    grammars: Compiler,
    max_queue: usize,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Engine {
    /// Requests that may wait for admission at most (`--max-queue`).
    pub fn max_queue(&self) -> usize {
        self.max_queue
    }

    /// Starts the scheduler thread with `model` (moved there) and a pool of `cfg.kv_blocks`.
    pub fn start(model: Model, tokenizer: Tokenizer, eos_ids: Vec<u32>, cfg: SchedulerConfig) -> Result<Self> {
        if cfg.max_batch == 0 || cfg.prefill_chunk == 0 {
            return Err(Error::msg("--max-batch and the prefill chunk must be positive"));
        }
        let kv_dtype = KvPool::resolve_dtype(cfg.kv_dtype, model.dtype, &model.device)?;
        let pool = KvPool::new(&model.cfg, cfg.kv_blocks, kv_dtype, &model.device)?.with_prefix_cache(cfg.prefix_cache);
        let metrics = Arc::new(Metrics::default());
        metrics.kv_blocks_total.store(pool.total_blocks() as u64, Relaxed);
        let (tx, rx) = mpsc::channel();
        let context_len = model.context_len().min(pool.capacity_tokens());
        let context_by_cache = context_len < model.context_len();
        let vocab_size = model.cfg.vocab_size;
        let grammars = Compiler::new(tokenizer.clone(), vocab_size, &eos_ids);
        let max_queue = cfg.max_queue;
        let mut s = Scheduler { model, tokenizer, eos_ids, cfg, pool, rx, context: context_len, waiting: VecDeque::new(), running: Vec::new(), metrics: metrics.clone() };
        let thread = std::thread::Builder::new()
            .name("awq-run-engine".into())
            .spawn(move || s.run())
            .map_err(|e| Error::msg(format!("cannot start the engine thread: {e}")))?;
        Ok(Self { tx, metrics, context_len, context_by_cache, vocab_size, grammars, max_queue, thread: Some(thread) })
    }

    /// The state a request's [`Request::constraint`] starts from, or why `g` is no grammar. The
    /// first call builds the vocabulary's trie (CPU work: call it off async threads).
    pub fn compile(&self, g: &Grammar) -> std::result::Result<Constraint, String> {
        self.grammars.compile(g)
    }

    /// Queues a request, or says why it cannot be.
    pub fn submit(&self, r: Request) -> std::result::Result<(), SubmitError> {
        let n = r.prompt.len();
        if n == 0 {
            return Err(SubmitError::EmptyPrompt);
        }
        if n >= self.context_len {
            return Err(SubmitError::PromptTooLong { prompt: n, context: self.context_len });
        }
        // A token the model has no embedding for would fail the whole batch's step.
        if let Some(&t) = r.prompt.iter().chain(&r.stop_token_ids).chain(r.logit_bias.iter().map(|(t, _)| t)).find(|&&t| t as usize >= self.vocab_size) {
            return Err(SubmitError::BadParams(format!("token id {t} is outside the vocabulary of {} tokens", self.vocab_size)));
        }
        if r.min_tokens > r.params.max_tokens {
            return Err(SubmitError::BadParams(format!("min_tokens ({}) is more than max_tokens ({})", r.min_tokens, r.params.max_tokens)));
        }
        // max_tokens 0 scores the prompt only.
        let mut params = r.params.clone();
        if r.prompt_logprobs.is_some() {
            params.max_tokens = params.max_tokens.max(1);
        }
        params.validate().map_err(|e| SubmitError::BadParams(e.to_string()))?;
        if let Some(n) = r.logprobs.max(r.prompt_logprobs).filter(|&n| n > logprobs::TOP_LOGPROBS_MAX) {
            return Err(SubmitError::BadParams(format!("{n} alternatives per token were asked for; at most {} are given", logprobs::TOP_LOGPROBS_MAX)));
        }
        // `waiting` counts queued requests until the scheduler admits them.
        let waiting = self.metrics.waiting.fetch_add(1, Relaxed);
        if waiting as usize >= self.max_queue {
            self.metrics.waiting.fetch_sub(1, Relaxed);
            self.metrics.requests_rejected.fetch_add(1, Relaxed);
            return Err(SubmitError::QueueFull(waiting as usize));
        }
        self.metrics.requests.fetch_add(1, Relaxed);
        self.tx.send(r).map_err(|_| {
            self.metrics.waiting.fetch_sub(1, Relaxed);
            SubmitError::Stopped
        })
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Closing the channel ends the scheduler once it is idle.
        let (tx, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A request being served.
struct Seq {
    req: Request,
    sampler: Sampler,
    /// Prompt and generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens of `tokens` whose keys and values are in the pool.
    fed: usize,
    kv: SeqKv,
    detok: TokenStream,
    stop: StopMatcher,
    arrived: Instant,
    first_token: bool,
    /// Counted in the `waiting` metric (from submission to its first admission).
    queued: bool,
}

impl Seq {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

struct Scheduler {
    model: Model,
    tokenizer: Tokenizer,
    eos_ids: Vec<u32>,
    cfg: SchedulerConfig,
    pool: KvPool,
    /// See [`Engine::context_len`].
    context: usize,
    rx: mpsc::Receiver<Request>,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    metrics: Arc<Metrics>,
}

/// A sequence's next token, with its log-probabilities where its request asked for them.
type Sampled = (u32, Option<TokenLogprob>);

/// What a step decided for one sequence.
enum Outcome {
    Continue,
    /// Done: the final event, sent once the sequence's blocks are back in the pool and the
    /// counters say so (a client that reads /metrics after its reply sees them freed).
    Finished(Finish),
    Cancelled,
    /// The sequence cannot go on (its grammar failed); the message says why.
    Failed(String),
}

impl Scheduler {
    fn run(&mut self) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match self.rx.recv() {
                    Ok(r) => self.arrive(r),
                    Err(_) => return,
                }
            }
            while let Ok(r) = self.rx.try_recv() {
                self.arrive(r);
            }
            self.drop_cancelled();
            self.admit();
            if let Err(e) = self.step() {
                // A failing step fails its batch, not the server.
                let failed: Vec<Seq> = self.running.drain(..).collect();
                for mut s in failed {
                    self.fail(&mut s, e.to_string());
                }
            }
            self.publish();
        }
    }

    fn arrive(&mut self, req: Request) {
        let prompt_len = req.prompt.len();
        let mut seq = Seq {
            sampler: Sampler::new(&req.params),
            tokens: req.prompt.clone(),
            stop: StopMatcher::new(req.stop.clone()),
            req,
            prompt_len,
            fed: 0,
            kv: SeqKv::default(),
            detok: TokenStream::new(),
            arrived: Instant::now(),
            first_token: true,
            queued: true,
        };
        self.metrics.prompt_tokens.fetch_add(prompt_len as u64, Relaxed);
        if let Some(top) = seq.req.prompt_logprobs {
            // Scored here, in one pass of its own outside the batch, before the sequence
            // queues: the batched step computes only each sequence's last logits. The running
            // sequences wait that long, as they would for the prompt's prefill.
            let scored = match logprobs::of_prompt(&self.model, &seq.req.prompt, top) {
                Ok(s) => s,
                Err(e) => return self.fail(&mut seq, format!("scoring the prompt: {e}")),
            };
            let alive = seq.req.sink.send(Event::PromptLogprobs(scored));
            if !alive || seq.req.params.max_tokens == 0 {
                // Gone, or done: it asked for the prompt's scores alone.
                self.metrics.waiting.fetch_sub(1, Relaxed);
                let done = Finish { reason: FinishReason::Length, prompt_tokens: prompt_len, completion_tokens: 0 };
                if alive {
                    self.metrics.requests_finished.fetch_add(1, Relaxed);
                    seq.req.sink.send(Event::Done(done));
                } else {
                    self.metrics.requests_cancelled.fetch_add(1, Relaxed);
                }
                return;
            }
        }
        self.waiting.push_back(seq);
    }

    /// Cancels queued and running sequences whose client has gone.
    fn drop_cancelled(&mut self) {
        let mut cancelled = 0;
        let metrics = &self.metrics;
        self.waiting.retain(|s| {
            let gone = s.req.sink.is_closed();
            if gone {
                cancelled += 1;
                if s.queued {
                    metrics.waiting.fetch_sub(1, Relaxed);
                }
            }
            !gone
        });
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].req.sink.is_closed() {
                let mut s = self.running.remove(i);
                self.pool.release(&mut s.kv);
                cancelled += 1;
            } else {
                i += 1;
            }
        }
        self.metrics.requests_cancelled.fetch_add(cancelled as u64, Relaxed);
    }

    /// Moves queued sequences into the batch, oldest first, while the batch has room and the
    /// pool can hold the sequence's whole prompt (and its first generated token) at once: a
    /// sequence admitted into a pool too full for it would only preempt others.
    fn admit(&mut self) {
        while self.running.len() < self.cfg.max_batch {
            let Some(s) = self.waiting.front_mut() else { break };
            // The same tokens that a running sequence is still prefilling (n choices of one
            // prompt, clients sending the same prompt together) wait for it: once its blocks are
            // registered this one adopts them and computes only what follows its last whole
            // block, instead of computing all of it again beside it in the same steps.
            if self.pool.prefix_caching() && s.tokens.len() > BLOCK_TOKENS && self.running.iter().any(|r| r.fed < r.tokens.len() && r.tokens == s.tokens) {
                break;
            }
            let need = s.tokens.len() + 1;
            if KvPool::blocks_for(need) > self.pool.total_blocks() {
                // Only a preempted sequence can have grown past the whole pool.
                let mut s = self.waiting.pop_front().expect("front exists");
                self.fail(&mut s, format!("the KV cache ({} tokens) cannot hold this sequence's {need} tokens", self.pool.capacity_tokens()));
                continue;
            }
            // The cached blocks of the prompt's prefix (a preempted sequence may find its own).
            let cached = self.pool.adopt_prefix(&mut s.kv, &s.tokens);
            if self.pool.reserve(&mut s.kv, need).is_err() {
                self.pool.release(&mut s.kv);
                break;
            }
            s.fed = cached;
            self.metrics.prefix_cache_hit_tokens.fetch_add(cached as u64, Relaxed);
            let mut s = self.waiting.pop_front().expect("front exists");
            if std::mem::take(&mut s.queued) {
                self.metrics.waiting.fetch_sub(1, Relaxed);
            }
            self.running.push(s);
        }
    }

    /// Ends `s` (no longer in `running` or `waiting`) with an error: its blocks freed and the
    /// counters updated before its client hears of it.
    fn fail(&mut self, s: &mut Seq, message: String) {
        self.pool.release(&mut s.kv);
        self.metrics.requests_failed.fetch_add(1, Relaxed);
        if std::mem::take(&mut s.queued) {
            self.metrics.waiting.fetch_sub(1, Relaxed);
        }
        self.publish();
        s.req.sink.send(Event::Failed(message));
    }

    /// Frees the blocks of running sequence `i` and queues it again at the front, to be
    /// prefilled again (prompt and generated tokens) when there is room (vLLM's recompute).
    fn preempt(&mut self, i: usize) {
        let mut s = self.running.remove(i);
        self.pool.release(&mut s.kv);
        s.fed = 0;
        self.waiting.push_front(s);
        self.metrics.preemptions.fetch_add(1, Relaxed);
    }

    /// How many tokens each running sequence feeds this step, with its blocks reserved. When
    /// the pool cannot grow a sequence, the most recently admitted one gives way (itself, if it
    /// is the latest): older sequences never lose their work to newer ones. Planning then starts
    /// over; the reservations already made stay valid.
    fn plan(&mut self) -> Vec<usize> {
        'again: loop {
            let mut budget = self.cfg.prefill_chunk;
            let mut plan = Vec::with_capacity(self.running.len());
            for i in 0..self.running.len() {
                let s = &mut self.running[i];
                let pending = s.tokens.len() - s.fed;
                let n = if pending == 1 { 1 } else { pending.min(budget) };
                let need = s.fed + n;
                if n == 0 || self.pool.reserve(&mut s.kv, need).is_ok() {
                    if pending > 1 {
                        budget -= n;
                    }
                    plan.push(n);
                    continue;
                }
                if self.running.len() > 1 {
                    self.preempt(self.running.len() - 1);
                } else {
                    let mut s = self.running.remove(i);
                    let e = format!("the KV cache ({} tokens) cannot hold this sequence's {need} tokens", self.pool.capacity_tokens());
                    self.fail(&mut s, e);
                }
                continue 'again;
            }
            return plan;
        }
    }

    fn step(&mut self) -> Result<()> {
        let plan = self.plan();
        if plan.iter().all(|&n| n == 0) {
            return Ok(());
        }
        let t0 = Instant::now();
        let logits = {
            let mut step: Vec<StepSeq> = Vec::new();
            for (s, &n) in self.running.iter_mut().zip(&plan) {
                if n > 0 {
                    step.push(StepSeq { tokens: &s.tokens[s.fed..s.fed + n], kv: &mut s.kv });
                }
            }
            self.metrics.batch_size.store(step.len() as u64, Relaxed);
            self.metrics.batched_sequences.fetch_add(step.len() as u64, Relaxed);
            self.model.forward_batch(&self.pool, &mut step)?
        };
        self.metrics.steps.fetch_add(1, Relaxed);
        // Each predicting sequence's row of logits, as much of it as its sampler needs: its
        // best few pairs where the settings allow (on a GPU selected there, so that a step
        // copies k pairs a sequence instead of its vocabulary), else the whole row.
        let vocab = logits.dim(1)?;
        let mut wants = Vec::with_capacity(plan.len());
        let mut row = 0;
        for (s, &n) in self.running.iter_mut().zip(&plan) {
            let r = (n > 0).then(|| {
                row += 1;
                row - 1
            });
            s.fed += n;
            self.pool.commit(&mut s.kv, &s.tokens[..s.fed]);
            // A prefill chunk that leaves prompt to feed makes no prediction yet. Log-probabilities
            // need the whole row (its softmax's denominator), and so does any edit of it.
            let want = if whole_rows_only() || s.req.logprobs.is_some() || Self::edits_row(s, &self.eos_ids) { Wants::Whole } else { s.sampler.wants(vocab) };
            wants.push(r.filter(|_| s.fed == s.tokens.len()).map(|r| (r, want)));
        }
        let predicts = fetch_rows(&logits, &wants)?;
        let t_forward = Instant::now();
        self.metrics.add_phase(StepPhase::Forward, (t_forward - t0).as_secs_f64());
        // Sampling is independent per sequence, and a whole row costs a pass over the
        // vocabulary: with a GPU step, on all cores (64 sequences one after another took
        // milliseconds of the step); on the CPU, where the step's kernel threads are still
        // spinning, in turn.
        let eos = &self.eos_ids;
        let sample = |(s, l): (&mut Seq, Option<RowLogits>)| {
            l.map(|l| match l {
                // The raw row's log-probabilities; the draw is the one `sample_fetched` makes,
                // from the row as the grammar, `logit_bias` and `min_tokens` leave it.
                // (The raw row is kept only where log-probabilities are asked for.)
                RowLogits::Whole(mut row) if s.req.logprobs.is_some() || Self::edits_row(s, eos) => {
                    let raw = s.req.logprobs.map(|n| (n, row.clone()));
                    let t = match Self::edit_row(s, eos, &mut row)? {
                        Some(end) => end,
                        None => s.sampler.sample(row, &s.tokens)?,
                    };
                    Ok((t, raw.map(|(n, raw)| logprobs::of_row(&raw, t, n))))
                }
                l => Ok((s.sampler.sample_fetched(l, &logits, &s.tokens)?, None)),
            })
        };
        let next: Vec<Option<Result<Sampled>>> = if self.model.device.is_cpu() {
            self.running.iter_mut().zip(predicts).map(sample).collect()
        } else {
            self.running.par_iter_mut().zip(predicts.into_par_iter()).map(sample).collect()
        };
        let t_sampled = Instant::now();
        self.metrics.add_phase(StepPhase::Sampling, (t_sampled - t_forward).as_secs_f64());
        let mut outcomes = Vec::with_capacity(plan.len());
        for (s, next) in self.running.iter_mut().zip(next) {
            outcomes.push(match next {
                Some(Ok((t, lp))) => Self::advance(s, t, lp, &self.tokenizer, &self.eos_ids, self.context, &self.metrics)?,
                // A grammar that fails fails its own sequence, not the batch.
                Some(Err(Error::Grammar(e))) => Outcome::Failed(e),
                Some(Err(e)) => return Err(e),
                None => Outcome::Continue,
            });
        }
        self.metrics.add_phase(StepPhase::Emit, t_sampled.elapsed().as_secs_f64());
        self.metrics.add_busy(t0.elapsed().as_secs_f64());
        let mut i = 0;
        for o in outcomes {
            match o {
                Outcome::Continue => i += 1,
                Outcome::Cancelled => {
                    let mut s = self.running.remove(i);
                    self.pool.release(&mut s.kv);
                    self.metrics.requests_cancelled.fetch_add(1, Relaxed);
                }
                Outcome::Finished(done) => {
                    let mut s = self.running.remove(i);
                    self.pool.release(&mut s.kv);
                    self.metrics.requests_finished.fetch_add(1, Relaxed);
                    self.publish();
                    s.req.sink.send(Event::Done(done));
                }
                Outcome::Failed(e) => {
                    let mut s = self.running.remove(i);
                    self.fail(&mut s, e);
                }
            }
        }
        Ok(())
    }

    /// Whether `s`'s row of logits is changed before its draw ([`Self::edit_row`]).
    fn edits_row(s: &Seq, eos: &[u32]) -> bool {
        s.req.constraint.is_some() || !s.req.logit_bias.is_empty() || !Self::banned(s, eos).is_empty()
    }

    /// Edits `s`'s row before its draw: the tokens its grammar does not allow next, then those
    /// `min_tokens` holds back, to −∞, its `logit_bias` added. Where the grammar is complete
    /// and allows only the end of the sequence, that end is the token (the draw is skipped).
    fn edit_row(s: &mut Seq, eos: &[u32], row: &mut [f32]) -> Result<Option<u32>> {
        if let Some(c) = &mut s.req.constraint {
            if let Next::End(end) = c.mask(row, &s.req.stop_token_ids).map_err(Error::Grammar)? {
                return Ok(Some(end));
            }
        }
        for t in Self::banned(s, eos) {
            if let Some(l) = row.get_mut(t as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        for &(t, b) in &s.req.logit_bias {
            if let Some(l) = row.get_mut(t as usize) {
                *l += b;
            }
        }
        Ok(None)
    }

    /// The tokens `s` may not draw now: its end-of-sequence and stop tokens while it has
    /// generated fewer than its `min_tokens`.
    fn banned(s: &Seq, eos: &[u32]) -> Vec<u32> {
        if s.generated() >= s.req.min_tokens {
            return Vec::new();
        }
        let eos = if s.req.ignore_eos { &[][..] } else { eos };
        eos.iter().chain(&s.req.stop_token_ids).copied().collect()
    }

    /// Takes `s`'s sampled next token (with its log-probabilities where asked for) and tells
    /// its client. An end-of-sequence token that ends the reply is not part of it, nor of its
    /// log-probabilities.
    fn advance(s: &mut Seq, next: u32, logprob: Option<TokenLogprob>, tok: &Tokenizer, eos: &[u32], context: usize, m: &Metrics) -> Result<Outcome> {
        if s.first_token {
            s.first_token = false;
            m.observe_ttft(s.arrived.elapsed().as_secs_f64());
        }
        let finish = |s: &mut Seq, reason: FinishReason| {
            let rest = s.detok.finish(tok).ok().flatten().unwrap_or_default();
            let mut text = s.stop.push(&rest);
            if !text.stopped {
                text.text += &s.stop.finish();
            }
            let alive = text.text.is_empty() || s.req.sink.send(Event::Text(text.text));
            let reason = if text.stopped { FinishReason::Stop } else { reason };
            if alive {
                Outcome::Finished(Finish { reason, prompt_tokens: s.prompt_len, completion_tokens: s.generated() })
            } else {
                Outcome::Cancelled
            }
        };
        // A grammar's end is the reply's, `ignore_eos` or not.
        let ends_grammar = s.req.constraint.is_some() && eos.contains(&next);
        if (eos.contains(&next) && !s.req.ignore_eos) || s.req.stop_token_ids.contains(&next) || ends_grammar {
            return Ok(finish(s, FinishReason::Stop));
        }
        let complete = match &mut s.req.constraint {
            Some(c) => match c.accept(next) {
                Ok(done) => done,
                Err(e) => return Ok(Outcome::Failed(e)),
            },
            None => false,
        };
        s.tokens.push(next);
        m.generated_tokens.fetch_add(1, Relaxed);
        if let Some(lp) = logprob {
            if !s.req.sink.send(Event::Logprobs(lp)) {
                return Ok(Outcome::Cancelled);
            }
        }
        if let Some(piece) = s.detok.push(tok, next)? {
            let o = s.stop.push(&piece);
            if !o.text.is_empty() && !s.req.sink.send(Event::Text(o.text)) {
                return Ok(Outcome::Cancelled);
            }
            if o.stopped {
                return Ok(Outcome::Finished(Finish { reason: FinishReason::Stop, prompt_tokens: s.prompt_len, completion_tokens: s.generated() }));
            }
        }
        if complete {
            // The grammar allows nothing more: the reply ends here, without a step for the
            // end-of-sequence token.
            return Ok(finish(s, FinishReason::Stop));
        }
        if s.generated() >= s.req.params.max_tokens || s.tokens.len() >= context {
            return Ok(finish(s, FinishReason::Length));
        }
        Ok(Outcome::Continue)
    }

    fn publish(&self) {
        self.metrics.running.store(self.running.len() as u64, Relaxed);
        self.metrics.kv_blocks_used.store(self.pool.used_blocks() as u64, Relaxed);
        self.metrics.kv_blocks_cached.store(self.pool.cached_blocks() as u64, Relaxed);
    }
}

/// `AWQ_RUN_WHOLE_LOGITS=1` copies every predicting row whole, as before the top-k selection
/// (to measure what the selection saves; the tokens drawn are the same).
fn whole_rows_only() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("AWQ_RUN_WHOLE_LOGITS").is_ok_and(|v| v == "1"))
}
