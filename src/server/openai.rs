//! The request bodies of the OpenAI-compatible endpoints, parsed by us so that the `dnd`
//! extension field and precise errors are ours.

use std::collections::HashMap;

use either::Either;
use indexmap::IndexMap;
use mistralrs_core::{Constraint, MessageContent, RequestMessage, SamplingParams, StopTokens};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;
use crate::policy::Turn;

/// The `dnd` request field: how this request's adapter is chosen.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DndExtension {
    /// Condition prompts, instead of the ones the policy would take from the messages.
    #[serde(default)]
    pub prompts: Option<Vec<String>>,
    /// A cached adapter's key.
    #[serde(default)]
    pub adapter: Option<String>,
    /// Opt out: the base model.
    #[serde(default)]
    pub base: bool,
}

/// Content of a chat message: text, or OpenAI content parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// `[{"type": "text", "text": ...}, ...]`.
    Parts(Vec<HashMap<String, Value>>),
}

/// One chat message.
#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    /// `system` (or `developer`, its newer name), `user`, `assistant`.
    pub role: String,
    /// Its content.
    #[serde(default)]
    pub content: Option<Content>,
    /// A participant name (accepted; the chat template has no place for it).
    #[serde(default)]
    pub name: Option<String>,
    /// Other fields. Clients send a previous reply back as it came (`tool_calls: null`,
    /// `refusal: null`, ...): empty ones are accepted, any with content refused.
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

/// Whether a JSON value says nothing: null, `{}` or `[]`.
fn is_empty_value(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// `stop`: one string or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop sequence.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Default, Deserialize)]
pub struct Sampling {
    /// Most tokens to generate.
    pub max_tokens: Option<usize>,
    /// Newer name of `max_tokens`.
    pub max_completion_tokens: Option<usize>,
    /// 0 (or absent) is greedy.
    pub temperature: Option<f64>,
    /// Nucleus sampling.
    pub top_p: Option<f64>,
    /// Top-k sampling (an extension, as in mistral.rs).
    pub top_k: Option<usize>,
    /// Min-p sampling (an extension).
    pub min_p: Option<f64>,
    /// Stop sequences.
    pub stop: Option<Stop>,
    /// Choices per request: only 1.
    pub n: Option<usize>,
    /// OpenAI frequency penalty.
    pub frequency_penalty: Option<f32>,
    /// OpenAI presence penalty.
    pub presence_penalty: Option<f32>,
    /// Repetition penalty (an extension).
    pub repetition_penalty: Option<f32>,
    /// Accepted for greedy requests, which are deterministic anyway; refused when sampling
    /// (the engine has one generator for every request).
    pub seed: Option<u64>,
    /// Refused unless empty: mistral.rs 0.8.1 keeps a logit bias but never applies it.
    pub logit_bias: Option<HashMap<String, f64>>,
}

impl Sampling {
    /// The engine's sampling parameters.
    pub fn to_params(&self) -> Result<SamplingParams, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(unsupported("only n = 1 is supported"));
        }
        let max_len = self.max_completion_tokens.or(self.max_tokens);
        if max_len == Some(0) {
            return Err(invalid("max_tokens must be at least 1"));
        }
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(invalid(format!("temperature {t} is outside [0, 2]")));
            }
        }
        if self.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
            return Err(unsupported("logit_bias is not supported by this server"));
        }
        let greedy = self.temperature.is_none_or(|t| t == 0.0);
        // mistral.rs 0.8.1 applies min-p only after a top-p cut (0 < top_p < 1).
        if !greedy
            && self.min_p.is_some_and(|m| m > 0.0)
            && self.top_p.is_none_or(|p| p <= 0.0 || p >= 1.0)
        {
            return Err(unsupported(
                "min_p needs top_p between 0 and 1 with this engine (it applies min-p after the \
                 top-p cut only)",
            ));
        }
        if self.seed.is_some() && !greedy {
            return Err(unsupported(
                "seed: per-request seeds are not supported when sampling (temperature > 0); \
                 greedy requests (temperature 0) are deterministic without one",
            ));
        }
        let mut p = if greedy {
            // Temperature 0 (not the engine's default 1 with top-k 1) reaches its argmax
            // sampler, which reports the model's own logprobs: the top-k path zeroes every
            // alternative before they are read.
            let mut p = SamplingParams::deterministic();
            p.temperature = Some(0.0);
            p.top_k = None;
            p
        } else {
            let mut p = SamplingParams::neutral();
            p.temperature = self.temperature;
            p.top_p = self.top_p;
            p.top_k = self.top_k;
            p.min_p = self.min_p;
            p
        };
        p.max_len = max_len;
        p.frequency_penalty = self.frequency_penalty;
        p.presence_penalty = self.presence_penalty;
        p.repetition_penalty = self.repetition_penalty;
        p.stop_toks = self.stop.as_ref().map(|s| {
            StopTokens::Seqs(match s {
                Stop::One(x) => vec![x.clone()],
                Stop::Many(v) => v.clone(),
            })
        });
        Ok(p)
    }
}

