//! `collect`: LoRA fine-tuning of a base model on one task, saving a PEFT checkpoint at each of
//! the last K steps (the checkpoints a generator learns from).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, D};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::adamw::{AdamW, AdamWConfig};
use super::backward::lora_gradients;
use super::data::{encode, read_examples, Sequence};
use super::lora::TrainableLora;
use super::model::CausalLm;
use dnd_core::adapters::{BaseModelShape, Module};
use dnd_core::error::{read_to_string, DndError, Result};

/// What `collect` trains and where it writes.
#[derive(Debug, Clone)]
pub struct CollectOptions {
    /// Model folder (config.json, tokenizer.json, safetensors) or `.gguf` file.
    pub model_dir: PathBuf,
    /// Task file.
    pub task: PathBuf,
    /// Output folder: `step-NNNNN/` PEFT folders.
    pub out: PathBuf,
    /// LoRA rank.
    pub rank: usize,
    /// LoRA alpha.
    pub alpha: f64,
    /// Adapted modules.
    pub modules: Vec<Module>,
    /// AdamW learning rate.
    pub lr: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Optimiser steps.
    pub steps: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Most tokens per sequence.
    pub seq_len: usize,
    /// Checkpoints kept: one after each of the last `keep_last` steps.
    pub keep_last: usize,
    /// Extra checkpoints after these steps, under `out/early/` (a fine-tuning curve to compare
    /// against; not training targets, which are the direct `step-NNNNN` children).
    pub save_at: Vec<usize>,
    /// Seed of the LoRA init and the example order.
    pub seed: u64,
    /// Save the resumable state every this many steps (and when the run stops).
    pub save_every: usize,
    /// Continue from the state saved in `out`, when there is one.
    pub resume: bool,
    /// Stop (state saved, resumable) after this many steps in this invocation.
    pub stop_after: Option<usize>,
    /// Show a progress bar.
    pub progress: bool,
}

/// Mean next-token cross-entropy over the answer tokens of a padded batch, from the final hidden
/// states `(B, T, hidden)` of [`CausalLm::hidden`]. Only the positions that predict an answer
/// token go through the output projection.
pub fn answer_loss(model: &CausalLm, hidden: &Tensor, batch: &[Sequence]) -> Result<Tensor> {
    let (b, t, h) = hidden.dims3()?;
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (i, s) in batch.iter().enumerate().take(b) {
        for (p, token) in s.answer_targets().take_while(|&(p, _)| p + 1 < t) {
            rows.push((i * t + p) as u32);
            targets.push(token);
        }
    }
    if rows.is_empty() {
        return Err(DndError::InvalidInput(
            "a batch without answer tokens".into(),
        ));
    }
    let device = hidden.device();
    let n = rows.len();
    let rows = Tensor::from_vec(rows, n, device)?;
    let targets = Tensor::from_vec(targets, (n, 1), device)?;
    let picked = hidden.reshape((b * t, h))?.index_select(&rows, 0)?;
    let logp = candle_nn::ops::log_softmax(&model.logits(&picked)?, D::Minus1)?;
    Ok((logp.gather(&targets, D::Minus1)?.sum_all()? / -(n as f64))?)
}

/// Token ids `(B, T)` of a batch, right-padded with `pad` to its longest sequence.
pub fn pad_batch(batch: &[Sequence], pad: u32, device: &Device) -> Result<Tensor> {
    let t = batch.iter().map(|s| s.ids.len()).max().unwrap_or(1);
    let mut ids = Vec::with_capacity(batch.len() * t);
    for s in batch {
        ids.extend_from_slice(&s.ids);
        ids.extend(std::iter::repeat_n(pad, t - s.ids.len()));
    }
    Ok(Tensor::from_vec(ids, (batch.len(), t), device)?)
}

/// One step of `collect`: the loss and LoRA gradients of `batch` by the explicit backward pass,
/// then an AdamW update of the factors. Returns the loss.
pub fn train_step(
    model: &CausalLm,
    lora: &TrainableLora,
    opt: &mut AdamW,
    batch: &[Sequence],
) -> Result<f32> {
    let g = lora_gradients(model, batch, &lora.detached()?)?;
    opt.step(lora, &g.grads)?;
    Ok(g.loss)
}

