//! `POST /v1/chat/completions` and `POST /v1/completions`.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::Json;
use futures::stream::{self, Stream, StreamExt};
use mistralrs_core::{NormalRequest, Request, RequestMessage, Response, SamplingParams};
use serde_json::{json, Value};
use tokio::sync::mpsc::Receiver;

use super::error::ApiError;
use super::logprobs;
use super::metrics::RequestGauge;
use super::openai::{
    parse_body, ChatBody, CompletionBody, DndExtension, Extras, PromptInput, CHAT_FIELDS,
    COMPLETION_FIELDS,
};
use super::ServerState;
use crate::cache::{normalize_prompts, route_key, Source};
use crate::policy::{Condition, Turn};
use crate::provider::Served;

/// The request header carrying the client's or gateway's routing key.
pub(super) const ROUTE_HINT: &str = "x-dnd-key";
/// The response header reporting the routing key the request was served by (`none` when no
/// prompts conditioned it: the base model, a named adapter, an adapter chosen by key).
pub(super) const ROUTE_KEY: &str = "x-dnd-route-key";

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";

/// The body, or the OpenAI-style error for one the server could not read (413 when it is
/// over the size limit).
pub(super) fn body_or_error(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        let status = e.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "request_too_large"
        } else {
            "invalid_request"
        };
        ApiError::new(status, code, e.body_text())
    })
}