/// `stream_options` (other options, which change no token, are accepted).
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the request's token usage (and no choices).
    #[serde(default)]
    pub include_usage: bool,
}

/// `response_format` of a chat request.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    /// Free text (the default).
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON following a schema.
    JsonSchema {
        /// The schema and its name.
        json_schema: JsonSchemaFormat,
    },
}

/// The `json_schema` of a `json_schema` response format.
#[derive(Debug, Deserialize)]
pub struct JsonSchemaFormat {
    /// The schema's name (required by OpenAI; not used).
    pub name: String,
    /// The JSON schema replies must follow.
    #[serde(default)]
    pub schema: Option<Value>,
    /// OpenAI's strict flag: replies always follow the schema here.
    #[serde(default)]
    pub strict: Option<bool>,
    /// A description (not used).
    #[serde(default)]
    pub description: Option<String>,
}

/// What a request asks for besides its messages and sampling.
#[derive(Clone)]
pub struct Extras {
    /// Return the logprob of each generated token.
    pub logprobs: bool,
    /// How many alternatives per token to return with it.
    pub top_logprobs: usize,
    /// The engine's constraint for `response_format`.
    pub constraint: Constraint,
    /// Streams end with a usage chunk.
    pub include_usage: bool,
}

impl std::fmt::Debug for Extras {
    // By hand: the engine's `Constraint` has no `Debug`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let constraint = match &self.constraint {
            Constraint::None => "none",
            Constraint::JsonSchema(_) => "json_schema",
            _ => "grammar",
        };
        f.debug_struct("Extras")
            .field("logprobs", &self.logprobs)
            .field("top_logprobs", &self.top_logprobs)
            .field("constraint", &constraint)
            .field("include_usage", &self.include_usage)
            .finish()
    }
}

impl Default for Extras {
    fn default() -> Self {
        Self {
            logprobs: false,
            top_logprobs: 0,
            constraint: Constraint::None,
            include_usage: false,
        }
    }
}

/// Most alternatives per token a request may ask for (OpenAI's chat limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The top-level fields of `POST /v1/chat/completions` this server understands; any other is
/// refused rather than ignored.
pub const CHAT_FIELDS: &[&str] = &[
    "logit_bias",
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "stop",
    "n",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "seed",
    "stream",
    "stream_options",
    "logprobs",
    "top_logprobs",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "user",
    "dnd",
];

/// The top-level fields of `POST /v1/completions` this server understands.
pub const COMPLETION_FIELDS: &[&str] = &[
    "logit_bias",
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "stop",
    "n",
    "best_of",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "seed",
    "stream",
    "stream_options",
    "logprobs",
    "echo",
    "suffix",
    "user",
    "dnd",
];

