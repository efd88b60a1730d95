//! The DnD generator: prompts to a LoRA adapter in one forward pass.
//!
//! `prompts -> TextEncoder -> condition (1, N, L, C) -> [ConditionProjection] ->
//! HyperConvDecoder -> tokens (1, T, r+2, c+2) -> TokenLayout::detokenize -> LoraAdapter`.

pub mod anchors;
pub mod checkpoint;
pub mod config;
pub mod conv;
mod fftconv;
pub mod hyperconv;
pub mod init;
pub mod modulation;
pub mod presets;
mod winograd;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Module as _, Tensor};
use candle_nn::VarBuilder;

use crate::adapters::{BaseModelShape, LoraAdapter, TokenLayout};
use crate::encoder::TextEncoder;
use crate::error::{DndError, Result};
pub use config::{EncoderInfo, GeneratorConfig};
pub use hyperconv::{ConditionProjection, Features, HyperConvDecoder};
pub use modulation::Modulation;

/// The decoder half of a generator (no text encoder): condition to tokens.
///
/// Training and the benchmarks use it directly; [`Generator`] wraps it with an encoder.
pub struct ConditionDecoder {
    config: GeneratorConfig,
    layout: TokenLayout,
    projection: Option<ConditionProjection>,
    decoder: HyperConvDecoder,
    modulation: Option<Modulation>,
    token_offset: Option<Tensor>,
}

/// Checkpoint name of the optional `(T, r+2, c+2)` offset added to the decoder's tokens.
pub const TOKEN_OFFSET: &str = "token_offset";

impl ConditionDecoder {
    /// Builds the modules from a builder rooted at the checkpoint's top level
    /// (`decoder.module_list...`, `down_proj`, `gate_proj`).
    pub fn new(config: GeneratorConfig, vb: VarBuilder) -> Result<Self> {
        Self::with_modulation_stats(config, vb, None)
    }

    /// [`Self::new`] for a config with `modulated` set whose checkpoint does not hold the
    /// modulation's standardisation yet: `stats` (`(mean, scale)`, see
    /// [`modulation::standardisation`]) supplies it. A training run that adds modulation to an
    /// unmodulated generator builds it so, with a `VarMap`-backed `vb` that creates the
    /// weights at zero.
    pub fn with_modulation_stats(
        config: GeneratorConfig,
        vb: VarBuilder,
        stats: Option<(Tensor, Tensor)>,
    ) -> Result<Self> {
        let layout = config.validate()?;
        let projection = match config.modified_length {
            Some(m) => Some(ConditionProjection::new(config.max_length, m, vb.clone())?),
            None => None,
        };
        let decoder = HyperConvDecoder::new(&config.stages, config.kernel_size, vb.pp("decoder"))?;
        let modulation = match config.modulated {
            true => Some(Modulation::new(
                &config.stages,
                config.encoder.hidden,
                stats,
                vb.clone(),
            )?),
            false => None,
        };
        let token_offset = if vb.contains_tensor(TOKEN_OFFSET) {
            Some(vb.get_unchecked(TOKEN_OFFSET)?)
        } else {
            None
        };
        let mut dec = Self {
            config,
            layout,
            projection,
            decoder,
            modulation,
            token_offset: None,
        };
        dec.set_token_offset(token_offset)?;
        Ok(dec)
    }

