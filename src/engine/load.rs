//! Loading a GGUF model with a chosen activation dtype.
//!
//! mistral.rs 0.8.1's `GgufModelBuilder` always asks its loader for `ModelDType::Auto` (bf16 on
//! a CPU): there is no way to run a GGUF model's activations in f32 through it, which the
//! golden comparisons need and which some users want for accuracy. This builds the same
//! pipeline from mistral.rs's public loader with the dtype passed through.

use std::path::PathBuf;

use anyhow::{Context, Result};
use mistralrs_core::{
    AutoDeviceMapParams, DefaultSchedulerMethod, DeviceMapSetting, GGUFLoaderBuilder,
    GGUFSpecificConfig, MistralRsBuilder, ModelDType, SchedulerConfig, TokenSource,
};

/// What [`load_gguf`] loads and how.
#[derive(Debug, Clone)]
pub struct GgufOptions {
    /// The folder holding the GGUF file(s).
    pub dir: PathBuf,
    /// The GGUF file names in `dir` (several for a split model).
    pub files: Vec<String>,
    /// A folder with `tokenizer.json` (and `tokenizer_config.json`) to use instead of the
    /// tokenizer inside the GGUF file; `None` uses the file's own.
    pub tokenizer_dir: Option<PathBuf>,
    /// A chat template (Jinja literal, or a .json / .jinja file) overriding the model's.
    pub chat_template: Option<String>,
    /// Activation dtype (`ModelDType::Auto`: what `GgufModelBuilder` uses).
    pub dtype: ModelDType,
    /// Run on the CPU even when an accelerator is available.
    pub force_cpu: bool,
    /// Most sequences running at once.
    pub max_seqs: usize,
    /// mistral.rs's prefix-cache size, `None` when off.
    pub prefix_cache_n: Option<usize>,
}

/// Loads a GGUF model as `GgufModelBuilder::build` does, with `opts.dtype` as the activation
/// dtype.
pub async fn load_gguf(opts: &GgufOptions) -> Result<mistralrs::Model> {
    let path = |p: &PathBuf| p.to_string_lossy().into_owned();
    let loader = GGUFLoaderBuilder::new(
        opts.chat_template.clone(),
        opts.tokenizer_dir.as_ref().map(path),
        path(&opts.dir),
        opts.files.clone(),
        GGUFSpecificConfig { topology: None },
        false,
        None,
    )
    .build();
    let device = mistralrs::best_device(opts.force_cpu)?;
    let pipeline = loader
        .load_model_from_hf(
            None,
            TokenSource::None,
            &opts.dtype,
            &device,
            true,
            DeviceMapSetting::Auto(AutoDeviceMapParams::default_text()),
            None,
            None,
        )
        .with_context(|| format!("loading {:?} from {}", opts.files, opts.dir.display()))?;
    let scheduler = SchedulerConfig::DefaultScheduler {
        method: DefaultSchedulerMethod::Fixed(
            opts.max_seqs
                .try_into()
                .context("the most sequences at once must be at least 1")?,
        ),
    };
    let runner = MistralRsBuilder::new(pipeline, scheduler, false, None)
        .with_no_prefix_cache(opts.prefix_cache_n.is_none())
        .with_prefix_cache_n(opts.prefix_cache_n.unwrap_or(16))
        .build()
        .await;
    Ok(mistralrs::Model::new(runner))
}
