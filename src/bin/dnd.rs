//! `dnd`: make, convert, inspect and run DnD generators from the command line.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use mistralrs_dnd::adapters::{BaseModelShape, LoraSpec, Module};
use mistralrs_dnd::convert::{convert_pth, ConvertOptions};
use mistralrs_dnd::generator::{checkpoint, presets, ConditionDecoder, GeneratorConfig};
use mistralrs_dnd::prompts::{read_prompts, sample_prompts};
use mistralrs_dnd::{Generator, LoadOptions, LoraAdapter};

#[derive(Parser)]
#[command(
    name = "dnd",
    version,
    about = "Drag-and-Drop LLMs: prompts to LoRA adapters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Dtype {
    F32,
    Bf16,
}

impl From<Dtype> for DType {
    fn from(d: Dtype) -> DType {
        match d {
            Dtype::F32 => DType::F32,
            Dtype::Bf16 => DType::BF16,
        }
    }
}

/// A generator checkpoint and the encoder it runs with.
#[derive(clap::Args)]
struct GeneratorFiles {
    /// The generator checkpoint.
    #[arg(long)]
    checkpoint: PathBuf,
    /// The Sentence-BERT folder.
    #[arg(long, default_value = ".assets/all-MiniLM-L6-v2")]
    encoder: PathBuf,
}

#[derive(clap::Args)]
struct LoraArgs {
    /// Base model: a model folder, its config.json, or a .gguf file.
    #[arg(long)]
    base_model: Option<PathBuf>,
    /// Name recorded in the checkpoint (defaults to the base model's file or folder name).
    #[arg(long)]
    base_model_name: Option<String>,
    /// LoRA rank of the adapters.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// LoRA alpha of the adapters.
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    /// Chunk width of the parameter tokens.
    #[arg(long)]
    chunk_width: Option<usize>,
    /// Adapted modules, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj,up_proj,gate_proj,down_proj"
    )]
    modules: Vec<String>,
}

