//! `train` on the golden tiny Qwen2: LoRA checkpoints collected for two tasks, a small generator
//! trained on one of them (the other held out): the loss falls, the held-out task is never
//! drawn, the loss curve is a PNG, a second run reads every prompt encoding from the cache, a
//! resumed run continues where the first stopped, and the result generates adapters.

use dnd_core::test_util as common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{encoder_dir, golden_path};
use dnd_core::adapters::TokenLayout;
use dnd_core::adapters::{BaseModelShape, LoraAdapter, LoraSpec, Module};
use dnd_core::generator::{checkpoint, presets, ConditionDecoder, GeneratorConfig};
use dnd_core::{Generator, LoadOptions};
use dnd_training::data::{encode, read_examples};
use dnd_training::generator::through_base_model;
use dnd_training::{
    collect, load_base_model, train, CollectOptions, Objective, TaskSet, TrainOptions,
};

fn write_task(dir: &Path, name: &str, f: impl Fn(usize) -> (String, String)) -> PathBuf {
    let items: Vec<serde_json::Value> = (0..12)
        .map(|i| {
            let (p, r) = f(i);
            serde_json::json!({"prompt": p, "response": r})
        })
        .collect();
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string(&items).unwrap()).unwrap();
    path
}

fn collect_task(dir: &Path, task: &Path, name: &str) -> Vec<PathBuf> {
    let out = dir.join(format!("ckpt-{name}"));
    collect(&CollectOptions {
        model_dir: golden_path("tiny-qwen2"),
        task: task.to_path_buf(),
        out: out.clone(),
        rank: 2,
        alpha: 4.0,
        modules: Module::ALL.to_vec(),
        lr: 1e-2,
        weight_decay: 0.0,
        steps: 6,
        batch: 2,
        seq_len: 48,
        keep_last: 3,
        save_at: vec![],
        seed: 1,
        save_every: 10,
        resume: false,
        stop_after: None,
        progress: false,
    })
    .unwrap();
    // The PEFT folders, as `dnd train --task` takes them (not the resumable state files).
    let mut v: Vec<PathBuf> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("adapter_config.json").exists())
        .collect();
    v.sort();
    v
}

