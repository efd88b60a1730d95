//! `eval`: accuracy on a task's test split, scored as the paper does: greedy decoding, the
//! bracketed choice parsed from the start of the reply, compared with the reference answer.

use std::path::PathBuf;

use candle_core::{Device, Tensor, D};
use tokenizers::Tokenizer;

use super::data::{prompt_text, Example};
use super::model::{CausalLm, KvCache};
use crate::adapters::LoraAdapter;
use crate::error::{DndError, Result};

/// The choice in the first bracket pair of `reply`, if the reply opens with one (leading
/// whitespace and up to 8 other characters allowed before it), lower-cased and trimmed.
pub fn parse_choice(reply: &str) -> Option<String> {
    let start = reply.find('[')?;
    if reply[..start].chars().count() > 8 {
        return None;
    }
    let end = start + reply[start..].find(']')?;
    let inner = reply[start + 1..end].trim();
    (!inner.is_empty()).then(|| inner.to_lowercase())
}

/// The reply's choice read leniently: the bracketed choice, or else the leading word of the reply
/// (`A: ...`, `True.`), lower-cased. Small base models often name the right choice in the
/// task's own listing format rather than the bracketed one.
pub fn parse_choice_lenient(reply: &str) -> Option<String> {
    parse_choice(reply).or_else(|| {
        let word: String = reply
            .trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric())
            .collect();
        (!word.is_empty()).then(|| word.to_lowercase())
    })
}

