//! `collect`: LoRA fine-tuning of a base model on one task, saving a PEFT checkpoint at each of
//! the last K steps (the checkpoints a generator learns from).

use std::path::PathBuf;

use candle_core::{Device, Tensor, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::data::{encode, read_examples, Sequence};
use super::lora::TrainableLora;
use super::model::CausalLm;
use crate::adapters::{BaseModelShape, Module};
use crate::error::{DndError, Result};

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
        // Position p predicts token p + 1; answer tokens start at `answer_from`.
        for p in s.answer_from.saturating_sub(1)..s.ids.len().min(t) - 1 {
            rows.push((i * t + p) as u32);
            targets.push(s.ids[p + 1]);
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

fn pad_batch(batch: &[Sequence], pad: u32, device: &Device) -> Result<Tensor> {
    let t = batch.iter().map(|s| s.ids.len()).max().unwrap_or(1);
    let mut ids = Vec::with_capacity(batch.len() * t);
    for s in batch {
        ids.extend_from_slice(&s.ids);
        ids.extend(std::iter::repeat_n(pad, t - s.ids.len()));
    }
    Ok(Tensor::from_vec(ids, (batch.len(), t), device)?)
}

/// Fine-tunes and writes the checkpoints; returns the loss of every step.
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
    let mut opt = AdamW::new(
        lora.vars(),
        ParamsAdamW {
            lr: opts.lr,
            weight_decay: opts.weight_decay,
            ..Default::default()
        },
    )?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.shuffle(&mut rng);
    let mut cursor = 0;
    let bar = super::progress_bar(opts.steps, "collect", opts.progress);
    let name = opts
        .model_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    let mut losses = Vec::with_capacity(opts.steps);
    for step in 1..=opts.steps {
        let mut batch = Vec::with_capacity(opts.batch);
        for _ in 0..opts.batch.min(seqs.len()) {
            if cursor == order.len() {
                order.shuffle(&mut rng);
                cursor = 0;
            }
            batch.push(seqs[order[cursor]].clone());
            cursor += 1;
        }
        let ids = pad_batch(&batch, eos, &device)?;
        let hidden = model.hidden(&ids, Some(&lora.adapter()?), None)?;
        let loss = answer_loss(&model, &hidden, &batch)?;
        opt.backward_step(&loss)?;
        let l = loss.to_scalar::<f32>()?;
        losses.push(l);
        bar.set_message(format!("loss {l:.4}"));
        bar.inc(1);
        if step + opts.keep_last > opts.steps {
            let dir = opts.out.join(format!("step-{step:05}"));
            lora.snapshot()?.save_peft(&dir, name.as_deref())?;
        }
        if opts.save_at.contains(&step) {
            let dir = opts.out.join("early").join(format!("step-{step:05}"));
            lora.snapshot()?.save_peft(&dir, name.as_deref())?;
        }
    }
    bar.finish();
    Ok(losses)
}