fn unsupported(message: impl Into<String>) -> ApiError {
    ApiError::bad_request("unsupported_parameter", message)
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_parameter", message)
}

fn check_stream_options(options: &Option<StreamOptions>, stream: bool) -> Result<bool, ApiError> {
    match options {
        Some(_) if !stream => Err(invalid("stream_options is only allowed with stream: true")),
        Some(o) => Ok(o.include_usage),
        None => Ok(false),
    }
}

/// The schema with llguidance told to emit compact JSON, unless it says otherwise
/// (`x-guidance`): free whitespace lets a small model pad a reply until `max_tokens`.
fn compact(mut schema: Value) -> Value {
    if let Some(o) = schema.as_object_mut() {
        o.entry("x-guidance")
            .or_insert_with(|| serde_json::json!({"whitespace_flexible": false}));
    }
    schema
}

/// The fields both endpoints share.
#[derive(Debug, Deserialize)]
pub struct Common {
    /// A named adapter (`--lora`, `--dnd-preset`), or else the served model.
    #[serde(default)]
    pub model: Option<String>,
    /// Sampling.
    #[serde(flatten)]
    pub sampling: Sampling,
    /// Server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options (`include_usage`).
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// An end-user id (for the client's records; it changes no output).
    #[serde(default)]
    pub user: Option<String>,
    /// The DnD extension.
    #[serde(default)]
    pub dnd: Option<DndExtension>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatBody {
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Model, sampling, streaming, the DnD extension.
    #[serde(flatten)]
    pub common: Common,
    /// Return each generated token's logprob.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// Alternatives per token (needs `logprobs: true`).
    #[serde(default)]
    pub top_logprobs: Option<usize>,
    /// Constrain replies to JSON.
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
    /// Tool definitions: refused unless empty (no tool calling here).
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    /// Only `none`, or `auto` without tools.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// Without tools it has nothing to act on.
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
}

/// `prompt` of a completion: a string or token ids, or a list holding one of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    /// One prompt.
    One(String),
    /// A list (only one element supported).
    Many(Vec<String>),
    /// One prompt as token ids (lm-evaluation-harness sends these).
    Tokens(Vec<u32>),
    /// A list of token-id prompts (only one element supported).
    ManyTokens(Vec<Vec<u32>>),
}

/// A completion's prompt: text, or token ids of the engine's tokenizer.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    /// Text, tokenized by the engine.
    Text(String),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionBody {
    /// The prompt.
    pub prompt: PromptField,
    /// Model, sampling, streaming, the DnD extension (`include_usage` is refused: completion
    /// chunks carry no usage).
    #[serde(flatten)]
    pub common: Common,
    /// Echo the prompt before the completion.
    #[serde(default)]
    pub echo: bool,
    /// Return each generated token's logprob and this many alternatives.
    #[serde(default)]
    pub logprobs: Option<usize>,
    /// Text after the completion: refused (no infilling here).
    #[serde(default)]
    pub suffix: Option<String>,
    /// Only 1.
    #[serde(default)]
    pub best_of: Option<usize>,
}

/// Parses a body: malformed JSON and schema errors are told apart, and a top-level field
/// outside `fields` is refused (`unsupported_parameter`) rather than ignored.
pub fn parse_body<T: DeserializeOwned>(bytes: &[u8], fields: &[&str]) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("malformed JSON body: {e}")))?;
    let Value::Object(mut object) = value else {
        return Err(ApiError::bad_request(
            "invalid_request",
            "the body must be a JSON object",
        ));
    };
    // A null field is an absent one, as in OpenAI's API; so is an unknown one that says
    // nothing (clients send `"logit_bias": {}` by default).
    object.retain(|k, v| !(v.is_null() || (!fields.contains(&k.as_str()) && is_empty_value(v))));
    let mut unknown: Vec<&str> = object
        .keys()
        .map(String::as_str)
        .filter(|k| !fields.contains(k))
        .collect();
    if !unknown.is_empty() {
        unknown.sort_unstable();
        return Err(unsupported(format!(
            "not supported by this server: {}",
            unknown.join(", ")
        )));
    }
    serde_json::from_value(Value::Object(object))
        .map_err(|e| ApiError::bad_request("invalid_request", format!("invalid request: {e}")))
}

