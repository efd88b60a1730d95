//! The request bodies of the OpenAI-compatible endpoints, parsed by us so that the `dnd`
//! extension field and precise errors are ours.

use std::collections::HashMap;

use either::Either;
use indexmap::IndexMap;
use mistralrs_core::{MessageContent, RequestMessage, SamplingParams, StopTokens};
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
    /// `system`, `user`, `assistant`.
    pub role: String,
    /// Its content.
    #[serde(default)]
    pub content: Option<Content>,
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
}

impl Sampling {
    /// The engine's sampling parameters.
    pub fn to_params(&self) -> Result<SamplingParams, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad_request(
                "unsupported_parameter",
                "only n = 1 is supported",
            ));
        }
        let max_len = self.max_completion_tokens.or(self.max_tokens);
        if max_len == Some(0) {
            return Err(ApiError::bad_request(
                "invalid_parameter",
                "max_tokens must be at least 1",
            ));
        }
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(ApiError::bad_request(
                    "invalid_parameter",
                    format!("temperature {t} is outside [0, 2]"),
                ));
            }
        }
        let greedy = self.temperature.is_none_or(|t| t == 0.0);
        let mut p = if greedy {
            SamplingParams::deterministic()
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

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatBody {
    /// Ignored: the server serves one model.
    #[serde(default)]
    pub model: Option<String>,
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Sampling.
    #[serde(flatten)]
    pub sampling: Sampling,
    /// Server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// The DnD extension.
    #[serde(default)]
    pub dnd: Option<DndExtension>,
}

/// `prompt` of a completion: a string, or a list holding one.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    /// One prompt.
    One(String),
    /// A list (only one element supported).
    Many(Vec<String>),
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionBody {
    /// Ignored: the server serves one model.
    #[serde(default)]
    pub model: Option<String>,
    /// The prompt.
    pub prompt: PromptField,
    /// Sampling.
    #[serde(flatten)]
    pub sampling: Sampling,
    /// Server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Echo the prompt before the completion.
    #[serde(default)]
    pub echo: bool,
    /// The DnD extension.
    #[serde(default)]
    pub dnd: Option<DndExtension>,
}

/// Parses a body: malformed JSON and schema errors are told apart.
pub fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("malformed JSON body: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "invalid_request",
            "the body must be a JSON object",
        ));
    }
    serde_json::from_value(value)
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
            let text = match &m.content {
                None => String::new(),
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
            turns.push(Turn::new(m.role.clone(), text.clone()));
            let mut msg: IndexMap<String, MessageContent> = IndexMap::new();
            msg.insert("role".into(), Either::Left(m.role.clone()));
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

impl CompletionBody {
    /// The prompt as one user turn and as the engine's completion message.
    pub fn prompt(&self) -> Result<(Vec<Turn>, RequestMessage), ApiError> {
        let text = match &self.prompt {
            PromptField::One(s) => s.clone(),
            PromptField::Many(v) if v.len() == 1 => v[0].clone(),
            PromptField::Many(v) => {
                return Err(ApiError::bad_request(
                    "unsupported_parameter",
                    format!("{} prompts in one request; send one per request", v.len()),
                ))
            }
        };
        Ok((
            vec![Turn::new("user", text.clone())],
            RequestMessage::Completion {
                text,
                echo_prompt: self.echo,
                best_of: None,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_json_and_schema_errors_get_different_codes() {
        let e = parse_body::<ChatBody>(b"{\"messages\": [").unwrap_err();
        assert_eq!(e.code, "invalid_json");
        let e = parse_body::<ChatBody>(b"{\"model\": \"m\"}").unwrap_err();
        assert_eq!(e.code, "invalid_request");
        assert!(e.message.contains("messages"), "{}", e.message);
        let e = parse_body::<ChatBody>(b"[1]").unwrap_err();
        assert_eq!(e.code, "invalid_request");
        let e = parse_body::<ChatBody>(br#"{"messages":[],"dnd":{"promts":["x"]}}"#).unwrap_err();
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
                "max_tokens":5,"temperature":0,"stop":"\n","dnd":{"prompts":["p"]},"unknown":1}"#,
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
        let p = b.sampling.to_params().unwrap();
        assert_eq!((p.max_len, p.top_k), (Some(5), Some(1)));
        assert!(matches!(p.stop_toks, Some(StopTokens::Seqs(ref s)) if s == &["\n"]));
        assert_eq!(b.dnd.unwrap().prompts.unwrap(), ["p"]);
        let img: ChatBody = parse_body(
            br#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{}}]}]}"#,
        )
        .unwrap();
        assert_eq!(img.messages().unwrap_err().code, "unsupported_content");
    }

    #[test]
    fn sampling_limits_are_checked() {
        let s = |j: &str| parse_body::<Sampling>(j.as_bytes()).unwrap().to_params();
        assert_eq!(s(r#"{"n":2}"#).unwrap_err().code, "unsupported_parameter");
        assert_eq!(
            s(r#"{"max_tokens":0}"#).unwrap_err().code,
            "invalid_parameter"
        );
        assert_eq!(
            s(r#"{"temperature":3}"#).unwrap_err().code,
            "invalid_parameter"
        );
        let p = s(r#"{"temperature":0.7,"top_p":0.9}"#).unwrap();
        assert_eq!(
            (p.temperature, p.top_p, p.top_k),
            (Some(0.7), Some(0.9), None)
        );
    }
}
