//! `dnd cast`: a generator checkpoint stored in another dtype.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device};
use dnd_core::generator::checkpoint;

/// Store a generator checkpoint's tensors in another dtype (f16 halves a shipped file;
/// loading converts to the compute dtype).
#[derive(clap::Args)]
pub struct Args {
    /// The generator checkpoint.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Storage dtype: f16, bf16 or f32.
    #[arg(long, value_parser = ["f16", "bf16", "f32"])]
    dtype: String,
    /// Output checkpoint.
    #[arg(long)]
    out: PathBuf,
}

/// Converts every tensor and keeps the configuration as it is.
pub fn run(args: Args) -> Result<()> {
    let dt = match args.dtype.as_str() {
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        _ => DType::F32,
    };
    let config = checkpoint::read_config(&args.checkpoint)?;
    let tensors = candle_core::safetensors::load(&args.checkpoint, &Device::Cpu)?
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(dt)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    checkpoint::save(&args.out, &config, &tensors)?;
    eprintln!(
        "{} tensors as {}; wrote {}",
        tensors.len(),
        args.dtype,
        args.out.display()
    );
    Ok(())
}
