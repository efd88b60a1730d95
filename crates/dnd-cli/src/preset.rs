//! `dnd preset`: a named configuration as JSON.

use anyhow::{Context, Result};
use dnd_core::generator::presets;

/// Print a named configuration as JSON.
#[derive(clap::Args)]
pub struct Args {
    /// smollm2-135m-small or qwen25-05b-common-sense.
    name: String,
}

/// Prints the preset, or lists the known names when there is none of that name.
pub fn run(args: Args) -> Result<()> {
    let name = &args.name;
    let cfg = presets::by_name(name).with_context(|| {
        format!(
            "unknown preset {name:?}; known: {}",
            presets::NAMES.join(", ")
        )
    })??;
    println!("{}", serde_json::to_string_pretty(&cfg)?);
    Ok(())
}
