//! The base model's tokenizer over HTTP, in vLLM's shapes: `POST /tokenize`,
//! `POST /detokenize`, `GET /tokenizer_info`. lm-evaluation-harness looks for these and then
//! tokenizes through the server instead of fetching the model's tokenizer from a hub; the
//! prompt logprobs of `/v1/completions` read their token texts here too.
//!
//! The tokenizer is the engine's own (read once from its pipeline), so token ids mean the same
//! here as in a request's prompt.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::completions::body_or_error;
use super::error::ApiError;
use super::openai::parse_body;
use super::ServerState;

/// The engine's tokenizer and what `GET /tokenizer_info` reports of it.
pub struct ServedTokenizer {
    tokenizer: Arc<tokenizers::Tokenizer>,
    info: Value,
    max_model_len: usize,
}

impl ServedTokenizer {
    /// Reads the tokenizer, special tokens and chat template of the engine's default model.
    pub async fn of(engine: &mistralrs::Model) -> Result<Self, String> {
        let pipeline = engine.inner().pipeline(None)?;
        let (tokenizer, metadata, template) = {
            let p = pipeline.lock().await;
            (p.tokenizer(), p.get_metadata(), p.get_chat_template())
        };
        let tokenizer = tokenizer.ok_or("the model has no tokenizer")?;
        // A special token is a string or an added-token object (its type is not exported).
        macro_rules! token_of {
            ($t:expr) => {
                $t.as_ref()
                    .map(|t| t.0.as_ref().either(|s| s.clone(), |d| d.content.clone()))
            };
        }
        let (mut eos, bos, pad, chat_template) = match &template {
            Some(t) => (
                token_of!(t.eos_token),
                token_of!(t.bos_token),
                token_of!(t.pad_token),
                t.chat_template.as_ref().and_then(|v| {
                    v.0.as_ref().either(
                        |s| Some(s.clone()),
                        // Named templates: the default one.
                        |named| {
                            named
                                .iter()
                                .find(|m| m.get("name").is_some_and(|n| n == "default"))
                                .and_then(|m| m.get("template").cloned())
                        },
                    )
                }),
            ),
            None => (None, None, None, None),
        };
        if eos.is_none() {
            eos = metadata
                .eos_tok
                .first()
                .and_then(|&id| tokenizer.id_to_token(id));
        }
        let info = json!({
            "eos_token": eos,
            "bos_token": bos,
            "pad_token": pad,
            "chat_template": chat_template,
            "model_max_length": metadata.max_seq_len,
            "vocab_size": tokenizer.get_vocab_size(true),
            "tokenizer_class": "PreTrainedTokenizerFast",
        });
        Ok(Self {
            tokenizer,
            info,
            max_model_len: metadata.max_seq_len,
        })
    }

    /// Token ids of `text`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ApiError> {
        self.tokenizer
            .encode_fast(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ApiError::internal("internal_error", format!("tokenizing: {e}")))
    }

    /// Token ids of `text` with the tokenizer's special tokens, and per id whether the
    /// tokenizer added it around the text (a BOS or an EOS of its template) rather than read
    /// it from the text: such tokens carry no span of the text.
    pub fn encode_marking_added(&self, text: &str) -> Result<(Vec<u32>, Vec<bool>), ApiError> {
        let e = self
            .tokenizer
            .encode_fast(text, true)
            .map_err(|e| ApiError::internal("internal_error", format!("tokenizing: {e}")))?;
        Ok((e.get_ids().to_vec(), added_tokens(&e)))
    }

    /// The text of `ids`; an id outside the vocabulary is the client's mistake (400).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, ApiError> {
        self.check_ids(ids)?;
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| ApiError::internal("internal_error", format!("detokenizing: {e}")))
    }

    /// The text of one token, as it reads on its own (byte-level pieces decoded).
    pub fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }

    /// Each token's text as it reads in `ids`: the text a token adds to the few before it, so
    /// that pieces of one character and word-initial spaces come out as in the whole text.
    pub fn token_texts(&self, ids: &[u32]) -> Vec<String> {
        (0..ids.len())
            .map(|i| {
                let from = i.saturating_sub(4);
                let with = self.tokenizer.decode(&ids[from..=i], false);
                let without = self.tokenizer.decode(&ids[from..i], false);
                match (with, without) {
                    (Ok(w), Ok(wo)) if w.starts_with(&wo) => w[wo.len()..].to_string(),
                    _ => self.token_text(ids[i]),
                }
            })
            .collect()
    }

    /// Refuses ids outside the vocabulary.
    pub fn check_ids(&self, ids: &[u32]) -> Result<(), ApiError> {
        let vocab = self.tokenizer.get_vocab_size(true);
        match ids.iter().find(|&&id| id as usize >= vocab) {
            Some(id) => Err(ApiError::bad_request(
                "invalid_token_id",
                format!("token id {id} is outside the vocabulary (size {vocab})"),
            )),
            None => Ok(()),
        }
    }
}

