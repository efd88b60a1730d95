//! The parametric suite: a few task templates, each instantiated with many parameter values
//! that its system prompts state (add 7, wrap in angle brackets, answer `[win]` / `[lose]`).
//! A task held out of it differs from trained ones only in a value its instruction names, so a
//! generator that recovers it reads the instruction rather than recalling a task: a weaker kind
//! of novelty than a new family, and one that the skill suite cannot test.

use rand::rngs::StdRng;
use rand::Rng;

use super::{pick, review, TaskSpec, ADJECTIVES, NOUNS};

/// Adding K to a number, K = 2..=30.
const ADD: std::ops::RangeInclusive<u32> = 2..=30;
/// Multiplying a number by K, K = 2..=9.
const TIMES: std::ops::RangeInclusive<u32> = 2..=9;
/// The K-th word of six, K = 1..=5, by its ordinal.
const ORDINALS: [&str; 5] = ["first", "second", "third", "fourth", "fifth"];
/// (name in the task's file name, name in its instruction, opening, closing).
const WRAPS: [(&str, &str, &str, &str); 12] = [
    ("parentheses", "parentheses", "(", ")"),
    ("angle", "angle brackets", "<", ">"),
    ("braces", "curly braces", "{", "}"),
    ("asterisks", "asterisks", "*", "*"),
    ("double_quotes", "double quotes", "\"", "\""),
    ("single_quotes", "single quotes", "'", "'"),
    ("bars", "vertical bars", "|", "|"),
    ("underscores", "underscores", "_", "_"),
    ("tildes", "tildes", "~", "~"),
    ("hashes", "hash signs", "#", "#"),
    ("pluses", "plus signs", "+", "+"),
    ("slashes", "slashes", "/", "/"),
];
/// Label words for a positive and a negative review.
const LABELS: [(&str, &str); 12] = [
    ("happy", "sad"),
    ("yes", "no"),
    ("up", "down"),
    ("win", "lose"),
    ("pass", "fail"),
    ("like", "dislike"),
    ("pro", "con"),
    ("plus", "minus"),
    ("hot", "cold"),
    ("light", "dark"),
    ("gold", "lead"),
    ("sun", "rain"),
];

/// Six alternating adjectives and nouns.
fn six_words(rng: &mut StdRng) -> Vec<&'static str> {
    (0..6)
        .map(|i| pick(rng, if i % 2 == 0 { ADJECTIVES } else { NOUNS }))
        .collect()
}

/// An arithmetic task answering a number `n` drawn from `range` with `f(n)`.
fn number_task(
    name: String,
    systems: [String; 3],
    range: std::ops::Range<u32>,
    f: impl Fn(u32) -> u32 + Send + Sync + 'static,
) -> TaskSpec {
    TaskSpec {
        name,
        family: "arith",
        systems,
        make: Box::new(move |r| {
            let n = r.random_range(range.clone());
            (n.to_string(), f(n).to_string())
        }),
    }
}

/// Every task of the suite, in a fixed order: add_K, times_K, word_K, wrap_NAME, label_A_B.
pub fn param_tasks() -> Vec<TaskSpec> {
    let mut tasks = Vec::new();
    for k in ADD {
        tasks.push(number_task(
            format!("add_{k}"),
            [
                format!("Add {k} to the number and reply with the result."),
                format!("Reply with the number plus {k}, in digits only."),
                format!("Increase the given number by {k} and answer with the sum alone."),
            ],
            0..1000,
            move |n| n + k,
        ));
    }
    for k in TIMES {
        tasks.push(number_task(
            format!("times_{k}"),
            [
                format!("Multiply the number by {k} and reply with the product."),
                format!("Reply with {k} times the number, in digits only."),
                format!("What is the given number times {k}? Answer with digits only."),
            ],
            1..1000,
            move |n| n * k,
        ));
    }
    for (i, ord) in ORDINALS.iter().enumerate() {
        tasks.push(TaskSpec {
            name: format!("word_{}", i + 1),
            family: "extract",
            systems: [
                format!("Reply with the {ord} word of the text."),
                format!("Give only the {ord} word of the message."),
                format!("Which word comes {ord} in the text? Answer with that word alone."),
            ],
            make: Box::new(move |r| {
                let w = six_words(r);
                (w.join(" "), w[i].to_string())
            }),
        });
    }
    for (name, said, open, close) in WRAPS {
        tasks.push(TaskSpec {
            name: format!("wrap_{name}"),
            family: "format",
            systems: [
                format!("Reply with the text wrapped in {said}: {open} before it, {close} after."),
                format!("Repeat the text between {open} and {close}, with nothing else."),
                format!("Enclose the given text in {said} ({open} and {close}) and reply with it."),
            ],
            make: Box::new(move |r| {
                let p = super::phrase(r);
                (p.clone(), format!("{open}{p}{close}"))
            }),
        });
    }
    for (good, bad) in LABELS {
        tasks.push(TaskSpec {
            name: format!("label_{good}_{bad}"),
            family: "classify",
            systems: [
                format!(
                    "Classify the review: reply [{good}] if it is positive, [{bad}] if negative."
                ),
                format!("Answer [{good}] for a positive review and [{bad}] for a negative one."),
                format!(
                    "Is the review positive or negative? Say [{good}] or [{bad}], nothing else."
                ),
            ],
            make: Box::new(move |r| {
                let (text, positive) = review(r);
                (text, format!("[{}]", if positive { good } else { bad }))
            }),
        });
    }
    tasks
}
