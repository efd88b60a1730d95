//! `train` on the golden tiny Qwen2: LoRA checkpoints collected for two tasks, a small generator
//! trained on one of them (the other held out): the loss falls, the held-out task is never
//! drawn, the loss curve is a PNG, a second run reads every prompt encoding from the cache, a
//! resumed run continues where the first stopped, and the result generates adapters.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{encoder_dir, golden_path};
use mistralrs_dnd::adapters::{BaseModelShape, LoraAdapter, LoraSpec, Module};
use mistralrs_dnd::generator::{checkpoint, presets, ConditionDecoder, GeneratorConfig};
use mistralrs_dnd::training::{collect, train, CollectOptions, TaskSet, TrainOptions};
use mistralrs_dnd::{Generator, LoadOptions};

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
            prompts: mistralrs_dnd::prompts::read_prompts(&parity).unwrap(),
            checkpoints: collect_task(&dir, &parity, "parity"),
        },
        TaskSet {
            name: "letters".into(),
            prompts: mistralrs_dnd::prompts::read_prompts(&letters).unwrap(),
            checkpoints: collect_task(&dir, &letters, "letters"),
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
        steps: 60,
        lr: 3e-2,
        weight_decay: 0.0,
        mean_offset: false,
        warmup: 5,
        grad_clip: 1.0,
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
    };
    let report = train(&opts("gen.safetensors", None, false)).unwrap();
    let l = &report.losses;
    assert_eq!(l.len(), 60);
    let head: f32 = l[..5].iter().sum::<f32>() / 5.0;
    let tail: f32 = l[55..].iter().sum::<f32>() / 5.0;
    assert!(tail < 0.7 * head, "loss did not fall: {head} -> {tail}");
    assert_eq!(report.task_steps.keys().collect::<Vec<_>>(), ["parity"]);
    assert_eq!(report.encoded_prompts, 12, "each prompt encoded once");
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
}
