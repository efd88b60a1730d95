//! The LoRA-relevant shape of a base model, derived from its own `config.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{read_json, DndError, Result};

/// A projection of a decoder layer that LoRA can adapt.
///
/// The declaration order is the parameter-token order of DnD: q, k, v, o, up, gate, down
/// (up before gate, as in the reference checkpoints).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Module {
    /// `self_attn.q_proj`
    #[serde(rename = "q_proj")]
    Q,
    /// `self_attn.k_proj`
    #[serde(rename = "k_proj")]
    K,
    /// `self_attn.v_proj`
    #[serde(rename = "v_proj")]
    V,
    /// `self_attn.o_proj`
    #[serde(rename = "o_proj")]
    O,
    /// `mlp.up_proj`
    #[serde(rename = "up_proj")]
    Up,
    /// `mlp.gate_proj`
    #[serde(rename = "gate_proj")]
    Gate,
    /// `mlp.down_proj`
    #[serde(rename = "down_proj")]
    Down,
}

impl Module {
    /// All seven modules in token order.
    pub const ALL: [Module; 7] = [
        Module::Q,
        Module::K,
        Module::V,
        Module::O,
        Module::Up,
        Module::Gate,
        Module::Down,
    ];

    /// The PEFT target-module name (`q_proj`...).
    pub fn name(self) -> &'static str {
        match self {
            Module::Q => "q_proj",
            Module::K => "k_proj",
            Module::V => "v_proj",
            Module::O => "o_proj",
            Module::Up => "up_proj",
            Module::Gate => "gate_proj",
            Module::Down => "down_proj",
        }
    }

    /// The module's path inside a decoder layer (`self_attn.q_proj`...).
    pub fn path(self) -> &'static str {
        match self {
            Module::Q => "self_attn.q_proj",
            Module::K => "self_attn.k_proj",
            Module::V => "self_attn.v_proj",
            Module::O => "self_attn.o_proj",
            Module::Up => "mlp.up_proj",
            Module::Gate => "mlp.gate_proj",
            Module::Down => "mlp.down_proj",
        }
    }

    /// Parses a PEFT target-module name.
    pub fn from_name(name: &str) -> Option<Module> {
        Module::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// Widths of a decoder-only transformer that determine its LoRA matrix shapes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseModelShape {
    /// `model_type` of the config (`qwen2`, `llama`...), informative.
    pub model_type: String,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Residual stream width.
    pub hidden: usize,
    /// MLP inner width.
    pub intermediate: usize,
    /// Output width of q_proj (heads x head_dim).
    pub q_dim: usize,
    /// Output width of k_proj and v_proj (kv heads x head_dim).
    pub kv_dim: usize,
}

#[derive(Deserialize)]
struct HfConfig {
    #[serde(default)]
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
}