/// Where an interrupted run's state lives inside the output folder.
const STATE: &str = "collect-state";

/// What a resumed run must agree on with the run it continues.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Fingerprint {
    model: String,
    task: String,
    rank: usize,
    alpha: f64,
    modules: Vec<String>,
    lr: f64,
    weight_decay: f64,
    batch: usize,
    seq_len: usize,
    seed: u64,
}

impl Fingerprint {
    fn of(opts: &CollectOptions) -> Self {
        Self {
            model: opts.model_dir.display().to_string(),
            task: opts.task.display().to_string(),
            rank: opts.rank,
            alpha: opts.alpha,
            modules: opts.modules.iter().map(|m| m.name().to_string()).collect(),
            lr: opts.lr,
            weight_decay: opts.weight_decay,
            batch: opts.batch,
            seq_len: opts.seq_len,
            seed: opts.seed,
        }
    }
}

/// The progress file beside the factor and moment tensors.
#[derive(Debug, Serialize, Deserialize)]
struct Progress {
    fingerprint: Fingerprint,
    step: usize,
    losses: Vec<f32>,
}

/// The example order: a seeded shuffle, reshuffled at each pass over the examples.
struct Order {
    rng: rand::rngs::StdRng,
    order: Vec<usize>,
    cursor: usize,
}

impl Order {
    fn new(n: usize, seed: u64) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut rng);
        Self {
            rng,
            order,
            cursor: 0,
        }
    }

    fn next_batch(&mut self, size: usize) -> Vec<usize> {
        (0..size.min(self.order.len()))
            .map(|_| {
                if self.cursor == self.order.len() {
                    self.order.shuffle(&mut self.rng);
                    self.cursor = 0;
                }
                self.cursor += 1;
                self.order[self.cursor - 1]
            })
            .collect()
    }
}

fn save_state(out: &Path, lora: &TrainableLora, opt: &AdamW, progress: &Progress) -> Result<()> {
    let mut tensors = opt.state();
    for t in lora.targets() {
        let (a, b) = lora.var(t).expect("a trained target");
        let key = format!("{}.{}", t.layer, t.module.name());
        tensors.insert(format!("{key}.a"), a.as_tensor().detach());
        tensors.insert(format!("{key}.b"), b.as_tensor().detach());
    }
    // Written aside then renamed, so an interruption mid-save leaves the previous state whole.
    let tmp = out.join(format!("{STATE}.tmp.safetensors"));
    candle_core::safetensors::save(&tensors, &tmp)?;
    let json = out.join(format!("{STATE}.tmp.json"));
    let text = serde_json::to_string(progress).map_err(|e| DndError::json(json.display(), e))?;
    std::fs::write(&json, text).map_err(|e| DndError::io(&json, e))?;
    let (st, pj) = (
        out.join(format!("{STATE}.safetensors")),
        out.join(format!("{STATE}.json")),
    );
    std::fs::rename(&tmp, &st).map_err(|e| DndError::io(&st, e))?;
    std::fs::rename(&json, &pj).map_err(|e| DndError::io(&pj, e))?;
    Ok(())
}

