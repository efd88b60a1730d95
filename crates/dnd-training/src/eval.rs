//! `eval`: accuracy on a task's test split, greedy decoding. Choice tasks (bracketed answers
//! such as `[B]`) are scored as the paper does: the bracketed choice parsed from the start of
//! the reply against the reference's; other answers by exact match of the trimmed reply. Each
//! accuracy comes with its 95% Wilson interval, next to the best constant answer's accuracy.
//! Choice tasks also get a choice-likelihood score (the label whose tokens are likeliest after
//! the prompt), which does not depend on the reply's format.

use std::path::PathBuf;

use candle_core::{Device, Tensor, D};
use tokenizers::Tokenizer;

use super::collect::answer_loss;
use super::data::{encode, prompt_text, Example};
use super::model::{CausalLm, KvCache};
use dnd_core::adapters::LoraAdapter;
use dnd_core::error::{DndError, Result};

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

/// Whether `reply` answers `response`: for a bracketed choice (`[B]`, `[True]`) whether it
/// picks the same choice ([`parse_choice`]); for any other answer, whether the trimmed reply
/// equals it.
pub fn is_correct(reply: &str, response: &str) -> bool {
    match parse_choice(response) {
        Some(want) => parse_choice(reply) == Some(want),
        None => reply.trim() == response.trim(),
    }
}

/// Whether `reply` answers `response` in another format than asked: a choice read with
/// [`parse_choice_lenient`]; any other answer anywhere in the reply, ignoring case (a base
/// model often says `The city is Lima.` for `Lima`).
pub fn is_correct_lenient(reply: &str, response: &str) -> bool {
    match parse_choice(response) {
        Some(want) => parse_choice_lenient(reply) == Some(want),
        None => reply
            .to_lowercase()
            .contains(&response.trim().to_lowercase()),
    }
}

/// The answer a reply is compared on: the bracketed choice, or the trimmed text.
fn answer_key(response: &str) -> String {
    parse_choice(response).unwrap_or_else(|| response.trim().to_string())
}

/// The 95% Wilson score interval of `k` successes in `n` trials.
pub fn wilson_interval(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (z, n, p) = (1.96f64, n as f64, k as f64 / n as f64);
    let d = 1.0 + z * z / n;
    let c = (p + z * z / (2.0 * n)) / d;
    let h = z * ((p * (1.0 - p) + z * z / (4.0 * n)) / n).sqrt() / d;
    ((c - h).max(0.0), (c + h).min(1.0))
}

