//! `dnd inspect`: a checkpoint's configuration.

use std::path::PathBuf;

use anyhow::Result;
use dnd_core::generator::checkpoint;

/// Print a checkpoint's configuration.
#[derive(clap::Args)]
pub struct Args {
    /// The checkpoint.
    checkpoint: PathBuf,
}

/// Prints the configuration as JSON, without loading the weights.
pub fn run(args: Args) -> Result<()> {
    let cfg = checkpoint::read_config(&args.checkpoint)?;
    println!("{}", serde_json::to_string_pretty(&cfg)?);
    Ok(())
}
