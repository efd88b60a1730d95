//! `dnd anchors`: a generator's training conditions, stored for the server's abstention.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use dnd_core::generator::{anchors::CONDITION_ANCHORS, checkpoint};
use dnd_core::prompts::{read_prompts, read_systems, sample_prompts};

use crate::common::GeneratorFiles;

/// Store the generator's training conditions as anchors (per task: each system prompt of
/// its file, and a sample of its prompts), so that the server can abstain on prompts far
/// from all of them (`--dnd-abstain-distance`).
#[derive(clap::Args)]
pub struct Args {
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
}

/// Encodes the anchors and writes the input checkpoint's tensors with them added.
pub fn run(args: Args) -> Result<()> {
    let ckpt = &args.generator.checkpoint;
    let gen = args.generator.load()?;
    let n = gen.config().num_prompts;
    let (mut names, mut rows) = (Vec::new(), Vec::new());
    for t in &args.tasks {
        let (name, file) = parse_named_file(t)?;
        let systems = read_systems(&file)?;
        for (i, sys) in systems.iter().enumerate() {
            names.push(format!("{name}: system {}", i + 1));
            rows.push(gen.pooled(&[sys])?);
        }
        let prompts = sample_prompts(&read_prompts(&file)?, n, args.seed);
        names.push(format!("{name}: prompts"));
        rows.push(gen.pooled(&prompts)?);
    }
    let mut config = checkpoint::read_config(ckpt)?;
    config.anchor_names = names;
    let mut tensors: HashMap<String, Tensor> = candle_core::safetensors::load(ckpt, &Device::Cpu)?
        .into_iter()
        .collect();
    tensors.insert(CONDITION_ANCHORS.into(), Tensor::stack(&rows, 0)?);
    checkpoint::save(&args.out, &config, &tensors)?;
    eprintln!(
        "{} anchors from {} tasks; wrote {}",
        config.anchor_names.len(),
        args.tasks.len(),
        args.out.display()
    );
    Ok(())
}

/// `NAME=TASK_FILE` (or `NAME=TASK_FILE:ANYTHING`, as `train` takes it) to its name and file.
fn parse_named_file(s: &str) -> Result<(String, PathBuf)> {
    let (name, rest) = s
        .split_once('=')
        .with_context(|| format!("--task {s:?}: expected NAME=TASK_FILE"))?;
    let file = rest.rsplit_once(':').map_or(rest, |(f, _)| f);
    Ok((name.to_string(), PathBuf::from(file)))
}