pub(super) async fn chat(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> HttpResponse {
    let gauge = state.metrics.waiting();
    let result = async {
        let req: ChatBody = parse_body(&body_or_error(body)?, CHAT_FIELDS)?;
        let (turns, message) = req.messages()?;
        let params = req.common.sampling.to_params()?;
        let extras = req.extras()?;
        let c = req.common;
        let hint = route_hint(&headers)?;
        let served = choose(&state, c.dnd, c.model.as_deref(), &turns, hint).await?;
        run(&state, served, message, params, extras, c.stream, gauge).await
    }
    .await;
    finish(CHAT, result)
}

pub(super) async fn completion(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> HttpResponse {
    let gauge = state.metrics.waiting();
    let result = async {
        let mut req: CompletionBody = parse_body(&body_or_error(body)?, COMPLETION_FIELDS)?;
        let prompt = req.prompt()?;
        let server_echo = req.server_echo();
        // Scoring a prompt without generating: max_tokens 0, as OpenAI allows with echo.
        let s = &mut req.common.sampling;
        let generate = !(server_echo && s.max_completion_tokens.or(s.max_tokens) == Some(0));
        if !generate {
            (s.max_tokens, s.max_completion_tokens) = (None, None);
        }
        let params = req.common.sampling.to_params()?;
        let extras = req.extras()?;
        // The policy reads text: a token prompt is read as its text.
        let text = match &prompt {
            PromptInput::Text(t) => t.clone(),
            PromptInput::Tokens(ids) => state.tokenizer().await?.decode(ids, false)?,
        };
        let turns = vec![Turn::new("user", text.clone())];
        let hint = route_hint(&headers)?;
        let c = &req.common;
        let served = choose(&state, c.dnd.clone(), c.model.as_deref(), &turns, hint).await?;
        if server_echo {
            let echo = Echo {
                text,
                prompt,
                top_logprobs: req.logprobs,
                generate,
                stream: req.common.stream,
            };
            return echo_completion(&state, served, echo, params, extras, gauge).await;
        }
        let message = req.message(prompt);
        run(
            &state,
            served,
            message,
            params,
            extras,
            req.common.stream,
            gauge,
        )
        .await
    }
    .await;
    finish(COMPLETIONS, result)
}

fn finish(endpoint: &'static str, result: Result<HttpResponse, ApiError>) -> HttpResponse {
    result.unwrap_or_else(|e| {
        tracing::info!(endpoint, code = e.code, "request refused: {}", e.message);
        e.into_response()
    })
}

/// The request's `x-dnd-key` header: the routing key its client or gateway computed.
fn route_hint(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(v) = headers.get(ROUTE_HINT) else {
        return Ok(None);
    };
    v.to_str().map(|s| Some(s.trim())).map_err(|_| {
        ApiError::bad_request(
            "invalid_dnd_key",
            format!("the {ROUTE_HINT} header is not visible ASCII"),
        )
    })
}

/// Refuses a request whose `x-dnd-key` names another condition than the one it is served by:
/// a client or gateway that computes the key by another recipe would scatter one condition's
/// requests over replicas without anyone noticing.
fn check_route(hint: Option<&str>, route: &str) -> Result<(), ApiError> {
    match hint {
        Some(h) if h != route => Err(ApiError::bad_request(
            "dnd_key_mismatch",
            format!(
                "{ROUTE_HINT} is {h:?} but this request's condition has routing key {route:?} \
                 (the SHA-256 of its normalised prompts, each followed by a zero byte, first 32 \
                 hex characters; README \"Routing across replicas\")"
            ),
        )),
        _ => Ok(()),
    }
}

/// The adapter a request gets: a named adapter its `model` names, else its `dnd` field, else
/// the policy. `hint`: the request's `x-dnd-key`, checked against its condition's routing key.
async fn choose(
    state: &ServerState,
    ext: Option<DndExtension>,
    model: Option<&str>,
    turns: &[Turn],
    hint: Option<&str>,
) -> Result<Served, ApiError> {
    let ext = ext.unwrap_or_default();
    let Some(provider) = &state.provider else {
        if let Some(m) = model {
            state.check_base_model(m)?;
        }
        if ext.prompts.is_some() || ext.adapter.is_some() {
            return Err(state.provider().err().expect("no provider"));
        }
        return Ok(Served::default());
    };
    let chosen = [ext.base, ext.prompts.is_some(), ext.adapter.is_some()];
    let chosen = chosen.iter().filter(|b| **b).count();
    if chosen > 1 {
        return Err(ApiError::bad_request(
            "conflicting_dnd_fields",
            "dnd: give at most one of base, prompts and adapter",
        ));
    }
    if let Some(name) = model {
        if let Some(served) = provider.resolve_named(name).await {
            if chosen > 0 {
                return Err(ApiError::bad_request(
                    "conflicting_dnd_fields",
                    format!("model {name:?} names an adapter; drop the dnd field's choice"),
                ));
            }
            return Ok(served?);
        }
        state.check_base_model(name)?;
    }
    if ext.base {
        return Ok(Served::default());
    }
    if let Some(key) = ext.adapter {
        return Ok(provider.by_key(&key).await?);
    }
    let policy = &provider.options().policy;
    let condition = match ext.prompts {
        Some(p) => Condition::Prompts(
            policy
                .explicit(&p)
                .map_err(crate::provider::ProviderError::from)?,
        ),
        None => policy
            .from_turns(turns)
            .map_err(crate::provider::ProviderError::from)?,
    };
    let route = match &condition {
        Condition::Prompts(p) => {
            let route = route_key(&normalize_prompts(p));
            check_route(hint, &route)?;
            Some(route)
        }
        Condition::Base => None,
    };
    let mut served = provider.resolve(condition).await?;
    served.route = route;
    Ok(served)
}

/// The `dnd` response field.
fn dnd_info(served: &Served) -> Value {
    let mut v = json!({
        "adapter": served.key.as_ref().map(|k| k.as_str()),
        "source": source_name(served),
        "generation_ms": served.generation.map(|d| d.as_secs_f64() * 1e3),
    });
    if let Some(name) = &served.name {
        v["name"] = json!(name);
    }
    if let Some(n) = &served.abstained {
        v["distance"] = json!(n.distance);
        v["nearest"] = json!(n.name);
    }
    if let Some(d) = served.similar {
        v["distance"] = json!(d);
    }
    if let Some(r) = &served.route {
        v["route_key"] = json!(r);
    }
    v
}

/// `generated`, `joined`, `cached`, `restored` (copied back from the host-memory tier), `base`,
/// `loaded` (a named PEFT folder read into the cache by this request), or `abstained` (base
/// model: the condition was farther from every trained one than the abstention distance), or
/// `similar` (a cached adapter for a condition within the reuse distance).
fn source_name(served: &Served) -> &'static str {
    match (&served.abstained, served.source) {
        (Some(_), _) => "abstained",
        (None, Some(_)) if served.similar.is_some() => "similar",
        (None, Some(Source::Generated)) if served.peft => "loaded",
        (None, Some(s)) => s.as_str(),
        (None, None) => "base",
    }
}

fn dnd_headers(served: &Served) -> HeaderMap {
    let mut h = HeaderMap::new();
    let key = served.key.as_ref().map_or("none", |k| k.as_str());
    h.insert(
        "x-dnd-adapter",
        HeaderValue::from_str(key).expect("hex key"),
    );
    h.insert(
        "x-dnd-adapter-source",
        HeaderValue::from_static(source_name(served)),
    );
    h.insert(
        ROUTE_KEY,
        HeaderValue::from_str(served.route.as_deref().unwrap_or("none")).expect("hex key"),
    );
    h
}

/// Holds the served adapter (its copy owns the cache lease) until the response is complete;
/// the engine's sequence holds it too, and the lease goes with the last of the two.
struct Pin {
    _served: Served,
    /// Counts the request as running until the response is complete.
    _gauge: RequestGauge,
}

async fn run(
    state: &Arc<ServerState>,
    served: Served,
    message: RequestMessage,
    params: SamplingParams,
    extras: Extras,
    stream: bool,
    mut gauge: RequestGauge,
) -> Result<HttpResponse, ApiError> {
    let rx = send(state, &served, message, params, &extras, stream, false).await?;
    gauge.running();
    let headers = dnd_headers(&served);
    let info = dnd_info(&served);
    // As vLLM does, a named adapter's answers carry its name as their model.
    let model = served.name.clone();
    let pin = Pin {
        _served: served,
        _gauge: gauge,
    };
    if stream {
        let events = sse_events(rx, Some(info), pin, extras.include_usage, model, None, 0);
        return Ok((headers, Sse::new(events).keep_alive(KeepAlive::default())).into_response());
    }
    let mut body = collect(rx).await?;
    drop(pin);
    body["dnd"] = info;
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    Ok((headers, Json(body)).into_response())
}

/// Hands a request with the served adapter to the engine; `raw`: ask for the prompt's raw
/// logits instead of a completion.
async fn send(
    state: &Arc<ServerState>,
    served: &Served,
    message: RequestMessage,
    mut params: SamplingParams,
    extras: &Extras,
    stream: bool,
    raw: bool,
) -> Result<Receiver<Response>, ApiError> {
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    params.top_n_logprobs = extras.top_logprobs;
    let mut req = NormalRequest::new_simple(message, params, tx, id, None, None);
    req.is_streaming = stream;
    req.return_logprobs = extras.logprobs && !raw;
    req.return_raw_logits = raw;
    req.constraint = extras.constraint.clone();
    // The adapter travels with the request: the engine adds the sequence with it and asks
    // no provider (the policy was applied once, in `choose`).
    let request = Request::NormalWithAdapter(Box::new(req), served.adapter.clone());
    let sent = match state.engine.inner().get_sender(None) {
        Ok(s) => s.send(request).await.is_ok(),
        Err(_) => false,
    };
    if !sent {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "engine_unavailable",
            "the engine is not accepting requests",
        ));
    }
    Ok(rx)
}

