//! Reading and writing LoRA adapters in the Hugging Face PEFT folder format
//! (`adapter_config.json` + `adapter_model.safetensors`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::lora::{LoraAdapter, LoraPair, LoraTarget};
use super::shapes::{BaseModelShape, Module};
use crate::error::{read_json, DndError, Result};

/// The file names of a PEFT adapter folder.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The weights file of a PEFT adapter folder.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The subset of PEFT's `LoraConfig` that decides how the weights are applied.
#[derive(Debug, Deserialize)]
struct PeftConfigIn {
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    rank_pattern: Option<HashMap<String, Value>>,
    #[serde(default)]
    alpha_pattern: Option<HashMap<String, Value>>,
    #[serde(default)]
    bias: Option<String>,
}

/// `adapter_config.json` as written: the fields PEFT needs to rebuild the `LoraConfig`.
#[derive(Debug, Serialize)]
struct PeftConfigOut<'a> {
    peft_type: &'static str,
    task_type: &'static str,
    base_model_name_or_path: Option<&'a str>,
    r: usize,
    lora_alpha: f64,
    lora_dropout: f64,
    target_modules: Vec<&'static str>,
    bias: &'static str,
    fan_in_fan_out: bool,
    use_rslora: bool,
    use_dora: bool,
    inference_mode: bool,
    init_lora_weights: bool,
    modules_to_save: Option<()>,
    layers_to_transform: Option<()>,
    rank_pattern: BTreeMap<String, usize>,
    alpha_pattern: BTreeMap<String, f64>,
}

/// The fused projections of Phi-3-style models, each the named modules' outputs side by side.
const FUSED: [(&str, &[Module]); 2] = [
    ("self_attn.qkv_proj", &[Module::Q, Module::K, Module::V]),
    ("mlp.gate_up_proj", &[Module::Gate, Module::Up]),
];

/// The seven projections under the names some families give them, which their PEFT adapters
/// use: Phi-2's `dense`, `fc1` and `fc2`, Starcoder2's `c_fc` and `c_proj` (MLPs without a
/// gate: the first layer is the up projection, the second the down one).
const ALIASES: [(&str, Module); 5] = [
    ("self_attn.dense", Module::O),
    ("mlp.fc1", Module::Up),
    ("mlp.fc2", Module::Down),
    ("mlp.c_fc", Module::Up),
    ("mlp.c_proj", Module::Down),
];

/// What a PEFT weight key names: one of the seven projections, or a fused one (index into
/// [`FUSED`]) of a layer.
#[derive(Debug, Clone, Copy)]
enum KeyTarget {
    Plain(LoraTarget),
    Fused { layer: usize, fused: usize },
}

/// Parses a PEFT weight key such as
/// `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` into (target, is_a).
#[cfg(test)]
fn parse_key(key: &str) -> Option<(LoraTarget, bool)> {
    match parse_any_key(key)? {
        (KeyTarget::Plain(t), is_a) => Some((t, is_a)),
        _ => None,
    }
}

