//! `dnd distance`: how far prompts are from a generator's training conditions.

use std::path::PathBuf;

use anyhow::{bail, Result};
use dnd_core::prompts::{read_prompts, sample_prompts};

use crate::common::GeneratorFiles;

/// The distance (1 - cosine of pooled encodings) of prompts to the nearest training
/// condition of a generator with anchors: the whole file as one prompt set, or each prompt.
#[derive(clap::Args)]
pub struct Args {
    /// The generator (with anchors: `dnd anchors`).
    #[command(flatten)]
    generator: GeneratorFiles,
    /// Prompt file: a task file, a JSON list of strings, or one prompt per line.
    #[arg(long)]
    prompts: PathBuf,
    /// One line per prompt (as a request's system prompt alone) instead of one set.
    #[arg(long)]
    each: bool,
}

/// Prints `distance<TAB>nearest anchor<TAB>prompt set` per line.
pub fn run(args: Args) -> Result<()> {
    let ckpt = &args.generator.checkpoint;
    let gen = args.generator.load()?;
    if gen.anchors().is_none() {
        bail!(
            "{} has no anchors (add them with `dnd anchors`)",
            ckpt.display()
        );
    }
    let all = read_prompts(&args.prompts)?;
    let sets: Vec<Vec<String>> = if args.each {
        all.iter().map(|p| vec![p.clone()]).collect()
    } else {
        // Seed 0: the set is the whole file unless it has more than the generator's N prompts.
        vec![sample_prompts(&all, gen.config().num_prompts, 0)]
    };
    for set in &sets {
        let near = gen.nearest(set)?.expect("checked above");
        let shown = if args.each {
            set[0].replace('\n', " ")
        } else {
            format!("{} prompts", set.len())
        };
        println!("{:.4}\t{}\t{}", near.distance, near.name, shown);
    }
    Ok(())
}
