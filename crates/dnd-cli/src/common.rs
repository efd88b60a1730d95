//! What several rooms share: default values written once, the argument groups `init`, `convert`,
//! `anchors` and `distance` flatten in, and small helpers.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use dnd_core::adapters::{BaseModelShape, LoraSpec, Module};
use dnd_training::data::Example;
use dnd_training::eval::{self, EvalOutputs, EvalRow};
use indicatif::{ProgressBar, ProgressStyle};

/// The Sentence-BERT folder `scripts/fetch-assets.sh` installs: the default encoder of every
/// room that loads a generator or trains one.
pub const DEFAULT_ENCODER: &str = ".assets/all-MiniLM-L6-v2";

/// Every projection of a layer: the adapted modules of the paper's adapters.
pub const DEFAULT_MODULES: &str = "q_proj,k_proj,v_proj,o_proj,up_proj,gate_proj,down_proj";

/// LoRA rank; `collect` and `init` share it so that a generator fits the collected checkpoints.
pub const DEFAULT_RANK: usize = 8;

/// LoRA alpha, shared for the same reason as [`DEFAULT_RANK`].
pub const DEFAULT_ALPHA: f64 = 16.0;

/// Sequences per step of base-model fine-tuning: `collect`'s, and `train --objective sft`'s,
/// which mirrors it.
pub const DEFAULT_BATCH: usize = 4;

/// Most tokens per sequence of base-model fine-tuning (`collect`, `train --objective sft`).
pub const DEFAULT_SEQ_LEN: usize = 256;

/// A generator checkpoint and the encoder it runs with.
#[derive(clap::Args)]
pub struct GeneratorFiles {
    /// The generator checkpoint.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The Sentence-BERT folder.
    #[arg(long, default_value = DEFAULT_ENCODER)]
    pub encoder: PathBuf,
}

impl GeneratorFiles {
    /// The generator, on the CPU in f32.
    pub fn load(&self) -> Result<dnd_core::Generator> {
        let opts = dnd_core::LoadOptions::default();
        Ok(dnd_core::Generator::load(
            &self.checkpoint,
            &self.encoder,
            &opts,
        )?)
    }
}

/// The base model and LoRA shape a generator's adapters are for (`init`, `convert`).
#[derive(clap::Args)]
pub struct LoraArgs {
    /// Base model: a model folder, its config.json, or a .gguf file.
    #[arg(long)]
    pub base_model: Option<PathBuf>,
    /// Name recorded in the checkpoint (defaults to the base model's file or folder name).
    #[arg(long)]
    pub base_model_name: Option<String>,
    /// LoRA rank of the adapters.
    #[arg(long, default_value_t = DEFAULT_RANK)]
    pub rank: usize,
    /// LoRA alpha of the adapters.
    #[arg(long, default_value_t = DEFAULT_ALPHA)]
    pub alpha: f64,
    /// Chunk width of the parameter tokens.
    #[arg(long)]
    pub chunk_width: Option<usize>,
    /// Adapted modules, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = DEFAULT_MODULES)]
    pub modules: Vec<String>,
}

impl LoraArgs {
    /// The base model's shape, its recorded name and the LoRA spec. `--base-model` and
    /// `--chunk-width` are optional to clap only because `init --preset` replaces them.
    pub fn resolve(&self) -> Result<(BaseModelShape, String, LoraSpec)> {
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

/// `LABEL=VALUE` (both non-empty) of a repeatable `flag`; the error names the flag and the
/// expected form (`what` names the value).
pub fn split_label<'a>(arg: &'a str, flag: &str, what: &str) -> Result<(&'a str, &'a str)> {
    arg.split_once('=')
        .filter(|(l, v)| !l.is_empty() && !v.is_empty())
        .with_context(|| format!("{flag} {arg:?}: expected LABEL={what}"))
}

/// An `--adapter LABEL=PEFT_DIR` argument, loaded on the CPU.
pub fn labelled_adapter(arg: &str) -> Result<(String, dnd_core::LoraAdapter)> {
    let (label, dir) = split_label(arg, "--adapter", "PEFT_DIR")?;
    let adapter = dnd_core::LoraAdapter::load_peft(dir, &candle_core::Device::Cpu)
        .with_context(|| format!("--adapter {label}"))?;
    Ok((label.to_string(), adapter))
}

/// `q_proj`, `k_proj`, ... to modules.
pub fn parse_modules(names: &[String]) -> Result<Vec<Module>> {
    names
        .iter()
        .map(|m| Module::from_name(m.trim()).with_context(|| format!("unknown module {m:?}")))
        .collect()
}

/// A spinner on stderr for the steps that take seconds without a progress count.
pub fn spinner(msg: &str) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").unwrap());
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    pb
}

/// Prints an evaluation's table and writes its outputs, named after the task file (`eval` and
/// `score` report alike).
pub fn print_and_write(
    task: &Path,
    rows: &[EvalRow],
    examples: &[Example],
    outputs: &EvalOutputs,
) -> Result<()> {
    let name = task
        .file_stem()
        .map_or("task".into(), |s| s.to_string_lossy().into_owned());
    print!("{}", eval::markdown(&name, rows, examples));
    eval::write_outputs(&name, rows, examples, outputs)?;
    Ok(())
}
