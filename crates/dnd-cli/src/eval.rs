//! `dnd eval`: accuracy of the base model and of adapters on a test split.

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::Device;
use dnd_core::LoraAdapter;
use dnd_training::{data, eval::EvalOutputs};

use crate::common::{labelled_adapter, print_and_write};

/// Accuracy of the base model and of adapters on a task's test split (greedy decoding, the
/// bracketed choice parsed from the start of the reply), as a Markdown table and a PNG.
#[derive(clap::Args)]
pub struct Args {
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
}

impl From<&Args> for EvalOutputs {
    fn from(a: &Args) -> Self {
        EvalOutputs {
            markdown: a.out_md.clone(),
            png: a.out_png.clone(),
            replies: a.out_replies.clone(),
            summary: a.out_json.clone(),
        }
    }
}

/// Scores each system (the base model, then the adapters in order) on the same examples.
pub fn run(args: Args) -> Result<()> {
    let (lm, tok, eos) = dnd_training::load_base_model(&args.model, &Device::Cpu)?;
    let mut examples = data::read_examples(&args.task)?;
    // Like `prompts::sample_prompts` (same draw, kept in order), but over examples: that
    // function takes prompt strings only.
    if let Some(n) = args.limit.filter(|&n| n < examples.len()) {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
        let mut idx = rand::seq::index::sample(&mut rng, examples.len(), n).into_vec();
        idx.sort_unstable();
        examples = idx.into_iter().map(|i| examples[i].clone()).collect();
    }
    let mut systems: Vec<(String, Option<LoraAdapter>)> = Vec::new();
    if !args.no_base {
        systems.push(("base".into(), None));
    }
    for a in &args.adapters {
        let (label, adapter) = labelled_adapter(a)?;
        systems.push((label, Some(adapter)));
    }
    if systems.is_empty() {
        bail!("nothing to evaluate: give --adapter or drop --no-base");
    }
    let mut rows = Vec::new();
    for (label, adapter) in &systems {
        rows.push(dnd_training::eval::accuracy(
            &lm,
            &tok,
            &examples,
            adapter.as_ref(),
            args.max_new_tokens,
            args.seq_len,
            eos,
            label,
            true,
        )?);
    }
    print_and_write(&args.task, &rows, &examples, &EvalOutputs::from(&args))
}
