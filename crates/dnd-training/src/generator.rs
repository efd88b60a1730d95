//! `train`: generator training from collected LoRA checkpoints paired with their tasks'
//! prompts, as the paper does.
//!
//! Each step picks a task (or `tasks_per_step` distinct ones, their gradients averaged: our
//! addition), one of its checkpoints (the target tokens) and a fresh random set of
//! N of its prompts (the condition), adds noise to both (1e-4 to the condition, 1e-5 to the
//! target), and minimises the token-weighted MSE, the weight of a token being its standard
//! deviation across the training checkpoints (normalised to mean 1). AdamW with linear warm-up
//! and cosine decay, gradient clipping by global norm. Prompt encodings are cached (in memory,
//! and on disk when a cache folder is given) so BERT runs once per distinct prompt.
//!
//! With `mean_offset` (our addition, not in the paper) the network predicts each target's
//! difference from the mean of all training checkpoints' tokens, a fixed offset saved in the
//! checkpoint and added at generation. Short fine-tuning runs that start from one seeded LoRA
//! initialisation share nearly the same A factors, a random matrix a short generator training
//! does not learn to reproduce; B factors paired with the wrong A are noise to the model. With
//! the offset, A comes from the mean and the network spends its capacity on what
//! differs between tasks; an untrained network yields the mean adapter.
//!
//! With `system_share` > 0 (our addition) that share of the steps conditions on one of the
//! task's system prompts instead, repeated to N as the server fills a short prompt list, so
//! that one generator serves both conditions the server's policy produces: a request's system
//! prompt, or a few example prompts.
//!
//! [`Objective::Sft`] (beyond the paper, as Text-to-LoRA's SFT mode) trains through the base
//! model instead: the generated tokens become LoRA factors by tensor operations
//! ([`TokenLayout::factors`]), the explicit LoRA backward pass gives the answer loss of a batch
//! of the task's examples and its gradient with respect to every factor, and the generator's
//! gradient follows from the surrogate `Σ ⟨factor, its gradient⟩`, whose derivative through
//! the generator is the true one. It needs the tasks' examples, not their checkpoints, and
//! keeps the starting checkpoint's token offset (start it from a generator the paper's recipe
//! trained, or from `dnd init`).
//!
//! SFT alone lets the generator put the skill in what all its adapters share and leave the
//! task to the system prompt in the context: the shipped skills generator's adapters for 24
//! tasks have a mean pairwise cosine of 0.95 (`dnd similarity`; own LoRAs 0.08). With a
//! contrast share (our addition), that share of the steps also runs the batch under the
//! adapter of another task's condition and adds the hinge `max(0, margin - (wrong - own))`
//! on the two answer losses, so that an adapter must do its own task measurably better than
//! another task's adapter does; its surrogate is `2 own - wrong` while the hinge is active.
//! The other task is drawn from all of them, or from the few whose conditions lie nearest
//! (`contrast_nearest`): the pairs the context alone tells apart least.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::backward::lora_gradients;
use super::data::{encode, Example, Sequence};
use super::plot;
use dnd_core::adapters::{LoraAdapter, LoraPair, TokenLayout};
use dnd_core::cache::fingerprint;
use dnd_core::encoder::TextEncoder;
use dnd_core::error::{DndError, Result};
use dnd_core::generator::anchors::{pooled, CONDITION_ANCHORS};
use dnd_core::generator::modulation::{self, MODULATION_MEAN, MODULATION_SCALE};
use dnd_core::generator::{checkpoint, ConditionDecoder, GeneratorConfig, TOKEN_OFFSET};

/// One training task: its prompts and the folders of its collected PEFT checkpoints.
#[derive(Debug, Clone)]
pub struct TaskSet {
    /// Task name (for `exclude` and the report).
    pub name: String,
    /// Its prompts (conditions are drawn from them).
    pub prompts: Vec<String>,
    /// Its system prompts (instructions), conditions of the `system_share` steps.
    pub systems: Vec<String>,
    /// PEFT checkpoint folders (targets of [`Objective::Mse`]).
    pub checkpoints: Vec<PathBuf>,
    /// Its labelled examples (what [`Objective::Sft`] trains on).
    pub examples: Vec<Example>,
}

/// What the generator learns from.
#[derive(Debug, Clone, Default)]
pub enum Objective {
    /// The paper's: token-weighted MSE to the tasks' collected checkpoints.
    #[default]
    Mse,
    /// The base model's answer loss on the tasks' examples with the generated LoRA applied.
    Sft {
        /// The base model (folder or .gguf) the generator's adapters are for.
        model: PathBuf,
        /// Examples per step.
        batch: usize,
        /// Most tokens per example.
        seq_len: usize,
        /// Share of the steps whose examples the base model sees without their system prompt,
        /// so that only the generated adapter can carry the task (0: always with it, as
        /// served).
        bare_share: f64,
        /// Share of the steps that also contrast: the same batch under the adapter made from
        /// another task's condition (of the same kind) must lose at least `contrast_margin`
        /// more than under its own adapter, or the shortfall is added to the loss (see the
        /// module docs); 0: never.
        contrast_share: f64,
        /// The margin, in mean answer-token loss (nats).
        contrast_margin: f64,
        /// Where the other task comes from: 0, any other task alike; K, one of the K tasks
        /// whose condition of the step's kind (system prompts, or a sample of prompts) lies
        /// nearest by pooled encoder embedding, the ones a generator confuses (with 48 tasks
        /// a uniform draw pairs upper_case with lower_case once in 47 contrast steps).
        contrast_nearest: usize,
    },
}

