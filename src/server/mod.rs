//! The OpenAI-compatible HTTP server around a mistral.rs engine, with the DnD provider.
//!
//! - `POST /v1/chat/completions`, `POST /v1/completions` (both with `stream`): each request's
//!   adapter is chosen by the [`policy`](crate::policy) or its `dnd` field, resolved through the
//!   cache before the engine sees the request, and reported in the response (`dnd` field,
//!   `x-dnd-adapter` headers). A request's `x-dnd-key` header, the routing key a load
//!   balancer hashes on, must match its condition's ([`crate::cache::route_key`]); every
//!   answer reports the key it was served by (`x-dnd-route-key`).
//! - `GET /v1/adapters`, `GET /v1/adapters/{key}`, `GET /v1/adapters/{key}/peft` (a tar of the
//!   PEFT folder), `DELETE /v1/adapters/{key}`.
//! - `POST /v1/load_lora_adapter`, `POST /v1/unload_lora_adapter` (vLLM's shape; PEFT
//!   folders under `--adapter-root` only).
//! - `GET /metrics` (Prometheus; request gauges and adapter residency in vLLM's shape),
//!   `GET /v1/models`, `GET /health`.
//! - `POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info` (vLLM's shapes; what
//!   lm-evaluation-harness uses to tokenize through the server). `/v1/completions` takes token
//!   prompts and answers `echo` with `logprobs` with the prompt's own logprobs.

mod adapters;
mod completions;
pub mod error;
mod logprobs;
mod metrics;
pub mod openai;
mod runtime_adapters;
mod tokenize;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::provider::DndProvider;
pub use error::ApiError;
pub use metrics::{HttpMetrics, RequestGauge};
pub use runtime_adapters::RuntimeLoading;
pub use tokenize::ServedTokenizer;

/// What every handler shares.
pub struct ServerState {
    /// The engine.
    pub engine: mistralrs::Model,
    /// The name the model is served under.
    pub model_name: String,
    /// The DnD provider, when `--adapter-provider dnd`.
    pub provider: Option<Arc<DndProvider>>,
    /// Request counters.
    pub metrics: HttpMetrics,
    /// Where `POST /v1/load_lora_adapter` may load from; off when `None`.
    pub runtime: Option<RuntimeLoading>,
    /// The engine's tokenizer, read from its pipeline on first use.
    tokenizer: tokio::sync::OnceCell<Result<Arc<ServedTokenizer>, String>>,
    next_id: AtomicUsize,
}

impl ServerState {
    /// State for an engine (with its provider already registered, if any).
    pub fn new(
        engine: mistralrs::Model,
        model_name: impl Into<String>,
        provider: Option<Arc<DndProvider>>,
    ) -> Arc<Self> {
        Self::with_runtime_loading(engine, model_name, provider, None)
    }

    /// As [`new`](Self::new), with named adapters loaded and unloaded at runtime from the
    /// folder `runtime` names.
    pub fn with_runtime_loading(
        engine: mistralrs::Model,
        model_name: impl Into<String>,
        provider: Option<Arc<DndProvider>>,
        runtime: Option<RuntimeLoading>,
    ) -> Arc<Self> {
        Arc::new(Self {
            engine,
            model_name: model_name.into(),
            provider,
            metrics: HttpMetrics::default(),
            runtime,
            tokenizer: tokio::sync::OnceCell::new(),
            next_id: AtomicUsize::new(0),
        })
    }

    /// Refuses a `model` that is not the base model (its name or `default`); the caller has
    /// looked for a named adapter first. A typo must not be answered by another model.
    pub(crate) fn check_base_model(&self, model: &str) -> Result<(), ApiError> {
        if model == self.model_name || model == "default" {
            return Ok(());
        }
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!(
                "the model {model:?} does not exist here: use {:?} (or \"default\") for the \
                 base model, or a name GET /v1/models lists",
                self.model_name
            ),
        ))
    }

    /// The engine's tokenizer (for token prompts, prompt logprobs and `/tokenize`).
    pub(crate) async fn tokenizer(&self) -> Result<Arc<ServedTokenizer>, ApiError> {
        let t = self
            .tokenizer
            .get_or_init(|| async { ServedTokenizer::of(&self.engine).await.map(Arc::new) })
            .await;
        t.clone().map_err(|e| {
            ApiError::new(
                StatusCode::NOT_IMPLEMENTED,
                "tokenizer_unavailable",
                format!("the model's tokenizer cannot be read: {e}"),
            )
        })
    }

    fn provider(&self) -> Result<&Arc<DndProvider>, ApiError> {
        self.provider.as_ref().ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "adapter_provider_disabled",
                "this server runs without an adapter provider (start it with \
                 --adapter-provider dnd)",
            )
        })
    }
}

/// The router of all endpoints.
pub fn router(state: Arc<ServerState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(completions::chat))
        .route("/v1/completions", post(completions::completion))
        .route("/v1/models", get(models))
        .route("/v1/adapters", get(adapters::list))
        .route(
            "/v1/adapters/{key}",
            get(adapters::show).delete(adapters::remove),
        )
        .route("/v1/adapters/{key}/peft", get(adapters::export))
        .route("/v1/load_lora_adapter", post(runtime_adapters::load))
        .route("/v1/unload_lora_adapter", post(runtime_adapters::unload))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/tokenizer_info", get(tokenize::info))
        .route("/metrics", get(metrics::prometheus))
        .route("/health", get(|| async { "ok" }))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::count,
        ))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{method} is not allowed on this endpoint"),
            )
        })
        .with_state(state)
}

async fn models(
    axum::extract::State(state): axum::extract::State<Arc<ServerState>>,
) -> Json<serde_json::Value> {
    let mut data = vec![json!({
        "id": state.model_name,
        "object": "model",
        "owned_by": "local",
        "adapter_provider": state.provider.as_ref().map(|_| "dnd"),
    })];
    // Named adapters, as vLLM lists its LoRA modules: `model: NAME` selects one.
    for (name, kind) in state.provider.iter().flat_map(|p| p.names()) {
        data.push(json!({
            "id": name,
            "object": "model",
            "owned_by": "local",
            "parent": state.model_name,
            "root": state.model_name,
            "dnd": {"kind": kind},
        }));
    }
    Json(json!({"object": "list", "data": data}))
}