/// Per token of `e`, whether the tokenizer's post-processor added it: a special token that
/// covers no part of the text (one written in the text, `<|im_start|>` say, has its span).
fn added_tokens(e: &tokenizers::Encoding) -> Vec<bool> {
    e.get_special_tokens_mask()
        .iter()
        .zip(e.get_offsets())
        .map(|(&special, &(start, end))| special == 1 && start == end)
        .collect()
}

#[derive(Deserialize)]
struct TokenizeBody {
    prompt: String,
    #[serde(default = "yes")]
    add_special_tokens: bool,
    /// Accepted for vLLM clients; only the text prompt is tokenized here.
    #[serde(default)]
    #[allow(dead_code)]
    model: Option<String>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
struct DetokenizeBody {
    tokens: Vec<u32>,
    #[serde(default)]
    #[allow(dead_code)]
    model: Option<String>,
}

/// `POST /tokenize`: `{"prompt", "add_special_tokens"}` to `{"count", "max_model_len", "tokens"}`.
pub(super) async fn tokenize(
    State(state): State<Arc<ServerState>>,
    body: Result<Bytes, BytesRejection>,
) -> HttpResponse {
    let result = async {
        let b: TokenizeBody = parse_body(
            &body_or_error(body)?,
            &["prompt", "add_special_tokens", "model"],
        )?;
        let t = state.tokenizer().await?;
        let tokens = t.encode(&b.prompt, b.add_special_tokens)?;
        Ok::<_, ApiError>(Json(json!({
            "count": tokens.len(),
            "max_model_len": t.max_model_len,
            "tokens": tokens,
        })))
    }
    .await;
    result.map_or_else(IntoResponse::into_response, IntoResponse::into_response)
}

/// `POST /detokenize`: `{"tokens"}` to `{"prompt"}`.
pub(super) async fn detokenize(
    State(state): State<Arc<ServerState>>,
    body: Result<Bytes, BytesRejection>,
) -> HttpResponse {
    let result = async {
        let b: DetokenizeBody = parse_body(&body_or_error(body)?, &["tokens", "model"])?;
        let t = state.tokenizer().await?;
        let prompt = t.decode(&b.tokens, false)?;
        Ok::<_, ApiError>(Json(json!({ "prompt": prompt })))
    }
    .await;
    result.map_or_else(IntoResponse::into_response, IntoResponse::into_response)
}

/// `GET /tokenizer_info`: special tokens, chat template, lengths.
pub(super) async fn info(State(state): State<Arc<ServerState>>) -> HttpResponse {
    match state.tokenizer().await {
        Ok(t) => Json(t.info.clone()).into_response(),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_bos_is_added_and_a_written_one_is_not() {
        // A word-level tokenizer whose template puts <s> before the text, as Llama's does.
        let json = r#"{
            "version": "1.0",
            "added_tokens": [{"id": 0, "content": "<s>", "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}},
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"<s>": 0, "hi": 1, "there": 2, "<unk>": 3},
                      "unk_token": "<unk>"}
        }"#;
        let tok: tokenizers::Tokenizer = json.parse().unwrap();
        let e = tok.encode_fast("hi <s> there", true).unwrap();
        assert_eq!(e.get_ids(), &[0, 1, 0, 2]);
        assert_eq!(added_tokens(&e), vec![true, false, false, false]);
        let plain = tok.encode_fast("hi there", false).unwrap();
        assert_eq!(added_tokens(&plain), vec![false, false]);
    }
}