/// Generator training settings.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// The starting checkpoint (`dnd init` output): its config defines the generator.
    pub init: PathBuf,
    /// The Sentence-BERT folder.
    pub encoder_dir: PathBuf,
    /// Training tasks.
    pub tasks: Vec<TaskSet>,
    /// Task names left out (held-out tasks).
    pub exclude: Vec<String>,
    /// The loss.
    pub objective: Objective,
    /// Optimiser steps.
    pub steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Predict the difference from the mean of the training checkpoints' tokens, which is saved
    /// in the checkpoint as its token offset (see the module docs).
    pub mean_offset: bool,
    /// Linear warm-up steps.
    pub warmup: usize,
    /// Gradient clipping (global L2 norm).
    pub grad_clip: f64,
    /// Distinct tasks drawn per optimiser step, their gradients averaged (1: the paper's one
    /// task a step). More tasks a step keep one task's draw from pulling the shared weights
    /// its way alone.
    pub tasks_per_step: usize,
    /// Share of the steps conditioned on one system prompt of the task (repeated to N)
    /// rather than on N of its prompts; 0 is the paper's recipe.
    pub system_share: f64,
    /// Std of the noise added to conditions.
    pub condition_noise: f64,
    /// Std of the noise added to targets.
    pub target_noise: f64,
    /// Seed of task, checkpoint, prompt and noise draws.
    pub seed: u64,
    /// Output checkpoint.
    pub out: PathBuf,
    /// Loss-curve PNG.
    pub loss_png: Option<PathBuf>,
    /// Folder caching prompt encodings across runs.
    pub cache_dir: Option<PathBuf>,
    /// Save (and allow resuming) every this many steps.
    pub save_every: usize,
    /// Continue from `out` and its state file when they exist.
    pub resume: bool,
    /// Stop (saved, resumable) after this many steps in this invocation.
    pub stop_after: Option<usize>,
    /// Show a progress bar.
    pub progress: bool,
    /// Give an unmodulated `init` generator condition modulation
    /// (`dnd_core::generator::modulation`): its weights start at zero, so training starts from
    /// exactly what `init` computes, and its standardisation comes from the training tasks'
    /// conditions. A modulated `init` keeps its own either way.
    pub modulate: bool,
}

/// What a training run did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrainReport {
    /// Loss of every step (all steps, resumed runs included).
    pub losses: Vec<f32>,
    /// Draws per task (a step draws `tasks_per_step` of them).
    pub task_steps: BTreeMap<String, usize>,
    /// Of them, draws conditioned on a system prompt.
    #[serde(default)]
    pub system_steps: usize,
    /// Prompts that went through BERT in this run (the rest came from the cache).
    pub encoded_prompts: usize,
    /// On contrast steps, the answer loss under another task's adapter minus that under the
    /// task's own (the margin the contrast asks for), in order.
    #[serde(default)]
    pub contrast_gaps: Vec<f32>,
}

/// Per-prompt encodings `(L, C)`, in memory and optionally on disk.
struct PromptCache<'a> {
    encoder: &'a TextEncoder,
    max_length: usize,
    dir: Option<PathBuf>,
    mem: HashMap<String, Tensor>,
    encoded: usize,
}