    /// A decoder with freshly initialised weights (PyTorch's default initialisation, seeded),
    /// returned with its tensors by checkpoint name.
    pub fn random(
        config: GeneratorConfig,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<(Self, HashMap<String, Tensor>)> {
        let (vb, init) = init::SeededInit::builder(seed, dtype, device);
        let dec = Self::new(config, vb)?;
        Ok((dec, init.take()))
    }

    /// The configuration.
    pub fn config(&self) -> &GeneratorConfig {
        &self.config
    }

    /// The token layout of the generated adapters.
    pub fn layout(&self) -> &TokenLayout {
        &self.layout
    }

    /// The hyper-convolutional decoder.
    pub fn decoder(&self) -> &HyperConvDecoder {
        &self.decoder
    }

    /// The condition modulation, when the config has it.
    pub fn modulation(&self) -> Option<&Modulation> {
        self.modulation.as_ref()
    }

    /// Sets (or clears) the token offset: a fixed `(T, r+2, c+2)` tensor added to every output,
    /// so that the network predicts the difference from it. `dnd train` sets it to the mean of the
    /// training checkpoints' tokens (see `dnd_training::generator`); the authors'
    /// checkpoints have none.
    pub fn set_token_offset(&mut self, offset: Option<Tensor>) -> Result<()> {
        if let Some(o) = &offset {
            let (h, w) = self.layout.token_shape();
            let want = [self.layout.num_tokens(), h, w];
            if o.dims() != want {
                return Err(DndError::Incompatible(format!(
                    "{TOKEN_OFFSET} has shape {:?}, the generator's tokens are {want:?}",
                    o.dims()
                )));
            }
        }
        self.token_offset = offset;
        Ok(())
    }

    /// The token offset, if the checkpoint has one.
    pub fn token_offset(&self) -> Option<&Tensor> {
        self.token_offset.as_ref()
    }

    /// Readies the decoder's convolution kernels once for inference
    /// ([`HyperConvDecoder::prepare`]): for weights that stay as they are, as a loaded
    /// generator's do ([`Generator::load`] calls it). Returns the bytes they hold.
    pub fn prepare(&mut self) -> Result<usize> {
        Ok(self.decoder.prepare()?)
    }

    /// `(B, N, L, C)` condition to `(B, T, r+2, c+2)` tokens.
    pub fn forward(&self, condition: &Tensor) -> Result<Tensor> {
        let x = match &self.projection {
            Some(p) => p.forward(condition)?,
            None => condition.clone(),
        };
        let terms = match &self.modulation {
            Some(m) => Some(m.terms(condition)?),
            None => None,
        };
        let y = self.decoder.forward_modulated(&x, terms.as_deref())?;
        Ok(match &self.token_offset {
            Some(o) => y.broadcast_add(&o.to_dtype(y.dtype())?)?,
            None => y,
        })
    }
}

/// Where and in which precision a generator runs.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Device for the encoder, the decoder and the generated adapters.
    pub device: Device,
    /// Compute dtype: f32 (reference numerics) or bf16 (half the memory).
    pub dtype: DType,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
        }
    }
}

/// Wall-clock split of one generation.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// Tokenization and BERT.
    pub encode: Duration,
    /// Projection and hyper-convolutional decoder.
    pub decode: Duration,
    /// Tokens back to LoRA matrices.
    pub detokenize: Duration,
}

/// A loaded generator: `generate(&prompts)` returns a LoRA adapter for the base model it was
/// trained for.
pub struct Generator {
    encoder: TextEncoder,
    decoder: ConditionDecoder,
    device: Device,
    anchors: Option<anchors::Anchors>,
}

impl Generator {
    /// Loads a checkpoint and a Sentence-BERT folder.
    pub fn load(
        checkpoint: impl AsRef<Path>,
        encoder_dir: impl AsRef<Path>,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let (config, vb) = checkpoint::open(checkpoint, &opts.device, opts.dtype)?;
        let anchors = if vb.contains_tensor(anchors::CONDITION_ANCHORS) {
            let rows = vb.get_unchecked(anchors::CONDITION_ANCHORS)?;
            Some(anchors::Anchors::new(config.anchor_names.clone(), rows)?)
        } else {
            None
        };
        let mut decoder = ConditionDecoder::new(config, vb)?;
        // A checkpoint's weights never change once loaded.
        decoder.prepare()?;
        let encoder = TextEncoder::load(encoder_dir, &opts.device, opts.dtype)?;
        let mut g = Self::from_parts(encoder, decoder)?;
        g.anchors = anchors;
        Ok(g)
    }

    /// The training-condition anchors, if the checkpoint has them.
    pub fn anchors(&self) -> Option<&anchors::Anchors> {
        self.anchors.as_ref()
    }

    /// Replaces the anchors (`dnd anchors` computes them with [`Self::pooled`]).
    pub fn set_anchors(&mut self, anchors: Option<anchors::Anchors>) {
        self.anchors = anchors;
    }

    /// The pooled embedding of a prompt set, as anchors are made.
    pub fn pooled(&self, prompts: &[impl AsRef<str>]) -> Result<Tensor> {
        let refs: Vec<&str> = prompts.iter().map(AsRef::as_ref).collect();
        anchors::pooled(&self.encoder, &refs, self.config().max_length)
    }

    /// The training condition nearest to a prompt set, or `None` without anchors.
    pub fn nearest(&self, prompts: &[impl AsRef<str>]) -> Result<Option<anchors::Nearest>> {
        match &self.anchors {
            Some(a) => Ok(Some(a.nearest(&self.pooled(prompts)?)?)),
            None => Ok(None),
        }
    }

