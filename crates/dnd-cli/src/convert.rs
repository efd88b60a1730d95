//! `dnd convert`: the authors' released `.pth` generators in this project's format.

use std::path::PathBuf;

use anyhow::Result;
use dnd_core::convert::{convert_pth, ConvertOptions};

use crate::common::{spinner, LoraArgs};

/// Convert an authors' released .pth generator into this project's checkpoint format.
#[derive(clap::Args)]
pub struct Args {
    /// The PyTorch state dict.
    #[arg(long)]
    pth: PathBuf,
    #[command(flatten)]
    lora: LoraArgs,
    /// Name of the condition encoder the generator was trained with.
    #[arg(long, default_value = "all-MiniLM-L12-v2")]
    encoder_name: String,
    /// Output checkpoint (.safetensors).
    #[arg(long)]
    out: PathBuf,
}

impl Args {
    /// The library's options; fails without `--base-model` and `--chunk-width`, which a state
    /// dict does not record.
    fn options(&self) -> Result<ConvertOptions> {
        let (shape, name, spec) = self.lora.resolve()?;
        Ok(ConvertOptions {
            base_model: shape,
            base_model_name: Some(name),
            lora: spec,
            encoder_name: self.encoder_name.clone(),
        })
    }
}

/// Converts, lists what was not carried over, and prints the resulting configuration.
pub fn run(args: Args) -> Result<()> {
    let opts = args.options()?;
    let pb = spinner("converting");
    let conv = convert_pth(&args.pth, &args.out, &opts)?;
    pb.finish_and_clear();
    if !conv.dropped.is_empty() {
        eprintln!(
            "not carried over ({}): {}",
            conv.dropped.len(),
            conv.dropped.join(", ")
        );
    }
    eprintln!("wrote {}", args.out.display());
    println!("{}", serde_json::to_string_pretty(&conv.config)?);
    Ok(())
}