impl LoraArgs {
    fn resolve(&self) -> Result<(BaseModelShape, String, LoraSpec)> {
        let (Some(base_model), Some(chunk_width)) = (&self.base_model, self.chunk_width) else {
            bail!("--base-model and --chunk-width are required here");
        };
        let shape = BaseModelShape::from_path(base_model)?;
        let name = self.base_model_name.clone().unwrap_or_else(|| {
            let p = if base_model.ends_with("config.json") {
                base_model.parent().unwrap_or(base_model)
            } else {
                base_model
            };
            p.file_stem()
                .map_or("base".into(), |s| s.to_string_lossy().into_owned())
        });
        let target_modules = parse_modules(&self.modules)?;
        Ok((
            shape,
            name,
            LoraSpec {
                rank: self.rank,
                alpha: self.alpha,
                chunk_width,
                target_modules,
            },
        ))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Create a generator with random weights (for timing, tests, or as training's start).
    Init {
        /// A named configuration (see --help for the list): smollm2-135m-small,
        /// qwen25-05b-common-sense.
        #[arg(long, conflicts_with_all = ["base_model", "stages"])]
        preset: Option<String>,
        #[command(flatten)]
        lora: LoraArgs,
        /// Prompts per condition N.
        #[arg(long, default_value_t = 16)]
        num_prompts: usize,
        /// Encoder tokens per prompt L.
        #[arg(long, default_value_t = 64)]
        max_length: usize,
        /// Hidden stages between condition and tokens, e.g. "64x32x256,256x16x200".
        #[arg(long)]
        stages: Option<String>,
        /// Odd convolution kernel size.
        #[arg(long, default_value_t = 3)]
        kernel: usize,
        /// Seed of the initial weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output checkpoint (.safetensors).
        #[arg(long)]
        out: PathBuf,
    },
    /// Convert an authors' released .pth generator into this project's checkpoint format.
    Convert {
        /// The PyTorch state dict.
        #[arg(long)]
        pth: PathBuf,
        #[command(flatten)]
        lora: LoraArgs,
        /// Name of the condition encoder the generator was trained with.
        #[arg(long, default_value = "all-MiniLM-L12-v2")]
        encoder_name: String,
        /// Output checkpoint (.safetensors).
        #[arg(long)]
        out: PathBuf,
    },
    /// Print a named configuration as JSON.
    Preset {
        /// smollm2-135m-small or qwen25-05b-common-sense.
        name: String,
    },
    /// Print a checkpoint's configuration.
    Inspect {
        /// The checkpoint.
        checkpoint: PathBuf,
    },
    /// LoRA fine-tuning of a base model on one task file, keeping a PEFT checkpoint of each of
    /// the last K steps (the adapters a generator is trained on).
    Collect {
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
        #[arg(long, default_value_t = 8)]
        rank: usize,
        /// LoRA alpha.
        #[arg(long, default_value_t = 16.0)]
        alpha: f64,
        /// Adapted modules, comma-separated.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "q_proj,k_proj,v_proj,o_proj,up_proj,gate_proj,down_proj"
        )]
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
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Most tokens per sequence (prompts are cut from the front).
        #[arg(long, default_value_t = 256)]
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
    },
    /// Train a generator from collected checkpoints and their tasks' prompts (resumable).
    Train {
        /// Starting checkpoint (`dnd init`): its configuration defines the generator.
        #[arg(long)]
        init: PathBuf,
        /// The Sentence-BERT folder.
        #[arg(long, default_value = ".assets/all-MiniLM-L6-v2")]
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
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Most tokens per example, for --objective sft.
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
        /// Share of --objective sft steps whose examples the base model sees without their
        /// system prompt, so that only the generated adapter carries the task.
        #[arg(long, default_value_t = 0.0, value_parser = share)]
        bare_share: f64,
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
        /// Share of the steps conditioned on one of the task's system prompts (the `system`
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
    },
    /// Accuracy of the base model and of adapters on a task's test split (greedy decoding, the
    /// bracketed choice parsed from the start of the reply), as a Markdown table and a PNG.
    Eval {
        /// Model folder (config.json, tokenizer.json, safetensors) or .gguf file; qwen2 or llama.
        #[arg(long)]
        model: PathBuf,
        /// Test split (JSON list of {prompt, response[, system]}).
        #[arg(long)]
        task: PathBuf,
        /// An adapter to score, as LABEL=PEFT_DIR; repeatable.
        #[arg(long = "adapter")]
        adapters: Vec<String>,
        /// Leave the base model out of the table.
        #[arg(long)]
        no_base: bool,
        /// Score this many examples, sampled with --seed (default: all).
        #[arg(long)]
        limit: Option<usize>,
        /// Seed of the example sample.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Most generated tokens per answer.
        #[arg(long, default_value_t = 8)]
        max_new_tokens: usize,
        /// Most tokens of prompt plus answer (prompts are cut from the front).
        #[arg(long, default_value_t = 512)]
        seq_len: usize,
        /// Markdown table output.
        #[arg(long)]
        out_md: Option<PathBuf>,
        /// PNG chart output.
        #[arg(long)]
        out_png: Option<PathBuf>,
        /// JSON output of every reply, per label (to read what the models answered).
        #[arg(long)]
        out_replies: Option<PathBuf>,
        /// JSON summary: each row's correct answers, accuracy and 95% interval, and the
        /// constant answer's.
        #[arg(long)]
        out_json: Option<PathBuf>,
    },
    /// Score replies obtained elsewhere (e.g. from the server) by `eval`'s rules: the same
    /// table and JSON summary.
    Score {
        /// Task file (JSON list of {prompt, response[, system]}).
        #[arg(long)]
        task: PathBuf,
        /// JSON object {"examples": [indices into the task file], "replies": {LABEL: [one
        /// reply per listed example]}}.
        #[arg(long)]
        replies: PathBuf,
        /// Markdown table output.
        #[arg(long)]
        out_md: Option<PathBuf>,
        /// JSON summary output (as `eval --out-json`).
        #[arg(long)]
        out_json: Option<PathBuf>,
    },
    /// Split a task file into train and test files, deterministically for a seed.
    Split {
        /// The task file (JSON list).
        #[arg(long)]
        task: PathBuf,
        /// Fraction of the examples that go to the test file.
        #[arg(long, default_value_t = 0.5)]
        test_fraction: f64,
        /// Seed of the shuffle.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Train output.
        #[arg(long)]
        train_out: PathBuf,
        /// Test output.
        #[arg(long)]
        test_out: PathBuf,
    },
    /// Write the seeded skill tasks (format, classification, extraction, arithmetic): for each,
    /// NAME_train.json and NAME_test.json (an unseen system-prompt paraphrase), and tasks.json.
    Tasks {
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Training examples per task.
        #[arg(long, default_value_t = 500)]
        train: usize,
        /// Test examples per task (prompts never in training).
        #[arg(long, default_value_t = 200)]
        test: usize,
        /// Seed of every draw.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Store the generator's training conditions as anchors (per task: each system prompt of
    /// its file, and a sample of its prompts), so that the server can abstain on prompts far
    /// from all of them (`--dnd-abstain-distance`).
    Anchors {
        #[command(flatten)]
        generator: GeneratorFiles,
        /// A training task as NAME=TASK_FILE (train's NAME=FILE:DIR is accepted); repeatable.
        #[arg(long = "task", required = true)]
        tasks: Vec<String>,
        /// Seed of the prompt sample (the generator's N prompts per task).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output checkpoint: the input's weights and config with the anchors.
        #[arg(long)]
        out: PathBuf,
    },
    /// Store a generator checkpoint's tensors in another dtype (f16 halves a shipped file;
    /// loading converts to the compute dtype).
    Cast {
        /// The generator checkpoint.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Storage dtype: f16, bf16 or f32.
        #[arg(long, value_parser = ["f16", "bf16", "f32"])]
        dtype: String,
        /// Output checkpoint.
        #[arg(long)]
        out: PathBuf,
    },
    /// The adapter whose update is the mean of the given PEFT adapters' updates (ranks
    /// stacked, exact): the baseline for a task none of them was trained on.
    Mean {
        /// A PEFT adapter folder; repeatable (at least one).
        #[arg(long = "adapter", required = true)]
        adapters: Vec<PathBuf>,
        /// Output PEFT folder.
        #[arg(long)]
        out: PathBuf,
    },
    /// The distance (1 - cosine of pooled encodings) of prompts to the nearest training
    /// condition of a generator with anchors: the whole file as one prompt set, or each prompt.
    Distance {
        /// The generator (with anchors: `dnd anchors`).
        #[command(flatten)]
        generator: GeneratorFiles,
        /// Prompt file: a task file, a JSON list of strings, or one prompt per line.
        #[arg(long)]
        prompts: PathBuf,
        /// One line per prompt (as a request's system prompt alone) instead of one set.
        #[arg(long)]
        each: bool,
    },
    /// Generate a LoRA adapter (PEFT folder) from prompts.
    Generate {
        /// The generator checkpoint.
        #[arg(long)]
        checkpoint: PathBuf,
        /// The Sentence-BERT folder (scripts/fetch-assets.sh installs all-MiniLM-L6-v2).
        #[arg(long, default_value = ".assets/all-MiniLM-L6-v2")]
        encoder: PathBuf,
        /// Prompt file: a task file, a JSON list of strings, or one prompt per line.
        #[arg(long)]
        prompts: PathBuf,
        /// Use this many prompts of the file, sampled with --seed (default: the generator's N).
        #[arg(long)]
        sample: Option<usize>,
        /// Seed of the prompt sample.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Refuse unless the generator fits this base model (folder, config.json or .gguf).
        #[arg(long)]
        base_model: Option<PathBuf>,
        /// Compute dtype.
        #[arg(long, value_enum, default_value = "f32")]
        dtype: Dtype,
        /// Run on CUDA device N (needs the `cuda` feature).
        #[arg(long)]
        cuda: Option<usize>,
        /// Output PEFT folder.
        #[arg(long)]
        out: PathBuf,
    },
}

/// `NAME=TASK_FILE` (or `NAME=TASK_FILE:ANYTHING`, as `train` takes it) to its name and file.
fn parse_named_file(s: &str) -> Result<(String, PathBuf)> {
    let (name, rest) = s
        .split_once('=')
        .with_context(|| format!("--task {s:?}: expected NAME=TASK_FILE"))?;
    let file = rest.rsplit_once(':').map_or(rest, |(f, _)| f);
    Ok((name.to_string(), PathBuf::from(file)))
}

/// `NAME=PROMPTS_FILE:CHECKPOINTS_DIR` to a training task (checkpoints: the PEFT folders inside).
fn parse_task(s: &str) -> Result<mistralrs_dnd::training::TaskSet> {
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
    Ok(mistralrs_dnd::training::TaskSet {
        name: name.to_string(),
        prompts: read_prompts(prompts).with_context(|| {
            format!("--task {s:?}: expected NAME=PROMPTS_FILE:CHECKPOINTS_DIR (or NAME=TASK_FILE for --objective sft)")
        })?,
        systems: mistralrs_dnd::prompts::read_systems(prompts)?,
        // Labelled examples when the prompts file is a task file (what --objective sft needs;
        // training says so when a task has none).
        examples: mistralrs_dnd::training::data::read_examples(prompts).unwrap_or_default(),
        checkpoints,
    })
}

/// Prints an evaluation's table and writes its outputs, named after the task file.
fn print_and_write(
    task: &std::path::Path,
    rows: &[mistralrs_dnd::training::eval::EvalRow],
    examples: &[mistralrs_dnd::training::data::Example],
    outputs: &mistralrs_dnd::training::eval::EvalOutputs,
) -> Result<()> {
    use mistralrs_dnd::training::eval;
    let name = task
        .file_stem()
        .map_or("task".into(), |s| s.to_string_lossy().into_owned());
    print!("{}", eval::markdown(&name, rows, examples));
    eval::write_outputs(&name, rows, examples, outputs)?;
    Ok(())
}

/// A share in [0, 1].
fn share(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a share between 0 and 1")),
    }
}