impl ChatBody {
    /// The messages as policy turns and as the engine's chat message, checked.
    pub fn messages(&self) -> Result<(Vec<Turn>, RequestMessage), ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::bad_request(
                "invalid_request",
                "messages must not be empty",
            ));
        }
        let mut turns = Vec::with_capacity(self.messages.len());
        let mut engine = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.iter().enumerate() {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                "tool" | "function" => {
                    return Err(unsupported(format!(
                        "messages[{i}]: role {} needs tool calling, which this server does not \
                         support",
                        m.role
                    )))
                }
                other => {
                    return Err(ApiError::bad_request(
                        "invalid_request",
                        format!(
                            "messages[{i}]: unknown role {other:?} (system, developer, user, \
                             assistant)"
                        ),
                    ))
                }
            };
            for (k, v) in &m.other {
                if is_empty_value(v) {
                    continue;
                }
                return Err(match k.as_str() {
                    "tool_calls" | "function_call" | "tool_call_id" | "audio" => unsupported(
                        format!("messages[{i}].{k}: tool calls and audio are not supported"),
                    ),
                    _ => ApiError::bad_request(
                        "invalid_request",
                        format!("messages[{i}]: field {k} is not supported"),
                    ),
                });
            }
            let text = match &m.content {
                None => {
                    return Err(ApiError::bad_request(
                        "invalid_request",
                        format!("messages[{i}]: content is required"),
                    ))
                }
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut texts = Vec::new();
                    for p in parts {
                        match (p.get("type").and_then(Value::as_str), p.get("text")) {
                            (Some("text"), Some(Value::String(t))) => texts.push(t.as_str()),
                            (kind, _) => {
                                return Err(ApiError::bad_request(
                                    "unsupported_content",
                                    format!(
                                        "messages[{i}]: content part of type {} is not \
                                         supported by this text model",
                                        kind.unwrap_or("(none)")
                                    ),
                                ))
                            }
                        }
                    }
                    texts.join("\n")
                }
            };
            turns.push(Turn::new(role, text.clone()));
            let mut msg: IndexMap<String, MessageContent> = IndexMap::new();
            msg.insert("role".into(), Either::Left(role.to_string()));
            msg.insert("content".into(), Either::Left(text));
            engine.push(msg);
        }
        Ok((
            turns,
            RequestMessage::Chat {
                messages: engine,
                enable_thinking: None,
                reasoning_effort: None,
            },
        ))
    }
}

impl ChatBody {
    /// Logprobs, response format and stream options, checked.
    pub fn extras(&self) -> Result<Extras, ApiError> {
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(unsupported(
                "tools: tool calling is not supported by this server",
            ));
        }
        let no_tools = self.tools.as_ref().is_none_or(|t| t.is_empty());
        match &self.tool_choice {
            None => {}
            Some(Value::String(c)) if c == "none" || (c == "auto" && no_tools) => {}
            Some(c) => return Err(unsupported(format!("tool_choice {c}: no tools are served"))),
        }
        let logprobs = self.logprobs.unwrap_or(false);
        let top_logprobs = match self.top_logprobs {
            Some(_) if !logprobs => {
                return Err(invalid("top_logprobs needs logprobs: true"));
            }
            Some(k) if k > MAX_TOP_LOGPROBS => {
                return Err(invalid(format!(
                    "top_logprobs {k} is above {MAX_TOP_LOGPROBS}"
                )));
            }
            k => k.unwrap_or(0),
        };
        let constraint = match &self.response_format {
            None | Some(ResponseFormat::Text) => Constraint::None,
            Some(ResponseFormat::JsonObject) => {
                Constraint::JsonSchema(compact(serde_json::json!({"type": "object"})))
            }
            Some(ResponseFormat::JsonSchema { json_schema }) => match &json_schema.schema {
                Some(schema) if schema.is_object() => {
                    Constraint::JsonSchema(compact(schema.clone()))
                }
                _ => {
                    return Err(invalid(
                        "response_format.json_schema.schema must be a JSON schema object",
                    ))
                }
            },
        };
        Ok(Extras {
            logprobs,
            top_logprobs,
            constraint,
            include_usage: check_stream_options(&self.common.stream_options, self.common.stream)?,
        })
    }
}

