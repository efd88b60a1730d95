//! `dnd train`: a generator from collected checkpoints (or from the base model's answer loss).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use dnd_core::prompts::{read_prompts, read_systems};
use dnd_training::{data, Objective, TaskSet, TrainOptions};

use crate::common::{DEFAULT_BATCH, DEFAULT_ENCODER, DEFAULT_SEQ_LEN};

/// Train a generator from collected checkpoints and their tasks' prompts (resumable).
#[derive(clap::Args)]
pub struct Args {
    /// Starting checkpoint (`dnd init`): its configuration defines the generator.
    #[arg(long)]
    init: PathBuf,
    /// The Sentence-BERT folder.
    #[arg(long, default_value = DEFAULT_ENCODER)]
    encoder: PathBuf,
    /// A task as NAME=PROMPTS_FILE:CHECKPOINTS_DIR (the `collect` output), or
    /// NAME=TASK_FILE for --objective sft; repeat per task.
    #[arg(long = "task", required = true)]
    tasks: Vec<String>,
    /// Task names to leave out (held out for evaluation); repeatable.
    #[arg(long)]
    exclude: Vec<String>,
    /// What the generator learns from: `mse` (the paper: the checkpoints' tokens) or `sft`
    /// (the base model's answer loss on the tasks' examples with the generated LoRA
    /// applied; needs --model; keeps the --init checkpoint's token offset).
    #[arg(long, default_value = "mse", value_parser = ["mse", "sft"])]
    objective: String,
    /// The base model (folder or .gguf), for --objective sft.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Examples per step, for --objective sft.
    #[arg(long, default_value_t = DEFAULT_BATCH)]
    batch: usize,
    /// Most tokens per example, for --objective sft.
    #[arg(long, default_value_t = DEFAULT_SEQ_LEN)]
    seq_len: usize,
    /// Share of --objective sft task draws (the steps, with one task a step) whose examples
    /// the base model sees without their system prompt, so that only the generated adapter carries the task.
    #[arg(long, default_value_t = 0.0, value_parser = share)]
    bare_share: f64,
    /// Share of --objective sft task draws that also run the batch under the adapter made from
    /// another task's condition and add the shortfall of its loss below own + margin, so that
    /// adapters differ by task (`dnd similarity` measures how much they do).
    #[arg(long, default_value_t = 0.0, value_parser = share)]
    contrast_share: f64,
    /// The margin of --contrast-share, in mean answer-token loss (nats).
    #[arg(long, default_value_t = 0.5)]
    contrast_margin: f64,
    /// Add condition modulation to an unmodulated --init generator (ours: the condition's
    /// summary scales and shifts every stage's input; its weights start at zero, so training
    /// starts from what --init computes; README "Training a generator").
    #[arg(long)]
    modulate: bool,
    /// Draw --contrast-share's other task among the K tasks whose conditions (system prompts,
    /// or prompts) lie nearest by pooled encoder embedding; 0: any other task.
    #[arg(long, default_value_t = 0)]
    contrast_nearest: usize,
    /// Optimiser steps in total.
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-5)]
    lr: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    /// Predict the difference from the mean training checkpoint (saved in the generator as
    /// its token offset); see README "Results".
    #[arg(long)]
    mean_offset: bool,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 50)]
    warmup: usize,
    /// Gradient clipping (global L2 norm).
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    /// Distinct tasks per optimiser step, their gradients averaged (1: the paper's one task a
    /// step).
    #[arg(long, default_value_t = 1)]
    tasks_per_step: usize,
    /// Share of the task draws conditioned on one of the task's system prompts (the `system`
    /// fields of its prompts file) instead of N of its prompts: what serves requests whose
    /// adapter comes from their system prompt. 0 is the paper's recipe.
    #[arg(long, default_value_t = 0.0, value_parser = share)]
    system_share: f64,
    /// Seed of the task, checkpoint, prompt and noise draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output checkpoint (its training state goes beside it as .state.json).
    #[arg(long)]
    out: PathBuf,
    /// Loss-curve PNG.
    #[arg(long)]
    loss_png: Option<PathBuf>,
    /// Folder caching prompt encodings across runs.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Save every this many steps.
    #[arg(long, default_value_t = 100)]
    save_every: usize,
    /// Continue a stopped run from --out.
    #[arg(long)]
    resume: bool,
    /// Stop (saved, resumable) after this many steps in this invocation.
    #[arg(long)]
    stop_after: Option<usize>,
}

