//! `awq-run serve`: an OpenAI-compatible HTTP server (axum on tokio) in front of the
//! continuous-batching engine ([`crate::engine::scheduler`]). Handlers render the chat template,
//! tokenize, submit the request to the engine and turn its events into OpenAI's JSON objects or
//! Server-Sent Events; the engine thread owns the model.
pub mod bench;
pub mod logprobs;
pub mod openai;
mod reply;
mod routes;
pub mod tool_parser;

use crate::assets::ModelAssets;
use crate::engine::chat_template::{ChatTemplate, CHATML};
use crate::engine::sampling::SamplingParams;
use crate::engine::scheduler::{Engine, SchedulerConfig};
use crate::error::{Error, Result};
use crate::model::Model;
use std::net::SocketAddr;
use std::sync::Arc;
use tokenizers::Tokenizer;

/// The chat page served at `/`: plain HTML, CSS and JavaScript, no build step.
pub const CHAT_PAGE: &str = include_str!("chat.html");

/// What the server answers with, besides the engine.
pub struct ServerOptions {
    /// The name `/v1/models` lists and requests may give as `model`.
    pub model_name: String,
    /// A key every `/v1/` request must carry as `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// The model's own sampling settings (its generation_config.json over llama.cpp's
    /// defaults), which request fields override.
    pub defaults: SamplingParams,
    /// Reads tool calls out of replies (`tool_choice: "auto"`); without it `auto` is refused.
    pub tool_parser: Option<tool_parser::ToolParser>,
}

/// Everything a handler needs.
pub struct AppState {
    pub engine: Engine,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub opts: ServerOptions,
    pub created: u64,
}

impl AppState {
    /// Starts the engine on `model` with the tokenizer and chat template of `assets`.
    pub fn new(model: Model, assets: &ModelAssets, sched: SchedulerConfig, opts: ServerOptions) -> Result<Self> {
        let template = ChatTemplate::new(assets.chat_template.as_deref().unwrap_or(CHATML), assets.bos_token.as_deref(), assets.eos_token.as_deref())
            .map_err(|e| Error::msg(format!("{}: {e}", assets.name)))?;
        let engine = Engine::start(model, assets.tokenizer.clone(), assets.eos_ids.clone(), sched)?;
        let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Ok(Self { engine, tokenizer: assets.tokenizer.clone(), template, opts, created })
    }
}

/// A bound server, not yet serving (so the caller learns the port before it blocks).
pub struct Server {
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
}

impl Server {
    /// Binds `addr` (port 0 picks a free one) inside `rt`.
    pub fn bind(rt: &tokio::runtime::Runtime, addr: SocketAddr, state: AppState) -> Result<Self> {
        let listener = rt.block_on(tokio::net::TcpListener::bind(addr)).map_err(|e| Error::msg(format!("cannot listen on {addr}: {e}")))?;
        Ok(Self { listener, state: Arc::new(state) })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener.local_addr().map_err(|e| Error::msg(e.to_string()))
    }

    /// Serves until Ctrl-C (or SIGTERM).
    pub fn run(self, rt: &tokio::runtime::Runtime) -> Result<()> {
        let app = routes::router(self.state);
        rt.block_on(async move {
            axum::serve(self.listener, app)
                .with_graceful_shutdown(shutdown_signal())
                .await
                .map_err(|e| Error::msg(format!("server: {e}")))
        })
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
