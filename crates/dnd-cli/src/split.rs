//! `dnd split`: a task file into train and test files.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// Split a task file into train and test files, deterministically for a seed.
#[derive(clap::Args)]
pub struct Args {
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
}

/// Shuffles the items as JSON values (any fields survive) and writes both parts.
pub fn run(args: Args) -> Result<()> {
    let (task, test_fraction) = (&args.task, args.test_fraction);
    if !(0.0..1.0).contains(&test_fraction) || test_fraction == 0.0 {
        bail!("--test-fraction must be in (0, 1)");
    }
    let text =
        std::fs::read_to_string(task).with_context(|| format!("reading {}", task.display()))?;
    let mut items: Vec<serde_json::Value> = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a JSON list", task.display()))?;
    items.shuffle(&mut rand::rngs::StdRng::seed_from_u64(args.seed));
    let n_test = ((items.len() as f64) * test_fraction).round() as usize;
    let train = items.split_off(n_test);
    for (path, part) in [(&args.test_out, &items), (&args.train_out, &train)] {
        std::fs::write(path, serde_json::to_string(part)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!("{} train / {} test examples", train.len(), items.len());
    Ok(())
}
