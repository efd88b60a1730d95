//! The generators that ship for SmolLM2-135M-Instruct (`generators/`) fit the model and do what
//! they were trained for, on questions and instructions written for this test (in no task file):
//! - the skills generator (`scripts/skill.sh`): an adapter made from an instruction alone makes
//!   that task's answers far likelier than the base model does (README "Skill results" shows
//!   that adapters made from other tasks' instructions mostly do too: the skill is largely
//!   shared); its anchors put paraphrased instructions near the trained conditions and
//!   ordinary chat far from them;
//! - the paper's six-task replica (`scripts/experiment.sh`): an adapter generated from
//!   multiple-choice questions makes the bracketed answers the task files use far likelier.
//!
//! Needs `scripts/fetch-assets.sh encoder smollm2`.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use dnd_core::adapters::{BaseModelShape, LoraAdapter};
use dnd_core::generator::{Generator, LoadOptions};
use dnd_core::test_util::repo_root;
use dnd_training::collect::answer_loss;
use dnd_training::data::{encode, Example};
use dnd_training::gguf::load_gguf;
use dnd_training::CausalLm;

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

/// Mean answer-token loss over the questions under a system prompt.
fn mean_loss(
    lm: &CausalLm,
    tok: &tokenizers::Tokenizer,
    eos: u32,
    a: Option<&LoraAdapter>,
    system: &str,
    questions: &[(&str, &str)],
) -> f32 {
    let mut total = 0.0;
    for (q, r) in questions {
        let ex = Example {
            prompt: q.to_string(),
            response: r.to_string(),
            system: Some(system.into()),
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
    total / questions.len() as f32
}

/// The SmolLM2 GGUF file and the shipped generator `file` (under `generators/`), loaded.
fn shipped(file: &str) -> (PathBuf, Generator) {
    let gguf = repo_root().join(".assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let encoder = repo_root().join(".assets/all-MiniLM-L6-v2");
    assert!(
        gguf.exists() && encoder.exists(),
        "run scripts/fetch-assets.sh encoder smollm2"
    );
    let gen = Generator::load(
        repo_root().join("generators").join(file),
        &encoder,
        &LoadOptions::default(),
    )
    .unwrap();
    (gguf, gen)
}

/// Instructions paraphrased by hand (none is a system prompt of `dnd tasks`) with questions.
const SKILLS: [(&str, [(&str, &str); 3]); 3] = [
    (
        "Repeat what the user writes, but in capital letters.",
        [
            ("green apples fall slowly", "GREEN APPLES FALL SLOWLY"),
            ("the old red barn", "THE OLD RED BARN"),
            ("quiet morning rain", "QUIET MORNING RAIN"),
        ],
    ),
    (
        "Tell me if this opinion is [positive] or [negative].",
        [
            ("The pizza was wonderful, I loved it.", "[positive]"),
            ("What a dreadful film, so boring.", "[negative]"),
            ("Our stay at the hotel was lovely.", "[positive]"),
        ],
    ),
    (
        "Answer with the integer that comes right after the given one.",
        [("41", "42"), ("699", "700"), ("15", "16")],
    ),
];

#[test]
fn skills_generator_specialises_smollm2_from_the_system_prompt() {
    let (gguf, gen) = shipped("smollm2-135m-skills.safetensors");
    let (lm, tok, eos) = load_gguf(&gguf, &Device::Cpu).unwrap();
    let adapters: Vec<LoraAdapter> = SKILLS
        .iter()
        .map(|(system, _)| gen.generate(&[*system]).unwrap())
        .collect();
    adapters[0]
        .check_fits(&BaseModelShape::from_path(&gguf).unwrap())
        .unwrap();
    let mut failures = Vec::new();
    for (i, (system, qs)) in SKILLS.iter().enumerate() {
        let base = mean_loss(&lm, &tok, eos, None, system, qs);
        let own = mean_loss(&lm, &tok, eos, Some(&adapters[i]), system, qs);
        let other = &adapters[(i + 1) % adapters.len()];
        let wrong = mean_loss(&lm, &tok, eos, Some(other), system, qs);
        eprintln!("{system:?}: answer loss base {base:.3}, own adapter {own:.3}, another task's {wrong:.3}");
        failures.extend(
            (own >= 0.7 * base).then(|| format!("{system:?}: base {base}, own adapter {own}")),
        );
    }
    assert!(failures.is_empty(), "{failures:#?}");
    // Abstention: the paraphrases are near a trained condition, ordinary chat is not (0.45, the
    // main job's threshold, chosen in README "Abstention").
    let limit = 0.45;
    for (system, _) in SKILLS {
        let n = gen.nearest(&[system]).unwrap().expect("anchors");
        assert!(n.distance < limit, "{system:?}: {n:?}");
    }
    let chat =
        std::fs::read_to_string(repo_root().join("tests/fixtures/general_chat.txt")).unwrap();
    for line in chat.lines().filter(|l| !l.trim().is_empty()) {
        let n = gen.nearest(&[line]).unwrap().unwrap();
        assert!(n.distance > limit, "{line:?} is near {n:?}");
    }
}

#[test]
fn six_task_generator_teaches_smollm2_the_answer_format() {
    let (gguf, gen) = shipped("smollm2-135m-six-tasks.safetensors");
    let prompts: Vec<&str> = QUESTIONS.iter().map(|(q, _)| *q).collect();
    let adapter = gen.generate(&prompts).unwrap();
    adapter
        .check_fits(&BaseModelShape::from_path(&gguf).unwrap())
        .unwrap();
    assert_eq!(adapter.rank(), 8);

    let (lm, tok, eos) = load_gguf(&gguf, &Device::Cpu).unwrap();
    let base = mean_loss(&lm, &tok, eos, None, SYSTEM, &QUESTIONS);
    let adapted = mean_loss(&lm, &tok, eos, Some(&adapter), SYSTEM, &QUESTIONS);
    eprintln!("answer loss: base {base:.3}, generated adapter {adapted:.3}");
    assert!(adapted.is_finite());
    assert!(
        adapted < 0.5 * base,
        "the generated adapter should halve the base model's answer loss: {base} -> {adapted}"
    );
}