#[test]
fn generator_training_learns_skips_held_out_tasks_caches_and_resumes() {
    let dir = std::env::temp_dir().join(format!("dnd-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let parity = write_task(&dir, "parity", |i| {
        (
            format!("Is {i} even?"),
            if i % 2 == 0 { "[True]" } else { "[False]" }.into(),
        )
    });
    let letters = write_task(&dir, "letters", |i| {
        (
            format!("Which letter follows {}?", (b'a' + i as u8) as char),
            format!("[{}]", (b'b' + i as u8) as char),
        )
    });
    let tasks = vec![
        TaskSet {
            name: "parity".into(),
            prompts: dnd_core::prompts::read_prompts(&parity).unwrap(),
            systems: vec!["Say whether the number is even.".into()],
            checkpoints: collect_task(&dir, &parity, "parity"),
            examples: read_examples(&parity).unwrap(),
        },
        TaskSet {
            name: "letters".into(),
            prompts: dnd_core::prompts::read_prompts(&letters).unwrap(),
            systems: Vec::new(),
            checkpoints: collect_task(&dir, &letters, "letters"),
            examples: read_examples(&letters).unwrap(),
        },
    ];
    let shape = BaseModelShape::from_path(golden_path("tiny-qwen2")).unwrap();
    let spec = LoraSpec {
        rank: 2,
        alpha: 4.0,
        chunk_width: 32,
        target_modules: Module::ALL.to_vec(),
    };
    let cfg = GeneratorConfig::new(
        shape,
        spec,
        presets::minilm(),
        4,
        16,
        None,
        &[[8, 16, 64]],
        3,
    )
    .unwrap();
    let (_, tensors) = ConditionDecoder::random(cfg.clone(), 5, &Device::Cpu, DType::F32).unwrap();
    let init = dir.join("init.safetensors");
    checkpoint::save(&init, &cfg, &tensors).unwrap();

    let opts = |out: &str, stop_after: Option<usize>, resume: bool| TrainOptions {
        init: init.clone(),
        encoder_dir: encoder_dir(),
        tasks: tasks.clone(),
        exclude: vec!["letters".into()],
        objective: Objective::Mse,
        steps: 60,
        lr: 3e-2,
        weight_decay: 0.0,
        mean_offset: false,
        warmup: 5,
        grad_clip: 1.0,
        tasks_per_step: 1,
        system_share: 0.0,
        condition_noise: 1e-4,
        target_noise: 1e-5,
        seed: 0,
        out: dir.join(out),
        loss_png: Some(dir.join(format!("{out}.png"))),
        cache_dir: Some(dir.join("enc-cache")),
        save_every: 20,
        resume,
        stop_after,
        progress: false,
        modulate: false,
    };
    let report = train(&opts("gen.safetensors", None, false)).unwrap();
    let l = &report.losses;
    assert_eq!(l.len(), 60);
    let head: f32 = l[..5].iter().sum::<f32>() / 5.0;
    let tail: f32 = l[55..].iter().sum::<f32>() / 5.0;
    assert!(tail < 0.7 * head, "loss did not fall: {head} -> {tail}");
    assert_eq!(report.task_steps.keys().collect::<Vec<_>>(), ["parity"]);
    assert_eq!(report.encoded_prompts, 12, "each prompt encoded once");
    assert_eq!(report.system_steps, 0);
    let png = std::fs::read(dir.join("gen.safetensors.png")).unwrap();
    assert_eq!(&png[..4], b"\x89PNG");

    // The same run again, stopped after 40 steps: every encoding from the disk cache, the
    // same losses (seeded draws; multi-threaded sums may differ in the last bits).
    let close = |a: f32, b: f32| (a - b).abs() <= 1e-4 * b.abs().max(1e-3);
    let part = train(&opts("gen2.safetensors", Some(40), false)).unwrap();
    assert_eq!(part.encoded_prompts, 0);
    assert_eq!(part.losses.len(), 40);
    assert!(
        part.losses.iter().zip(l).all(|(a, b)| close(*a, *b)),
        "{:?}",
        part.losses
    );
    // Resumed to 60: the same weights and draws at step 40 (AdamW moments restart, so later
    // steps may drift a little).
    let resumed = train(&opts("gen2.safetensors", None, true)).unwrap();
    assert_eq!(resumed.losses.len(), 60);
    assert!(
        close(resumed.losses[40], l[40]),
        "{} vs {}",
        resumed.losses[40],
        l[40]
    );

    // Two tasks a step: each step draws both (distinct), and a step cannot draw more tasks
    // than there are.
    let mut both = opts("gen-both.safetensors", Some(6), false);
    both.exclude.clear();
    both.tasks_per_step = 2;
    let r = train(&both).unwrap();
    assert_eq!(r.losses.len(), 6);
    assert_eq!(
        r.task_steps.into_iter().collect::<Vec<_>>(),
        [("letters".to_string(), 6), ("parity".to_string(), 6)]
    );
    // Resuming it with another number of tasks a step would mix two runs: refused.
    both.tasks_per_step = 1;
    both.resume = true;
    let err = train(&both).unwrap_err().to_string();
    assert!(err.contains("trained with 2 tasks a step"), "{err}");
    both.resume = false;
    both.tasks_per_step = 3;
    let err = train(&both).unwrap_err().to_string();
    assert!(err.contains("between 1 and the 2 training tasks"), "{err}");

    // System-prompt conditions: every step with a share of 1 (only the instruction is encoded),
    // some with a share of 1/2; a task without a system prompt cannot take part.
    let mut all_system = opts("gen-sys.safetensors", Some(8), false);
    all_system.system_share = 1.0;
    all_system.cache_dir = None;
    let r = train(&all_system).unwrap();
    assert_eq!((r.system_steps, r.encoded_prompts), (8, 1));
    let mut half = opts("gen-half.safetensors", Some(40), false);
    half.system_share = 0.5;
    let r = train(&half).unwrap();
    assert!((10..=30).contains(&r.system_steps), "{}", r.system_steps);
    half.exclude.clear();
    let err = train(&half).unwrap_err().to_string();
    assert!(err.contains("letters has no system prompt"), "{err}");

    let g = Generator::load(
        dir.join("gen.safetensors"),
        encoder_dir(),
        &LoadOptions::default(),
    )
    .unwrap();
    assert!(g.config().note.as_deref().unwrap().contains("parity"));
    let a = g.generate(&["Is 4 even?"]).unwrap();
    a.check_finite().unwrap();
    assert!(g.condition_decoder().token_offset().is_none());

    // With the mean offset, the checkpoint carries the mean of the training checkpoints' tokens
    // and the decoder adds it to what the network predicts.
    let mut o = opts("gen-offset.safetensors", Some(3), false);
    o.mean_offset = true;
    train(&o).unwrap();
    let (cfg, vb) =
        checkpoint::open(dir.join("gen-offset.safetensors"), &Device::Cpu, DType::F32).unwrap();
    let mut dec = ConditionDecoder::new(cfg, vb).unwrap();
    let layout = dec.layout().clone();
    let targets: Vec<Tensor> = tasks[0]
        .checkpoints
        .iter()
        .map(|c| {
            layout
                .tokenize(
                    &LoraAdapter::load_peft(c, &Device::Cpu).unwrap(),
                    &Device::Cpu,
                )
                .unwrap()
        })
        .collect();
    let n = targets.len() as f64;
    let mut mean = targets[0].clone();
    for t in &targets[1..] {
        mean = (mean + t).unwrap();
    }
    let mean = (mean / n).unwrap();
    let offset = dec.token_offset().unwrap().clone();
    assert!(common::max_abs_diff(&offset, &mean) <= 1e-6);
    let cond = g.condition(&["Is 4 even?"]).unwrap();
    let with = dec.forward(&cond).unwrap();
    dec.set_token_offset(None).unwrap();
    let without = dec.forward(&cond).unwrap();
    let added = (with - without).unwrap().squeeze(0).unwrap();
    assert!(common::max_abs_diff(&added, &mean) <= 1e-5);
    let wrong = offset.narrow(0, 1, offset.dim(0).unwrap() - 1).unwrap();
    assert!(dec.set_token_offset(Some(wrong)).is_err());

    // Through the base model (SFT), from the offset checkpoint: the answer loss falls, and the
    // starting checkpoint's offset is kept.
    let mut sft = opts("gen-sft.safetensors", None, false);
    sft.init = dir.join("gen-offset.safetensors");
    sft.objective = Objective::Sft {
        model: golden_path("tiny-qwen2"),
        batch: 4,
        seq_len: 48,
        bare_share: 0.0,
        contrast_share: 0.0,
        contrast_margin: 0.0,
        contrast_nearest: 0,
    };
    sft.steps = 40;
    sft.lr = 1e-2;
    let r = train(&sft).unwrap();
    let plain_first = r.losses[0];
    let head: f32 = r.losses[..5].iter().sum::<f32>() / 5.0;
    let tail: f32 = r.losses[35..].iter().sum::<f32>() / 5.0;
    assert!(
        tail < 0.8 * head,
        "answer loss did not fall: {head} -> {tail}"
    );
    let (cfg, vb) =
        checkpoint::open(dir.join("gen-sft.safetensors"), &Device::Cpu, DType::F32).unwrap();
    let kept = ConditionDecoder::new(cfg, vb).unwrap();
    assert!(common::max_abs_diff(kept.token_offset().unwrap(), &offset) == 0.0);
    // Contrast: both tasks, every step also under the other task's adapter. The gap between
    // the two answer losses is what the hinge widens; it needs a second task.
    let mut contrast = sft.clone();
    contrast.out = dir.join("gen-contrast.safetensors");
    contrast.exclude.clear();
    contrast.steps = 30;
    contrast.lr = 3e-3;
    contrast.objective = Objective::Sft {
        model: golden_path("tiny-qwen2"),
        batch: 4,
        seq_len: 48,
        bare_share: 0.0,
        contrast_share: 1.0,
        contrast_margin: 2.0,
        contrast_nearest: 0,
    };
    let r = train(&contrast).unwrap();
    let g = &r.contrast_gaps;
    assert_eq!(g.len(), 30);
    let head: f32 = g[..5].iter().sum::<f32>() / 5.0;
    let tail: f32 = g[25..].iter().sum::<f32>() / 5.0;
    // The same run with a zero margin (the hinge idle while the own adapter is no worse)
    // records the gap plain SFT leaves.
    let mut idle = contrast.clone();
    idle.out = dir.join("gen-contrast-idle.safetensors");
    if let Objective::Sft {
        contrast_margin, ..
    } = &mut idle.objective
    {
        *contrast_margin = 0.0;
    }
    let g0 = train(&idle).unwrap().contrast_gaps;
    let idle_tail: f32 = g0[25..].iter().sum::<f32>() / 5.0;
    eprintln!("contrast gap {head} -> {tail}; with a zero margin -> {idle_tail}");
    assert!(tail > head + 0.2, "the gap did not widen: {head} -> {tail}");
    assert!(
        tail > idle_tail + 0.2,
        "{tail} vs {idle_tail} without the contrast"
    );
    contrast.exclude = vec!["letters".into()];
    let err = train(&contrast).unwrap_err().to_string();
    assert!(err.contains("at least two tasks"), "{err}");
    // Nearest partners without a contrast share would be ignored: refused instead.
    let mut stray = idle.clone();
    if let Objective::Sft {
        contrast_share,
        contrast_nearest,
        ..
    } = &mut stray.objective
    {
        (*contrast_share, *contrast_nearest) = (0.0, 1);
    }
    let err = train(&stray).unwrap_err().to_string();
    assert!(err.contains("needs a contrast share"), "{err}");
    // Condition modulation added to the unmodulated generator: its first step is the plain
    // run's (the modulation starts at zero), its weights then move, and the checkpoint it
    // writes loads as a modulated generator.
    let mut modulated = sft.clone();
    modulated.out = dir.join("gen-modulated.safetensors");
    modulated.steps = 8;
    modulated.modulate = true;
    let m = train(&modulated).unwrap();
    assert!(
        (m.losses[0] - plain_first).abs() < 1e-4,
        "{} vs {plain_first}",
        m.losses[0]
    );
    let (cfg, vb) = checkpoint::open(&modulated.out, &Device::Cpu, DType::F32).unwrap();
    assert!(cfg.modulated);
    assert!(ConditionDecoder::new(cfg, vb)
        .unwrap()
        .modulation()
        .is_some());
    let saved = candle_core::safetensors::load(&modulated.out, &Device::Cpu).unwrap();
    let moved = saved["modulation.1.gamma"]
        .abs()
        .unwrap()
        .sum_all()
        .unwrap();
    assert!(moved.to_scalar::<f32>().unwrap() > 0.0);
    // Without labelled examples there is nothing to train on.
    sft.tasks[0].examples.clear();
    let err = train(&sft).unwrap_err().to_string();
    assert!(err.contains("no labelled examples"), "{err}");
}

