//! mistral.rs's logprobs in OpenAI's shapes.
//!
//! The engine reports each token as `{token, logprob, bytes, top_logprobs}` whose
//! alternatives carry a token *id* in `token` and its text in `bytes`; chat chunks carry one
//! such entry bare, and completions use the chat shape. OpenAI's chat shape has text in
//! `token` and UTF-8 bytes in `bytes`, chunks wrap entries in `{"content": [...]}`, and
//! completions use the legacy `{tokens, token_logprobs, top_logprobs, text_offset}`.
//! A token the sampler had ruled out (top-k, top-p) has probability 0: its logprob, -inf,
//! which JSON cannot hold, is reported as OpenAI does for such tokens, -9999.

use candle_core::Tensor;
use serde_json::{json, Map, Value};

use super::error::ApiError;

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
        // OpenAI's legacy shape always lists the chosen token beside the `logprobs` likeliest
        // (so up to k + 1 entries; `logprobs: 0` gives the chosen token alone).
        let mut top = Map::new();
        top.insert(token.to_string(), logprob(&e["logprob"]));
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

/// The legacy logprobs of a whole prompt from its raw `logits` (positions × vocabulary): each
/// token's logprob under the positions before it and the `k` likeliest alternatives there.
/// The first token has no context, so its logprob and alternatives are null (as OpenAI's).
/// `texts`: each prompt token's text in context (offsets add them up); `added`: per token,
/// whether the tokenizer added it around the text (a BOS): it is listed but takes none of the
/// echoed text's characters, so that every `text_offset` indexes that text; `text_of`: an
/// alternative's text. Also returns the characters the prompt's tokens add up to.
pub fn prompt(
    logits: &Tensor,
    ids: &[u32],
    k: usize,
    texts: Vec<String>,
    added: &[bool],
    text_of: impl Fn(u32) -> String,
) -> Result<(Value, usize), ApiError> {
    let internal = |e: candle_core::Error| ApiError::internal("internal_error", e.to_string());
    let (positions, vocab) = logits.dims2().map_err(internal)?;
    if positions != ids.len() {
        return Err(ApiError::internal(
            "internal_error",
            format!(
                "the engine returned logits for {positions} positions of a {}-token prompt",
                ids.len()
            ),
        ));
    }
    // One copy of the logits; each row normalised on the fly (log-sum-exp), so a long prompt
    // over a large vocabulary holds one matrix, not three.
    let rows = logits.to_vec2::<f32>().map_err(internal)?;
    let (mut tokens, mut token_logprobs, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    let mut offset = 0;
    for (i, (&id, text)) in ids.iter().zip(texts).enumerate() {
        offsets.push(json!(offset));
        if !added.get(i).copied().unwrap_or(false) {
            offset += text.chars().count();
        }
        tokens.push(json!(text.clone()));
        let Some(row) = i.checked_sub(1).map(|p| &rows[p]) else {
            token_logprobs.push(Value::Null);
            tops.push(Value::Null);
            continue;
        };
        let id = id as usize;
        if id >= vocab {
            return Err(ApiError::bad_request(
                "invalid_token_id",
                format!("token id {id} is outside the vocabulary (size {vocab})"),
            ));
        }
        let lse = log_sum_exp(row);
        token_logprobs.push(finite(row[id] - lse));
        // The prompt's token first, under its text in context, then the k likeliest (as the
        // generated tokens' entries).
        let mut top = Map::new();
        top.insert(text, finite(row[id] - lse));
        for alt in top_k(row, k) {
            top.entry(text_of(alt as u32))
                .or_insert_with(|| finite(row[alt] - lse));
        }
        tops.push(Value::Object(top));
    }
    let value = json!({
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": tops,
        "text_offset": offsets,
    });
    Ok((value, offset))
}

/// ln Σ exp(v), stable.
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    max + row.iter().map(|&v| (v - max).exp()).sum::<f32>().ln()
}

fn finite(lp: f32) -> Value {
    json!(if lp.is_finite() {
        lp as f64
    } else {
        IMPOSSIBLE
    })
}

/// Indices of the `k` largest values, largest first.
fn top_k(row: &[f32], k: usize) -> Vec<usize> {
    let mut best: Vec<usize> = Vec::with_capacity(k + 1);
    for (i, &v) in row.iter().enumerate() {
        if best.len() == k && best.last().is_none_or(|&b| row[b] >= v) {
            continue;
        }
        let at = best.partition_point(|&b| row[b] >= v);
        best.insert(at, i);
        best.truncate(k);
    }
    best
}