/// `q_proj`, `k_proj`, ... to modules.
fn parse_modules(names: &[String]) -> Result<Vec<Module>> {
    names
        .iter()
        .map(|m| Module::from_name(m.trim()).with_context(|| format!("unknown module {m:?}")))
        .collect()
}

fn parse_stages(s: &str) -> Result<Vec<[usize; 3]>> {
    s.split(',')
        .map(|st| {
            let v: Vec<usize> = st
                .trim()
                .split('x')
                .map(|d| d.trim().parse::<usize>())
                .collect::<std::result::Result<_, _>>()
                .with_context(|| format!("stage {st:?} is not NxHxW"))?;
            <[usize; 3]>::try_from(v).map_err(|_| anyhow::anyhow!("stage {st:?} is not NxHxW"))
        })
        .collect()
}

fn spinner(msg: &str) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").unwrap());
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    pb
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Init {
            preset,
            lora,
            num_prompts,
            max_length,
            stages,
            kernel,
            seed,
            out,
        } => {
            let mut cfg: GeneratorConfig = match preset {
                Some(p) => presets::by_name(&p).with_context(|| {
                    format!("unknown preset {p:?}; known: {}", presets::NAMES.join(", "))
                })??,
                None => {
                    let (shape, name, spec) = lora.resolve()?;
                    let hidden = match stages {
                        Some(s) => parse_stages(&s)?,
                        None => vec![],
                    };
                    let mut cfg = GeneratorConfig::new(
                        shape,
                        spec,
                        presets::minilm(),
                        num_prompts,
                        max_length,
                        None,
                        &hidden,
                        kernel,
                    )?;
                    cfg.base_model_name = Some(name);
                    cfg
                }
            };
            cfg.note = Some(format!(
                "RANDOM WEIGHTS (seed {seed}): untrained, adapters are noise"
            ));
            let pb = spinner("initialising weights");
            let (dec, tensors) =
                ConditionDecoder::random(cfg.clone(), seed, &Device::Cpu, DType::F32)?;
            checkpoint::save(&out, &cfg, &tensors)?;
            pb.finish_and_clear();
            eprintln!(
                "wrote {} ({:.1} M parameters, {} tokens of {:?} per adapter)",
                out.display(),
                dec.decoder().num_params() as f64 / 1e6,
                dec.layout().num_tokens(),
                dec.layout().token_shape()
            );
        }
        Command::Convert {
            pth,
            lora,
            encoder_name,
            out,
        } => {
            let (shape, name, spec) = lora.resolve()?;
            let pb = spinner("converting");
            let conv = convert_pth(
                &pth,
                &out,
                &ConvertOptions {
                    base_model: shape,
                    base_model_name: Some(name),
                    lora: spec,
                    encoder_name,
                },
            )?;
            pb.finish_and_clear();
            if !conv.dropped.is_empty() {
                eprintln!(
                    "not carried over ({}): {}",
                    conv.dropped.len(),
                    conv.dropped.join(", ")
                );
            }
            eprintln!("wrote {}", out.display());
            println!("{}", serde_json::to_string_pretty(&conv.config)?);
        }
        Command::Preset { name } => {
            let cfg = presets::by_name(&name).with_context(|| {
                format!(
                    "unknown preset {name:?}; known: {}",
                    presets::NAMES.join(", ")
                )
            })??;
            println!("{}", serde_json::to_string_pretty(&cfg)?);
        }
        Command::Inspect { checkpoint: path } => {
            let cfg = checkpoint::read_config(&path)?;
            println!("{}", serde_json::to_string_pretty(&cfg)?);
        }
        Command::Collect {
            model,
            task,
            out,
            rank,
            alpha,
            modules,
            lr,
            weight_decay,
            steps,
            batch,
            seq_len,
            keep_last,
            save_at,
            seed,
            save_every,
            resume,
            stop_after,
        } => {
            let modules = parse_modules(&modules)?;
            if keep_last == 0 || keep_last > steps {
                bail!("--keep-last must be between 1 and --steps ({steps})");
            }
            let t0 = Instant::now();
            let losses =
                mistralrs_dnd::training::collect(&mistralrs_dnd::training::CollectOptions {
                    model_dir: model,
                    task,
                    out: out.clone(),
                    rank,
                    alpha,
                    modules,
                    lr,
                    weight_decay,
                    steps,
                    batch,
                    seq_len,
                    keep_last,
                    save_at,
                    seed,
                    save_every,
                    resume,
                    stop_after,
                    progress: true,
                })?;
            eprintln!(
                "{} steps in {:.1} s, loss {:.4} -> {:.4}; checkpoints of the last {keep_last} steps in {}",
                losses.len(),
                t0.elapsed().as_secs_f64(),
                losses.first().copied().unwrap_or(f32::NAN),
                losses.last().copied().unwrap_or(f32::NAN),
                out.display()
            );
        }
        Command::Train {
            init,
            encoder,
            tasks,
            exclude,
            objective,
            model,
            batch,
            seq_len,
            bare_share,
            steps,
            lr,
            weight_decay,
            mean_offset,
            warmup,
            grad_clip,
            system_share,
            seed,
            out,
            loss_png,
            cache_dir,
            save_every,
            resume,
            stop_after,
        } => {
            let tasks = tasks
                .iter()
                .map(|t| parse_task(t))
                .collect::<Result<Vec<_>>>()?;
            use mistralrs_dnd::training::Objective;
            let objective = match (objective.as_str(), model) {
                ("sft", Some(model)) => Objective::Sft {
                    model,
                    batch,
                    seq_len,
                    bare_share,
                },
                ("sft", None) => bail!("--objective sft needs --model (the base model)"),
                (_, Some(_)) => bail!("--model is for --objective sft"),
                _ => Objective::Mse,
            };
            if mean_offset && matches!(objective, Objective::Sft { .. }) {
                bail!("--mean-offset is for --objective mse (sft keeps the --init checkpoint's offset)");
            }
            let t0 = Instant::now();
            let report = mistralrs_dnd::training::train(&mistralrs_dnd::training::TrainOptions {
                init,
                encoder_dir: encoder,
                tasks,
                exclude,
                objective,
                steps,
                lr,
                weight_decay,
                mean_offset,
                warmup,
                grad_clip,
                system_share,
                condition_noise: 1e-4,
                target_noise: 1e-5,
                seed,
                out: out.clone(),
                loss_png,
                cache_dir,
                save_every,
                resume,
                stop_after,
                progress: true,
            })?;
            eprintln!(
                "{} steps ({:.1} s in this run), loss {:.5} -> {:.5}, steps per task {:?}; wrote {}",
                report.losses.len(),
                t0.elapsed().as_secs_f64(),
                report.losses.first().copied().unwrap_or(f32::NAN),
                report.losses.last().copied().unwrap_or(f32::NAN),
                report.task_steps,
                out.display()
            );
        }
        Command::Eval {
            model,
            task,
            adapters,
            no_base,
            limit,
            seed,
            max_new_tokens,
            seq_len,
            out_md,
            out_png,
            out_replies,
            out_json,
        } => {
            use mistralrs_dnd::training::eval;
            let (lm, tok, eos) = mistralrs_dnd::training::load_base_model(&model, &Device::Cpu)?;
            let mut examples = mistralrs_dnd::training::data::read_examples(&task)?;
            if let Some(n) = limit.filter(|&n| n < examples.len()) {
                use rand::SeedableRng;
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let mut idx = rand::seq::index::sample(&mut rng, examples.len(), n).into_vec();
                idx.sort_unstable();
                examples = idx.into_iter().map(|i| examples[i].clone()).collect();
            }
            let mut systems: Vec<(String, Option<LoraAdapter>)> = Vec::new();
            if !no_base {
                systems.push(("base".into(), None));
            }
            for a in &adapters {
                let (label, dir) = a
                    .split_once('=')
                    .with_context(|| format!("--adapter {a:?}: expected LABEL=PEFT_DIR"))?;
                systems.push((
                    label.to_string(),
                    Some(LoraAdapter::load_peft(dir, &Device::Cpu)?),
                ));
            }
            if systems.is_empty() {
                bail!("nothing to evaluate: give --adapter or drop --no-base");
            }
            let mut rows = Vec::new();
            for (label, adapter) in &systems {
                rows.push(eval::accuracy(
                    &lm,
                    &tok,
                    &examples,
                    adapter.as_ref(),
                    max_new_tokens,
                    seq_len,
                    eos,
                    label,
                    true,
                )?);
            }
            print_and_write(
                &task,
                &rows,
                &examples,
                &eval::EvalOutputs {
                    markdown: out_md,
                    png: out_png,
                    replies: out_replies,
                    summary: out_json,
                },
            )?;
        }
        Command::Score {
            task,
            replies,
            out_md,
            out_json,
        } => {
            use mistralrs_dnd::training::eval;
            #[derive(serde::Deserialize)]
            struct Replies {
                examples: Vec<usize>,
                replies: std::collections::BTreeMap<String, Vec<String>>,
            }
            let all = mistralrs_dnd::training::data::read_examples(&task)?;
            let text = std::fs::read_to_string(&replies)
                .with_context(|| format!("reading {}", replies.display()))?;
            let r: Replies = serde_json::from_str(&text).with_context(|| {
                format!(
                    "{}: expected {{\"examples\": [..], \"replies\": {{..}}}}",
                    replies.display()
                )
            })?;
            let examples = r
                .examples
                .iter()
                .map(|&i| {
                    all.get(i).cloned().with_context(|| {
                        format!(
                            "example {i} is beyond the {} of {}",
                            all.len(),
                            task.display()
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            if r.replies.is_empty() {
                bail!("{}: no replies", replies.display());
            }
            let rows = r
                .replies
                .into_iter()
                .map(|(label, v)| eval::score(&examples, v, &label))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            print_and_write(
                &task,
                &rows,
                &examples,
                &eval::EvalOutputs {
                    markdown: out_md,
                    summary: out_json,
                    ..Default::default()
                },
            )?;
        }
        Command::Split {
            task,
            test_fraction,
            seed,
            train_out,
            test_out,
        } => {
            use rand::seq::SliceRandom;
            use rand::SeedableRng;
            if !(0.0..1.0).contains(&test_fraction) || test_fraction == 0.0 {
                bail!("--test-fraction must be in (0, 1)");
            }
            let text = std::fs::read_to_string(&task)
                .with_context(|| format!("reading {}", task.display()))?;
            let mut items: Vec<serde_json::Value> = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a JSON list", task.display()))?;
            items.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
            let n_test = ((items.len() as f64) * test_fraction).round() as usize;
            let train = items.split_off(n_test);
            for (path, part) in [(&test_out, &items), (&train_out, &train)] {
                std::fs::write(path, serde_json::to_string(part)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            eprintln!("{} train / {} test examples", train.len(), items.len());
        }
        Command::Tasks {
            out,
            train,
            test,
            seed,
        } => {
            let entries = mistralrs_dnd::training::tasks::write_tasks(&out, train, test, seed)?;
            eprintln!(
                "{} tasks ({} train / {} test examples each) in {}",
                entries.len(),
                train,
                test,
                out.display()
            );
        }
        Command::Anchors {
            generator:
                GeneratorFiles {
                    checkpoint: ckpt,
                    encoder,
                },
            tasks,
            seed,
            out,
        } => {
            let gen = Generator::load(&ckpt, &encoder, &LoadOptions::default())?;
            let n = gen.config().num_prompts;
            let (mut names, mut rows) = (Vec::new(), Vec::new());
            for t in &tasks {
                let (name, file) = parse_named_file(t)?;
                let systems = mistralrs_dnd::prompts::read_systems(&file)?;
                for (i, sys) in systems.iter().enumerate() {
                    names.push(format!("{name}: system {}", i + 1));
                    rows.push(gen.pooled(&[sys])?);
                }
                let prompts = sample_prompts(&read_prompts(&file)?, n, seed);
                names.push(format!("{name}: prompts"));
                rows.push(gen.pooled(&prompts)?);
            }
            let mut config = mistralrs_dnd::generator::checkpoint::read_config(&ckpt)?;
            config.anchor_names = names;
            let mut tensors: std::collections::HashMap<String, candle_core::Tensor> =
                candle_core::safetensors::load(&ckpt, &Device::Cpu)?
                    .into_iter()
                    .collect();
            tensors.insert(
                mistralrs_dnd::generator::anchors::CONDITION_ANCHORS.into(),
                candle_core::Tensor::stack(&rows, 0)?,
            );
            mistralrs_dnd::generator::checkpoint::save(&out, &config, &tensors)?;
            eprintln!(
                "{} anchors from {} tasks; wrote {}",
                config.anchor_names.len(),
                tasks.len(),
                out.display()
            );
        }
        Command::Cast {
            checkpoint: ckpt,
            dtype,
            out,
        } => {
            let dt = match dtype.as_str() {
                "f16" => DType::F16,
                "bf16" => DType::BF16,
                _ => DType::F32,
            };
            let config = mistralrs_dnd::generator::checkpoint::read_config(&ckpt)?;
            let tensors = candle_core::safetensors::load(&ckpt, &Device::Cpu)?
                .into_iter()
                .map(|(k, t)| Ok((k, t.to_dtype(dt)?)))
                .collect::<Result<std::collections::HashMap<_, _>>>()?;
            mistralrs_dnd::generator::checkpoint::save(&out, &config, &tensors)?;
            eprintln!(
                "{} tensors as {dtype}; wrote {}",
                tensors.len(),
                out.display()
            );
        }
        Command::Mean { adapters, out } => {
            let loaded = adapters
                .iter()
                .map(|d| LoraAdapter::load_peft(d, &Device::Cpu))
                .collect::<mistralrs_dnd::error::Result<Vec<_>>>()?;
            let mean = LoraAdapter::mean(&loaded)?;
            mean.save_peft(&out, None)?;
            eprintln!(
                "mean of {} adapters (rank {}); wrote {}",
                loaded.len(),
                mean.rank(),
                out.display()
            );
        }
        Command::Distance {
            generator:
                GeneratorFiles {
                    checkpoint: ckpt,
                    encoder,
                },
            prompts,
            each,
        } => {
            let gen = Generator::load(&ckpt, &encoder, &LoadOptions::default())?;
            if gen.anchors().is_none() {
                bail!(
                    "{} has no anchors (add them with `dnd anchors`)",
                    ckpt.display()
                );
            }
            let all = read_prompts(&prompts)?;
            let sets: Vec<Vec<String>> = if each {
                all.iter().map(|p| vec![p.clone()]).collect()
            } else {
                vec![sample_prompts(&all, gen.config().num_prompts, 0)]
            };
            for set in &sets {
                let near = gen.nearest(set)?.expect("checked above");
                let shown = if each {
                    set[0].replace('\n', " ")
                } else {
                    format!("{} prompts", set.len())
                };
                println!("{:.4}\t{}\t{}", near.distance, near.name, shown);
            }
        }
        Command::Generate {
            checkpoint: ckpt,
            encoder,
            prompts,
            sample,
            seed,
            base_model,
            dtype,
            cuda,
            out,
        } => {
            let device = match cuda {
                Some(i) => {
                    Device::new_cuda(i).context("CUDA device (build with --features cuda)")?
                }
                None => Device::Cpu,
            };
            let t0 = Instant::now();
            let pb = spinner("loading generator");
            let gen = Generator::load(
                &ckpt,
                &encoder,
                &LoadOptions {
                    device,
                    dtype: dtype.into(),
                },
            )?;
            pb.finish_and_clear();
            if let Some(note) = &gen.config().note {
                if note.contains("RANDOM") {
                    eprintln!("WARNING: {note}");
                }
            }
            if let Some(bm) = base_model {
                gen.check_base_model(&BaseModelShape::from_path(&bm)?)?;
            }
            let all = read_prompts(&prompts)?;
            let n = sample.unwrap_or(gen.config().num_prompts);
            let chosen = sample_prompts(&all, n, seed);
            eprintln!(
                "loaded in {:.2}s; {} of {} prompts",
                t0.elapsed().as_secs_f64(),
                chosen.len(),
                all.len()
            );
            let pb = spinner("generating");
            let (adapter, t) = gen.generate_timed(&chosen)?;
            pb.finish_and_clear();
            adapter.check_finite()?;
            adapter.save_peft(&out, gen.config().base_model_name.as_deref())?;
            eprintln!(
                "wrote {} (rank {}, {} pairs, {:.1} MB): encode {:.3}s, decode {:.3}s, detokenize {:.3}s",
                out.display(),
                adapter.rank(),
                adapter.pairs().len(),
                adapter.size_in_bytes() as f64 / 1e6,
                t.encode.as_secs_f64(),
                t.decode.as_secs_f64(),
                t.detokenize.as_secs_f64()
            );
        }
    }
    Ok(())
}
