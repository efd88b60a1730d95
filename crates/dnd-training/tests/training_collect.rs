//! `collect` on the golden tiny Qwen2: the answer loss falls, the last K steps are saved as PEFT
//! checkpoints, and training starts exactly at the base model (B = 0).

use dnd_core::test_util as common;

use candle_core::{Device, Tensor};
use common::golden_path;
use dnd_core::adapters::{LoraAdapter, Module};
use dnd_training::collect::answer_loss;
use dnd_training::data::{encode, read_examples, Sequence};
use dnd_training::{collect, CausalLm, CollectOptions};

/// The answer loss of one example.
fn loss_of(model: &CausalLm, s: &Sequence, adapter: Option<&LoraAdapter>) -> f32 {
    let ids = Tensor::new(s.ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let hidden = model.hidden(&ids, adapter, None).unwrap();
    answer_loss(model, &hidden, std::slice::from_ref(s))
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn answer_loss_falls_and_last_steps_are_saved() {
    let dir = std::env::temp_dir().join(format!("dnd-collect-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let task = dir.join("task.json");
    // A task whose answer follows from the prompt: the parity of a digit.
    let examples: Vec<serde_json::Value> = (0..16)
        .map(|i| {
            serde_json::json!({
                "prompt": format!("Is {} even?", i % 10),
                "response": if i % 2 == 0 { "[True]" } else { "[False]" },
                "system": "Answer true or false."
            })
        })
        .collect();
    std::fs::write(&task, serde_json::to_string(&examples).unwrap()).unwrap();
    let out = dir.join("ckpt");
    let opts = CollectOptions {
        model_dir: golden_path("tiny-qwen2"),
        task: task.clone(),
        out: out.clone(),
        rank: 4,
        alpha: 8.0,
        modules: Module::ALL.to_vec(),
        lr: 1e-2,
        weight_decay: 0.0,
        steps: 30,
        batch: 4,
        seq_len: 64,
        keep_last: 3,
        save_at: vec![10],
        seed: 0,
        save_every: 10,
        resume: false,
        stop_after: None,
        progress: false,
    };
    let losses = collect(&opts).unwrap();
    assert_eq!(losses.len(), 30);
    let tail: f32 = losses[27..].iter().sum::<f32>() / 3.0;
    assert!(tail < 0.5 * losses[0], "loss did not fall: {losses:?}");

    // Step 1 starts from the base model: B = 0, so its loss is the base model's answer loss
    // on one of the examples' batches; check the scale with the whole task instead.
    let model = CausalLm::load(golden_path("tiny-qwen2"), &Device::Cpu).unwrap();
    let tok = tokenizers::Tokenizer::from_file(golden_path("tiny-qwen2/tokenizer.json")).unwrap();
    let seqs: Vec<_> = read_examples(&task)
        .unwrap()
        .iter()
        .map(|e| encode(&tok, e, 64, 258).unwrap())
        .collect();
    let base_losses: Vec<f32> = seqs.iter().map(|s| loss_of(&model, s, None)).collect();
    let (lo, hi) = base_losses
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &l| (a.min(l), b.max(l)));
    assert!(
        losses[0] >= lo - 1e-4 && losses[0] <= hi + 1e-4,
        "first loss {} outside the base model's per-example range [{lo}, {hi}]",
        losses[0]
    );

    let mut saved: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    saved.sort();
    assert_eq!(
        saved,
        [
            "collect-state.json",
            "collect-state.safetensors",
            "early",
            "step-00028",
            "step-00029",
            "step-00030"
        ]
    );
    assert!(out.join("early/step-00010/adapter_config.json").exists());
    let last = LoraAdapter::load_peft(out.join("step-00030"), &Device::Cpu).unwrap();
    assert_eq!(last.rank(), 4);
    assert_eq!(last.pairs().len(), 14);
    let b = &last.get(0, Module::Q).unwrap().b;
    let norm = b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(norm > 0.0, "B was trained");
    // The trained adapter lowers the base model's loss on the task.
    let with: f32 = seqs.iter().map(|s| loss_of(&model, s, Some(&last))).sum();
    let without: f32 = base_losses.iter().sum();
    assert!(with < 0.5 * without, "task loss {without} -> {with}");
}

/// The loss over gathered answer positions equals the cross-entropy computed by hand from the
/// full logits of the plain forward.
#[test]
fn answer_loss_is_the_mean_cross_entropy_of_the_answer_tokens() {
    let model = CausalLm::load(golden_path("tiny-qwen2"), &Device::Cpu).unwrap();
    let tok = tokenizers::Tokenizer::from_file(golden_path("tiny-qwen2/tokenizer.json")).unwrap();
    let ex = dnd_training::data::Example {
        prompt: "Is 4 even?".into(),
        response: "[True]".into(),
        system: Some("Answer true or false.".into()),
    };
    let s = encode(&tok, &ex, 64, 258).unwrap();
    let ids = Tensor::new(s.ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits: Vec<Vec<f32>> = model
        .forward(&ids, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    let mut total = 0.0f64;
    let mut n = 0;
    for p in s.answer_from - 1..s.ids.len() - 1 {
        let row = &logits[p];
        let max = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let lse = max
            + row
                .iter()
                .map(|&v| (v as f64 - max).exp())
                .sum::<f64>()
                .ln();
        total += lse - row[s.ids[p + 1] as usize] as f64;
        n += 1;
    }
    let want = total / n as f64;
    let got = loss_of(&model, &s, None) as f64;
    assert!((got - want).abs() < 1e-4, "loss {got}, by hand {want}");
}

/// An interrupted run resumed with `--resume` takes the same steps as one uninterrupted run:
/// the same losses and the same final factors, bit for bit; a resume with other settings is
/// refused.
#[test]
fn an_interrupted_collect_resumes_exactly() {
    let dir = std::env::temp_dir().join(format!("dnd-collect-resume-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let task = dir.join("task.json");
    let examples: Vec<serde_json::Value> = (0..10)
        .map(|i| {
            serde_json::json!({
                "prompt": format!("Is {i} odd?"),
                "response": if i % 2 == 1 { "[True]" } else { "[False]" },
            })
        })
        .collect();
    std::fs::write(&task, serde_json::to_string(&examples).unwrap()).unwrap();
    let opts = |out: &str| CollectOptions {
        model_dir: golden_path("tiny-llama"),
        task: task.clone(),
        out: dir.join(out),
        rank: 4,
        alpha: 8.0,
        modules: Module::ALL.to_vec(),
        lr: 1e-2,
        weight_decay: 0.01,
        // Batches of 3 over 10 examples: the resumed run must continue mid-epoch.
        steps: 9,
        batch: 3,
        seq_len: 64,
        keep_last: 2,
        save_at: vec![],
        seed: 7,
        save_every: 100,
        resume: false,
        stop_after: None,
        progress: false,
    };
    let whole = collect(&opts("whole")).unwrap();
    let first = collect(&CollectOptions {
        stop_after: Some(4),
        ..opts("parts")
    })
    .unwrap();
    assert_eq!(first.len(), 4);
    assert!(!dir.join("parts/step-00009").exists());
    let resumed = collect(&CollectOptions {
        resume: true,
        ..opts("parts")
    })
    .unwrap();
    assert_eq!(resumed, whole, "losses of the resumed run");
    for step in ["step-00008", "step-00009"] {
        let a = LoraAdapter::load_peft(dir.join("whole").join(step), &Device::Cpu).unwrap();
        let b = LoraAdapter::load_peft(dir.join("parts").join(step), &Device::Cpu).unwrap();
        for (t, p) in a.pairs() {
            let q = b.pairs().get(t).unwrap();
            assert_eq!(p.a.to_vec2::<f32>().unwrap(), q.a.to_vec2::<f32>().unwrap());
            assert_eq!(p.b.to_vec2::<f32>().unwrap(), q.b.to_vec2::<f32>().unwrap());
        }
    }
    let err = collect(&CollectOptions {
        resume: true,
        lr: 1e-3,
        ..opts("parts")
    })
    .expect_err("a resume with another learning rate is refused");
    assert!(err.to_string().contains("other settings"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
