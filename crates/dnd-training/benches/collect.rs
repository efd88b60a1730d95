//! LoRA training steps: `dnd collect`'s step (explicit backward + AdamW) next to PyTorch + PEFT
//! on the same batches, from the same initial factors, in the same run.
//!
//! ```sh
//! cargo bench --manifest-path crates/Cargo.toml --profile dev --bench collect -- --model .assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
//!     [--task ../shared/data/dnd/ARC-e_train.json] [--steps 6] [--batch 4] [--seq-len 256] \
//!     [--rank 8] [--alpha 16] [--lr 1e-3] [--context K] [--python .assets/bench-venv/bin/python] [--autograd]
//! ```
//!
//! `--context K` puts the text of the next K prompts before each prompt, so that every
//! sequence is cut to `--seq-len` tokens (the long-sequence memory check).
//!
//! The first `steps × batch` examples of the task file, tokenized as `collect` does, make the
//! batches; the factors start from `collect`'s seeded PEFT initialisation, B then set to small
//! seeded values so that the first step already has gradients for A. Each side runs in a
//! process of its own (peak RSS per side, model load included). `--python` (with torch,
//! transformers, peft and gguf) adds the PEFT row and the ratios; `--autograd` adds the plain
//! candle-autograd step that `collect` used before (slow, memory-hungry: for comparison).
//! Prints step times (the first step apart), tokens per second, peak RSS, ratios, and both
//! loss curves with their largest relative difference.

use std::path::{Path, PathBuf};
#[path = "../../../benches/util/mod.rs"]
mod util;

use std::process::Command;

use std::time::Instant;
use util::peak_rss_mib;

use candle_core::{Device, Tensor};
use dnd_core::adapters::{BaseModelShape, LoraAdapter, LoraPair, Module};
use dnd_training::adamw::{AdamW, AdamWConfig};
use dnd_training::collect::{answer_loss, pad_batch, train_step};
use dnd_training::data::{encode, read_examples, Sequence};
use dnd_training::{load_base_model, TrainableLora};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

fn opt<T: std::str::FromStr>(name: &str) -> Option<T> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .ok()
                .unwrap_or_else(|| panic!("{name}: bad value {v}"))
        })
}

fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

/// The settings both sides share, written to the work folder.
#[derive(Serialize, Deserialize)]
struct Plan {
    model: PathBuf,
    rank: usize,
    alpha: f64,
    lr: f64,
    weight_decay: f64,
    batches: Vec<Vec<Seq>>,
}

#[derive(Serialize, Deserialize, Clone)]
struct Seq {
    ids: Vec<u32>,
    answer_from: usize,
}

/// What one side measured.
#[derive(Serialize, Deserialize)]
struct Measured {
    load_s: f64,
    step_s: Vec<f64>,
    losses: Vec<f64>,
    peak_rss_mib: f64,
    tokens: Vec<usize>,
}

fn read_plan(work: &Path) -> Plan {
    serde_json::from_str(&std::fs::read_to_string(work.join("plan.json")).unwrap()).unwrap()
}

/// The child: run the plan's steps through `collect`'s step, or through autograd.
fn child(work: &Path, autograd: bool) {
    let plan = read_plan(work);
    let dev = Device::Cpu;
    let t0 = Instant::now();
    let (model, _, _) = load_base_model(&plan.model, &dev).unwrap();
    let init = LoraAdapter::load_peft(work.join("init"), &dev).unwrap();
    let lora = TrainableLora::from_adapter(&init).unwrap();
    let cfg = AdamWConfig {
        lr: plan.lr,
        weight_decay: plan.weight_decay,
        ..Default::default()
    };
    let mut adamw = AdamW::new(cfg);
    let mut candle_opt = <candle_nn::AdamW as candle_nn::Optimizer>::new(
        lora.vars(),
        candle_nn::ParamsAdamW {
            lr: plan.lr,
            weight_decay: plan.weight_decay,
            ..Default::default()
        },
    )
    .unwrap();
    let load_s = t0.elapsed().as_secs_f64();
    let mut m = Measured {
        load_s,
        step_s: vec![],
        losses: vec![],
        peak_rss_mib: 0.0,
        tokens: vec![],
    };
    for batch in &plan.batches {
        let seqs: Vec<Sequence> = batch
            .iter()
            .map(|s| Sequence {
                ids: s.ids.clone(),
                answer_from: s.answer_from,
            })
            .collect();
        let t = Instant::now();
        let loss = if autograd {
            use candle_nn::Optimizer;
            let ids = pad_batch(&seqs, 0, &dev).unwrap();
            let hidden = model
                .hidden(&ids, Some(&lora.adapter().unwrap()), None)
                .unwrap();
            let loss = answer_loss(&model, &hidden, &seqs).unwrap();
            candle_opt.backward_step(&loss).unwrap();
            loss.to_scalar::<f32>().unwrap()
        } else {
            train_step(&model, &lora, &mut adamw, &seqs).unwrap()
        };
        m.step_s.push(t.elapsed().as_secs_f64());
        m.losses.push(loss as f64);
        m.tokens.push(seqs.iter().map(|s| s.ids.len()).sum());
        eprintln!(
            "  step {}: {:.2} s, loss {loss:.4}",
            m.losses.len(),
            m.step_s.last().unwrap()
        );
    }
    m.peak_rss_mib = peak_rss_mib();
    println!("{}", serde_json::to_string(&m).unwrap());
}