/// Restores factors and moments from a saved state; returns the optimiser and progress.
fn load_state(
    out: &Path,
    opts: &CollectOptions,
    lora: &TrainableLora,
    cfg: AdamWConfig,
    device: &Device,
) -> Result<Option<(AdamW, Progress)>> {
    let pj = out.join(format!("{STATE}.json"));
    if !pj.exists() {
        return Ok(None);
    }
    let progress: Progress =
        serde_json::from_str(&read_to_string(&pj)?).map_err(|e| DndError::json(pj.display(), e))?;
    let want = Fingerprint::of(opts);
    if progress.fingerprint != want {
        return Err(DndError::InvalidInput(format!(
            "--resume: {} was written by a run with other settings ({:?}); this run has {:?}",
            pj.display(),
            progress.fingerprint,
            want
        )));
    }
    let st = out.join(format!("{STATE}.safetensors"));
    let tensors = candle_core::safetensors::load(&st, device)?;
    for t in lora.targets() {
        let (a, b) = lora.var(t).expect("a trained target");
        let key = format!("{}.{}", t.layer, t.module.name());
        for (var, k) in [(a, "a"), (b, "b")] {
            let saved = tensors
                .get(&format!("{key}.{k}"))
                .ok_or_else(|| DndError::Incompatible(format!("{}: no {key}.{k}", st.display())))?;
            var.set(saved)?;
        }
    }
    let opt = AdamW::restore(cfg, lora, &tensors, progress.step as u64, device)?;
    Ok(Some((opt, progress)))
}

/// Fine-tunes and writes the checkpoints; returns the loss of every step (of the resumed run
/// too, when resuming).
///
/// Each step's loss and LoRA gradients come from the explicit backward pass
/// ([`super::backward::lora_gradients`]); AdamW is PyTorch's ([`AdamW`]). The state (factors,
/// moments, losses) is saved in the output folder every `save_every` steps and when the run
/// stops, so `resume` continues an interrupted run exactly.
pub fn collect(opts: &CollectOptions) -> Result<Vec<f32>> {
    let device = Device::Cpu;
    let (model, tok, eos) = super::load_base_model(&opts.model_dir, &device)?;
    let shape = BaseModelShape::from_path(&opts.model_dir)?;
    let examples = read_examples(&opts.task)?;
    let seqs: Vec<Sequence> = examples
        .iter()
        .map(|e| encode(&tok, e, opts.seq_len, eos))
        .collect::<Result<_>>()?;
    let lora = TrainableLora::new(
        &shape,
        &opts.modules,
        opts.rank,
        opts.alpha,
        opts.seed,
        &device,
    )?;
    let cfg = AdamWConfig {
        lr: opts.lr,
        weight_decay: opts.weight_decay,
        ..Default::default()
    };
    std::fs::create_dir_all(&opts.out).map_err(|e| DndError::io(&opts.out, e))?;
    let (mut opt, mut progress) = match opts
        .resume
        .then(|| load_state(&opts.out, opts, &lora, cfg, &device))
        .transpose()?
        .flatten()
    {
        Some(resumed) => resumed,
        None => (
            AdamW::new(cfg),
            Progress {
                fingerprint: Fingerprint::of(opts),
                step: 0,
                losses: Vec::new(),
            },
        ),
    };
    let mut order = Order::new(seqs.len(), opts.seed);
    for _ in 0..progress.step {
        order.next_batch(opts.batch);
    }
    let bar = super::progress_bar(opts.steps, "collect", opts.progress);
    bar.set_position(progress.step.min(opts.steps) as u64);
    let name = opts
        .model_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    let last = opts
        .stop_after
        .map_or(opts.steps, |n| opts.steps.min(progress.step + n));
    while progress.step < last {
        let step = progress.step + 1;
        let batch: Vec<Sequence> = order
            .next_batch(opts.batch)
            .into_iter()
            .map(|i| seqs[i].clone())
            .collect();
        let loss = train_step(&model, &lora, &mut opt, &batch)?;
        progress.losses.push(loss);
        progress.step = step;
        bar.set_message(format!("loss {loss:.4}"));
        bar.inc(1);
        if step + opts.keep_last > opts.steps {
            let dir = opts.out.join(format!("step-{step:05}"));
            lora.snapshot()?.save_peft(&dir, name.as_deref())?;
        }
        if opts.save_at.contains(&step) {
            let dir = opts.out.join("early").join(format!("step-{step:05}"));
            lora.snapshot()?.save_peft(&dir, name.as_deref())?;
        }
        if step % opts.save_every.max(1) == 0 || step == last {
            save_state(&opts.out, &lora, &opt, &progress)?;
        }
    }
    bar.finish();
    Ok(progress.losses)
}