/// A completion the server assembles: the prompt's text (and its logprobs) before what the
/// engine generates.
struct Echo {
    /// The prompt's text.
    text: String,
    prompt: PromptInput,
    /// `logprobs`: alternatives per token; None: no logprobs asked for.
    top_logprobs: Option<usize>,
    /// False for `max_tokens` 0: the prompt scored, nothing generated.
    generate: bool,
    /// Streamed: a first chunk with the prompt (and its logprobs), then the engine's chunks.
    stream: bool,
}

/// `echo` with `logprobs` (how lm-evaluation-harness scores a continuation), or `echo` of a
/// token prompt: the prompt's logprobs come from the engine's raw logits of the whole prompt
/// under the request's adapter, the generated tokens' from the completion that follows.
async fn echo_completion(
    state: &Arc<ServerState>,
    served: Served,
    echo: Echo,
    params: SamplingParams,
    extras: Extras,
    mut gauge: RequestGauge,
) -> Result<HttpResponse, ApiError> {
    let tokenizer = state.tokenizer().await?;
    // The ids the engine would see for a text prompt (it adds special tokens too); those it
    // adds are not in the echoed text. A token prompt's text is all its tokens' decoded.
    let (ids, added) = match &echo.prompt {
        PromptInput::Tokens(ids) => {
            tokenizer.check_ids(ids)?;
            (ids.clone(), vec![false; ids.len()])
        }
        PromptInput::Text(t) => tokenizer.encode_marking_added(t)?,
    };
    let mut prompt_logprobs = None;
    if let Some(k) = echo.top_logprobs {
        let message = RequestMessage::CompletionTokens(ids.clone());
        let rx = send(
            state,
            &served,
            message,
            params.clone(),
            &extras,
            false,
            true,
        )
        .await?;
        gauge.running();
        let logits = raw_logits(rx).await?;
        // Off the async threads: a long prompt over a large vocabulary is seconds of work.
        let (tok, ids) = (tokenizer.clone(), ids.clone());
        prompt_logprobs = Some(
            tokio::task::spawn_blocking(move || {
                let texts = tok.token_texts(&ids);
                logprobs::prompt(&logits, &ids, k, texts, &added, |id| tok.token_text(id))
            })
            .await
            .map_err(|e| ApiError::internal("internal_error", e.to_string()))??,
        );
    }
    if echo.stream {
        return Ok(echo_stream(
            state,
            served,
            echo,
            ids,
            prompt_logprobs,
            params,
            extras,
            gauge,
        )
        .await?
        .into_response());
    }
    let mut body = if echo.generate {
        let message = RequestMessage::CompletionTokens(ids.clone());
        let rx = send(state, &served, message, params, &extras, false, false).await?;
        gauge.running();
        collect(rx).await?
    } else {
        let mut body = completion_object(
            state,
            &served,
            json!({"index": 0, "text": "", "logprobs": null, "finish_reason": "length"}),
        );
        body["usage"] = json!({"prompt_tokens": ids.len(), "completion_tokens": 0,
                               "total_tokens": ids.len()});
        body
    };
    if let Some(choice) = body["choices"].get_mut(0) {
        let generated = choice["text"].as_str().unwrap_or_default().to_string();
        choice["text"] = json!(format!("{}{generated}", echo.text));
        // The generated tokens' offsets continue after the prompt tokens' texts.
        if let Some((p, chars)) = prompt_logprobs {
            choice["logprobs"] = logprobs::append(p, choice["logprobs"].take(), chars);
        }
    }
    body["dnd"] = dnd_info(&served);
    if let Some(m) = &served.name {
        body["model"] = json!(m);
    }
    let headers = dnd_headers(&served);
    drop(served);
    Ok((headers, Json(body)).into_response())
}

