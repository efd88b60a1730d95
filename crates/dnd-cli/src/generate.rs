//! `dnd generate`: a LoRA adapter from prompts.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use clap::ValueEnum;
use dnd_core::adapters::BaseModelShape;
use dnd_core::prompts::{read_prompts, sample_prompts};
use dnd_core::{Generator, LoadOptions};

use crate::common::{spinner, DEFAULT_ENCODER};

/// Compute dtypes the generator runs in.
// No doc comments on the variants: clap would print them as `--dtype` value descriptions.
#[derive(Clone, Copy, ValueEnum)]
enum Dtype {
    F32,
    Bf16,
}

impl From<Dtype> for DType {
    fn from(d: Dtype) -> DType {
        match d {
            Dtype::F32 => DType::F32,
            Dtype::Bf16 => DType::BF16,
        }
    }
}

/// Generate a LoRA adapter (PEFT folder) from prompts.
#[derive(clap::Args)]
pub struct Args {
    /// The generator checkpoint.
    #[arg(long)]
    checkpoint: PathBuf,
    /// The Sentence-BERT folder (scripts/fetch-assets.sh installs all-MiniLM-L6-v2).
    #[arg(long, default_value = DEFAULT_ENCODER)]
    encoder: PathBuf,
    /// Prompt file: a task file, a JSON list of strings, or one prompt per line.
    #[arg(long)]
    prompts: PathBuf,
    /// Use this many prompts of the file, sampled with --seed (default: the generator's N).
    #[arg(long)]
    sample: Option<usize>,
    /// Seed of the prompt sample.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Refuse unless the generator fits this base model (folder, config.json or .gguf).
    #[arg(long)]
    base_model: Option<PathBuf>,
    /// Compute dtype.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: Dtype,
    /// Run on CUDA device N (needs the `cuda` feature).
    #[arg(long)]
    cuda: Option<usize>,
    /// Output PEFT folder.
    #[arg(long)]
    out: PathBuf,
}

impl Args {
    /// The library's load options; fails when `--cuda` names a device this build cannot open.
    fn load_options(&self) -> Result<LoadOptions> {
        let device = match self.cuda {
            Some(i) => Device::new_cuda(i).context(
                "CUDA device (build with `cargo build --manifest-path crates/Cargo.toml --bin dnd --features dnd-cli/cuda`)",
            )?,
            None => Device::Cpu,
        };
        Ok(LoadOptions {
            device,
            dtype: self.dtype.into(),
        })
    }
}

/// Loads the generator, checks it against `--base-model`, and writes the adapter with the
/// time of each stage.
pub fn run(args: Args) -> Result<()> {
    let opts = args.load_options()?;
    let t0 = Instant::now();
    let pb = spinner("loading generator");
    let gen = Generator::load(&args.checkpoint, &args.encoder, &opts)?;
    pb.finish_and_clear();
    if gen.config().is_untrained() {
        eprintln!("WARNING: RANDOM WEIGHTS: this generator is untrained, its adapters are noise");
    }
    if let Some(bm) = &args.base_model {
        gen.check_base_model(&BaseModelShape::from_path(bm)?)?;
    }
    let all = read_prompts(&args.prompts)?;
    let n = args.sample.unwrap_or(gen.config().num_prompts);
    let chosen = sample_prompts(&all, n, args.seed);
    eprintln!(
        "loaded in {:.2}s; {} of {} prompts",
        t0.elapsed().as_secs_f64(),
        chosen.len(),
        all.len()
    );
    let pb = spinner("generating");
    let (adapter, t) = gen.generate_timed(&chosen)?;
    pb.finish_and_clear();
    adapter.check_finite()?;
    adapter.save_peft(&args.out, gen.config().base_model_name.as_deref())?;
    eprintln!(
        "wrote {} (rank {}, {} pairs, {:.1} MB): encode {:.3}s, decode {:.3}s, detokenize {:.3}s",
        args.out.display(),
        adapter.rank(),
        adapter.pairs().len(),
        adapter.size_in_bytes() as f64 / 1e6,
        t.encode.as_secs_f64(),
        t.decode.as_secs_f64(),
        t.detokenize.as_secs_f64()
    );
    Ok(())
}