impl BaseModelShape {
    /// Reads the shape from a Hugging Face `config.json` (a file, or a model folder holding one).
    pub fn from_config_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let cfg: HfConfig = read_json(&file)?;
        Self::from_hf(cfg).map_err(|e| DndError::Incompatible(format!("{}: {e}", file.display())))
    }

    /// Parses the shape from the text of a Hugging Face `config.json`.
    pub fn from_config_json(text: &str) -> Result<Self> {
        let cfg: HfConfig =
            serde_json::from_str(text).map_err(|e| DndError::json("config.json", e))?;
        Self::from_hf(cfg)
    }

    fn from_hf(cfg: HfConfig) -> Result<Self> {
        if cfg.num_attention_heads == 0 {
            return Err(DndError::Incompatible("num_attention_heads is 0".into()));
        }
        let head_dim = cfg
            .head_dim
            .unwrap_or(cfg.hidden_size / cfg.num_attention_heads);
        let kv_heads = cfg.num_key_value_heads.unwrap_or(cfg.num_attention_heads);
        Ok(Self {
            model_type: cfg.model_type.unwrap_or_default(),
            num_layers: cfg.num_hidden_layers,
            hidden: cfg.hidden_size,
            intermediate: cfg.intermediate_size,
            q_dim: cfg.num_attention_heads * head_dim,
            kv_dim: kv_heads * head_dim,
        })
    }

    /// Reads the shape from a GGUF file's metadata (`llama`, `qwen2` and other architectures
    /// that use the standard `{arch}.block_count`, `{arch}.attention.*` keys).
    pub fn from_gguf(path: impl AsRef<Path>) -> Result<Self> {
        use candle_core::quantized::gguf_file;
        let path = path.as_ref();
        let mut f = std::fs::File::open(path).map_err(|e| DndError::io(path, e))?;
        let content = gguf_file::Content::read(&mut f)
            .map_err(|e| DndError::Incompatible(format!("{}: {e}", path.display())))?;
        let md = &content.metadata;
        let missing = |k: &str| {
            DndError::Incompatible(format!("{}: no `{k}` in the GGUF metadata", path.display()))
        };
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| missing("general.architecture"))?
            .clone();
        let int = |k: &str| -> Result<Option<usize>> {
            let key = format!("{arch}.{k}");
            Ok(match md.get(&key) {
                None => None,
                Some(v) => Some(
                    v.to_u32()
                        .map(|x| x as usize)
                        .or_else(|_| v.to_u64().map(|x| x as usize))
                        .or_else(|_| v.to_i32().map(|x| x as usize))
                        .map_err(|e| DndError::Incompatible(format!("{key}: {e}")))?,
                ),
            })
        };
        let need = |k: &str| int(k)?.ok_or_else(|| missing(&format!("{arch}.{k}")));
        let hidden = need("embedding_length")?;
        let heads = need("attention.head_count")?;
        let kv_heads = int("attention.head_count_kv")?.unwrap_or(heads);
        let head_dim = int("attention.key_length")?.unwrap_or(hidden / heads.max(1));
        Ok(Self {
            model_type: arch.clone(),
            num_layers: need("block_count")?,
            hidden,
            intermediate: need("feed_forward_length")?,
            q_dim: heads * head_dim,
            kv_dim: kv_heads * head_dim,
        })
    }

    /// The shape of a base model given as a model folder, a `config.json` or a `.gguf` file.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            Self::from_gguf(path)
        } else {
            Self::from_config_file(path)
        }
    }

    /// (input width, output width) of a module, as in `nn.Linear(in, out)`.
    pub fn in_out(&self, module: Module) -> (usize, usize) {
        match module {
            Module::Q => (self.hidden, self.q_dim),
            Module::K | Module::V => (self.hidden, self.kv_dim),
            Module::O => (self.q_dim, self.hidden),
            Module::Up | Module::Gate => (self.hidden, self.intermediate),
            Module::Down => (self.intermediate, self.hidden),
        }
    }

    /// Whether the base model has `module`: every family has all seven but those whose MLP has
    /// no gate (Phi-2, `phi` in its config and `phi2` in GGUF; Starcoder2), which have no
    /// `gate_proj`.
    pub fn has_module(&self, module: Module) -> bool {
        module != Module::Gate || !matches!(self.model_type.as_str(), "phi" | "phi2" | "starcoder2")
    }

    /// Qwen2.5-0.5B, the base model of the authors' released common-sense generator.
    pub fn qwen25_05b() -> Self {
        Self {
            model_type: "qwen2".into(),
            num_layers: 24,
            hidden: 896,
            intermediate: 4864,
            q_dim: 896,
            kv_dim: 128,
        }
    }

    /// SmolLM2-135M(-Instruct), the embedded default base model.
    pub fn smollm2_135m() -> Self {
        Self {
            model_type: "llama".into(),
            num_layers: 30,
            hidden: 576,
            intermediate: 1536,
            q_dim: 576,
            kv_dim: 192,
        }
    }

    /// True when two shapes describe interchangeable LoRA targets (`model_type` is ignored
    /// but for whether the MLP has a gate).
    pub fn same_widths(&self, other: &Self) -> bool {
        self.has_module(Module::Gate) == other.has_module(Module::Gate)
            && (
                self.num_layers,
                self.hidden,
                self.intermediate,
                self.q_dim,
                self.kv_dim,
            ) == (
                other.num_layers,
                other.hidden,
                other.intermediate,
                other.q_dim,
                other.kv_dim,
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen_config_gives_gqa_widths() {
        let json = r#"{"model_type":"qwen2","hidden_size":896,"intermediate_size":4864,
            "num_hidden_layers":24,"num_attention_heads":14,"num_key_value_heads":2}"#;
        let s = BaseModelShape::from_config_json(json).unwrap();
        assert_eq!(s, BaseModelShape::qwen25_05b());
        assert_eq!(s.in_out(Module::Down), (4864, 896));
        assert_eq!(s.in_out(Module::K), (896, 128));
    }

    #[test]
    fn explicit_head_dim_wins() {
        let json = r#"{"hidden_size":64,"intermediate_size":160,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"head_dim":32}"#;
        let s = BaseModelShape::from_config_json(json).unwrap();
        assert_eq!((s.q_dim, s.kv_dim), (128, 64));
        assert_eq!(s.in_out(Module::O), (128, 64));
    }

    #[test]
    fn gguf_metadata_gives_the_same_shape() {
        use candle_core::quantized::gguf_file::{write, Value};
        let path = std::env::temp_dir().join(format!("dnd-shape-{}.gguf", std::process::id()));
        let md: Vec<(&str, Value)> = vec![
            ("general.architecture", Value::String("llama".into())),
            ("llama.block_count", Value::U32(30)),
            ("llama.embedding_length", Value::U32(576)),
            ("llama.feed_forward_length", Value::U32(1536)),
            ("llama.attention.head_count", Value::U32(9)),
            ("llama.attention.head_count_kv", Value::U32(3)),
        ];
        let refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
        write(&mut std::fs::File::create(&path).unwrap(), &refs, &[]).unwrap();
        let s = BaseModelShape::from_path(&path).unwrap();
        assert!(s.same_widths(&BaseModelShape::smollm2_135m()), "{s:?}");
        assert_eq!(s.model_type, "llama");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn module_names_round_trip() {
        for m in Module::ALL {
            assert_eq!(Module::from_name(m.name()), Some(m));
            assert!(m.path().ends_with(m.name()));
        }
        assert_eq!(Module::from_name("lm_head"), None);
    }
}
