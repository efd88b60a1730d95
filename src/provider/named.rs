//! Adapters served under a name, the convention of vLLM, LoRAX and mistral.rs 0.9: a request
//! whose `model` is the name gets it. Two kinds: a PEFT folder (`--lora NAME=DIR`), loaded
//! into the adapter cache when used and again after an eviction, and a prompt set
//! (`--dnd-preset NAME=FILE`) whose generated adapter is served under the name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use mistralrs_core::adapter_provider::SequenceLora;

use super::{AdapterMeta, GenerationError, Origin};
use crate::adapters::peft::{CONFIG_FILE, WEIGHTS_FILE};
use crate::adapters::{BaseModelShape, LoraAdapter};
use crate::cache::{fingerprint, AdapterKey};
use crate::engine::to_sequence_lora;
use crate::error::{DndError, Result};

/// One named adapter.
#[derive(Debug, Clone)]
pub enum NamedAdapter {
    /// A PEFT LoRA folder.
    Peft {
        /// The folder.
        dir: PathBuf,
        /// Its cache key (from the files' content and the base model).
        key: AdapterKey,
        /// The fingerprint of its files when it was checked: a folder changed since is
        /// refused rather than served under the old key.
        content: String,
        /// Bytes it takes on the model's device.
        bytes: usize,
    },
    /// A prompt set, generated into an adapter like a request's own prompts.
    Preset {
        /// The prompts.
        prompts: Vec<String>,
    },
}

impl NamedAdapter {
    /// `peft` or `preset`, as `GET /v1/models` reports it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Peft { .. } => "peft",
            Self::Preset { .. } => "preset",
        }
    }
}

/// The names a server serves, checked once when they are added.
#[derive(Debug, Default)]
pub struct NamedAdapters {
    by_name: BTreeMap<String, NamedAdapter>,
}

impl NamedAdapters {
    /// The adapter named `name`.
    pub fn get(&self, name: &str) -> Option<&NamedAdapter> {
        self.by_name.get(name)
    }

    /// Every name and its adapter, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &NamedAdapter)> {
        self.by_name.iter().map(|(n, a)| (n.as_str(), a))
    }

    /// Adds `name`, refusing an empty or duplicate one, or one the base model answers to.
    pub fn insert(&mut self, name: &str, adapter: NamedAdapter, reserved: &[&str]) -> Result<()> {
        if name.trim().is_empty() || name.chars().any(char::is_whitespace) {
            return Err(DndError::InvalidInput(format!(
                "adapter name {name:?}: names are non-empty and have no whitespace"
            )));
        }
        if reserved.contains(&name) {
            return Err(DndError::InvalidInput(format!(
                "adapter name {name:?} is the base model's"
            )));
        }
        if self.by_name.contains_key(name) {
            return Err(DndError::Conflict(format!(
                "adapter name {name:?} is already served"
            )));
        }
        self.by_name.insert(name.to_string(), adapter);
        Ok(())
    }

    /// Stops serving `name`, returning its adapter.
    pub fn remove(&mut self, name: &str) -> Option<NamedAdapter> {
        self.by_name.remove(name)
    }
}

/// Checks a PEFT folder against the base model (loadable, fits its shapes, finite) and
/// describes it: its key and its size on the device in `dtype`.
pub fn check_peft(
    dir: &Path,
    shape: Option<&BaseModelShape>,
    base_model_id: &str,
    dtype: DType,
) -> Result<NamedAdapter> {
    let adapter = LoraAdapter::load_peft_for(dir, &Device::Cpu, shape)?;
    if let Some(shape) = shape {
        adapter.check_fits(shape)?;
    }
    // The engine's copy, as a request would get it: its weights are checked finite in the
    // model's dtype (finite in f32 is not enough), and it tells the bytes on the device.
    let lora = to_sequence_lora(&adapter, "check", &Device::Cpu, dtype)?;
    let content = content_fingerprint(dir)?;
    Ok(NamedAdapter::Peft {
        dir: dir.to_path_buf(),
        key: AdapterKey::new(&format!("peft:{content}"), base_model_id, &[]),
        content,
        bytes: lora.size_in_bytes(),
    })
}

fn content_fingerprint(dir: &Path) -> Result<String> {
    let mut content = Vec::new();
    for file in [CONFIG_FILE, WEIGHTS_FILE] {
        let path = dir.join(file);
        content.extend(std::fs::read(&path).map_err(|e| DndError::io(&path, e))?);
    }
    Ok(fingerprint(&content))
}

/// Loads a PEFT folder as the engine's adapter (off the async threads: it reads files);
/// `shape`, the base model's, splits fused projections.
pub fn load_peft(
    dir: &Path,
    name: &str,
    content: &str,
    shape: &BaseModelShape,
    device: &Device,
    dtype: DType,
) -> std::result::Result<SequenceLora, GenerationError> {
    let failed = |e: DndError| match GenerationError::from(e) {
        GenerationError::Failed(m) => {
            GenerationError::Failed(format!("loading {}: {m}", dir.display()))
        }
        non_finite => non_finite,
    };
    if content_fingerprint(dir).map_err(failed)? != content {
        return Err(GenerationError::Failed(format!(
            "adapter {name}: {} changed since the server checked it; restart the server to \
             serve the new weights",
            dir.display()
        )));
    }
    let adapter = LoraAdapter::load_peft_for(dir, &Device::Cpu, Some(shape)).map_err(failed)?;
    to_sequence_lora(&adapter, format!("peft-{name}"), device, dtype).map_err(failed)
}

/// The cache metadata of a named PEFT adapter.
pub fn peft_meta(name: &str, dir: &Path) -> AdapterMeta {
    AdapterMeta {
        prompts: Arc::new(Vec::new()),
        origin: Origin::Peft {
            name: name.to_string(),
            dir: dir.to_path_buf(),
        },
        embedding: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        let mut n = NamedAdapters::default();
        let preset = || NamedAdapter::Preset {
            prompts: vec!["p".into()],
        };
        n.insert("a", preset(), &["base"]).unwrap();
        for bad in ["a", "", "two words", "base"] {
            assert!(n.insert(bad, preset(), &["base"]).is_err(), "{bad:?}");
        }
        assert_eq!(
            n.iter().map(|(k, a)| (k, a.kind())).collect::<Vec<_>>(),
            [("a", "preset")]
        );
        assert!(n.remove("a").is_some() && n.remove("a").is_none());
        n.insert("a", preset(), &["base"]).unwrap();
    }
}