    /// Joins an encoder and a decoder, checking that their widths agree.
    pub fn from_parts(encoder: TextEncoder, decoder: ConditionDecoder) -> Result<Self> {
        let want = decoder.config().encoder.hidden;
        if encoder.hidden() != want {
            return Err(DndError::Incompatible(format!(
                "the generator expects {want}-wide conditions ({}), the encoder at {} gives {}",
                decoder.config().encoder.name,
                encoder.dir().display(),
                encoder.hidden()
            )));
        }
        let device = decoder.decoder().stages()[0].conv_weight_device();
        Ok(Self {
            encoder,
            decoder,
            device,
            anchors: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &GeneratorConfig {
        self.decoder.config()
    }

    /// The token layout (base model shape and LoRA spec) of generated adapters.
    pub fn layout(&self) -> &TokenLayout {
        self.decoder.layout()
    }

    /// The text encoder.
    pub fn encoder(&self) -> &TextEncoder {
        &self.encoder
    }

    /// The decoder half.
    pub fn condition_decoder(&self) -> &ConditionDecoder {
        &self.decoder
    }

    /// Fails unless this generator makes adapters for a base model of this shape.
    pub fn check_base_model(&self, shape: &BaseModelShape) -> Result<()> {
        let own = &self.config().base_model;
        if own.same_widths(shape) {
            return Ok(());
        }
        Err(DndError::Incompatible(format!(
            "this generator was trained for {} ({} layers, hidden {}, intermediate {}, q {}, kv {}); \
             the base model has {} layers, hidden {}, intermediate {}, q {}, kv {}",
            self.config().base_model_name.as_deref().unwrap_or(&own.model_type),
            own.num_layers,
            own.hidden,
            own.intermediate,
            own.q_dim,
            own.kv_dim,
            shape.num_layers,
            shape.hidden,
            shape.intermediate,
            shape.q_dim,
            shape.kv_dim
        )))
    }

    /// The condition `(1, N, L, C)` for a prompt set (see [`fill_prompts`] for the rule).
    pub fn condition(&self, prompts: &[impl AsRef<str>]) -> Result<Tensor> {
        let cfg = self.config();
        let filled = fill_prompts(prompts, cfg.num_prompts)?;
        let refs: Vec<&str> = filled.iter().map(String::as_str).collect();
        Ok(self.encoder.encode(&refs, cfg.max_length)?.unsqueeze(0)?)
    }

    /// Generates an adapter for the task the prompts show.
    pub fn generate(&self, prompts: &[impl AsRef<str>]) -> Result<LoraAdapter> {
        Ok(self.generate_timed(prompts)?.0)
    }

    /// As [`Self::generate`], with the time spent in each step.
    pub fn generate_timed(&self, prompts: &[impl AsRef<str>]) -> Result<(LoraAdapter, Timings)> {
        let t0 = Instant::now();
        let cond = self.condition(prompts)?;
        sync(&self.device)?;
        let t1 = Instant::now();
        let tokens = self.decoder.forward(&cond)?.squeeze(0)?;
        sync(&self.device)?;
        let t2 = Instant::now();
        let adapter = self.layout().detokenize(&tokens, &self.device)?;
        let t3 = Instant::now();
        Ok((
            adapter,
            Timings {
                encode: t1 - t0,
                decode: t2 - t1,
                detokenize: t3 - t2,
            },
        ))
    }
}

impl Generator {
    /// Adapters for several prompt sets at once: one encoder pass over all their prompts and
    /// one decoder pass with the sets as its batch. Each adapter is the one
    /// [`generate`](Self::generate) makes for its set (up to float rounding).
    pub fn generate_batch<S: AsRef<str>>(&self, sets: &[&[S]]) -> Result<Vec<LoraAdapter>> {
        if sets.is_empty() {
            return Ok(Vec::new());
        }
        let cfg = self.config();
        let mut filled = Vec::with_capacity(sets.len() * cfg.num_prompts);
        for set in sets {
            filled.extend(fill_prompts(set, cfg.num_prompts)?);
        }
        let refs: Vec<&str> = filled.iter().map(String::as_str).collect();
        let encoded = self.encoder.encode(&refs, cfg.max_length)?;
        let (_, l, c) = encoded.dims3()?;
        let cond = encoded.reshape((sets.len(), cfg.num_prompts, l, c))?;
        let tokens = self.decoder.forward(&cond)?;
        (0..sets.len())
            .map(|b| self.layout().detokenize(&tokens.get(b)?, &self.device))
            .collect()
    }
}

fn sync(device: &Device) -> Result<()> {
    Ok(device.synchronize()?)
}

/// Expands a caller's prompt set to exactly `n` condition prompts.
///
/// The reference always feeds exactly `n` prompts of one task. Here fewer are accepted and
/// repeated in order (`p0, p1, .., pk-1, p0, p1, ..`) until there are `n`: every prompt weighs
/// the same (up to one extra copy) and the result is deterministic. An empty list, a blank prompt,
/// or more than `n` prompts is an error.
pub fn fill_prompts(prompts: &[impl AsRef<str>], n: usize) -> Result<Vec<String>> {
    if prompts.is_empty() {
        return Err(DndError::InvalidInput(
            "no prompts: a generator needs at least one example prompt of the task".into(),
        ));
    }
    if prompts.len() > n {
        return Err(DndError::InvalidInput(format!(
            "{} prompts given; this generator takes at most {n}",
            prompts.len()
        )));
    }
    if let Some(i) = prompts.iter().position(|p| p.as_ref().trim().is_empty()) {
        return Err(DndError::InvalidInput(format!(
            "prompt {i} is empty or only whitespace"
        )));
    }
    Ok(prompts
        .iter()
        .cycle()
        .take(n)
        .map(|p| p.as_ref().to_string())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::fill_prompts;

    #[test]
    fn generator_and_adapters_can_be_shared_across_threads() {
        // A server holds one generator for all requests and hands adapters between tasks.
        fn shared<T: Send + Sync>() {}
        shared::<super::Generator>();
        shared::<crate::adapters::LoraAdapter>();
    }

    #[test]
    fn a_batch_of_prompt_sets_gives_each_set_its_own_adapter() {
        use crate::adapters::{BaseModelShape, LoraSpec, Module};
        use crate::generator::{presets, ConditionDecoder, GeneratorConfig};
        use candle_core::{DType, Device};
        let shape = BaseModelShape::from_path(crate::test_util::golden_path("tiny-qwen2")).unwrap();
        let spec = LoraSpec {
            rank: 2,
            alpha: 4.0,
            chunk_width: 32,
            target_modules: Module::ALL.to_vec(),
        };
        let cfg =
            GeneratorConfig::new(shape, spec, presets::minilm(), 4, 16, None, &[], 3).unwrap();
        let (dec, _) = ConditionDecoder::random(cfg, 5, &Device::Cpu, DType::F32).unwrap();
        let encoder = crate::encoder::TextEncoder::load(
            crate::test_util::encoder_dir(),
            &Device::Cpu,
            DType::F32,
        )
        .unwrap_or_else(|e| panic!("{e}: run scripts/fetch-assets.sh encoder"));
        let g = super::Generator::from_parts(encoder, dec).unwrap();
        let sets: [&[&str]; 3] = [
            &["Add the numbers.", "12 + 30"],
            &["Translate into French."],
            &[
                "Is the sky green?",
                "Is fire hot?",
                "Is ice cold?",
                "Is grass blue?",
            ],
        ];
        let batch = g.generate_batch(&sets).unwrap();
        assert_eq!(batch.len(), 3);
        use crate::test_util::max_abs_diff;
        let mut worst = 0f32;
        for (set, got) in sets.iter().zip(&batch) {
            let want = g.generate(set).unwrap();
            assert_eq!(got.pairs().len(), want.pairs().len());
            for ((ta, a), (tb, b)) in got.pairs().iter().zip(want.pairs()) {
                assert_eq!(ta, tb);
                worst = worst
                    .max(max_abs_diff(&a.a, &b.a))
                    .max(max_abs_diff(&a.b, &b.b));
            }
        }
        assert!(worst < 1e-4, "batched adapters differ by {worst}");
        // Different sets, different adapters: the batch did not mix them up.
        let first = |i: usize| batch[i].pairs().values().next().unwrap().a.clone();
        let d = max_abs_diff(&first(0), &first(1));
        assert!(d > 1e-3, "{d}");
        assert!(g.generate_batch::<&str>(&[]).unwrap().is_empty());
    }

    #[test]
    fn prompts_are_cycled_to_n() {
        let got = fill_prompts(&["a", "b"], 5).unwrap();
        assert_eq!(got, ["a", "b", "a", "b", "a"]);
        assert_eq!(fill_prompts(&["x"; 3], 3).unwrap().len(), 3);
    }

    #[test]
    fn bad_prompt_sets_are_refused() {
        let none: [&str; 0] = [];
        assert!(fill_prompts(&none, 4)
            .unwrap_err()
            .to_string()
            .contains("no prompts"));
        assert!(fill_prompts(&["a", "  \n"], 4)
            .unwrap_err()
            .to_string()
            .contains("prompt 1"));
        assert!(fill_prompts(&["a"; 5], 4)
            .unwrap_err()
            .to_string()
            .contains("at most 4"));
    }
}