fn parse_any_key(key: &str) -> Option<(KeyTarget, bool)> {
    let rest = key.strip_prefix("base_model.model.").unwrap_or(key);
    let rest = rest.strip_prefix("model.")?;
    let rest = rest.strip_prefix("layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (block, rest) = rest.split_once('.')?;
    let (name, rest) = rest.split_once('.')?;
    let path = format!("{block}.{name}");
    let target = match Module::from_name(name) {
        Some(module) if module.path() == path => KeyTarget::Plain(LoraTarget { layer, module }),
        Some(_) => return None,
        None => match ALIASES.iter().find(|(p, _)| *p == path) {
            Some(&(_, module)) => KeyTarget::Plain(LoraTarget { layer, module }),
            None => KeyTarget::Fused {
                layer,
                fused: FUSED.iter().position(|(p, _)| *p == path)?,
            },
        },
    };
    let is_a = match rest {
        "lora_A.weight" | "lora_A.default.weight" => true,
        "lora_B.weight" | "lora_B.default.weight" => false,
        _ => return None,
    };
    Some((target, is_a))
}

/// The PEFT key of one matrix.
pub fn peft_key(target: LoraTarget, is_a: bool) -> String {
    format!(
        "base_model.model.model.layers.{}.{}.lora_{}.weight",
        target.layer,
        target.module.path(),
        if is_a { "A" } else { "B" }
    )
}

impl LoraAdapter {
    /// Loads a PEFT LoRA folder onto `device` (weights converted to f32).
    ///
    /// Refused with a clear error: DoRA, `fan_in_fan_out`, trained biases, per-module rank or
    /// alpha patterns, weights for anything but the seven decoder projections (under their own
    /// names or Phi-2's and Starcoder2's), one projection under two names, and
    /// fused projections (which [`load_peft_for`](Self::load_peft_for) splits).
    pub fn load_peft(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Self::load_peft_for(dir, device, None)
    }

    /// As [`load_peft`](Self::load_peft), and with the base model's `shape`, a LoRA on a
    /// fused projection (Phi-3's `qkv_proj`, `gate_up_proj`) becomes the LoRAs of its parts:
    /// the same A, and B's rows of each part (q, k, v; gate, up), which is the same update.
    pub fn load_peft_for(
        dir: impl AsRef<Path>,
        device: &Device,
        shape: Option<&BaseModelShape>,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg_path = dir.join(CONFIG_FILE);
        let cfg: PeftConfigIn = read_json(&cfg_path)?;
        let refuse = |what: &str| {
            Err(DndError::Incompatible(format!(
                "{}: {what} is not supported",
                cfg_path.display()
            )))
        };
        if cfg.peft_type.as_deref().is_some_and(|t| t != "LORA") {
            return refuse(&format!("peft_type {:?}", cfg.peft_type.unwrap()));
        }
        if cfg.use_dora {
            return refuse("DoRA (use_dora)");
        }
        if cfg.fan_in_fan_out {
            return refuse("fan_in_fan_out");
        }
        if cfg.bias.as_deref().is_some_and(|b| b != "none") {
            return refuse("a trained bias");
        }
        if cfg.rank_pattern.as_ref().is_some_and(|p| !p.is_empty())
            || cfg.alpha_pattern.as_ref().is_some_and(|p| !p.is_empty())
        {
            return refuse("a per-module rank_pattern or alpha_pattern");
        }
        // rsLoRA scales by alpha / sqrt(r); fold it into an equivalent plain alpha.
        let alpha = if cfg.use_rslora {
            cfg.lora_alpha * (cfg.r as f64).sqrt()
        } else {
            cfg.lora_alpha
        };

        let weights_path = dir.join(WEIGHTS_FILE);
        let tensors = candle_core::safetensors::load(&weights_path, device)?;
        let mut a_map = BTreeMap::new();
        let mut b_map = BTreeMap::new();
        for (key, t) in tensors {
            let Some((target, is_a)) = parse_any_key(&key) else {
                return Err(DndError::Incompatible(format!(
                    "{}: tensor {key} is not a LoRA matrix of a decoder projection",
                    weights_path.display()
                )));
            };
            let t = t.to_dtype(DType::F32)?;
            // Two names for one projection (`mlp.fc1` next to `mlp.up_proj`, a fused key next to
            // its parts) would leave one of them unused.
            let twice = |target: LoraTarget| {
                DndError::Incompatible(format!(
                    "{}: layer {} {} has LoRA weights under two names (last: {key})",
                    weights_path.display(),
                    target.layer,
                    target.module.name()
                ))
            };
            let (layer, f) = match target {
                KeyTarget::Plain(target) => {
                    let map = if is_a { &mut a_map } else { &mut b_map };
                    if map.insert(target, t).is_some() {
                        return Err(twice(target));
                    }
                    continue;
                }
                KeyTarget::Fused { layer, fused } => (layer, fused),
            };
            let (path, parts) = FUSED[f];
            let Some(shape) = shape else {
                return Err(DndError::Incompatible(format!(
                    "{}: {key} is a fused projection ({path}); splitting it into its parts \
                     needs the base model's shape",
                    weights_path.display(),
                )));
            };
            // A fused LoRA, y = x Aᵀ Bᵀ over the parts' outputs side by side, is the parts'
            // LoRAs with the same A and B's rows of each part (paired below like any other).
            let widths: Vec<usize> = parts.iter().map(|m| shape.in_out(*m).1).collect();
            if !is_a && t.dim(0)? != widths.iter().sum::<usize>() {
                return Err(DndError::Incompatible(format!(
                    "{}: layer {layer} {path}: lora_B has {} rows, the base model's parts \
                     {widths:?}",
                    weights_path.display(),
                    t.dim(0)?
                )));
            }
            let mut offset = 0;
            for (&module, width) in parts.iter().zip(widths) {
                let target = LoraTarget { layer, module };
                let earlier = if is_a {
                    a_map.insert(target, t.clone())
                } else {
                    b_map.insert(target, t.narrow(0, offset, width)?.contiguous()?)
                };
                if earlier.is_some() {
                    return Err(twice(target));
                }
                offset += width;
            }
        }
        let mut pairs = BTreeMap::new();
        for (target, a) in a_map {
            let b = b_map.remove(&target).ok_or_else(|| {
                DndError::Incompatible(format!(
                    "{}: {} has lora_A but no lora_B",
                    weights_path.display(),
                    peft_key(target, true)
                ))
            })?;
            pairs.insert(target, LoraPair { a, b });
        }
        if let Some(target) = b_map.keys().next() {
            return Err(DndError::Incompatible(format!(
                "{}: {} has lora_B but no lora_A",
                weights_path.display(),
                peft_key(*target, false)
            )));
        }
        if pairs.is_empty() {
            return Err(DndError::Incompatible(format!(
                "{}: no LoRA weights",
                weights_path.display()
            )));
        }
        LoraAdapter::new(cfg.r, alpha, pairs)
    }

    /// Writes the adapter as a PEFT folder (created if needed), weights in f32.
    ///
    /// `base_model` is recorded as `base_model_name_or_path`.
    pub fn save_peft(&self, dir: impl AsRef<Path>, base_model: Option<&str>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| DndError::io(dir, e))?;
        let cfg = PeftConfigOut {
            peft_type: "LORA",
            task_type: "CAUSAL_LM",
            base_model_name_or_path: base_model,
            r: self.rank(),
            lora_alpha: self.alpha(),
            lora_dropout: 0.0,
            target_modules: self.target_modules().iter().map(|m| m.name()).collect(),
            bias: "none",
            fan_in_fan_out: false,
            use_rslora: false,
            use_dora: false,
            inference_mode: true,
            init_lora_weights: true,
            modules_to_save: None,
            layers_to_transform: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
        };
        let cfg_path = dir.join(CONFIG_FILE);
        let text = serde_json::to_string_pretty(&cfg).expect("config serialises");
        std::fs::write(&cfg_path, text).map_err(|e| DndError::io(&cfg_path, e))?;

        let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(self.pairs().len() * 2);
        for (t, p) in self.pairs() {
            tensors.push((peft_key(*t, true), p.a.to_dtype(DType::F32)?.contiguous()?));
            tensors.push((peft_key(*t, false), p.b.to_dtype(DType::F32)?.contiguous()?));
        }
        let weights_path = dir.join(WEIGHTS_FILE);
        let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        safetensors::serialize_to_file(
            tensors.iter().map(|(k, v)| (k.as_str(), v)),
            Some(metadata),
            &weights_path,
        )
        .map_err(|e| DndError::Incompatible(format!("{}: {e}", weights_path.display())))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_projections_become_their_parts_with_the_models_shape() {
        let dir = crate::test_util::golden_path("tiny-phi3");
        let err = LoraAdapter::load_peft(dir.join("adapter1"), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("fused projection"), "{err}");
        let shape = BaseModelShape::from_path(&dir).unwrap();
        let a =
            LoraAdapter::load_peft_for(dir.join("adapter1"), &Device::Cpu, Some(&shape)).unwrap();
        assert_eq!(a.target_modules(), Module::ALL.to_vec());
        let raw =
            candle_core::safetensors::load(dir.join("adapter1").join(WEIGHTS_FILE), &Device::Cpu)
                .unwrap();
        let fused = |layer: usize, path: &str, ab: &str| {
            raw[&format!("base_model.model.model.layers.{layer}.{path}.lora_{ab}.weight")].clone()
        };
        let same = |x: &Tensor, y: &Tensor| crate::test_util::max_abs_diff(x, y) == 0.0;
        for layer in 0..shape.num_layers {
            // Each part keeps the fused A and takes its own rows of B, in q, k, v order.
            let (qa, qb) = (
                fused(layer, "self_attn.qkv_proj", "A"),
                fused(layer, "self_attn.qkv_proj", "B"),
            );
            let mut row = 0;
            for m in [Module::Q, Module::K, Module::V] {
                let p = a.get(layer, m).unwrap();
                let w = shape.in_out(m).1;
                assert!(
                    same(&p.a, &qa) && same(&p.b, &qb.narrow(0, row, w).unwrap()),
                    "{m:?}"
                );
                row += w;
            }
            assert_eq!(row, qb.dim(0).unwrap());
            let gb = fused(layer, "mlp.gate_up_proj", "B");
            let i = shape.intermediate;
            assert!(same(
                &a.get(layer, Module::Gate).unwrap().b,
                &gb.narrow(0, 0, i).unwrap()
            ));
            assert!(same(
                &a.get(layer, Module::Up).unwrap().b,
                &gb.narrow(0, i, i).unwrap()
            ));
        }
        // A base model whose parts do not add up to the fused width is refused.
        let mut wrong = shape.clone();
        wrong.kv_dim += 1;
        let err = LoraAdapter::load_peft_for(dir.join("adapter1"), &Device::Cpu, Some(&wrong))
            .unwrap_err()
            .to_string();
        assert!(err.contains("rows"), "{err}");
    }

    #[test]
    fn gateless_families_projection_names_load_as_our_module_names() {
        for (family, o, up, down) in [
            ("tiny-phi2", "self_attn.dense", "mlp.fc1", "mlp.fc2"),
            (
                "tiny-starcoder2",
                "self_attn.o_proj",
                "mlp.c_fc",
                "mlp.c_proj",
            ),
        ] {
            let dir = crate::test_util::golden_path(family);
            let shape = BaseModelShape::from_path(&dir).unwrap();
            assert!(!shape.has_module(Module::Gate), "{family}: {shape:?}");
            // The GGUF copy's architecture names the family too (`phi2` where the config says
            // `phi`).
            let gguf = BaseModelShape::from_path(dir.join("model-f32.gguf")).unwrap();
            assert!(!gguf.has_module(Module::Gate), "{family}: {gguf:?}");
            assert!(gguf.same_widths(&shape), "{family}: {gguf:?} vs {shape:?}");
            let a = LoraAdapter::load_peft_for(dir.join("adapter1"), &Device::Cpu, Some(&shape))
                .unwrap();
            let want: Vec<Module> = Module::ALL
                .into_iter()
                .filter(|m| *m != Module::Gate)
                .collect();
            assert_eq!(a.target_modules(), want, "{family}");
            a.check_fits(&shape).unwrap();
            // The same matrices as the file's, under our names.
            let raw = candle_core::safetensors::load(
                dir.join("adapter1").join(WEIGHTS_FILE),
                &Device::Cpu,
            )
            .unwrap();
            for (path, module) in [(o, Module::O), (up, Module::Up), (down, Module::Down)] {
                let pair = &a.pairs()[&LoraTarget { layer: 1, module }];
                for (ab, got) in [("A", &pair.a), ("B", &pair.b)] {
                    let want =
                        &raw[&format!("base_model.model.model.layers.1.{path}.lora_{ab}.weight")];
                    assert_eq!(
                        crate::test_util::max_abs_diff(got, want),
                        0.0,
                        "{family} {path}"
                    );
                }
            }
            // A gate LoRA has nowhere to go in these models: refused, not ignored.
            let mut pairs = a.pairs().clone();
            let up_pair = pairs[&LoraTarget {
                layer: 0,
                module: Module::Up,
            }]
                .clone();
            pairs.insert(
                LoraTarget {
                    layer: 0,
                    module: Module::Gate,
                },
                up_pair,
            );
            let gated = LoraAdapter::new(a.rank(), a.alpha(), pairs).unwrap();
            let err = gated.check_fits(&shape).unwrap_err().to_string();
            assert!(err.contains("no gate"), "{family}: {err}");
        }
    }

    #[test]
    fn one_projection_under_two_names_is_refused() {
        let src = crate::test_util::golden_path("tiny-phi2").join("adapter1");
        let dir = std::env::temp_dir().join(format!("dnd-peft-twice-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(src.join(CONFIG_FILE), dir.join(CONFIG_FILE)).unwrap();
        let mut raw = candle_core::safetensors::load(src.join(WEIGHTS_FILE), &Device::Cpu).unwrap();
        // fc1's A again under Llama's name for the same projection.
        let prefix = "base_model.model.model.layers.0.mlp";
        let a = raw[&format!("{prefix}.fc1.lora_A.weight")].clone();
        raw.insert(format!("{prefix}.up_proj.lora_A.weight"), a);
        candle_core::safetensors::save(&raw, dir.join(WEIGHTS_FILE)).unwrap();
        let err = LoraAdapter::load_peft(&dir, &Device::Cpu)
            .unwrap_err()
            .to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            err.contains("two names") && err.contains("up_proj"),
            "{err}"
        );
    }

    #[test]
    fn keys_parse_both_ways() {
        let t = LoraTarget {
            layer: 12,
            module: Module::Down,
        };
        let k = peft_key(t, false);
        assert_eq!(
            k,
            "base_model.model.model.layers.12.mlp.down_proj.lora_B.weight"
        );
        assert_eq!(parse_key(&k), Some((t, false)));
        assert_eq!(
            parse_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"),
            Some((
                LoraTarget {
                    layer: 0,
                    module: Module::Q
                },
                true
            ))
        );
        // A module under the wrong block, or something that is no projection, is rejected.
        assert_eq!(
            parse_key("base_model.model.model.layers.0.mlp.q_proj.lora_A.weight"),
            None
        );
        assert_eq!(parse_key("base_model.model.lm_head.lora_A.weight"), None);
    }
}