/// Whether `reply` picks the choice of `response` (e.g. `[B]`, `[True]`).
pub fn is_correct(reply: &str, response: &str) -> bool {
    match (parse_choice(reply), parse_choice(response)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// Greedy continuation of `prompt` (at most `max_new` tokens, stopping at `eos` or once the
/// reply has closed its first bracket, which is all [`parse_choice`] reads). Decodes
/// incrementally over a key/value cache, the output projection only at the last position.
pub fn greedy(
    model: &CausalLm,
    tok: &Tokenizer,
    prompt: &str,
    adapter: Option<&LoraAdapter>,
    max_new: usize,
    max_len: usize,
    eos: u32,
) -> Result<String> {
    let mut ids = tok
        .encode(prompt, false)
        .map_err(|e| DndError::Tokenizer(e.to_string()))?
        .get_ids()
        .to_vec();
    if ids.len() + max_new > max_len {
        ids.drain(..ids.len() + max_new - max_len);
    }
    let start = ids.len();
    let mut cache = KvCache::default();
    let mut fresh = ids.clone();
    let decode = |ids: &[u32]| {
        tok.decode(ids, true)
            .map_err(|e| DndError::Tokenizer(e.to_string()))
    };
    for _ in 0..max_new {
        let x = Tensor::new(fresh.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let hidden = model.hidden(&x, adapter, Some(&mut cache))?;
        let last = hidden.get(0)?.narrow(0, fresh.len() - 1, 1)?;
        let next = model
            .logits(&last)?
            .squeeze(0)?
            .argmax(D::Minus1)?
            .to_scalar::<u32>()?;
        if next == eos {
            break;
        }
        ids.push(next);
        if decode(&ids[start..])?.contains(']') {
            break;
        }
        fresh = vec![next];
    }
    decode(&ids[start..])
}

/// One evaluated system (base model or an adapter).
#[derive(Debug, Clone)]
pub struct EvalRow {
    /// Label.
    pub label: String,
    /// Correct answers / examples.
    pub accuracy: f64,
    /// Examples scored.
    pub n: usize,
    /// Correct answers / examples, choices read with [`parse_choice_lenient`].
    pub lenient_accuracy: f64,
    /// Share of replies that opened with a bracketed choice (right or wrong).
    pub well_formed: f64,
    /// The replies, in example order.
    pub replies: Vec<String>,
}

/// Accuracy of the base model (`adapter` none) or an adapter on `examples`.
#[allow(clippy::too_many_arguments)]
pub fn accuracy(
    model: &CausalLm,
    tok: &Tokenizer,
    examples: &[Example],
    adapter: Option<&LoraAdapter>,
    max_new: usize,
    max_len: usize,
    eos: u32,
    label: &str,
    progress: bool,
) -> Result<EvalRow> {
    let bar = super::progress_bar(examples.len(), "eval", progress);
    bar.set_message(label.to_string());
    let (mut correct, mut lenient, mut well_formed) = (0, 0, 0);
    let mut replies = Vec::with_capacity(examples.len());
    for ex in examples {
        let reply = greedy(model, tok, &prompt_text(ex), adapter, max_new, max_len, eos)?;
        correct += usize::from(is_correct(&reply, &ex.response));
        well_formed += usize::from(parse_choice(&reply).is_some());
        lenient += usize::from(
            parse_choice(&ex.response).is_some_and(|c| parse_choice_lenient(&reply) == Some(c)),
        );
        replies.push(reply);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let n = examples.len().max(1) as f64;
    Ok(EvalRow {
        label: label.to_string(),
        accuracy: correct as f64 / n,
        lenient_accuracy: lenient as f64 / n,
        n: examples.len(),
        well_formed: well_formed as f64 / n,
        replies,
    })
}

/// The rows as a Markdown table.
pub fn markdown(task: &str, rows: &[EvalRow]) -> String {
    let mut s = format!(
        "| {task} | accuracy | lenient accuracy | bracketed replies | examples |\n\
         |---|---|---|---|---|\n"
    );
    for r in rows {
        s += &format!(
            "| {} | {:.1}% | {:.1}% | {:.1}% | {} |\n",
            r.label,
            100.0 * r.accuracy,
            100.0 * r.lenient_accuracy,
            100.0 * r.well_formed,
            r.n
        );
    }
    s
}

/// Where `eval` writes its table and chart.
#[derive(Debug, Clone, Default)]
pub struct EvalOutputs {
    /// Markdown table.
    pub markdown: Option<PathBuf>,
    /// PNG bar chart.
    pub png: Option<PathBuf>,
    /// JSON object: label -> the replies, in example order.
    pub replies: Option<PathBuf>,
}

/// Writes the table and chart.
pub fn write_outputs(task: &str, rows: &[EvalRow], out: &EvalOutputs) -> Result<()> {
    if let Some(p) = &out.markdown {
        std::fs::write(p, markdown(task, rows)).map_err(|e| DndError::io(p, e))?;
    }
    if let Some(p) = &out.png {
        super::plot::bar_chart(&[rows.iter().map(|r| r.accuracy).collect()], p)?;
    }
    if let Some(p) = &out.replies {
        let map: serde_json::Map<String, serde_json::Value> = rows
            .iter()
            .map(|r| (r.label.clone(), serde_json::json!(r.replies)))
            .collect();
        let text = serde_json::to_string_pretty(&map).expect("strings serialize");
        std::fs::write(p, text).map_err(|e| DndError::io(p, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_are_read_from_the_start_of_the_reply() {
        assert_eq!(parse_choice("[B] because"), Some("b".into()));
        assert_eq!(parse_choice("  [ True ]"), Some("true".into()));
        assert_eq!(parse_choice("Answer: [A]"), Some("a".into()));
        assert_eq!(parse_choice("I think the answer is [A]"), None);
        assert_eq!(parse_choice("B"), None);
        assert_eq!(parse_choice_lenient("B"), Some("b".into()));
        assert_eq!(parse_choice_lenient(" A: dry palms"), Some("a".into()));
        assert_eq!(parse_choice_lenient("True."), Some("true".into()));
        assert_eq!(parse_choice_lenient("x [C]"), Some("c".into()));
        assert_eq!(parse_choice_lenient(": no"), None);
        assert_eq!(parse_choice("[]"), None);
        assert!(is_correct("[false]", "[False]"));
        assert!(!is_correct("[A]", "[B]"));
        assert!(!is_correct("A", "[A]"));
    }
}
