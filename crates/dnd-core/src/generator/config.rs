//! The self-describing generator configuration stored inside every checkpoint.

use serde::{Deserialize, Serialize};

use super::hyperconv::Features;
use crate::adapters::{BaseModelShape, LoraSpec, TokenLayout};
use crate::error::{DndError, Result};

/// Format tag written into checkpoints.
pub const FORMAT: &str = "mistralrs-dnd-generator";
/// Current checkpoint format version.
pub const FORMAT_VERSION: u32 = 1;

/// Which text encoder produced the conditions a generator was trained on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncoderInfo {
    /// Informative name (`all-MiniLM-L6-v2`).
    pub name: String,
    /// Condition width; must equal the loaded encoder's hidden size.
    pub hidden: usize,
}

/// Everything needed to rebuild and use a generator, stored as JSON in the checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GeneratorConfig {
    /// Always [`FORMAT`].
    pub format: String,
    /// [`FORMAT_VERSION`] at the time of writing.
    pub version: u32,
    /// Decoder stage boundaries `(N, H, W)`, first = condition, last = tokens.
    pub stages: Vec<Features>,
    /// Odd convolution kernel size.
    pub kernel_size: usize,
    /// Prompts per condition `N`.
    pub num_prompts: usize,
    /// Encoder tokens per prompt `L`.
    pub max_length: usize,
    /// `L'` of the large configs' `down_proj`/`gate_proj` condition projection, if any.
    #[serde(default)]
    pub modified_length: Option<usize>,
    /// The condition encoder.
    pub encoder: EncoderInfo,
    /// Widths of the base model the adapters are for.
    pub base_model: BaseModelShape,
    /// Informative base model name (`SmolLM2-135M-Instruct`).
    #[serde(default)]
    pub base_model_name: Option<String>,
    /// LoRA rank, alpha, chunk width and target modules of the generated adapters.
    pub lora: LoraSpec,
    /// Free-form provenance (how it was trained, converted or initialised).
    #[serde(default)]
    pub note: Option<String>,
    /// The weights are random (`dnd init`), never trained: its adapters are noise. Tools and
    /// the server warn loudly about such a generator.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub untrained: bool,
    /// Names of the training-condition anchors stored with the weights (see
    /// [`super::anchors`]), in row order; empty when the checkpoint has none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anchor_names: Vec<String>,
    /// The condition's summary modulates every stage (ours; see [`super::modulation`]): the
    /// checkpoint holds `modulation.*` weights.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub modulated: bool,
}

impl GeneratorConfig {
    /// Whether the weights are random: the `untrained` flag, or for checkpoints written before
    /// it existed, the note `dnd init` wrote then ("RANDOM WEIGHTS ...").
    pub fn is_untrained(&self) -> bool {
        self.untrained
            || self
                .note
                .as_deref()
                .is_some_and(|n| n.starts_with("RANDOM WEIGHTS"))
    }

    /// A config whose first stage is the condition shape and whose last is the token shape
    /// of `base_model` under `lora`; `hidden_stages` lie between.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        base_model: BaseModelShape,
        lora: LoraSpec,
        encoder: EncoderInfo,
        num_prompts: usize,
        max_length: usize,
        modified_length: Option<usize>,
        hidden_stages: &[Features],
        kernel_size: usize,
    ) -> Result<Self> {
        let layout = TokenLayout::new(base_model.clone(), lora.clone())?;
        let (th, tw) = layout.token_shape();
        let mut stages = vec![[
            num_prompts,
            modified_length.unwrap_or(max_length),
            encoder.hidden,
        ]];
        stages.extend_from_slice(hidden_stages);
        stages.push([layout.num_tokens(), th, tw]);
        let cfg = Self {
            format: FORMAT.into(),
            version: FORMAT_VERSION,
            stages,
            kernel_size,
            num_prompts,
            max_length,
            modified_length,
            encoder,
            base_model,
            base_model_name: None,
            lora: layout.spec().clone(),
            note: None,
            untrained: false,
            anchor_names: Vec::new(),
            modulated: false,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks internal consistency and returns the token layout.
    pub fn validate(&self) -> Result<TokenLayout> {
        let bad = |m: String| Err(DndError::Incompatible(format!("generator config: {m}")));
        if self.format != FORMAT {
            return bad(format!("format {:?} is not {FORMAT:?}", self.format));
        }
        if self.version > FORMAT_VERSION {
            return bad(format!(
                "version {} is newer than this build understands ({FORMAT_VERSION})",
                self.version
            ));
        }
        if self.kernel_size.is_multiple_of(2) {
            return bad(format!("kernel size {} must be odd", self.kernel_size));
        }
        if self.stages.len() < 2 {
            return bad("at least two stages are needed".into());
        }
        if self.stages.iter().flatten().any(|&d| d == 0) {
            return bad(format!("empty stage in {:?}", self.stages));
        }
        let layout = TokenLayout::new(self.base_model.clone(), self.lora.clone())?;
        let cond = [
            self.num_prompts,
            self.modified_length.unwrap_or(self.max_length),
            self.encoder.hidden,
        ];
        if self.stages[0] != cond {
            return bad(format!(
                "first stage {:?} must be the condition shape (N, L, hidden) = {cond:?}",
                self.stages[0]
            ));
        }
        let (th, tw) = layout.token_shape();
        let tokens = [layout.num_tokens(), th, tw];
        if *self.stages.last().unwrap() != tokens {
            return bad(format!(
                "last stage {:?} must be the token shape (T, r+2, c+2) = {tokens:?} of the base model",
                self.stages.last().unwrap()
            ));
        }
        Ok(layout)
    }
}