impl PromptCache<'_> {
    fn file(&self, prompt: &str) -> Option<PathBuf> {
        let id = format!(
            "{}|{}|{prompt}",
            self.encoder.dir().display(),
            self.max_length
        );
        self.dir
            .as_ref()
            .map(|d| d.join(format!("{}.safetensors", fingerprint(id.as_bytes()))))
    }

    /// Encodings of `prompts`, stacked `(N, L, C)`.
    fn condition(&mut self, prompts: &[&str]) -> Result<Tensor> {
        let missing: Vec<&str> = prompts
            .iter()
            .copied()
            .filter(|p| !self.mem.contains_key(*p))
            .collect();
        let mut to_encode = Vec::new();
        for p in missing {
            match self.file(p).filter(|f| f.exists()) {
                Some(f) => {
                    let t = candle_core::safetensors::load(&f, &Device::Cpu)?
                        .remove("encoding")
                        .ok_or_else(|| {
                            DndError::Incompatible(format!("{}: no encoding", f.display()))
                        })?;
                    self.mem.insert(p.to_string(), t);
                }
                None if !to_encode.contains(&p) => to_encode.push(p),
                None => {}
            }
        }
        if !to_encode.is_empty() {
            let enc = self.encoder.encode(&to_encode, self.max_length)?;
            for (i, p) in to_encode.iter().enumerate() {
                let t = enc.get(i)?.contiguous()?;
                if let Some(f) = self.file(p) {
                    if let Some(d) = f.parent() {
                        std::fs::create_dir_all(d).map_err(|e| DndError::io(d, e))?;
                    }
                    candle_core::safetensors::save(&HashMap::from([("encoding", t.clone())]), &f)?;
                }
                self.mem.insert(p.to_string(), t);
            }
            self.encoded += to_encode.len();
        }
        let rows: Vec<&Tensor> = prompts.iter().map(|p| &self.mem[*p]).collect();
        Ok(Tensor::stack(&rows, 0)?)
    }

    /// A step's condition: [`Self::condition`] plus the training noise of std `std`, with a
    /// batch axis, `(1, N, L, C)`.
    fn noisy_condition(
        &mut self,
        prompts: &[&str],
        rng: &mut impl Rng,
        std: f64,
    ) -> Result<Tensor> {
        let c = self.condition(prompts)?;
        Ok((&c + noise(rng, c.dims(), std)?)?.unsqueeze(0)?)
    }
}

/// A step's condition for `task`: one of its system prompts repeated to `n` (as the server
/// fills a short prompt list), or `n` of its prompts drawn without replacement (all of them,
/// cycled, when it has fewer).
fn condition_prompts<'t>(
    task: &'t TaskSet,
    by_system: bool,
    n: usize,
    rng: &mut impl Rng,
) -> Vec<&'t str> {
    if by_system {
        let s = task.systems[rng.random_range(0..task.systems.len())].as_str();
        vec![s; n]
    } else if task.prompts.len() >= n {
        rand::seq::index::sample(rng, task.prompts.len(), n)
            .into_iter()
            .map(|i| task.prompts[i].as_str())
            .collect()
    } else {
        (0..n)
            .map(|i| task.prompts[i % task.prompts.len()].as_str())
            .collect()
    }
}

/// The standardisation of the condition summaries the tasks' training conditions give: each
/// system prompt (repeated to `n`, as a step conditions on it) and the first `n` prompts.
fn condition_standardisation(
    tasks: &[&TaskSet],
    n: usize,
    cache: &mut PromptCache,
) -> Result<(Tensor, Tensor)> {
    let mut rows = Vec::new();
    for t in tasks {
        let mut sets: Vec<Vec<&str>> = t.systems.iter().map(|s| vec![s.as_str(); n]).collect();
        sets.push(first_prompts(t, n));
        for p in sets {
            rows.push(modulation::summary(&cache.condition(&p)?.unsqueeze(0)?)?.squeeze(0)?);
        }
    }
    Ok(modulation::standardisation(&Tensor::stack(&rows, 0)?)?)
}

/// The first `n` of a task's prompts (where its prompt conditions come from).
fn first_prompts(task: &TaskSet, n: usize) -> Vec<&str> {
    task.prompts.iter().take(n).map(String::as_str).collect()
}

/// For each row of `emb` (`(T, C)`, rows L2-normalised), the indices of the `k` other rows
/// of highest cosine, nearest first (all others when fewer than `k`).
fn nearest_others(emb: &Tensor, k: usize) -> Result<Vec<Vec<usize>>> {
    let sims = emb.matmul(&emb.t()?)?.to_vec2::<f32>()?;
    Ok(sims
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let mut others: Vec<usize> = (0..row.len()).filter(|&j| j != i).collect();
            others.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            others.truncate(k);
            others
        })
        .collect())
}

/// Standard-normal noise of `shape`, from `rng` (Box-Muller), times `std`.
fn noise(rng: &mut impl Rng, shape: &[usize], std: f64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
            let u2: f64 = rng.random();
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * std) as f32
        })
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// Learning rate at `step` (0-based): linear warm-up, then cosine decay to zero.
pub fn learning_rate(step: usize, steps: usize, warmup: usize, peak: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let t = (step - warmup) as f64 / (steps - warmup).max(1) as f64;
    peak * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
}

/// Per-token weights `(T)`: each token's std over all checkpoints, normalised to mean 1.
pub fn criterion_weight(targets: &[Tensor]) -> Result<Tensor> {
    let all = Tensor::stack(targets, 0)?; // (K, T, h, w)
    let (k, t, h, w) = all.dims4()?;
    let per_token = all.transpose(0, 1)?.reshape((t, k * h * w))?;
    let mean = per_token.mean_keepdim(1)?;
    let var = per_token.broadcast_sub(&mean)?.sqr()?.mean(1)?;
    let std = (var + 1e-12)?.sqrt()?;
    let m = std.mean_all()?;
    Ok(std.broadcast_div(&m)?)
}

