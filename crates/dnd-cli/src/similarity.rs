//! `dnd similarity`: how alike adapters are, as weight updates.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use dnd_core::prompts::{read_prompts, sample_prompts};
use dnd_core::LoraAdapter;

use crate::common::{labelled_adapter, split_label, GeneratorFiles};

/// The norm of each adapter's weight update (all of `scale * B A`, Frobenius) and the cosine
/// between every two: how much of what a generator makes is specific to its condition. Two
/// fine-tuned LoRAs of different tasks are nearly orthogonal; adapters whose pairwise cosines
/// are near 1 do the same thing whatever they were made from.
#[derive(clap::Args)]
pub struct Args {
    /// An adapter as LABEL=PEFT_DIR; repeatable.
    #[arg(long = "adapter")]
    adapters: Vec<String>,
    /// A condition as LABEL=PROMPT_FILE (a task file, a JSON list of strings, or one prompt
    /// per line), made into an adapter by --checkpoint; repeatable.
    #[arg(long = "condition", requires = "checkpoint")]
    conditions: Vec<String>,
    /// The generator of the --condition adapters.
    #[arg(long, requires = "conditions")]
    checkpoint: Option<std::path::PathBuf>,
    /// The Sentence-BERT folder the generator runs with.
    #[arg(long, default_value = crate::common::DEFAULT_ENCODER)]
    encoder: std::path::PathBuf,
    /// Use this many prompts of each condition file, sampled with --seed (default: the
    /// generator's N), as `dnd generate` does.
    #[arg(long)]
    sample: Option<usize>,
    /// Seed of the prompt samples.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Prints a Markdown table: each adapter's update norm and its cosine with every other, then
/// the mean cosine over distinct pairs.
pub fn run(args: Args) -> Result<()> {
    let mut named: Vec<(String, LoraAdapter)> = Vec::new();
    for a in &args.adapters {
        named.push(labelled_adapter(a)?);
    }
    if let Some(checkpoint) = &args.checkpoint {
        let gen = GeneratorFiles {
            checkpoint: checkpoint.clone(),
            encoder: args.encoder.clone(),
        }
        .load()?;
        let n = args.sample.unwrap_or(gen.config().num_prompts);
        for c in &args.conditions {
            let (label, file) = split_label(c, "--condition", "PROMPT_FILE")?;
            let prompts = sample_prompts(&read_prompts(file)?, n, args.seed);
            let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
            let adapter = gen
                .generate(&refs)
                .with_context(|| format!("--condition {label}"))?;
            named.push((label.to_string(), adapter));
        }
    }
    if named.len() < 2 {
        bail!("give at least two adapters (--adapter, or --condition with --checkpoint)");
    }
    // In f64 once, so that every inner product reads the factors without converting them.
    let adapters: Vec<LoraAdapter> = named
        .iter()
        .map(|(_, a)| a.to(&Device::Cpu, DType::F64))
        .collect::<dnd_core::error::Result<_>>()?;
    // Each pair once: the inner product is symmetric.
    let k = adapters.len();
    let mut gram = vec![0f64; k * k];
    for i in 0..k {
        for j in i..k {
            let v = adapters[i].inner(&adapters[j])?;
            gram[i * k + j] = v;
            gram[j * k + i] = v;
        }
    }
    let norm = |i: usize| gram[i * k + i].sqrt();
    let labels: Vec<&str> = named.iter().map(|(l, _)| l.as_str()).collect();
    println!("| adapter | update norm | {} |", labels.join(" | "));
    println!("|---|---|{}", "---|".repeat(k));
    let (mut sum, mut pairs) = (0.0, 0usize);
    for (i, label) in labels.iter().enumerate() {
        let mut cells = Vec::with_capacity(k);
        for j in 0..k {
            let cos = gram[i * k + j] / (norm(i) * norm(j));
            if j > i {
                sum += cos;
                pairs += 1;
            }
            cells.push(format!("{cos:.3}"));
        }
        println!("| {label} | {:.3} | {} |", norm(i), cells.join(" | "));
    }
    println!(
        "\nmean cosine over {pairs} pairs: {:.3}",
        sum / pairs as f64
    );
    Ok(())
}