fn run_side(args: &[&str]) -> Option<Measured> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("start the side");
    if !out.status.success() {
        eprintln!("  {} failed ({})", args.join(" "), out.status);
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().rev().find(|l| l.starts_with('{'))?;
    Some(serde_json::from_str(line).expect("a JSON line"))
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn main() {
    // Relative paths on the command line are the repository root's, as the README writes them
    // (cargo runs a bench in its package's folder).
    std::env::set_current_dir(dnd_core::test_util::repo_root()).expect("the repository root");
    if let Some(work) = opt::<PathBuf>("--child") {
        child(&work, flag("--child-autograd"));
        return;
    }
    let model: PathBuf = opt("--model").expect("--model FILE.gguf or folder");
    let task: PathBuf = opt("--task")
        .unwrap_or_else(|| Path::new("../shared/data/dnd/ARC-e_train.json").to_path_buf());
    let steps: usize = opt("--steps").unwrap_or(6);
    let batch: usize = opt("--batch").unwrap_or(4);
    let seq_len: usize = opt("--seq-len").unwrap_or(256);
    let rank: usize = opt("--rank").unwrap_or(8);
    let alpha: f64 = opt("--alpha").unwrap_or(16.0);
    let lr: f64 = opt("--lr").unwrap_or(1e-3);
    let python: Option<String> = opt("--python");
    // `--work DIR` keeps the plan (to profile one side: `collect --child DIR`).
    let keep: Option<PathBuf> = opt("--work");
    let work = keep.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("dnd-bench-collect-{}", std::process::id()))
    });
    std::fs::create_dir_all(&work).unwrap();

    // The plan: batches and initial factors.
    let dev = Device::Cpu;
    let (_, tok, eos) = load_base_model(&model, &dev).expect("the model");
    let examples = read_examples(&task).unwrap();
    // `--context K`: each prompt after the text of the next K prompts, so that sequences run
    // to `--seq-len` (the prompt is cut from the front): the long-sequence memory check.
    let context: usize = opt("--context").unwrap_or(0);
    let seqs: Vec<Seq> = (0..(steps * batch).min(examples.len()))
        .map(|i| {
            let mut e = examples[i].clone();
            if context > 0 {
                let more: Vec<&str> = (1..=context)
                    .map(|k| examples[(i + k) % examples.len()].prompt.as_str())
                    .collect();
                e.prompt = format!("{}\n\n{}", more.join("\n\n"), e.prompt);
            }
            let s = encode(&tok, &e, seq_len, eos).unwrap();
            Seq {
                ids: s.ids,
                answer_from: s.answer_from,
            }
        })
        .collect();
    let shape = BaseModelShape::from_path(&model).unwrap();
    let init = TrainableLora::new(&shape, &Module::ALL, rank, alpha, 0, &dev).unwrap();
    // Non-zero B (seeded), so A has a gradient from the first step on.
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let pairs = init
        .snapshot()
        .unwrap()
        .pairs()
        .iter()
        .map(|(t, p)| {
            let v: Vec<f32> = (0..p.b.elem_count())
                .map(|_| rng.random_range(-1e-3..1e-3))
                .collect();
            let b = Tensor::from_vec(v, p.b.shape(), &dev).unwrap();
            (*t, LoraPair { a: p.a.clone(), b })
        })
        .collect();
    LoraAdapter::new(rank, alpha, pairs)
        .unwrap()
        .save_peft(work.join("init"), None)
        .unwrap();
    let plan = Plan {
        model: model.clone(),
        rank,
        alpha,
        lr,
        weight_decay: 0.0,
        batches: seqs.chunks(batch).map(<[Seq]>::to_vec).collect(),
    };
    std::fs::write(
        work.join("plan.json"),
        serde_json::to_string(&plan).unwrap(),
    )
    .unwrap();
    std::fs::write(
        work.join("batches.json"),
        serde_json::to_string(&plan.batches).unwrap(),
    )
    .unwrap();
    let tokens: Vec<usize> = plan
        .batches
        .iter()
        .map(|b| b.iter().map(|s| s.ids.len()).sum())
        .collect();
    println!(
        "collect bench: {}, {} steps x {batch} examples of {} ({:.0} tokens a batch on average), \
         rank {rank}, alpha {alpha}, all 7 projections, AdamW lr {lr}, f32, {} threads",
        model.display(),
        plan.batches.len(),
        task.file_name().unwrap().to_string_lossy(),
        mean(&tokens.iter().map(|&t| t as f64).collect::<Vec<_>>()),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let exe = std::env::current_exe().unwrap();
    let exe = exe.to_str().unwrap();
    let w = work.to_str().unwrap();
    let mut rows: Vec<(&str, Measured)> = Vec::new();
    eprintln!("dnd collect step:");
    if let Some(m) = run_side(&[exe, "--child", w]) {
        rows.push(("dnd collect (explicit backward)", m));
    }
    if flag("--autograd") {
        eprintln!("candle autograd step:");
        if let Some(m) = run_side(&[exe, "--child", w, "--child-autograd"]) {
            rows.push(("candle autograd (before)", m));
        }
    }
    if let Some(py) = &python {
        eprintln!("PyTorch + PEFT:");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/collect_baseline.py");
        let lr_s = lr.to_string();
        let threads = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .to_string();
        let m = run_side(&[
            py,
            script,
            "--gguf",
            model.to_str().unwrap(),
            "--work",
            w,
            "--lr",
            &lr_s,
            "--weight-decay",
            "0",
            "--threads",
            &threads,
        ]);
        if let Some(m) = m {
            rows.push(("PyTorch + PEFT", m));
        }
    }

    let base = rows
        .iter()
        .find(|(n, _)| *n == "PyTorch + PEFT")
        .map(|(_, m)| m);
    println!();
    println!("| side | load s | first step s | later steps s (mean) | tokens/s | peak RSS MiB | step time vs PyTorch | peak RSS vs PyTorch |");
    println!("|---|---|---|---|---|---|---|---|");
    for (name, m) in &rows {
        let later = if m.step_s.len() > 1 {
            &m.step_s[1..]
        } else {
            &m.step_s[..]
        };
        let later_tokens: usize = if m.tokens.len() > 1 {
            m.tokens[1..].iter().sum()
        } else {
            m.tokens.iter().sum()
        };
        let (rt, rm) = match base {
            Some(b) => {
                let bl = if b.step_s.len() > 1 {
                    &b.step_s[1..]
                } else {
                    &b.step_s[..]
                };
                (
                    format!("{:.2}x", mean(later) / mean(bl)),
                    format!("{:.2}x", m.peak_rss_mib / b.peak_rss_mib),
                )
            }
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {name} | {:.1} | {:.2} | {:.2} | {:.0} | {:.0} | {rt} | {rm} |",
            m.load_s,
            m.step_s[0],
            mean(later),
            later_tokens as f64 / later.iter().sum::<f64>(),
            m.peak_rss_mib
        );
    }
    println!();
    print!("| step |");
    for (name, _) in &rows {
        print!(" loss: {name} |");
    }
    println!();
    println!("|---|{}", "---|".repeat(rows.len()));
    for i in 0..plan.batches.len() {
        print!("| {} |", i + 1);
        for (_, m) in &rows {
            print!(" {:.5} |", m.losses.get(i).copied().unwrap_or(f64::NAN));
        }
        println!();
    }
    if let (Some(b), Some((_, ours))) = (base, rows.first()) {
        let worst = ours
            .losses
            .iter()
            .zip(&b.losses)
            .map(|(a, b)| ((a - b) / b).abs())
            .fold(0.0, f64::max);
        println!();
        println!("largest relative loss difference, dnd collect vs PyTorch + PEFT: {worst:.2e}");
    }
    if keep.is_none() {
        let _ = std::fs::remove_dir_all(&work);
    }
}
