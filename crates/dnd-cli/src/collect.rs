//! `dnd collect`: the LoRA checkpoints a generator is trained on.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use dnd_training::CollectOptions;

use crate::common::{
    parse_modules, DEFAULT_ALPHA, DEFAULT_BATCH, DEFAULT_MODULES, DEFAULT_RANK, DEFAULT_SEQ_LEN,
};

/// LoRA fine-tuning of a base model on one task file, keeping a PEFT checkpoint of each of
/// the last K steps (the adapters a generator is trained on).
#[derive(clap::Args)]
pub struct Args {
    /// Model folder (config.json, tokenizer.json, safetensors) or .gguf file; qwen2 or llama.
    #[arg(long)]
    model: PathBuf,
    /// Task file (JSON list of {prompt, response[, system]}).
    #[arg(long)]
    task: PathBuf,
    /// Output folder for the step-NNNNN/ PEFT checkpoints.
    #[arg(long)]
    out: PathBuf,
    /// LoRA rank.
    #[arg(long, default_value_t = DEFAULT_RANK)]
    rank: usize,
    /// LoRA alpha.
    #[arg(long, default_value_t = DEFAULT_ALPHA)]
    alpha: f64,
    /// Adapted modules, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = DEFAULT_MODULES)]
    modules: Vec<String>,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Optimiser steps.
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = DEFAULT_BATCH)]
    batch: usize,
    /// Most tokens per sequence (prompts are cut from the front).
    #[arg(long, default_value_t = DEFAULT_SEQ_LEN)]
    seq_len: usize,
    /// Keep a checkpoint after each of the last K steps.
    #[arg(long, default_value_t = 5)]
    keep_last: usize,
    /// Also save checkpoints after these steps, under OUT/early/ (comma-separated).
    #[arg(long, value_delimiter = ',')]
    save_at: Vec<usize>,
    /// Seed of the LoRA init and the example order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Save the resumable state (OUT/collect-state.*) every N steps, and when stopping.
    #[arg(long, default_value_t = 10)]
    save_every: usize,
    /// Continue the run whose state is in OUT (same settings; --steps may grow).
    #[arg(long)]
    resume: bool,
    /// Stop after this many steps of this invocation (state saved; continue with --resume).
    #[arg(long)]
    stop_after: Option<usize>,
}

impl Args {
    /// The library's options, with a progress bar; fails on an unknown module name.
    fn options(&self) -> Result<CollectOptions> {
        Ok(CollectOptions {
            model_dir: self.model.clone(),
            task: self.task.clone(),
            out: self.out.clone(),
            rank: self.rank,
            alpha: self.alpha,
            modules: parse_modules(&self.modules)?,
            lr: self.lr,
            weight_decay: self.weight_decay,
            steps: self.steps,
            batch: self.batch,
            seq_len: self.seq_len,
            keep_last: self.keep_last,
            save_at: self.save_at.clone(),
            seed: self.seed,
            save_every: self.save_every,
            resume: self.resume,
            stop_after: self.stop_after,
            progress: true,
        })
    }
}

/// Fine-tunes and reports the loss from the first to the last step.
pub fn run(args: Args) -> Result<()> {
    let opts = args.options()?;
    let (keep_last, steps) = (opts.keep_last, opts.steps);
    if keep_last == 0 || keep_last > steps {
        bail!("--keep-last must be between 1 and --steps ({steps})");
    }
    let t0 = Instant::now();
    let losses = dnd_training::collect(&opts)?;
    eprintln!(
        "{} steps in {:.1} s, loss {:.4} -> {:.4}; checkpoints of the last {keep_last} steps in {}",
        losses.len(),
        t0.elapsed().as_secs_f64(),
        losses.first().copied().unwrap_or(f32::NAN),
        losses.last().copied().unwrap_or(f32::NAN),
        opts.out.display()
    );
    Ok(())
}
