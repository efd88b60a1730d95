//! Generator checkpoints: one safetensors file, weights under the reference key names (minus
//! the reference's `model.` prefix) and the [`GeneratorConfig`] as JSON in the metadata.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::config::GeneratorConfig;
use crate::error::{DndError, Result};

/// Metadata key holding the JSON config.
pub const CONFIG_KEY: &str = "dnd_config";

/// Reads the config of a checkpoint without loading its weights.
pub fn read_config(path: impl AsRef<Path>) -> Result<GeneratorConfig> {
    let path = path.as_ref();
    let file = std::fs::File::open(path).map_err(|e| DndError::io(path, e))?;
    // SAFETY: read-only mapping of a file we do not modify.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| DndError::io(path, e))?;
    let (_, md) = safetensors::SafeTensors::read_metadata(&mmap)
        .map_err(|e| DndError::Incompatible(format!("{}: {e}", path.display())))?;
    let json = md
        .metadata()
        .as_ref()
        .and_then(|m| m.get(CONFIG_KEY))
        .ok_or_else(|| {
            DndError::Incompatible(format!(
                "{}: not a DnD generator checkpoint (no `{CONFIG_KEY}` metadata); \
                 convert the authors' .pth files with `dnd convert`",
                path.display()
            ))
        })?;
    let cfg: GeneratorConfig =
        serde_json::from_str(json).map_err(|e| DndError::json(path.display(), e))?;
    cfg.validate()?;
    Ok(cfg)
}

/// Opens a checkpoint: its validated config and a builder over its weights.
pub fn open(
    path: impl AsRef<Path>,
    device: &Device,
    dtype: DType,
) -> Result<(GeneratorConfig, VarBuilder<'static>)> {
    let path = path.as_ref();
    let cfg = read_config(path)?;
    // SAFETY: as above.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[path], dtype, device)? };
    Ok((cfg, vb))
}

/// Writes weights and config as a checkpoint (weights stored in their own dtype).
pub fn save(
    path: impl AsRef<Path>,
    config: &GeneratorConfig,
    tensors: &HashMap<String, Tensor>,
) -> Result<()> {
    let path = path.as_ref();
    config.validate()?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| DndError::io(parent, e))?;
    }
    let json = serde_json::to_string(config).expect("config serialises");
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let contiguous: Vec<(String, Tensor)> = names
        .into_iter()
        .map(|k| Ok((k.clone(), tensors[k].contiguous()?)))
        .collect::<Result<_>>()?;
    safetensors::serialize_to_file(
        contiguous.iter().map(|(k, v)| (k.as_str(), v)),
        Some(HashMap::from([(CONFIG_KEY.to_string(), json)])),
        path,
    )
    .map_err(|e| DndError::Incompatible(format!("{}: {e}", path.display())))
}

/// The tensors of a `VarMap` by name (e.g. after random initialisation or training).
pub fn varmap_tensors(map: &VarMap) -> HashMap<String, Tensor> {
    map.data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect()
}
