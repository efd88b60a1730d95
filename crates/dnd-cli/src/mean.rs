//! `dnd mean`: the mean of PEFT adapters, the baseline for an unseen task.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;
use dnd_core::LoraAdapter;

/// The adapter whose update is the mean of the given PEFT adapters' updates (ranks
/// stacked, exact): the baseline for a task none of them was trained on.
#[derive(clap::Args)]
pub struct Args {
    /// A PEFT adapter folder; repeatable (at least one).
    #[arg(long = "adapter", required = true)]
    adapters: Vec<PathBuf>,
    /// Output PEFT folder.
    #[arg(long)]
    out: PathBuf,
}

/// Loads the adapters and writes their mean.
pub fn run(args: Args) -> Result<()> {
    let loaded = args
        .adapters
        .iter()
        .map(|d| LoraAdapter::load_peft(d, &Device::Cpu))
        .collect::<dnd_core::error::Result<Vec<_>>>()?;
    let mean = LoraAdapter::mean(&loaded)?;
    mean.save_peft(&args.out, None)?;
    eprintln!(
        "mean of {} adapters (rank {}); wrote {}",
        loaded.len(),
        mean.rank(),
        args.out.display()
    );
    Ok(())
}
