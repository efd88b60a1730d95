//! `eval` on the golden tiny Qwen2: the base model (which never answers in brackets) scores
//! zero, and a LoRA collected on the very examples learns to answer them.

use dnd_core::test_util as common;

use candle_core::Device;
use common::golden_path;
use dnd_core::adapters::{LoraAdapter, Module};
use dnd_training::data::read_examples;
use dnd_training::eval::{accuracy, markdown, write_outputs, EvalOutputs};
use dnd_training::{collect, CausalLm, CollectOptions};

#[test]
fn a_lora_trained_on_the_examples_beats_the_base_model() {
    let dir = std::env::temp_dir().join(format!("dnd-eval-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let task = dir.join("task.json");
    let items: Vec<serde_json::Value> = (0..8)
        .map(|i| {
            serde_json::json!({
                "prompt": format!("Is {i} even?"),
                "response": if i % 2 == 0 { "[True]" } else { "[False]" },
            })
        })
        .collect();
    std::fs::write(&task, serde_json::to_string(&items).unwrap()).unwrap();
    collect(&CollectOptions {
        model_dir: golden_path("tiny-qwen2"),
        task: task.clone(),
        out: dir.join("ckpt"),
        rank: 8,
        alpha: 16.0,
        modules: Module::ALL.to_vec(),
        lr: 1e-2,
        weight_decay: 0.0,
        steps: 80,
        batch: 8,
        seq_len: 48,
        keep_last: 1,
        save_at: vec![],
        seed: 0,
        save_every: 10,
        resume: false,
        stop_after: None,
        progress: false,
    })
    .unwrap();
    let lora = LoraAdapter::load_peft(dir.join("ckpt/step-00080"), &Device::Cpu).unwrap();
    let model = CausalLm::load(golden_path("tiny-qwen2"), &Device::Cpu).unwrap();
    let tok = tokenizers::Tokenizer::from_file(golden_path("tiny-qwen2/tokenizer.json")).unwrap();
    let examples = read_examples(&task).unwrap();
    let base = accuracy(&model, &tok, &examples, None, 8, 64, 258, "base", false).unwrap();
    let tuned = accuracy(
        &model,
        &tok,
        &examples,
        Some(&lora),
        8,
        64,
        258,
        "lora",
        false,
    )
    .unwrap();
    eprintln!("base {} tuned {}", base.accuracy, tuned.accuracy);
    assert_eq!(base.accuracy, 0.0);
    assert!(tuned.accuracy >= 0.75, "tuned accuracy {}", tuned.accuracy);
    // Scored by likelihood, the tuned LoRA prefers the right label too; the base model's score
    // exists whatever its replies' format.
    let (lb, lt) = (
        base.choice_likelihood.unwrap(),
        tuned.choice_likelihood.unwrap(),
    );
    assert!(
        lt >= 0.75 && lt >= lb,
        "choice likelihood: base {lb}, tuned {lt}"
    );
    let rows = [base, tuned];
    let md = markdown("parity", &rows, &examples);
    assert!(md.contains("| base | 0.0% | 0.0-32.4% |"), "{md}");
    // Half the answers are [True]: the constant answer scores 50%.
    assert!(
        md.contains("| constant answer `true` | 50.0% |")
            || md.contains("| constant answer `false` | 50.0% |"),
        "{md}"
    );
    assert_eq!(rows[1].replies.len(), 8);
    // A correct reply is well formed.
    assert!(rows[1].well_formed >= rows[1].accuracy);
    let out = EvalOutputs {
        markdown: Some(dir.join("table.md")),
        png: Some(dir.join("chart.png")),
        replies: Some(dir.join("replies.json")),
        summary: Some(dir.join("summary.json")),
    };
    write_outputs("parity", &rows, &examples, &out).unwrap();
    assert_eq!(
        &std::fs::read(dir.join("chart.png")).unwrap()[..4],
        b"\x89PNG"
    );
    let replies: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("replies.json")).unwrap()).unwrap();
    assert_eq!(replies["lora"].as_array().unwrap().len(), 8);
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["rows"][0]["correct"], 0);
    assert_eq!(summary["rows"][1]["n"], 8);
    assert_eq!(summary["constant"]["correct"], 4);
    assert_eq!(summary["rows"][1]["choice_likelihood"], lt);
}