/// Per-token statistics over the training checkpoints, accumulated one checkpoint at a time
/// (in f64): what [`criterion_weight`] and the mean offset need, without holding them all.
#[derive(Default)]
struct TokenStats {
    count: usize,
    /// Element-wise sum `(T, h, w)`.
    sum: Option<Tensor>,
    /// Per token: sum and sum of squares over its elements.
    token_sum: Option<Tensor>,
    token_sumsq: Option<Tensor>,
    per_token: usize,
}

impl TokenStats {
    fn add(&mut self, target: &Tensor) -> Result<()> {
        let (t, h, w) = target.dims3()?;
        let x = target.to_dtype(DType::F64)?;
        let flat = x.reshape((t, h * w))?;
        let (s, sq) = (flat.sum(1)?, flat.sqr()?.sum(1)?);
        let add = |acc: &mut Option<Tensor>, v: Tensor| -> Result<()> {
            *acc = Some(match acc.take() {
                Some(a) => (a + v)?,
                None => v,
            });
            Ok(())
        };
        add(&mut self.sum, x)?;
        add(&mut self.token_sum, s)?;
        add(&mut self.token_sumsq, sq)?;
        self.count += 1;
        self.per_token = h * w;
        Ok(())
    }

    /// The same weights as [`criterion_weight`] over every added checkpoint.
    fn criterion_weight(&self) -> Result<Tensor> {
        let (Some(s), Some(sq)) = (&self.token_sum, &self.token_sumsq) else {
            return Err(DndError::InvalidInput("no training checkpoint".into()));
        };
        let n = (self.count * self.per_token) as f64;
        let mean = (s / n)?;
        let var = ((sq / n)? - mean.sqr()?)?.relu()?;
        let std = (var + 1e-12)?.sqrt()?;
        let m = std.mean_all()?;
        Ok(std.broadcast_div(&m)?.to_dtype(DType::F32)?)
    }

    /// The element-wise mean of every added checkpoint's tokens.
    fn mean(&self) -> Result<Tensor> {
        let s = self
            .sum
            .as_ref()
            .ok_or_else(|| DndError::InvalidInput("no training checkpoint".into()))?;
        Ok((s / self.count as f64)?.to_dtype(DType::F32)?)
    }
}

#[derive(Serialize, Deserialize)]
struct State {
    step: usize,
    report: TrainReport,
    /// Tasks a step of the run (absent in states written before it was recorded).
    #[serde(default)]
    tasks_per_step: Option<usize>,
}

fn state_path(out: &Path) -> PathBuf {
    out.with_extension("state.json")
}