/// The SFT surrogate's gradient with respect to the tokens is the derivative of the answer
/// loss: central differences through the detokenized adapter agree, for core values and for
/// the encoded statistics.
#[test]
fn sft_gradient_matches_finite_differences() {
    let dev = Device::Cpu;
    let (model, tok, eos) = load_base_model(golden_path("tiny-qwen2"), &dev).unwrap();
    let shape = BaseModelShape::from_path(golden_path("tiny-qwen2")).unwrap();
    let layout = TokenLayout::new(
        shape,
        LoraSpec {
            rank: 2,
            alpha: 4.0,
            chunk_width: 32,
            target_modules: Module::ALL.to_vec(),
        },
    )
    .unwrap();
    let (th, tw) = layout.token_shape();
    // Seeded normal tokens (Box-Muller), std 0.3.
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(11);
    let n = layout.num_tokens() * th * tw;
    let values: Vec<f32> = (0..n)
        .map(|_| {
            let (u1, u2): (f32, f32) = (
                rand::Rng::random_range(&mut rng, 1e-6..1.0),
                rand::Rng::random(&mut rng),
            );
            0.3 * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect();
    let tokens = Tensor::from_vec(values, (layout.num_tokens(), th, tw), &dev).unwrap();
    let ex = |p: &str, r: &str| dnd_training::data::Example {
        prompt: p.into(),
        response: r.into(),
        system: Some("Answer briefly.".into()),
    };
    let batch: Vec<_> = [ex("Is 4 even?", "[True]"), ex("Is 7 even?", "[False]")]
        .iter()
        .map(|e| encode(&tok, e, 48, eos).unwrap())
        .collect();
    let var = candle_core::Var::from_tensor(&tokens).unwrap();
    let (loss, surrogate) = through_base_model(&model, &layout, var.as_tensor(), &batch).unwrap();
    let grad = surrogate.backward().unwrap();
    let g = grad.get(var.as_tensor()).unwrap();
    let loss_at = |t: &Tensor| {
        let a = layout.detokenize(t, &dev).unwrap();
        dnd_training::backward::lora_gradients(&model, &batch, &a)
            .unwrap()
            .loss
    };
    assert!((loss_at(&tokens) - loss).abs() < 1e-5);
    let flat_g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
    // The entries with the largest gradient: anywhere (a core value), in the statistics rows
    // (encoded means at even columns, stds at odd ones), and in the statistics columns.
    let (r, c) = (2, 32);
    let largest = |keep: &dyn Fn(usize, usize) -> bool| {
        (0..flat_g.len())
            .filter(|&i| keep((i / tw) % th, i % tw))
            .max_by(|&a, &b| flat_g[a].abs().total_cmp(&flat_g[b].abs()))
            .unwrap()
    };
    let picks = [
        largest(&|_, _| true),
        largest(&|row, col| row >= r && col % 2 == 0),
        largest(&|row, col| row >= r && col % 2 == 1),
        largest(&|row, col| row < r && col == c + 1),
    ];
    for i in picks {
        let eps = 1e-2f32;
        let mut v: Vec<f32> = tokens.flatten_all().unwrap().to_vec1().unwrap();
        let orig = v[i];
        v[i] = orig + eps;
        let up = loss_at(&Tensor::from_vec(v.clone(), tokens.dims(), &dev).unwrap());
        v[i] = orig - eps;
        let down = loss_at(&Tensor::from_vec(v, tokens.dims(), &dev).unwrap());
        let numeric = (up - down) / (2.0 * eps);
        let analytic = flat_g[i];
        assert!(
            (numeric - analytic).abs() <= 0.05 * analytic.abs().max(1e-3),
            "entry {i}: finite differences {numeric}, surrogate {analytic}"
        );
    }
}