impl CompletionBody {
    /// Logprobs and stream options, checked; refused: `suffix`, `best_of` > 1, and
    /// `include_usage` (completion chunks carry no usage).
    pub fn extras(&self) -> Result<Extras, ApiError> {
        if self.suffix.is_some() {
            return Err(unsupported(
                "suffix: infilling is not supported by this server",
            ));
        }
        if self.best_of.is_some_and(|b| b != 1) {
            return Err(unsupported("only best_of = 1 is supported"));
        }
        if let Some(k) = self.logprobs.filter(|&k| k > MAX_TOP_LOGPROBS) {
            return Err(invalid(format!("logprobs {k} is above {MAX_TOP_LOGPROBS}")));
        }
        if check_stream_options(&self.common.stream_options, self.common.stream)? {
            return Err(unsupported(
                "stream_options.include_usage is not supported for completions",
            ));
        }
        Ok(Extras {
            logprobs: self.logprobs.is_some(),
            top_logprobs: self.logprobs.unwrap_or(0),
            constraint: Constraint::None,
            include_usage: false,
        })
    }
}

impl CompletionBody {
    /// Whether the prompt is token ids.
    fn tokens(&self) -> bool {
        matches!(
            self.prompt,
            PromptField::Tokens(_) | PromptField::ManyTokens(_)
        )
    }

    /// The one prompt of the request.
    pub fn prompt(&self) -> Result<PromptInput, ApiError> {
        let many = |n: usize| {
            if n == 0 {
                return Err(invalid("the prompt is empty"));
            }
            Err(unsupported(format!(
                "{n} prompts in one request; send one per request"
            )))
        };
        match &self.prompt {
            PromptField::One(s) => Ok(PromptInput::Text(s.clone())),
            PromptField::Many(v) if v.len() == 1 => Ok(PromptInput::Text(v[0].clone())),
            PromptField::Many(v) => many(v.len()),
            PromptField::Tokens(ids) if ids.is_empty() => Err(invalid("the prompt has no tokens")),
            PromptField::Tokens(ids) => Ok(PromptInput::Tokens(ids.clone())),
            PromptField::ManyTokens(v) if v.len() == 1 && v[0].is_empty() => {
                Err(invalid("the prompt has no tokens"))
            }
            PromptField::ManyTokens(v) if v.len() == 1 => Ok(PromptInput::Tokens(v[0].clone())),
            PromptField::ManyTokens(v) => many(v.len()),
        }
    }

    /// Whether the answer is assembled by the server from the prompt's own logprobs and text
    /// rather than echoed by the engine: `echo` with `logprobs`, or `echo` of a token prompt.
    pub fn server_echo(&self) -> bool {
        self.echo && (self.logprobs.is_some() || self.tokens())
    }