/// The streamed form of [`echo_completion`]: a first chunk carrying the prompt's text and
/// logprobs (and the `dnd` field), then the engine's chunks of the generated tokens, whose
/// logprob offsets continue after the prompt.
#[allow(clippy::too_many_arguments)]
async fn echo_stream(
    state: &Arc<ServerState>,
    served: Served,
    echo: Echo,
    ids: Vec<u32>,
    prompt_logprobs: Option<(Value, usize)>,
    params: SamplingParams,
    extras: Extras,
    mut gauge: RequestGauge,
) -> Result<HttpResponse, ApiError> {
    let mut first = completion_object(
        state,
        &served,
        json!({"index": 0, "text": echo.text,
               "logprobs": prompt_logprobs.as_ref().map(|(p, _)| p),
               "finish_reason": if echo.generate { Value::Null } else { json!("length") }}),
    );
    first["dnd"] = dnd_info(&served);
    let id = first["id"].as_str().unwrap_or_default().to_string();
    let headers = dnd_headers(&served);
    let head =
        stream::once(async move { Ok::<_, Infallible>(Event::default().data(first.to_string())) });
    if !echo.generate {
        let done = stream::once(async { Ok::<_, Infallible>(Event::default().data("[DONE]")) });
        return Ok((headers, Sse::new(head.chain(done))).into_response());
    }
    let message = RequestMessage::CompletionTokens(ids);
    let rx = send(state, &served, message, params, &extras, true, false).await?;
    gauge.running();
    let model = served.name.clone();
    let pin = Pin {
        _served: served,
        _gauge: gauge,
    };
    let offset = prompt_logprobs.map_or(echo.text.chars().count(), |(_, chars)| chars);
    // One completion, one id: the engine's chunks carry the first chunk's.
    let events = sse_events(rx, None, pin, false, model, Some(id), offset);
    Ok((
        headers,
        Sse::new(head.chain(events)).keep_alive(KeepAlive::default()),
    )
        .into_response())
}

