//! Importing the authors' released generators (PyTorch `.pth` state dicts) into the
//! self-describing checkpoint format. An offline step: servers only read safetensors.
//!
//! The decoder's stage shapes, kernel size, prompt count and condition length are read off the
//! weights; what the weights cannot say (the base model's widths and the LoRA rank, alpha, chunk
//! width and target modules) is given by the caller and checked against the last stage.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::adapters::{BaseModelShape, LoraSpec};
use crate::error::{DndError, Result};
use crate::generator::config::{EncoderInfo, GeneratorConfig, FORMAT, FORMAT_VERSION};
use crate::generator::Features;

/// What the caller knows that the weights do not.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Widths of the base model the generator was trained for.
    pub base_model: BaseModelShape,
    /// Informative base model name.
    pub base_model_name: Option<String>,
    /// LoRA rank, alpha, chunk width and targets of the training adapters.
    pub lora: LoraSpec,
    /// Name of the condition encoder (its width is read off the weights).
    pub encoder_name: String,
}

/// The outcome of a conversion.
#[derive(Debug)]
pub struct Converted {
    /// The inferred and checked configuration.
    pub config: GeneratorConfig,
    /// Weights under this crate's key names.
    pub tensors: HashMap<String, Tensor>,
    /// Keys of the source that were not carried over (a frozen encoder saved alongside...).
    pub dropped: Vec<String>,
}

/// Reads the tensors of a PyTorch state dict saved with `torch.save` (zip format), directly or
/// under a `state_dict` / `model` entry.
pub fn read_pth(path: impl AsRef<Path>) -> Result<HashMap<String, Tensor>> {
    let path = path.as_ref();
    let mut last_err = None;
    for key in [None, Some("state_dict"), Some("model")] {
        match candle_core::pickle::read_all_with_key(path, key) {
            Ok(v) if !v.is_empty() => return Ok(v.into_iter().collect()),
            Ok(_) => {}
            Err(e) => last_err = Some(e),
        }
    }
    Err(DndError::Incompatible(format!(
        "{}: no tensors found in the pickle (a state dict is expected{})",
        path.display(),
        last_err.map(|e| format!("; {e}")).unwrap_or_default()
    )))
}

fn dims<const N: usize>(t: &Tensor, key: &str) -> Result<[usize; N]> {
    t.dims().try_into().map_err(|_| {
        DndError::Incompatible(format!("{key} has shape {:?}, expected {N} axes", t.dims()))
    })
}

/// Maps a reference state dict (`model.decoder.module_list...`, `down_proj`, `gate_proj`,
/// `criterion_weight`; the `model.` prefix optional) to a checkpoint.
pub fn convert_state_dict(
    source: HashMap<String, Tensor>,
    opts: &ConvertOptions,
) -> Result<Converted> {
    let mut tensors = HashMap::new();
    let mut dropped = Vec::new();
    for (key, t) in source {
        let k = key.strip_prefix("model.").unwrap_or(&key);
        let keep = k.starts_with("decoder.module_list.")
            || k.starts_with("down_proj.")
            || k.starts_with("gate_proj.")
            || k == "criterion_weight";
        if keep {
            tensors.insert(k.to_string(), t.to_device(&Device::Cpu)?);
        } else {
            dropped.push(key);
        }
    }
    dropped.sort();

    // Stage i: norm (Hi, Wi), bias (Ho, Wo), ConvL (No, Ni, k, k).
    let mut stages: BTreeMap<usize, (Features, Features, usize)> = BTreeMap::new();
    for (k, t) in &tensors {
        let Some(rest) = k.strip_prefix("decoder.module_list.") else {
            continue;
        };
        let Some((idx, name)) = rest.split_once('.') else {
            continue;
        };
        if name != "linear2.weight" {
            continue;
        }
        let i: usize = idx
            .parse()
            .map_err(|_| DndError::Incompatible(format!("unexpected key {k}")))?;
        let [no, ni, kh, kw] = dims::<4>(t, k)?;
        let get = |n: &str| {
            let key = format!("decoder.module_list.{i}.linear1.{n}");
            tensors
                .get(&key)
                .ok_or_else(|| DndError::Incompatible(format!("missing {key}")))
                .and_then(|t| dims::<2>(t, &key))
        };
        let [hi, wi] = get("norm.weight")?;
        let [ho, wo] = get("bias")?;
        if kh != kw {
            return Err(DndError::Incompatible(format!(
                "{k}: non-square kernel {kh}x{kw}"
            )));
        }
        stages.insert(i, ([ni, hi, wi], [no, ho, wo], kh));
    }
    if stages.is_empty() {
        return Err(DndError::Incompatible(
            "no `decoder.module_list.*` weights: not a DnD hyper-convolutional generator".into(),
        ));
    }
    let n_stages = stages.len();
    if stages.keys().copied().ne(0..n_stages) {
        return Err(DndError::Incompatible(format!(
            "decoder stages are not numbered 0..{n_stages}: {:?}",
            stages.keys().collect::<Vec<_>>()
        )));
    }
    let stage_list: Vec<_> = stages.into_values().collect();
    let kernel_size = stage_list[0].2;
    let mut features = vec![stage_list[0].0];
    for (i, (input, output, k)) in stage_list.iter().enumerate() {
        if *k != kernel_size {
            return Err(DndError::Incompatible(format!(
                "stage {i} has kernel {k}, stage 0 has {kernel_size}"
            )));
        }
        if *input != *features.last().unwrap() {
            return Err(DndError::Incompatible(format!(
                "stage {i} takes {input:?} but the previous stage gives {:?}",
                features.last().unwrap()
            )));
        }
        features.push(*output);
    }
    let [num_prompts, cond_len, hidden] = features[0];
    let (max_length, modified_length) = match tensors.get("down_proj.weight") {
        Some(w) => {
            let [lp, l] = dims::<2>(w, "down_proj.weight")?;
            if lp != cond_len {
                return Err(DndError::Incompatible(format!(
                    "down_proj gives length {lp} but the decoder takes {cond_len}"
                )));
            }
            (l, Some(lp))
        }
        None => (cond_len, None),
    };
    let config = GeneratorConfig {
        format: FORMAT.into(),
        version: FORMAT_VERSION,
        stages: features,
        kernel_size,
        num_prompts,
        max_length,
        modified_length,
        encoder: EncoderInfo {
            name: opts.encoder_name.clone(),
            hidden,
        },
        base_model: opts.base_model.clone(),
        base_model_name: opts.base_model_name.clone(),
        lora: opts.lora.clone(),
        note: Some("converted from a reference PyTorch checkpoint".into()),
        untrained: false,
        anchor_names: Vec::new(),
        modulated: false,
    };
    config.validate()?;
    Ok(Converted {
        config,
        tensors,
        dropped,
    })
}

/// Reads a `.pth` and writes the converted checkpoint to `out`.
pub fn convert_pth(
    pth: impl AsRef<Path>,
    out: impl AsRef<Path>,
    opts: &ConvertOptions,
) -> Result<Converted> {
    let converted = convert_state_dict(read_pth(pth)?, opts)?;
    crate::generator::checkpoint::save(out, &converted.config, &converted.tensors)?;
    Ok(converted)
}