    /// The engine's message for `prompt` when the engine answers alone (no server echo).
    pub fn message(&self, prompt: PromptInput) -> RequestMessage {
        match prompt {
            PromptInput::Text(text) => RequestMessage::Completion {
                text,
                echo_prompt: self.echo,
                best_of: None,
            },
            PromptInput::Tokens(ids) => RequestMessage::CompletionTokens(ids),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_json_and_schema_errors_get_different_codes() {
        let e = parse_body::<ChatBody>(b"{\"messages\": [", CHAT_FIELDS).unwrap_err();
        assert_eq!(e.code, "invalid_json");
        let e = parse_body::<ChatBody>(b"{\"model\": \"m\"}", CHAT_FIELDS).unwrap_err();
        assert_eq!(e.code, "invalid_request");
        assert!(e.message.contains("messages"), "{}", e.message);
        let e = parse_body::<ChatBody>(b"[1]", CHAT_FIELDS).unwrap_err();
        assert_eq!(e.code, "invalid_request");
        let e = parse_body::<ChatBody>(br#"{"messages":[],"dnd":{"promts":["x"]}}"#, CHAT_FIELDS)
            .unwrap_err();
        assert!(
            e.message.contains("promts"),
            "typos in dnd are reported: {}",
            e.message
        );
    }

    #[test]
    fn chat_bodies_become_turns_and_engine_messages() {
        let b: ChatBody = parse_body(
            br#"{"model":"x","messages":[{"role":"system","content":"Be terse."},
                {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],
                "max_tokens":5,"temperature":0,"stop":"\n","dnd":{"prompts":["p"]}}"#,
            CHAT_FIELDS,
        )
        .unwrap();
        let (turns, msg) = b.messages().unwrap();
        assert_eq!(turns[1].text, "a\nb");
        let RequestMessage::Chat { messages, .. } = msg else {
            panic!("chat")
        };
        assert_eq!(
            messages[0]["content"],
            Either::Left("Be terse.".to_string())
        );
        let p = b.common.sampling.to_params().unwrap();
        assert_eq!(
            (p.max_len, p.top_k, p.temperature),
            (Some(5), None, Some(0.0))
        );
        assert!(matches!(p.stop_toks, Some(StopTokens::Seqs(ref s)) if s == &["\n"]));
        assert_eq!(b.common.dnd.unwrap().prompts.unwrap(), ["p"]);
        let img: ChatBody = parse_body(
            br#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{}}]}]}"#,
            CHAT_FIELDS,
        )
        .unwrap();
        assert_eq!(img.messages().unwrap_err().code, "unsupported_content");
    }

    #[test]
    fn sampling_limits_are_checked() {
        let s = |j: &str| {
            parse_body::<Sampling>(j.as_bytes(), CHAT_FIELDS)
                .unwrap()
                .to_params()
        };
        assert_eq!(s(r#"{"n":2}"#).unwrap_err().code, "unsupported_parameter");
        assert_eq!(
            s(r#"{"max_tokens":0}"#).unwrap_err().code,
            "invalid_parameter"
        );
        assert_eq!(
            s(r#"{"temperature":3}"#).unwrap_err().code,
            "invalid_parameter"
        );
        assert_eq!(
            s(r#"{"temperature":0.7,"seed":1}"#).unwrap_err().code,
            "unsupported_parameter"
        );
        assert!(s(r#"{"temperature":0,"seed":1}"#).is_ok());
        assert_eq!(
            s(r#"{"temperature":0.7,"min_p":0.1}"#).unwrap_err().code,
            "unsupported_parameter"
        );
        assert!(s(r#"{"temperature":0.7,"min_p":0.1,"top_p":0.9}"#).is_ok());
        let p = s(r#"{"temperature":0.7,"top_p":0.9}"#).unwrap();
        assert_eq!(
            (p.temperature, p.top_p, p.top_k),
            (Some(0.7), Some(0.9), None)
        );
    }

    fn chat(json: &str) -> Result<ChatBody, ApiError> {
        parse_body(json.as_bytes(), CHAT_FIELDS)
    }

    fn completion_body(json: &str) -> CompletionBody {
        parse_body(json.as_bytes(), COMPLETION_FIELDS).unwrap()
    }

    #[test]
    fn fields_the_server_does_not_act_on_are_refused() {
        let e = chat(r#"{"messages":[],"store":true,"functions":[{}]}"#).unwrap_err();
        assert_eq!(e.code, "unsupported_parameter");
        assert!(e.message.contains("functions, store"), "{}", e.message);
        // Nulls and unknown fields that say nothing are absent (LangChain sends some).
        let m = r#""messages":[{"role":"user","content":"x"}]"#;
        assert!(chat(&format!(
            r#"{{{m},"seed":null,"stream":null,"logit_bias":{{}},"metadata":{{}}}}"#
        ))
        .is_ok());
        let e = chat(&format!(r#"{{{m},"logit_bias":{{"5":10}}}}"#))
            .unwrap()
            .common
            .sampling
            .to_params()
            .unwrap_err();
        assert_eq!(e.code, "unsupported_parameter");
        let e = parse_body::<CompletionBody>(
            br#"{"prompt":"x","max_completion_tokens":3}"#,
            COMPLETION_FIELDS,
        )
        .unwrap_err();
        assert_eq!(e.code, "unsupported_parameter");
        let code = |j: &str| chat(j).unwrap().extras().unwrap_err().code;
        let m = r#""messages":[{"role":"user","content":"x"}]"#;
        assert_eq!(
            code(&format!(r#"{{{m},"tools":[{{"type":"function"}}]}}"#)),
            "unsupported_parameter"
        );
        assert_eq!(
            code(&format!(r#"{{{m},"tool_choice":"required"}}"#)),
            "unsupported_parameter"
        );
        assert_eq!(
            code(&format!(r#"{{{m},"top_logprobs":2}}"#)),
            "invalid_parameter"
        );
        assert_eq!(
            code(&format!(r#"{{{m},"logprobs":true,"top_logprobs":21}}"#)),
            "invalid_parameter"
        );
        assert_eq!(
            code(&format!(
                r#"{{{m},"stream_options":{{"include_usage":true}}}}"#
            )),
            "invalid_parameter"
        );
        assert_eq!(
            code(&format!(
                r#"{{{m},"response_format":{{"type":"json_schema","json_schema":{{"name":"x"}}}}}}"#
            )),
            "invalid_parameter"
        );
        assert!(chat(&format!(r#"{{{m},"response_format":{{"type":"xml"}}}}"#)).is_err());
        let completion = |j: &str| completion_body(j).extras();
        for j in [
            r#"{"prompt":"x","suffix":"y"}"#,
            r#"{"prompt":"x","best_of":2}"#,
            r#"{"prompt":"x","stream":true,"stream_options":{"include_usage":true}}"#,
        ] {
            assert_eq!(
                completion(j).unwrap_err().code,
                "unsupported_parameter",
                "{j}"
            );
        }
        let x = completion(r#"{"prompt":"x","logprobs":3}"#).unwrap();
        assert_eq!((x.logprobs, x.top_logprobs), (true, 3));
        // Prompt logprobs (answered whole) and echoed token prompts are the server's to build.
        let body = completion_body;
        assert!(body(r#"{"prompt":"x","echo":true,"logprobs":1}"#).server_echo());
        assert!(body(r#"{"prompt":[[5,6]],"echo":true}"#).server_echo());
        assert!(!body(r#"{"prompt":"x","echo":true}"#).server_echo());
        assert!(completion(r#"{"prompt":"x","echo":true,"logprobs":1}"#).is_ok());
        assert!(completion(r#"{"prompt":[1,2],"echo":true,"logprobs":1,"stream":true}"#).is_ok());
    }

    #[test]
    fn token_prompts_are_one_list_of_ids() {
        let prompt = |j: &str| completion_body(j).prompt();
        assert_eq!(
            prompt(r#"{"prompt":[1,2,3]}"#).unwrap(),
            PromptInput::Tokens(vec![1, 2, 3])
        );
        assert_eq!(
            prompt(r#"{"prompt":[[4]]}"#).unwrap(),
            PromptInput::Tokens(vec![4])
        );
        assert_eq!(
            prompt(r#"{"prompt":["hi"]}"#).unwrap(),
            PromptInput::Text("hi".into())
        );
        assert_eq!(
            prompt(r#"{"prompt":[[1],[2]]}"#).unwrap_err().code,
            "unsupported_parameter"
        );
        assert_eq!(
            prompt(r#"{"prompt":[]}"#).unwrap_err().code,
            "invalid_parameter"
        );
        assert_eq!(
            prompt(r#"{"prompt":[[]]}"#).unwrap_err().code,
            "invalid_parameter"
        );
    }

    #[test]
    fn requested_extras_reach_the_engine_options() {
        let m = r#""messages":[{"role":"user","content":"x"}]"#;
        let x = chat(&format!(
            r#"{{{m},"logprobs":true,"top_logprobs":3,"stream":true,"stream_options":{{"include_usage":true}},
               "response_format":{{"type":"json_schema","json_schema":{{"name":"n","schema":{{"type":"object","required":["a"]}}}}}},
               "tool_choice":"none","user":"u"}}"#
        ))
        .unwrap()
        .extras()
        .unwrap();
        assert_eq!(
            (x.logprobs, x.top_logprobs, x.include_usage),
            (true, 3, true)
        );
        assert!(matches!(&x.constraint, Constraint::JsonSchema(s)
            if s["required"][0] == "a" && s["x-guidance"]["whitespace_flexible"] == false));
        let x = chat(&format!(
            r#"{{{m},"response_format":{{"type":"json_object"}}}}"#
        ))
        .unwrap()
        .extras()
        .unwrap();
        assert!(matches!(&x.constraint, Constraint::JsonSchema(s) if s["type"] == "object"));
        let x = chat(&format!("{{{m}}}")).unwrap().extras().unwrap();
        assert!(!x.logprobs && matches!(x.constraint, Constraint::None));
    }

    #[test]
    fn roles_and_contents_are_checked() {
        let msgs = |m: &str| {
            chat(&format!(r#"{{"messages":[{m}]}}"#)).and_then(|b| b.messages().map(|_| ()))
        };
        assert_eq!(
            msgs(r#"{"role":"wizard","content":"x"}"#).unwrap_err().code,
            "invalid_request"
        );
        assert_eq!(
            msgs(r#"{"role":"user","content":null}"#).unwrap_err().code,
            "invalid_request"
        );
        assert_eq!(
            msgs(r#"{"role":"user"}"#).unwrap_err().code,
            "invalid_request"
        );
        assert_eq!(
            msgs(r#"{"role":"tool","content":"x"}"#).unwrap_err().code,
            "unsupported_parameter"
        );
        // A previous reply sent back as it came, and a participant name, are accepted.
        assert!(
            msgs(r#"{"role":"assistant","content":"x","tool_calls":null,"refusal":null}"#).is_ok()
        );
        assert!(msgs(r#"{"role":"user","content":"x","name":"ann","tool_calls":[]}"#).is_ok());
        assert_eq!(
            msgs(r#"{"role":"assistant","content":"x","tool_calls":[{"id":"1"}]}"#)
                .unwrap_err()
                .code,
            "unsupported_parameter"
        );
        assert_eq!(
            msgs(r#"{"role":"user","content":"x","mood":"odd"}"#)
                .unwrap_err()
                .code,
            "invalid_request"
        );
        let b = chat(r#"{"messages":[{"role":"developer","content":"Be terse."},{"role":"user","content":"x"}]}"#)
            .unwrap();
        let (turns, msg) = b.messages().unwrap();
        assert_eq!(turns[0].role, "system");
        let RequestMessage::Chat { messages, .. } = msg else {
            panic!("chat")
        };
        assert_eq!(messages[0]["role"], Either::Left("system".to_string()));
    }
}