/// A completion (or completion chunk) the server writes itself, with one `choice`: a new id,
/// the time, and the served adapter's name or the base model's as its model.
fn completion_object(state: &ServerState, served: &Served, choice: Value) -> Value {
    json!({
        "id": format!("cmpl-{}", state.next_id.fetch_add(1, Ordering::Relaxed)),
        "object": "text_completion",
        "created": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        "model": served.name.as_deref().unwrap_or(&state.model_name),
        "choices": [choice],
    })
}

/// The raw logits of a whole prompt, (positions, vocabulary).
async fn raw_logits(mut rx: Receiver<Response>) -> Result<candle_core::Tensor, ApiError> {
    let internal = |e: candle_core::Error| ApiError::internal("internal_error", e.to_string());
    match rx.recv().await {
        Some(Response::Raw { logits_chunks, .. }) => {
            let rows = logits_chunks
                .iter()
                .map(|t| {
                    let vocab = t.dims().last().copied().unwrap_or(0);
                    t.to_device(&candle_core::Device::Cpu)?
                        .to_dtype(candle_core::DType::F32)?
                        .reshape(((), vocab))
                })
                .collect::<candle_core::Result<Vec<_>>>()
                .map_err(internal)?;
            candle_core::Tensor::cat(&rows, 0).map_err(internal)
        }
        Some(other) => Err(engine_error(other)
            .unwrap_or_else(|| ApiError::internal("internal_error", "unexpected engine response"))),
        None => Err(ApiError::internal(
            "internal_error",
            "the engine dropped the request without an answer",
        )),
    }
}

fn engine_error(r: Response) -> Option<ApiError> {
    match r {
        Response::ValidationError(e) => {
            Some(ApiError::bad_request("invalid_request", e.to_string()))
        }
        Response::InternalError(e) => Some(ApiError::internal("internal_error", e.to_string())),
        Response::ModelError(m, _) | Response::CompletionModelError(m, _) => {
            Some(ApiError::internal("model_error", m))
        }
        _ => None,
    }
}

/// The final response of a non-streaming request.
async fn collect(mut rx: Receiver<Response>) -> Result<Value, ApiError> {
    while let Some(r) = rx.recv().await {
        let value = match r {
            Response::Done(d) => serde_json::to_value(d).map(|mut v| {
                logprobs::chat_response(&mut v);
                v
            }),
            Response::CompletionDone(d) => serde_json::to_value(d).map(|mut v| {
                logprobs::completion_response(&mut v);
                v
            }),
            Response::Chunk(_) | Response::CompletionChunk(_) => continue,
            other => {
                return Err(engine_error(other).unwrap_or_else(|| {
                    ApiError::internal("internal_error", "unexpected engine response")
                }))
            }
        };
        return value.map_err(|e| ApiError::internal("internal_error", e.to_string()));
    }
    Err(ApiError::internal(
        "internal_error",
        "the engine dropped the request without an answer",
    ))
}

