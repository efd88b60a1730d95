//! mistral.rs's logprobs in OpenAI's shapes.
//!
//! The engine reports each token as `{token, logprob, bytes, top_logprobs}` whose
//! alternatives carry a token *id* in `token` and its text in `bytes`; chat chunks carry one
//! such entry bare, and completions use the chat shape. OpenAI's chat shape has text in
//! `token` and UTF-8 bytes in `bytes`, chunks wrap entries in `{"content": [...]}`, and
//! completions use the legacy `{tokens, token_logprobs, top_logprobs, text_offset}`.
//! A token the sampler had ruled out (top-k, top-p) has probability 0: its logprob, -inf,
//! which JSON cannot hold, is reported as OpenAI does for such tokens, -9999.

use serde_json::{json, Map, Value};

/// The logprob reported for a token of probability 0.
pub const IMPOSSIBLE: f64 = -9999.0;

fn logprob(v: &Value) -> Value {
    json!(v.as_f64().unwrap_or(IMPOSSIBLE))
}

/// One engine entry (or alternative) with OpenAI's `token` text and `bytes`.
fn openai_alternative(alt: &Value) -> Value {
    let text = alt["bytes"].as_str().unwrap_or_default();
    json!({
        "token": text,
        "logprob": logprob(&alt["logprob"]),
        "bytes": text.as_bytes(),
    })
}

fn openai_entry(entry: &Value) -> Value {
    let alternatives: Vec<Value> = entry["top_logprobs"]
        .as_array()
        .map(|a| a.iter().map(openai_alternative).collect())
        .unwrap_or_default();
    let token = entry["token"].as_str().unwrap_or_default();
    json!({
        "token": token,
        "logprob": logprob(&entry["logprob"]),
        "bytes": token.as_bytes(),
        "top_logprobs": alternatives,
    })
}

fn choices(response: &mut Value) -> impl Iterator<Item = &mut Value> {
    response["choices"]
        .as_array_mut()
        .into_iter()
        .flat_map(|c| c.iter_mut())
}

/// A chat completion's choices: `logprobs.content[*]` in OpenAI's entry shape.
pub fn chat_response(response: &mut Value) {
    for choice in choices(response) {
        if let Some(content) = choice["logprobs"]["content"].as_array_mut() {
            for e in content.iter_mut() {
                *e = openai_entry(e);
            }
        }
    }
}

/// A chat chunk's choices: the bare entry becomes `{"content": [entry]}`.
pub fn chat_chunk(chunk: &mut Value) {
    for choice in choices(chunk) {
        if choice["logprobs"].is_object() {
            choice["logprobs"] = json!({ "content": [openai_entry(&choice["logprobs"])] });
        }
    }
}

/// Legacy completion logprobs of `entries`, the first starting at character `offset`.
fn legacy(entries: &[Value], mut offset: usize) -> Value {
    let (mut tokens, mut logprobs, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for e in entries {
        let token = e["token"].as_str().unwrap_or_default();
        let mut top = Map::new();
        for alt in e["top_logprobs"].as_array().into_iter().flatten() {
            let text = alt["bytes"].as_str().unwrap_or_default().to_string();
            top.entry(text).or_insert_with(|| logprob(&alt["logprob"]));
        }
        tokens.push(json!(token));
        logprobs.push(logprob(&e["logprob"]));
        tops.push(Value::Object(top));
        offsets.push(json!(offset));
        offset += token.chars().count();
    }
    json!({
        "tokens": tokens,
        "token_logprobs": logprobs,
        "top_logprobs": tops,
        "text_offset": offsets,
    })
}

/// A completion's choices: legacy logprobs.
pub fn completion_response(response: &mut Value) {
    for choice in choices(response) {
        if let Some(content) = choice["logprobs"]["content"].as_array() {
            choice["logprobs"] = legacy(content, 0);
        }
    }
}

/// A completion chunk's choices: legacy logprobs of their one token, at character `offset`
/// of the text streamed so far (advanced by this chunk's text).
pub fn completion_chunk(chunk: &mut Value, offset: &mut usize) {
    for choice in choices(chunk) {
        if choice["logprobs"].is_object() {
            choice["logprobs"] = legacy(std::slice::from_ref(&choice["logprobs"]), *offset);
        }
        *offset += choice["text"].as_str().map_or(0, |t| t.chars().count());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(token: &str, lp: f64) -> Value {
        json!({"token": token, "logprob": lp, "bytes": token.as_bytes(),
               "top_logprobs": [{"token": 7, "logprob": lp, "bytes": token},
                                {"token": 9, "logprob": -3.0, "bytes": " no"},
                                {"token": 11, "logprob": null, "bytes": " ruled out"}]})
    }

    #[test]
    fn chat_entries_get_text_tokens_and_chunks_get_content_lists() {
        let mut r = json!({"choices": [{"logprobs": {"content": [entry("Hi", -0.5)]}}]});
        chat_response(&mut r);
        let e = &r["choices"][0]["logprobs"]["content"][0];
        assert_eq!(e["token"], "Hi");
        assert_eq!(
            e["top_logprobs"][1],
            json!({"token": " no", "logprob": -3.0, "bytes": [32, 110, 111]})
        );
        let mut c = json!({"choices": [{"delta": {}, "logprobs": entry("Hi", -0.5)}]});
        chat_chunk(&mut c);
        assert_eq!(
            c["choices"][0]["logprobs"]["content"][0]["top_logprobs"][0]["token"],
            "Hi"
        );
        let mut none = json!({"choices": [{"delta": {}, "logprobs": null}]});
        chat_chunk(&mut none);
        assert!(none["choices"][0]["logprobs"].is_null());
    }

    #[test]
    fn completions_get_the_legacy_shape_with_running_offsets() {
        let mut r = json!({"choices": [{"text": "Hi there", "logprobs": {"content": [entry("Hi", -0.5), entry(" there", -1.0)]}}]});
        completion_response(&mut r);
        assert_eq!(
            r["choices"][0]["logprobs"],
            json!({"tokens": ["Hi", " there"], "token_logprobs": [-0.5, -1.0],
                   "top_logprobs": [{"Hi": -0.5, " no": -3.0, " ruled out": IMPOSSIBLE},
                                    {" there": -1.0, " no": -3.0, " ruled out": IMPOSSIBLE}],
                   "text_offset": [0, 2]})
        );
        let mut offset = 0;
        let mut first = json!({"choices": [{"text": "Hi", "logprobs": entry("Hi", -0.5)}]});
        let mut second =
            json!({"choices": [{"text": " there", "logprobs": entry(" there", -1.0)}]});
        completion_chunk(&mut first, &mut offset);
        completion_chunk(&mut second, &mut offset);
        assert_eq!(second["choices"][0]["logprobs"]["text_offset"], json!([2]));
        assert_eq!(offset, 8);
    }
}
