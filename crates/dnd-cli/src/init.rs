//! `dnd init`: a generator with random weights.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use dnd_core::generator::{checkpoint, presets, ConditionDecoder, GeneratorConfig};

use crate::common::{spinner, LoraArgs};

/// Create a generator with random weights (for timing, tests, or as training's start).
#[derive(clap::Args)]
pub struct Args {
    /// A named configuration (see --help for the list): smollm2-135m-small,
    /// qwen25-05b-common-sense.
    #[arg(long, conflicts_with_all = ["base_model", "stages"])]
    preset: Option<String>,
    #[command(flatten)]
    lora: LoraArgs,
    /// Prompts per condition N.
    #[arg(long, default_value_t = 16)]
    num_prompts: usize,
    /// Encoder tokens per prompt L.
    #[arg(long, default_value_t = 64)]
    max_length: usize,
    /// Hidden stages between condition and tokens, e.g. "64x32x256,256x16x200".
    #[arg(long)]
    stages: Option<String>,
    /// Odd convolution kernel size.
    #[arg(long, default_value_t = 3)]
    kernel: usize,
    /// Seed of the initial weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output checkpoint (.safetensors).
    #[arg(long)]
    out: PathBuf,
}

impl Args {
    /// The configuration: the preset's, or one built from the base model and the shape flags.
    fn config(&self) -> Result<GeneratorConfig> {
        if let Some(p) = &self.preset {
            return Ok(presets::by_name(p).with_context(|| {
                format!("unknown preset {p:?}; known: {}", presets::NAMES.join(", "))
            })??);
        }
        let (shape, name, spec) = self.lora.resolve()?;
        let hidden = match &self.stages {
            Some(s) => parse_stages(s)?,
            None => vec![],
        };
        let mut cfg = GeneratorConfig::new(
            shape,
            spec,
            presets::minilm(),
            self.num_prompts,
            self.max_length,
            None,
            &hidden,
            self.kernel,
        )?;
        cfg.base_model_name = Some(name);
        Ok(cfg)
    }
}

/// Writes the seeded random generator, marked untrained: its adapters are noise.
pub fn run(args: Args) -> Result<()> {
    let mut cfg = args.config()?;
    let seed = args.seed;
    cfg.untrained = true;
    cfg.note = Some(format!("random weights (seed {seed})"));
    let pb = spinner("initialising weights");
    let (dec, tensors) = ConditionDecoder::random(cfg.clone(), seed, &Device::Cpu, DType::F32)?;
    checkpoint::save(&args.out, &cfg, &tensors)?;
    pb.finish_and_clear();
    eprintln!(
        "wrote {} ({:.1} M parameters, {} tokens of {:?} per adapter)",
        args.out.display(),
        dec.decoder().num_params() as f64 / 1e6,
        dec.layout().num_tokens(),
        dec.layout().token_shape()
    );
    Ok(())
}

/// `"64x32x256,256x16x200"` to the hidden stages' feature shapes.
fn parse_stages(s: &str) -> Result<Vec<[usize; 3]>> {
    s.split(',')
        .map(|st| {
            let v: Vec<usize> = st
                .trim()
                .split('x')
                .map(|d| d.trim().parse::<usize>())
                .collect::<std::result::Result<_, _>>()
                .with_context(|| format!("stage {st:?} is not NxHxW"))?;
            <[usize; 3]>::try_from(v).map_err(|_| anyhow::anyhow!("stage {st:?} is not NxHxW"))
        })
        .collect()
}