impl Args {
    /// The library's options: reads the tasks' files, and refuses flags of the other
    /// objective. The noise levels are the paper's, not flags.
    fn options(self) -> Result<TrainOptions> {
        let tasks = self
            .tasks
            .iter()
            .map(|t| parse_task(t))
            .collect::<Result<Vec<_>>>()?;
        let objective = match (self.objective.as_str(), self.model) {
            ("sft", Some(model)) => Objective::Sft {
                model,
                batch: self.batch,
                seq_len: self.seq_len,
                bare_share: self.bare_share,
                contrast_share: self.contrast_share,
                contrast_margin: self.contrast_margin,
                contrast_nearest: self.contrast_nearest,
            },
            ("sft", None) => bail!("--objective sft needs --model (the base model)"),
            (_, Some(_)) => bail!("--model is for --objective sft"),
            _ => Objective::Mse,
        };
        if matches!(objective, Objective::Mse)
            && (self.bare_share > 0.0 || self.contrast_share > 0.0)
        {
            bail!("--bare-share and --contrast-share are for --objective sft");
        }
        if self.mean_offset && matches!(objective, Objective::Sft { .. }) {
            bail!(
                "--mean-offset is for --objective mse (sft keeps the --init checkpoint's offset)"
            );
        }
        Ok(TrainOptions {
            init: self.init,
            encoder_dir: self.encoder,
            tasks,
            exclude: self.exclude,
            objective,
            steps: self.steps,
            lr: self.lr,
            weight_decay: self.weight_decay,
            mean_offset: self.mean_offset,
            warmup: self.warmup,
            grad_clip: self.grad_clip,
            tasks_per_step: self.tasks_per_step,
            system_share: self.system_share,
            condition_noise: 1e-4,
            target_noise: 1e-5,
            seed: self.seed,
            out: self.out,
            loss_png: self.loss_png,
            cache_dir: self.cache_dir,
            save_every: self.save_every,
            resume: self.resume,
            stop_after: self.stop_after,
            progress: true,
            modulate: self.modulate,
        })
    }
}

/// Trains (or continues training) and reports the loss and how often each task was drawn.
pub fn run(args: Args) -> Result<()> {
    let opts = args.options()?;
    let t0 = Instant::now();
    let report = dnd_training::train(&opts)?;
    eprintln!(
        "{} steps ({:.1} s in this run), loss {:.5} -> {:.5}, draws per task {:?}; wrote {}",
        report.losses.len(),
        t0.elapsed().as_secs_f64(),
        report.losses.first().copied().unwrap_or(f32::NAN),
        report.losses.last().copied().unwrap_or(f32::NAN),
        report.task_steps,
        opts.out.display()
    );
    let gaps = &report.contrast_gaps;
    if !gaps.is_empty() {
        // What the contrast asks for, early and late: another task's adapter's answer loss
        // minus the task's own, averaged over a tenth of the contrast steps at either end.
        let k = gaps.len().div_ceil(10);
        let mean = |g: &[f32]| g.iter().sum::<f32>() / g.len() as f32;
        eprintln!(
            "contrast: {} task draws, loss gap to another task's adapter {:.3} (first {k}) -> {:.3} (last {k})",
            gaps.len(),
            mean(&gaps[..k]),
            mean(&gaps[gaps.len() - k..])
        );
    }
    Ok(())
}

/// `NAME=PROMPTS_FILE:CHECKPOINTS_DIR` to a training task (checkpoints: the PEFT folders inside).
fn parse_task(s: &str) -> Result<TaskSet> {
    let (name, rest) = s
        .split_once('=')
        .with_context(|| format!("--task {s:?}: expected NAME=PROMPTS_FILE:CHECKPOINTS_DIR"))?;
    // Without a checkpoint folder (enough for --objective sft) the task has no targets.
    let (prompts, dir) = match rest.rsplit_once(':') {
        Some((p, d)) => (p, Some(d)),
        None => (rest, None),
    };
    let mut checkpoints: Vec<PathBuf> = Vec::new();
    if let Some(dir) = dir {
        checkpoints = std::fs::read_dir(dir)
            .with_context(|| format!("--task {name}: reading {dir}"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("adapter_config.json").exists())
            .collect();
        checkpoints.sort();
        if checkpoints.is_empty() {
            bail!("--task {name}: no PEFT checkpoint folders in {dir}");
        }
    }
    Ok(TaskSet {
        name: name.to_string(),
        prompts: read_prompts(prompts).with_context(|| {
            format!("--task {s:?}: expected NAME=PROMPTS_FILE:CHECKPOINTS_DIR (or NAME=TASK_FILE for --objective sft)")
        })?,
        systems: read_systems(prompts)?,
        // Labelled examples when the prompts file is a task file (what --objective sft needs;
        // training says so when a task has none).
        examples: data::read_examples(prompts).unwrap_or_default(),
        checkpoints,
    })
}

/// A share in [0, 1].
fn share(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a share between 0 and 1")),
    }
}