/// Server-sent events of a streaming request: chunks (the first with the `dnd` field), a
/// usage chunk when asked for, then `[DONE]`; an engine error becomes an `error` event.
/// `info`: the `dnd` field for the first chunk (None: an earlier chunk carried it); `id`: the
/// chunks' id when an earlier chunk set it (None: the engine's); `offset`: characters of text
/// streamed before these chunks (legacy logprobs' offsets continue there).
fn sse_events(
    rx: Receiver<Response>,
    info: Option<Value>,
    pin: Pin,
    include_usage: bool,
    model: Option<String>,
    id: Option<String>,
    offset: usize,
) -> impl Stream<Item = Result<Event, Infallible>> {
    struct St {
        rx: Receiver<Response>,
        info: Option<Value>,
        /// The usage chunk, sent after the last one.
        usage: Option<Value>,
        /// Characters of completion text streamed so far (legacy logprobs' offsets).
        offset: usize,
        /// The adapter name reported as the chunks' model.
        model: Option<String>,
        id: Option<String>,
        done: bool,
        _pin: Pin,
    }
    let st = St {
        rx,
        info,
        usage: None,
        offset,
        model,
        id,
        done: false,
        _pin: pin,
    };
    stream::unfold(st, move |mut st| async move {
        if st.done {
            return None;
        }
        if let Some(u) = st.usage.take() {
            return Some((Ok(Event::default().data(u.to_string())), st));
        }
        let Some(r) = st.rx.recv().await else {
            st.done = true;
            return Some((Ok(Event::default().data("[DONE]")), st));
        };
        let (mut value, last) = match r {
            Response::Chunk(c) => {
                let last = c.choices.iter().all(|c| c.finish_reason.is_some());
                let v = serde_json::to_value(c).map(|mut v| {
                    logprobs::chat_chunk(&mut v);
                    v
                });
                (v, last)
            }
            Response::CompletionChunk(c) => {
                let last = c.choices.iter().all(|c| c.finish_reason.is_some());
                let v = serde_json::to_value(c).map(|mut v| {
                    logprobs::completion_chunk(&mut v, &mut st.offset);
                    v
                });
                (v, last)
            }
            Response::Done(d) => (serde_json::to_value(d), true),
            Response::CompletionDone(d) => (serde_json::to_value(d), true),
            other => {
                let e = engine_error(other).unwrap_or_else(|| {
                    ApiError::internal("internal_error", "unexpected engine response")
                });
                st.done = true;
                let ev = Event::default().data(e.body().to_string());
                return Some((Ok(ev), st));
            }
        };
        if let Ok(v) = &mut value {
            if let Some(info) = st.info.take() {
                v["dnd"] = info;
            }
            if let Some(m) = &st.model {
                v["model"] = json!(m);
            }
            if let Some(id) = &st.id {
                v["id"] = json!(id);
            }
            // OpenAI streams carry usage only in a last chunk of its own, and only when asked.
            if let Some(usage) = v.get_mut("usage").map(Value::take) {
                if include_usage && !usage.is_null() {
                    let mut u = v.clone();
                    u["choices"] = json!([]);
                    u["usage"] = usage;
                    if let Some(o) = u.as_object_mut() {
                        o.remove("dnd");
                    }
                    st.usage = Some(u);
                }
            }
        }
        let data =
            value.unwrap_or_else(|e| ApiError::internal("internal_error", e.to_string()).body());
        if last {
            // `[DONE]` follows on the next polls (rx is then drained or closed).
            st.rx.close();
        }
        Some((Ok(Event::default().data(data.to_string())), st))
    })
}