/// The best constant answer on `examples`: the most frequent reference answer and the share
/// of examples it is right on (what a model answering one thing always would score).
pub fn constant_baseline(examples: &[Example]) -> (String, usize) {
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for ex in examples {
        *counts.entry(answer_key(&ex.response)).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by_key(|(_, c)| *c)
        .unwrap_or_default()
}

/// Greedy continuation of `prompt` (at most `max_new` tokens, stopping at `eos` or, with
/// `stop_at_bracket`, once the reply has closed its first bracket, which is all
/// [`parse_choice`] reads). Decodes incrementally over a key/value cache, the output
/// projection only at the last position.
#[allow(clippy::too_many_arguments)]
pub fn greedy(
    model: &CausalLm,
    tok: &Tokenizer,
    prompt: &str,
    adapter: Option<&LoraAdapter>,
    max_new: usize,
    max_len: usize,
    eos: u32,
    stop_at_bracket: bool,
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
        if stop_at_bracket && decode(&ids[start..])?.contains(']') {
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
    /// Correct answers.
    pub correct: usize,
    /// Examples scored.
    pub n: usize,
    /// Correct answers / examples read leniently ([`is_correct_lenient`]).
    pub lenient_accuracy: f64,
    /// Share of replies that opened with a bracketed choice (right or wrong).
    pub well_formed: f64,
    /// For choice tasks, the share of replies whose choice is one of the task's labels (the
    /// reference answers of `examples`); `None` for free-text answers.
    pub label_space: Option<f64>,
    /// For choice tasks scored by the model itself ([`accuracy`]), the share of examples whose
    /// likeliest label is the reference ([`choice_likelihood`]); `None` otherwise.
    pub choice_likelihood: Option<f64>,
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
    // Examples decode in parallel: one sequence's decoding steps are too small to keep more
    // than one core busy.
    use rayon::prelude::*;
    let replies = examples
        .par_iter()
        .map(|ex| {
            let choice = parse_choice(&ex.response).is_some();
            let reply = greedy(
                model,
                tok,
                &prompt_text(ex),
                adapter,
                max_new,
                max_len,
                eos,
                choice,
            );
            bar.inc(1);
            reply
        })
        .collect::<Result<Vec<String>>>()?;
    bar.finish_and_clear();
    let mut row = score(examples, replies, label)?;
    row.choice_likelihood = choice_likelihood(model, tok, examples, adapter, max_len, eos)?;
    Ok(row)
}

/// For choice tasks (every reference answer bracketed), the share of examples whose likeliest
/// label, by the summed log-probability of the label's tokens and the end of turn after the
/// prompt, is the reference: lm-evaluation-harness's `acc` over the task's label set (the
/// distinct reference answers). `None` for free-text tasks.
pub fn choice_likelihood(
    model: &CausalLm,
    tok: &Tokenizer,
    examples: &[Example],
    adapter: Option<&LoraAdapter>,
    max_len: usize,
    eos: u32,
) -> Result<Option<f64>> {
    let mut labels: Vec<(String, String)> = Vec::new();
    for ex in examples {
        let Some(key) = parse_choice(&ex.response) else {
            return Ok(None);
        };
        if !labels.iter().any(|(k, _)| *k == key) {
            labels.push((key, ex.response.clone()));
        }
    }
    use rayon::prelude::*;
    let correct = examples
        .par_iter()
        .map(|ex| -> Result<usize> {
            let mut best = (f32::NEG_INFINITY, "");
            for (key, text) in &labels {
                let candidate = Example {
                    response: text.clone(),
                    ..ex.clone()
                };
                let s = encode(tok, &candidate, max_len, eos)?;
                let ids = Tensor::new(s.ids.as_slice(), &model.device)?.unsqueeze(0)?;
                let hidden = model.hidden(&ids, adapter, None)?;
                let mean =
                    answer_loss(model, &hidden, std::slice::from_ref(&s))?.to_scalar::<f32>()?;
                let logp = -mean * (s.ids.len() - s.answer_from) as f32;
                if logp > best.0 {
                    best = (logp, key.as_str());
                }
            }
            Ok(usize::from(
                parse_choice(&ex.response).as_deref() == Some(best.1),
            ))
        })
        .sum::<Result<usize>>()?;
    Ok(Some(correct as f64 / examples.len().max(1) as f64))
}

/// Scores `replies` (one per example, in order; from any source, e.g. a server) as the row
/// `label`, by the rules of [`accuracy`].
pub fn score(examples: &[Example], replies: Vec<String>, label: &str) -> Result<EvalRow> {
    if replies.len() != examples.len() {
        return Err(DndError::InvalidInput(format!(
            "{label}: {} replies for {} examples",
            replies.len(),
            examples.len()
        )));
    }
    let labels: Option<std::collections::BTreeSet<String>> =
        examples.iter().map(|e| parse_choice(&e.response)).collect();
    let (mut correct, mut lenient, mut well_formed, mut inside) = (0, 0, 0, 0);
    for (ex, reply) in examples.iter().zip(&replies) {
        let reply = reply.as_str();
        correct += usize::from(is_correct(reply, &ex.response));
        let choice = parse_choice(reply);
        inside += usize::from(
            labels
                .as_ref()
                .is_some_and(|l| choice.as_ref().is_some_and(|c| l.contains(c))),
        );
        well_formed += usize::from(choice.is_some());
        lenient += usize::from(is_correct_lenient(reply, &ex.response));
    }
    let n = examples.len().max(1) as f64;
    Ok(EvalRow {
        label: label.to_string(),
        accuracy: correct as f64 / n,
        correct,
        lenient_accuracy: lenient as f64 / n,
        n: examples.len(),
        well_formed: well_formed as f64 / n,
        label_space: labels.map(|_| inside as f64 / n),
        choice_likelihood: None,
        replies,
    })
}

/// The rows as a Markdown table, with each accuracy's 95% interval and, last, the best
/// constant answer on `examples` (the reference no skill is needed for).
pub fn markdown(task: &str, rows: &[EvalRow], examples: &[Example]) -> String {
    let mut s = format!(
        "| {task} | accuracy | 95% interval | lenient accuracy | bracketed replies | examples |\n\
         |---|---|---|---|---|---|\n"
    );
    let ci = |k, n| {
        let (lo, hi) = wilson_interval(k, n);
        format!("{:.1}-{:.1}%", 100.0 * lo, 100.0 * hi)
    };
    for r in rows {
        s += &format!(
            "| {} | {:.1}% | {} | {:.1}% | {:.1}% | {} |\n",
            r.label,
            100.0 * r.accuracy,
            ci(r.correct, r.n),
            100.0 * r.lenient_accuracy,
            100.0 * r.well_formed,
            r.n
        );
    }
    let (answer, k) = constant_baseline(examples);
    let n = examples.len();
    s += &format!(
        "| constant answer `{answer}` | {:.1}% | {} | | | {n} |\n",
        100.0 * k as f64 / n.max(1) as f64,
        ci(k, n)
    );
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
    /// JSON summary: per row its label, correct answers, examples, accuracy and 95% interval,
    /// and the constant answer's.
    pub summary: Option<PathBuf>,
}

/// Writes the table and chart.
pub fn write_outputs(
    task: &str,
    rows: &[EvalRow],
    examples: &[Example],
    out: &EvalOutputs,
) -> Result<()> {
    if let Some(p) = &out.markdown {
        std::fs::write(p, markdown(task, rows, examples)).map_err(|e| DndError::io(p, e))?;
    }
    if let Some(p) = &out.png {
        super::plot::bar_chart(&[rows.iter().map(|r| r.accuracy).collect()], p)?;
    }
    if let Some(p) = &out.summary {
        let row = |label: &str, k: usize, n: usize| {
            let (lo, hi) = wilson_interval(k, n);
            serde_json::json!({"label": label, "correct": k, "n": n,
                "accuracy": k as f64 / n.max(1) as f64, "ci95": [lo, hi]})
        };
        let (answer, k) = constant_baseline(examples);
        let v = serde_json::json!({
            "task": task,
            "rows": rows.iter().map(|r| {
                let mut v = row(&r.label, r.correct, r.n);
                v["lenient_accuracy"] = serde_json::json!(r.lenient_accuracy);
                if let Some(s) = r.label_space {
                    v["label_space"] = serde_json::json!(s);
                }
                if let Some(c) = r.choice_likelihood {
                    v["choice_likelihood"] = serde_json::json!(c);
                }
                v
            }).collect::<Vec<_>>(),
            "constant": row(&answer, k, examples.len()),
        });
        let text = serde_json::to_string_pretty(&v).expect("numbers serialize");
        std::fs::write(p, text).map_err(|e| DndError::io(p, e))?;
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
        // Answers without brackets: exact match of the trimmed reply.
        assert!(is_correct(" 68\n", "68"));
        assert!(!is_correct("68.", "68"));
        assert!(!is_correct("THE CAT", "THE CAT SAT"));
        assert!(is_correct_lenient("The city is Lima.", "Lima"));
        assert!(!is_correct_lenient("The city is Quito.", "Lima"));
        assert!(is_correct_lenient("B: carbon dioxide", "[B]"));
    }

    #[test]
    fn wilson_intervals_match_known_values() {
        // 50/100: 40.4%-59.6%; 0/20: 0-16.1%; 20/20: 83.9-100%.
        let (lo, hi) = wilson_interval(50, 100);
        assert!(
            (lo - 0.4038).abs() < 1e-3 && (hi - 0.5962).abs() < 1e-3,
            "{lo} {hi}"
        );
        let (lo, hi) = wilson_interval(0, 20);
        assert!(lo == 0.0 && (hi - 0.1611).abs() < 1e-3, "{hi}");
        let (lo, hi) = wilson_interval(20, 20);
        assert!((lo - 0.8389).abs() < 1e-3 && hi > 1.0 - 1e-9, "{lo} {hi}");
    }

    #[test]
    fn the_constant_baseline_is_the_most_frequent_answer() {
        let ex = |r: &str| Example {
            prompt: "q".into(),
            response: r.into(),
            system: None,
        };
        let examples = [ex("[A]"), ex("[b]"), ex("[B]"), ex("[C]")];
        assert_eq!(constant_baseline(&examples), ("b".to_string(), 2));
        // Replies scored as given: right, wrong label, outside the labels, no choice.
        let replies = ["[A]", "[C] maybe", "[Z]", "b"].map(String::from).to_vec();
        let row = score(&examples, replies, "r").unwrap();
        assert_eq!((row.correct, row.n), (1, 4));
        assert_eq!((row.well_formed, row.label_space), (0.75, Some(0.5)));
        assert!(score(&examples, vec![], "r").is_err());
        let free = [ex("68")];
        let row = score(&free, vec!["68".into()], "r").unwrap();
        assert_eq!((row.correct, row.label_space), (1, None));
        let md = markdown("t", &[], &examples);
        assert!(md.contains("| constant answer `b` | 50.0% |"), "{md}");
    }
}
