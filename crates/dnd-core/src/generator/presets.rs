//! Named generator configurations.

use super::config::{EncoderInfo, GeneratorConfig};
use crate::adapters::{BaseModelShape, LoraSpec, Module};
use crate::error::Result;

/// The condition encoder every preset uses.
pub fn minilm() -> EncoderInfo {
    EncoderInfo {
        name: "all-MiniLM-L6-v2".into(),
        hidden: 384,
    }
}

/// The authors' released common-sense configuration for Qwen2.5-0.5B: rank 8, N=128, L=384,
/// k=9, about 1.1 B decoder parameters and 4.1 T multiply-adds per adapter.
pub fn qwen25_05b_common_sense() -> Result<GeneratorConfig> {
    let mut cfg = GeneratorConfig::new(
        BaseModelShape::qwen25_05b(),
        LoraSpec {
            rank: 8,
            alpha: 16.0,
            chunk_width: 128,
            target_modules: Module::ALL.to_vec(),
        },
        minilm(),
        128,
        384,
        None,
        &[
            [128, 200, 300],
            [128, 100, 256],
            [256, 50, 200],
            [512, 50, 200],
            [1024, 25, 200],
            [1024, 10, 200],
            [2048, 10, 200],
        ],
        9,
    )?;
    cfg.base_model_name = Some("Qwen2.5-0.5B".into());
    Ok(cfg)
}

/// A small configuration sized for SmolLM2-135M on a CPU: rank 8 on all seven modules,
/// chunk width 192 (1590 tokens of 10x194), N=16 prompts of L=64 tokens, k=3, about 7 M
/// parameters.
pub fn smollm2_135m_small() -> Result<GeneratorConfig> {
    let mut cfg = GeneratorConfig::new(
        BaseModelShape::smollm2_135m(),
        LoraSpec {
            rank: 8,
            alpha: 16.0,
            chunk_width: 192,
            target_modules: Module::ALL.to_vec(),
        },
        minilm(),
        16,
        64,
        None,
        &[[64, 32, 256], [256, 16, 200]],
        3,
    )?;
    cfg.base_model_name = Some("SmolLM2-135M-Instruct".into());
    Ok(cfg)
}

/// Looks a preset up by name (`qwen25-05b-common-sense`, `smollm2-135m-small`).
pub fn by_name(name: &str) -> Option<Result<GeneratorConfig>> {
    match name {
        "qwen25-05b-common-sense" => Some(qwen25_05b_common_sense()),
        "smollm2-135m-small" => Some(smollm2_135m_small()),
        _ => None,
    }
}

/// Names accepted by [`by_name`].
pub const NAMES: [&str; 2] = ["qwen25-05b-common-sense", "smollm2-135m-small"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_sense_preset_has_the_papers_size() {
        let cfg = qwen25_05b_common_sense().unwrap();
        assert_eq!(cfg.stages.first(), Some(&[128, 384, 384]));
        assert_eq!(cfg.stages.last(), Some(&[4296, 10, 130]));
        assert_eq!(cfg.stages.len(), 9);
    }

    #[test]
    fn presets_validate() {
        for n in NAMES {
            by_name(n).unwrap().unwrap().validate().unwrap();
        }
    }
}
