//! Running a loaded model: token generation ([`generation`]) and sampling ([`sampling`]), chat
//! rendering ([`chat_template`]), perplexity ([`eval`]) and the choice of device and dtype
//! ([`device`]).
pub mod chat_template;
pub mod conversation;
pub mod device;
pub mod eval;
pub mod generation;
pub mod metrics;
pub mod sampling;
pub mod scheduler;
pub mod stop;