/// The prompt's legacy logprobs followed by the generated tokens' (`generated`: legacy
/// logprobs or null), whose text offsets move past the prompt's `prompt_chars` characters.
pub fn append(mut prompt: Value, generated: Value, prompt_chars: usize) -> Value {
    for key in ["tokens", "token_logprobs", "top_logprobs"] {
        if let (Some(p), Some(g)) = (prompt[key].as_array_mut(), generated[key].as_array()) {
            p.extend(g.iter().cloned());
        }
    }
    if let (Some(p), Some(g)) = (
        prompt["text_offset"].as_array_mut(),
        generated["text_offset"].as_array(),
    ) {
        p.extend(
            g.iter()
                .map(|o| json!(o.as_u64().unwrap_or(0) as usize + prompt_chars)),
        );
    }
    prompt
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_logprobs_are_log_softmax_of_the_previous_position() {
        // Three positions over a vocabulary of 3; the prompt is tokens 2, 0, 1.
        let logits = Tensor::new(
            &[[0.0f32, 1.0, 2.0], [3.0, 3.0, 3.0], [5.0, 0.0, 0.0]],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let names = ["a", "b", "c"];
        let text = |id: u32| names[id as usize].to_string();
        let texts = vec!["c".into(), "a".into(), "bb".into()];
        let (v, chars) = prompt(&logits, &[2, 0, 1], 2, texts, &[false; 3], text).unwrap();
        assert_eq!(chars, 4);
        let lse0 = (1f64 + 1f64.exp() + 2f64.exp()).ln();
        let lse1 = (3.0 * 3f64.exp()).ln();
        let lp = v["token_logprobs"].as_array().unwrap();
        assert!(lp[0].is_null());
        assert!((lp[1].as_f64().unwrap() - (0.0 - lse0)).abs() < 1e-5);
        assert!((lp[2].as_f64().unwrap() - (3.0 - lse1)).abs() < 1e-5);
        assert_eq!(v["tokens"], json!(["c", "a", "bb"]));
        assert_eq!(v["text_offset"], json!([0, 1, 2]));
        // Position 0's two likeliest tokens are c then b; the prompt's own token, a, is listed
        // beside them, as OpenAI lists the chosen token.
        let top = v["top_logprobs"][1].as_object().unwrap();
        assert_eq!(top.keys().collect::<Vec<_>>().len(), 3);
        assert!((top["c"].as_f64().unwrap() - (2.0 - lse0)).abs() < 1e-5);
        assert!((top["b"].as_f64().unwrap() - (1.0 - lse0)).abs() < 1e-5);
        assert!((top["a"].as_f64().unwrap() - (0.0 - lse0)).abs() < 1e-5);
        assert!(v["top_logprobs"][0].is_null());
        // `logprobs: 0`: the prompt's tokens alone.
        let texts = vec!["c".into(), "a".into(), "bb".into()];
        let (z, _) = prompt(&logits, &[2, 0, 1], 0, texts, &[false; 3], text).unwrap();
        assert_eq!(z["top_logprobs"][1], json!({"a": lp[1]}));
        assert_eq!(z["top_logprobs"][2], json!({"bb": lp[2]}));
        // A token the tokenizer added (a BOS "c" before the text "abb") is listed but takes
        // no characters: the offsets index "abb".
        let texts = vec!["c".into(), "a".into(), "bb".into()];
        let (b, chars) =
            prompt(&logits, &[2, 0, 1], 0, texts, &[true, false, false], text).unwrap();
        assert_eq!(b["text_offset"], json!([0, 0, 1]));
        assert_eq!(chars, 3);
        assert_eq!(b["tokens"], v["tokens"]);
        // A logit row count that does not match the prompt is the engine's fault, not a panic.
        assert_eq!(
            prompt(
                &logits,
                &[1, 2],
                1,
                vec![String::new(); 2],
                &[false; 2],
                |_| String::new()
            )
            .unwrap_err()
            .code,
            "internal_error"
        );
    }

    #[test]
    fn top_k_keeps_the_largest_in_order() {
        assert_eq!(top_k(&[0.1, 0.9, 0.5, 0.9, -1.0], 3), vec![1, 3, 2]);
        assert_eq!(top_k(&[0.1, 0.2], 0), Vec::<usize>::new());
        assert_eq!(top_k(&[0.1, 0.2], 5), vec![1, 0]);
    }

    #[test]
    fn generated_logprobs_follow_the_prompt_with_shifted_offsets() {
        let p = json!({"tokens": ["a"], "token_logprobs": [null], "top_logprobs": [null],
                       "text_offset": [0]});
        let g = json!({"tokens": ["b"], "token_logprobs": [-1.0], "top_logprobs": [{"b": -1.0}],
                       "text_offset": [0]});
        let v = append(p.clone(), g, 1);
        assert_eq!(v["tokens"], json!(["a", "b"]));
        assert_eq!(v["text_offset"], json!([0, 1]));
        assert_eq!(append(p.clone(), Value::Null, 1), p);
    }

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
        // `logprobs: 0`: no alternatives from the engine; the chosen token is still listed.
        let mut zero = json!({"choices": [{"text": "Hi", "logprobs": {"content": [
            {"token": "Hi", "logprob": -0.5, "bytes": "Hi", "top_logprobs": []}]}}]});
        completion_response(&mut zero);
        assert_eq!(
            zero["choices"][0]["logprobs"]["top_logprobs"],
            json!([{"Hi": -0.5}])
        );
    }
}