/// Trains a generator; writes `out` (and its `.state.json`) every `save_every` steps and at the
/// end, and the loss curve when asked.
pub fn train(opts: &TrainOptions) -> Result<TrainReport> {
    let dev = Device::Cpu;
    let mut config: GeneratorConfig = checkpoint::read_config(&opts.init)?;
    let layout: TokenLayout = config.validate()?;
    let tasks: Vec<&TaskSet> = opts
        .tasks
        .iter()
        .filter(|t| !opts.exclude.contains(&t.name))
        .collect();
    if tasks.is_empty() {
        return Err(DndError::InvalidInput(
            "no training task left after --exclude".into(),
        ));
    }
    if opts.tasks_per_step == 0 || opts.tasks_per_step > tasks.len() {
        return Err(DndError::InvalidInput(format!(
            "{} tasks per step: it must lie between 1 and the {} training tasks",
            opts.tasks_per_step,
            tasks.len()
        )));
    }
    // Targets stay on disk: a step loads the one it draws, so memory does not grow with the
    // number of checkpoints. One pass over them gives the criterion weight and the mean.
    let load_target = |c: &Path| -> Result<Tensor> {
        let a = LoraAdapter::load_peft(c, &dev)?;
        layout.tokenize(&a, &dev).map_err(|e| {
            DndError::Incompatible(format!("{} does not fit the generator: {e}", c.display()))
        })
    };
    let sft = matches!(opts.objective, Objective::Sft { .. });
    let mut stats = TokenStats::default();
    for t in &tasks {
        if t.prompts.is_empty() {
            return Err(DndError::InvalidInput(format!(
                "task {} has no prompts",
                t.name
            )));
        }
        if !sft && t.checkpoints.is_empty() {
            return Err(DndError::InvalidInput(format!(
                "task {} needs at least one checkpoint",
                t.name
            )));
        }
        if sft && t.examples.is_empty() {
            return Err(DndError::InvalidInput(format!(
                "task {} has no labelled examples, which training through the base model needs",
                t.name
            )));
        }
        if opts.system_share > 0.0 && t.systems.is_empty() {
            return Err(DndError::InvalidInput(format!(
                "task {} has no system prompt, which a system share of {} needs",
                t.name, opts.system_share
            )));
        }
        if !sft {
            for c in &t.checkpoints {
                stats.add(&load_target(c)?)?;
            }
        }
    }

    // Weights: the starting checkpoint, or the run being resumed.
    let resume = opts.resume && opts.out.exists() && state_path(&opts.out).exists();
    let source = if resume { &opts.out } else { &opts.init };
    let varmap = VarMap::new();
    let (mut source_weight, mut source_offset, mut source_anchors) = (None, None, None);
    let (mut source_mod_mean, mut source_mod_scale) = (None, None);
    {
        let mut data = varmap.data().lock().expect("varmap lock");
        for (name, t) in candle_core::safetensors::load(source, &dev)? {
            match name.as_str() {
                "criterion_weight" => source_weight = Some(t.to_dtype(DType::F32)?),
                TOKEN_OFFSET => source_offset = Some(t.to_dtype(DType::F32)?),
                // Kept as they are: they describe the conditions, not trained weights.
                CONDITION_ANCHORS => source_anchors = Some(t),
                // Statistics of the conditions, not weights to train.
                MODULATION_MEAN => source_mod_mean = Some(t.to_dtype(DType::F32)?),
                MODULATION_SCALE => source_mod_scale = Some(t.to_dtype(DType::F32)?),
                _ => {
                    data.insert(name, Var::from_tensor(&t.to_dtype(DType::F32)?)?);
                }
            }
        }
    }
    // The MSE recipe derives its weight and offset from the checkpoints; training through the
    // base model keeps the starting checkpoint's.
    let (weight, offset) = if sft {
        (source_weight, source_offset)
    } else {
        let offset = if opts.mean_offset {
            Some(stats.mean()?)
        } else {
            None
        };
        (Some(stats.criterion_weight()?), offset)
    };
    drop(stats);
    let encoder = TextEncoder::load(&opts.encoder_dir, &dev, DType::F32)?;
    let mut cache = PromptCache {
        encoder: &encoder,
        max_length: config.max_length,
        dir: opts.cache_dir.clone(),
        mem: HashMap::new(),
        encoded: 0,
    };
    config.modulated |= opts.modulate;
    let modulation_stats = match (source_mod_mean, source_mod_scale) {
        (Some(m), Some(s)) => Some((m, s)),
        _ if config.modulated => Some(condition_standardisation(
            &tasks,
            config.num_prompts,
            &mut cache,
        )?),
        _ => None,
    };
    let mut decoder = ConditionDecoder::with_modulation_stats(
        config.clone(),
        VarBuilder::from_varmap(&varmap, DType::F32, &dev),
        modulation_stats,
    )?;
    decoder.set_token_offset(offset.clone())?;
    // The base model and the tasks' tokenized examples, for training through it.
    let base = match &opts.objective {
        Objective::Mse => None,
        Objective::Sft {
            model,
            batch,
            seq_len,
            bare_share,
            contrast_share,
            contrast_margin,
            contrast_nearest,
        } => {
            if *contrast_nearest > 0 && *contrast_share == 0.0 {
                return Err(DndError::InvalidInput(
                    "contrast_nearest picks the contrast's other task: it needs a contrast share"
                        .into(),
                ));
            }
            let valid = (0.0..=1.0).contains(contrast_share)
                && contrast_margin.is_finite()
                && *contrast_margin >= 0.0;
            if !valid {
                return Err(DndError::InvalidInput(format!(
                    "contrast share {contrast_share} must lie in [0, 1] and margin {contrast_margin} be finite and non-negative"
                )));
            }
            if *contrast_share > 0.0 && tasks.len() < 2 {
                return Err(DndError::InvalidInput(
                    "contrast needs at least two tasks (another task's adapter to compare with)"
                        .into(),
                ));
            }
            let shape = dnd_core::adapters::BaseModelShape::from_path(model)?;
            if !config.base_model.same_widths(&shape) {
                return Err(DndError::Incompatible(format!(
                    "the generator makes adapters for another base model than {}",
                    model.display()
                )));
            }
            let (lm, tok, eos) = super::load_base_model(model, &dev)?;
            // Per task: its examples as served, and (when some steps hide it) without their
            // system prompt.
            let seqs = tasks
                .iter()
                .map(|t| {
                    let with = t
                        .examples
                        .iter()
                        .map(|e| encode(&tok, e, *seq_len, eos))
                        .collect::<Result<Vec<Sequence>>>()?;
                    let bare = (*bare_share > 0.0)
                        .then(|| {
                            t.examples
                                .iter()
                                .map(|e| {
                                    let e = Example {
                                        system: None,
                                        ..e.clone()
                                    };
                                    encode(&tok, &e, *seq_len, eos)
                                })
                                .collect::<Result<Vec<Sequence>>>()
                        })
                        .transpose()?;
                    Ok((with, bare))
                })
                .collect::<Result<Vec<_>>>()?;
            Some((
                lm,
                seqs,
                (*batch).max(1),
                *bare_share,
                (*contrast_share, *contrast_margin),
            ))
        }
    };
    let (mut start, mut report) = if resume {
        let text = std::fs::read_to_string(state_path(&opts.out))
            .map_err(|e| DndError::io(state_path(&opts.out), e))?;
        let s: State = serde_json::from_str(&text)
            .map_err(|e| DndError::json(state_path(&opts.out).display(), e))?;
        match s.tasks_per_step {
            Some(k) if k != opts.tasks_per_step => {
                return Err(DndError::InvalidInput(format!(
                    "{} was trained with {k} tasks a step: resume it with the same (asked for {})",
                    opts.out.display(),
                    opts.tasks_per_step
                )))
            }
            _ => (s.step, s.report),
        }
    } else {
        (0, TrainReport::default())
    };
    report.encoded_prompts = 0;
    // Hard negatives for the contrast: each task's nearest others, per condition kind.
    let partners = match &opts.objective {
        Objective::Sft {
            contrast_share,
            contrast_nearest,
            ..
        } if *contrast_share > 0.0 && *contrast_nearest > 0 => {
            let n = config.num_prompts;
            let embed = |sets: Vec<Vec<&str>>| -> Result<Vec<Vec<usize>>> {
                let rows = sets
                    .iter()
                    .map(|p| pooled(&encoder, p, config.max_length))
                    .collect::<Result<Vec<_>>>()?;
                nearest_others(&Tensor::stack(&rows, 0)?, *contrast_nearest)
            };
            // A task without system prompts is placed by its prompts under both kinds.
            let by_system = embed(
                tasks
                    .iter()
                    .map(|t| match t.systems.is_empty() {
                        true => first_prompts(t, n),
                        false => t.systems.iter().map(String::as_str).collect(),
                    })
                    .collect(),
            )?;
            let by_prompts = embed(tasks.iter().map(|t| first_prompts(t, n)).collect())?;
            Some((by_system, by_prompts))
        }
        _ => None,
    };
    let mut opt = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: opts.lr,
            weight_decay: opts.weight_decay,
            ..Default::default()
        },
    )?;
    let bar = super::progress_bar(opts.steps, "train", opts.progress);
    bar.set_position(start as u64);
    let end = opts
        .stop_after
        .map_or(opts.steps, |k| (start + k).min(opts.steps));
    let n = config.num_prompts;
    let save = |report: &TrainReport, step: usize, config: &mut GeneratorConfig| -> Result<()> {
        let mut tensors = checkpoint::varmap_tensors(&varmap);
        if let Some(w) = &weight {
            tensors.insert("criterion_weight".into(), w.clone());
        }
        if let Some(o) = &offset {
            tensors.insert(TOKEN_OFFSET.into(), o.clone());
        }
        if let Some(a) = &source_anchors {
            tensors.insert(CONDITION_ANCHORS.into(), a.clone());
        }
        if let Some((mean, scale)) = decoder.modulation().map(|m| m.stats()) {
            tensors.insert(MODULATION_MEAN.into(), mean.clone());
            tensors.insert(MODULATION_SCALE.into(), scale.clone());
        }
        let names: Vec<&str> = tasks.iter().map(|t| t.name.as_str()).collect();
        config.untrained = false;
        config.note = Some(format!(
            "trained by `dnd train`: {step} of {} steps on tasks {names:?} (excluded {:?}), lr {}, seed {}",
            opts.steps, opts.exclude, opts.lr, opts.seed
        ));
        checkpoint::save(&opts.out, config, &tensors)?;
        let state = serde_json::to_string(&State {
            step,
            report: report.clone(),
            tasks_per_step: Some(opts.tasks_per_step),
        })
        .expect("state serialises");
        std::fs::write(state_path(&opts.out), state).map_err(|e| DndError::io(&opts.out, e))
    };
    while start < end {
        let step = start;
        // Every step's draws depend only on (seed, step): a resumed run draws the same.
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            opts.seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        opt.set_learning_rate(learning_rate(step, opts.steps, opts.warmup, opts.lr));
        let vars = varmap.all_vars();
        let k = opts.tasks_per_step;
        let (mut drawn, mut losses) = (Vec::with_capacity(k), Vec::with_capacity(k));
        let mut sum: Option<GradStore> = None;
        for _ in 0..k {
            // Distinct tasks; with one a step the draw is the single-task recipe's.
            let ti = loop {
                let t = rng.random_range(0..tasks.len());
                if !drawn.contains(&t) {
                    break t;
                }
            };
            drawn.push(ti);
            let task = tasks[ti];
            let target = match &base {
                None => Some(load_target(
                    &task.checkpoints[rng.random_range(0..task.checkpoints.len())],
                )?),
                Some(_) => None,
            };
            let by_system = opts.system_share > 0.0 && rng.random_bool(opts.system_share.min(1.0));
            let prompts = condition_prompts(task, by_system, n, &mut rng);
            let cond = cache.noisy_condition(&prompts, &mut rng, opts.condition_noise)?;
            let pred = decoder.forward(&cond)?.squeeze(0)?;
            let (l, grads) = match (&target, &base) {
                (Some(target), _) => {
                    let tgt = (target + noise(&mut rng, target.dims(), opts.target_noise)?)?;
                    let w = weight.as_ref().expect("the MSE recipe has its weight");
                    let w4 = w.reshape((w.dim(0)?, 1, 1))?;
                    let loss = (pred - tgt)?.sqr()?.broadcast_mul(&w4)?.mean_all()?;
                    (loss.to_scalar::<f32>()?, loss.backward()?)
                }
                (None, Some((lm, seqs, batch, bare_share, (contrast_share, margin)))) => {
                    let (with, bare) = &seqs[ti];
                    let idx =
                        rand::seq::index::sample(&mut rng, with.len(), (*batch).min(with.len()));
                    let shown = match bare {
                        Some(bare) if rng.random_bool(bare_share.min(1.0)) => bare,
                        _ => with,
                    };
                    let batch: Vec<Sequence> = idx.into_iter().map(|i| shown[i].clone()).collect();
                    let (l, surrogate) = through_base_model(lm, &layout, &pred, &batch)?;
                    // Drawn only when contrasting, so that runs without it draw as before.
                    let other =
                        (*contrast_share > 0.0 && rng.random_bool(*contrast_share)).then(|| {
                            match &partners {
                                Some((by_sys, by_prompts)) => {
                                    let near = if by_system { by_sys } else { by_prompts };
                                    tasks[near[ti][rng.random_range(0..near[ti].len())]]
                                }
                                None => {
                                    let j = rng.random_range(0..tasks.len() - 1);
                                    tasks[if j >= ti { j + 1 } else { j }]
                                }
                            }
                        });
                    match other {
                        Some(other) => {
                            let prompts = condition_prompts(other, by_system, n, &mut rng);
                            let c =
                                cache.noisy_condition(&prompts, &mut rng, opts.condition_noise)?;
                            let wrong = decoder.forward(&c)?.squeeze(0)?;
                            let (lw, sw) = through_base_model(lm, &layout, &wrong, &batch)?;
                            let short = *margin as f32 - (lw - l);
                            report.contrast_gaps.push(lw - l);
                            if short > 0.0 {
                                (l + short, ((surrogate * 2.0)? - sw)?.backward()?)
                            } else {
                                (l, surrogate.backward()?)
                            }
                        }
                        None => (l, surrogate.backward()?),
                    }
                }
                (None, None) => unreachable!("a target or a base model per objective"),
            };
            if !l.is_finite() {
                // Saved checkpoints stay as they were: the run resumes from the last one.
                return Err(DndError::NonFinite(format!(
                    "step {step} (task {}): the loss is {l}; lower the learning rate",
                    task.name
                )));
            }
            losses.push(l);
            *report.task_steps.entry(task.name.clone()).or_default() += 1;
            report.system_steps += usize::from(by_system);
            match &mut sum {
                None => sum = Some(grads),
                Some(s) => accumulate(s, grads, &vars)?,
            }
        }
        let mut grads = sum.expect("at least one task a step");
        if k > 1 {
            scale(&mut grads, &vars, 1.0 / k as f64)?;
        }
        let l = losses.iter().sum::<f32>() / k as f32;
        let mut sq = 0f64;
        for v in &vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
        }
        let norm = sq.sqrt();
        if norm > opts.grad_clip {
            scale(&mut grads, &vars, opts.grad_clip / norm)?;
        }
        opt.step(&grads)?;
        report.losses.push(l);
        bar.set_message(format!("loss {l:.5}"));
        bar.inc(1);
        start += 1;
        if start % opts.save_every.max(1) == 0 || start == end {
            report.encoded_prompts = cache.encoded;
            save(&report, start, &mut config)?;
        }
    }
    bar.finish();
    report.encoded_prompts = cache.encoded;
    if let Some(png) = &opts.loss_png {
        plot::line_chart(&report.losses, png)?;
    }
    Ok(report)
}

