//! Running a loaded model: token generation ([`generation`]) and sampling ([`sampling`]), chat
//! rendering ([`chat_template`]), perplexity ([`eval`]), the choice of device and dtype
//! ([`device`]), and the server's continuous batching ([`scheduler`]) with the log-probabilities
//! it reports ([`logprobs`]) and the grammars that structured output holds replies to
//! ([`constraint`]).
pub mod chat_template;
pub mod constraint;
pub mod conversation;
pub mod device;
pub mod eval;
pub mod generation;
pub mod logprobs;
pub mod metrics;
pub mod sampling;
pub mod scheduler;
pub mod stop;
