//! Training (CPU): LoRA steps on an explicit backward pass ([`backward`]), generator training on
//! candle's autograd.
//!
//! - [`model::CausalLm`]: the training forward of Qwen2 / Llama models; its logits match the
//!   inference model's (checked against the transformers fixtures of the golden tiny models).
//! - [`lora::TrainableLora`], [`data`], [`collect()`]: LoRA fine-tuning on a task file with the
//!   loss on the answer tokens, keeping a PEFT checkpoint of each of the last K steps.
//! - [`generator::train`]: generator training from those checkpoints and their tasks' prompts.
//! - [`eval`]: accuracy on a test split, greedy, the bracketed choice parsed from the reply.

#![warn(missing_docs)]

pub mod adamw;
pub mod backward;
pub mod collect;
pub mod data;
pub mod eval;
pub mod generator;
pub mod gguf;
pub mod kernels;
pub mod lora;
pub mod model;
pub mod plot;
pub mod tasks;

pub use collect::{collect, CollectOptions};
pub use generator::{train, Objective, TaskSet, TrainOptions, TrainReport};
pub use lora::TrainableLora;
pub use model::{CausalLm, LmConfig};

use std::path::Path;

use candle_core::Device;
use tokenizers::Tokenizer;

use dnd_core::error::{DndError, Result};

/// A base model for training or evaluation, its tokenizer and its end-of-sequence id: from a
/// Hugging Face folder (config.json, tokenizer.json, safetensors) or a `.gguf` file.
pub fn load_base_model(
    path: impl AsRef<Path>,
    device: &Device,
) -> Result<(CausalLm, Tokenizer, u32)> {
    let path = path.as_ref();
    if path.extension().is_some_and(|e| e == "gguf") {
        return gguf::load_gguf(path, device);
    }
    let model = CausalLm::load(path, device)?;
    let eos = model.config().eos_token_id().ok_or_else(|| {
        DndError::Incompatible(format!(
            "{}: config.json has no eos_token_id",
            path.display()
        ))
    })?;
    let tok = Tokenizer::from_file(path.join("tokenizer.json")).map_err(|e| {
        DndError::Tokenizer(format!("{}: {e}", path.join("tokenizer.json").display()))
    })?;
    Ok((model, tok, eos))
}

/// A progress bar with ETA for a long training step (`prefix` names it; hidden when `show` is
/// false, e.g. in tests).
pub(crate) fn progress_bar(len: usize, prefix: &str, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let style = indicatif::ProgressStyle::with_template(&format!(
        "{prefix} {{bar:30}} {{pos}}/{{len}} [{{elapsed}} < {{eta}}] {{msg}}"
    ))
    .expect("a valid template");
    indicatif::ProgressBar::new(len as u64).with_style(style)
}
