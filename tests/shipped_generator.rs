//! The generator that ships for SmolLM2-135M-Instruct (`generators/`, trained by
//! `scripts/experiment.sh`) fits the model, and its adapters do what it was trained for: on
//! multiple-choice questions written for this test (not in any task file), an adapter generated
//! from the questions makes the bracketed answers the task files use far likelier than the base
//! model does. Needs `scripts/fetch-assets.sh encoder smollm2`.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use mistralrs_dnd::adapters::{BaseModelShape, LoraAdapter};
use mistralrs_dnd::generator::{Generator, LoadOptions};
use mistralrs_dnd::training::collect::answer_loss;
use mistralrs_dnd::training::data::{encode, Example};
use mistralrs_dnd::training::gguf::load_gguf;
use mistralrs_dnd::training::CausalLm;

const SYSTEM: &str = "Pick one answer among the given choices and reply with its letter in \
                      brackets, like [A].";

/// (question, right answer).
const QUESTIONS: [(&str, &str); 4] = [
    (
        "Which body part pumps blood through the body?\nA: lungs\nB: heart\nC: stomach\nD: liver",
        "[B]",
    ),
    (
        "What happens to ice left in a warm room?\nA: it melts\nB: it grows\nC: it turns to \
         sand\nD: it glows",
        "[A]",
    ),
    (
        "Which of these is a source of light?\nA: a rock\nB: a spoon\nC: a book\nD: a candle",
        "[D]",
    ),
    (
        "Which animal lays eggs?\nA: a cow\nB: a dog\nC: a chicken\nD: a horse",
        "[C]",
    ),
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Mean answer-token loss over the questions.
fn mean_loss(lm: &CausalLm, tok: &tokenizers::Tokenizer, eos: u32, a: Option<&LoraAdapter>) -> f32 {
    let mut total = 0.0;
    for (q, r) in QUESTIONS {
        let ex = Example {
            prompt: q.into(),
            response: r.into(),
            system: Some(SYSTEM.into()),
        };
        let s = encode(tok, &ex, 256, eos).unwrap();
        let ids = Tensor::new(s.ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let hidden = lm.hidden(&ids, a, None).unwrap();
        total += answer_loss(lm, &hidden, std::slice::from_ref(&s))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
    }
    total / QUESTIONS.len() as f32
}

#[test]
fn shipped_generator_specialises_smollm2() {
    let gguf = root().join(".assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let encoder = root().join(".assets/all-MiniLM-L6-v2");
    assert!(
        gguf.exists() && encoder.exists(),
        "run scripts/fetch-assets.sh encoder smollm2"
    );
    let gen = Generator::load(
        root().join("generators/smollm2-135m-six-tasks.safetensors"),
        &encoder,
        &LoadOptions::default(),
    )
    .unwrap();
    let prompts: Vec<&str> = QUESTIONS.iter().map(|(q, _)| *q).collect();
    let adapter = gen.generate(&prompts).unwrap();
    adapter
        .check_fits(&BaseModelShape::from_path(&gguf).unwrap())
        .unwrap();
    assert_eq!(adapter.rank(), 8);

    let (lm, tok, eos) = load_gguf(&gguf, &Device::Cpu).unwrap();
    let base = mean_loss(&lm, &tok, eos, None);
    let adapted = mean_loss(&lm, &tok, eos, Some(&adapter));
    eprintln!("answer loss: base {base:.3}, generated adapter {adapted:.3}");
    assert!(adapted.is_finite());
    assert!(
        adapted < 0.5 * base,
        "the generated adapter should halve the base model's answer loss: {base} -> {adapted}"
    );
}