/// Adds `more`'s gradients of `vars` into `sum` (the tasks of one step).
fn accumulate(sum: &mut GradStore, mut more: GradStore, vars: &[Var]) -> Result<()> {
    for v in vars {
        if let Some(g) = more.remove(v.as_tensor()) {
            let total = match sum.remove(v.as_tensor()) {
                Some(s) => (s + g)?,
                None => g,
            };
            sum.insert(v.as_tensor(), total);
        }
    }
    Ok(())
}

/// Multiplies the gradients of `vars` by `k`.
fn scale(grads: &mut GradStore, vars: &[Var], k: f64) -> Result<()> {
    for v in vars {
        if let Some(g) = grads.remove(v.as_tensor()) {
            grads.insert(v.as_tensor(), (g * k)?);
        }
    }
    Ok(())
}

/// The answer loss of `batch` with the LoRA of `tokens` applied, and a scalar whose gradient
/// with respect to `tokens` (and whatever computed them) is the loss's:
/// `Σ ⟨A, ∂loss/∂A⟩ + ⟨B, ∂loss/∂B⟩` with the factor gradients held constant.
pub fn through_base_model(
    model: &super::CausalLm,
    layout: &TokenLayout,
    tokens: &Tensor,
    batch: &[Sequence],
) -> Result<(f32, Tensor)> {
    let factors = layout.factors(tokens)?;
    let pairs = factors
        .iter()
        .map(|(t, a, b)| {
            Ok((
                *t,
                LoraPair {
                    a: a.detach().contiguous()?,
                    b: b.detach().contiguous()?,
                },
            ))
        })
        .collect::<Result<BTreeMap<_, _>>>()?;
    let spec = layout.spec();
    let adapter = LoraAdapter::new(spec.rank, spec.alpha, pairs)?;
    let g = lora_gradients(model, batch, &adapter)?;
    let mut terms = Vec::with_capacity(2 * factors.len());
    for (t, a, b) in &factors {
        let gp = g.grads.get(t).ok_or_else(|| {
            DndError::Incompatible(format!(
                "no gradient for layer {} {}",
                t.layer,
                t.module.name()
            ))
        })?;
        terms.push((a * &gp.a)?.sum_all()?);
        terms.push((b * &gp.b)?.sum_all()?);
    }
    let surrogate = Tensor::stack(&terms, 0)?.sum_all()?;
    Ok((g.loss, surrogate))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_others_rank_by_cosine_and_skip_self() {
        // Unit vectors at angles 0, 10, 80 and 30 degrees.
        let rows: Vec<f32> = [0f32, 10.0, 80.0, 30.0]
            .iter()
            .flat_map(|d| [d.to_radians().cos(), d.to_radians().sin()])
            .collect();
        let emb = Tensor::from_vec(rows, (4, 2), &Device::Cpu).unwrap();
        let near = nearest_others(&emb, 2).unwrap();
        assert_eq!(near, vec![vec![1, 3], vec![0, 3], vec![3, 1], vec![1, 0]]);
        assert_eq!(nearest_others(&emb, 9).unwrap()[2], vec![3, 1, 0]);
    }

    #[test]
    fn averaged_task_gradients_are_the_gradient_of_the_mean_loss() {
        let w =
            Var::from_tensor(&Tensor::new(&[0.5f32, -1.0, 2.0], &Device::Cpu).unwrap()).unwrap();
        let x1 = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
        let x2 = Tensor::new(&[-2f32, 0.5, 1.0], &Device::Cpu).unwrap();
        let loss = |x: &Tensor| {
            (w.as_tensor() * x)
                .unwrap()
                .sum_all()
                .unwrap()
                .sqr()
                .unwrap()
        };
        let vars = [w.clone()];
        let mut sum = loss(&x1).backward().unwrap();
        accumulate(&mut sum, loss(&x2).backward().unwrap(), &vars).unwrap();
        scale(&mut sum, &vars, 0.5).unwrap();
        // d/dw of ((w·x1)² + (w·x2)²) / 2 = (w·x1) x1 + (w·x2) x2, by hand.
        let (d1, d2) = (0.5f32 - 2.0 + 6.0, -1.0f32 - 0.5 + 2.0);
        let want = [d1 - 2.0 * d2, 2.0 * d1 + 0.5 * d2, 3.0 * d1 + d2];
        let got = sum.get(w.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        for (g, e) in got.iter().zip(want) {
            assert!((g - e).abs() < 1e-5, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        let lr = |s| learning_rate(s, 110, 10, 1.0);
        assert!((lr(0) - 0.1).abs() < 1e-12);
        assert!((lr(9) - 1.0).abs() < 1e-12);
        assert!((lr(10) - 1.0).abs() < 1e-12);
        assert!((lr(60) - 0.5).abs() < 1e-12);
        assert!(lr(109) < 0.001);
    }

    #[test]
    fn streamed_statistics_equal_the_stacked_ones() {
        let dev = Device::Cpu;
        let ts: Vec<Tensor> = (0..5)
            .map(|i| (Tensor::randn(0f32, 1.0, (3, 4, 6), &dev).unwrap() * (i + 1) as f64).unwrap())
            .collect();
        let mut stats = TokenStats::default();
        for t in &ts {
            stats.add(t).unwrap();
        }
        let diff = dnd_core::test_util::max_abs_diff;
        let want = criterion_weight(&ts).unwrap();
        assert!(diff(&stats.criterion_weight().unwrap(), &want) < 1e-5);
        let mean = Tensor::stack(&ts, 0).unwrap().mean(0).unwrap();
        assert!(diff(&stats.mean().unwrap(), &mean) < 1e-6);
    }

    #[test]
    fn criterion_weight_is_the_normalised_per_token_std() {
        // Token 0 varies by ±1 across two checkpoints, token 1 by ±3.
        let a = Tensor::new(&[[[1f32]], [[3f32]]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[[-1f32]], [[-3f32]]], &Device::Cpu).unwrap();
        let w = criterion_weight(&[a, b]).unwrap().to_vec1::<f32>().unwrap();
        assert!(
            (w[0] - 0.5).abs() < 1e-5 && (w[1] - 1.5).abs() < 1e-5,
            "{w:?}"
        );
    }
}
