//! `eval`: accuracy on a task's test split, scored as the paper does: greedy decoding, the
//! bracketed choice parsed from the start of the reply, compared with the reference answer.

use std::path::PathBuf;

use candle_core::{Device, Tensor, D};
use tokenizers::Tokenizer;

use super::data::{prompt_text, Example};
use super::model::CausalLm;
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

/// Whether `reply` picks the choice of `response` (e.g. `[B]`, `[True]`).
pub fn is_correct(reply: &str, response: &str) -> bool {
    match (parse_choice(reply), parse_choice(response)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// Greedy continuation of `prompt` (at most `max_new` tokens, stopping at `eos`).
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
    for _ in 0..max_new {
        let x = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let logits = model.forward(&x, adapter)?;
        let next = logits
            .get(0)?
            .get(ids.len() - 1)?
            .argmax(D::Minus1)?
            .to_scalar::<u32>()?;
        if next == eos {
            break;
        }
        ids.push(next);
    }
    tok.decode(&ids[start..], true)
        .map_err(|e| DndError::Tokenizer(e.to_string()))
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
    let mut correct = 0;
    for ex in examples {
        let reply = greedy(model, tok, &prompt_text(ex), adapter, max_new, max_len, eos)?;
        correct += usize::from(is_correct(&reply, &ex.response));
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(EvalRow {
        label: label.to_string(),
        accuracy: correct as f64 / examples.len().max(1) as f64,
        n: examples.len(),
    })
}

/// The rows as a Markdown table.
pub fn markdown(task: &str, rows: &[EvalRow]) -> String {
    let mut s = format!("| {task} | accuracy | examples |\n|---|---|---|\n");
    for r in rows {
        s += &format!("| {} | {:.1}% | {} |\n", r.label, 100.0 * r.accuracy, r.n);
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
}

/// Writes the table and chart.
pub fn write_outputs(task: &str, rows: &[EvalRow], out: &EvalOutputs) -> Result<()> {
    if let Some(p) = &out.markdown {
        std::fs::write(p, markdown(task, rows)).map_err(|e| DndError::io(p, e))?;
    }
    if let Some(p) = &out.png {
        super::plot::bar_chart(&[rows.iter().map(|r| r.accuracy).collect()], p)?;
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
        assert_eq!(parse_choice("[]"), None);
        assert!(is_correct("[false]", "[False]"));
        assert!(!is_correct("[A]", "[B]"));
        assert!(!is_correct("A", "[A]"));
    }
}
