//! A BERT encoder (Sentence-BERT's MiniLM family) returning `last_hidden_state`.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{embedding, layer_norm, linear, Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

/// The fields of a BERT `config.json` that the forward pass needs.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden width (384 for MiniLM).
    pub hidden_size: usize,
    /// Number of transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Position table size (512): longer inputs must be chunked by the caller.
    pub max_position_embeddings: usize,
    /// Token-type table size.
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Activation of the MLP.
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}

struct Embeddings {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    norm: LayerNorm,
}

impl Embeddings {
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, len) = ids.dims2()?;
        let positions = Tensor::arange(0u32, len as u32, ids.device())?;
        // token_type_ids are all 0: add row 0 of the table everywhere.
        let zeros = Tensor::zeros(len, DType::U32, ids.device())?;
        let x = self
            .word
            .forward(ids)?
            .broadcast_add(&self.position.forward(&positions)?)?
            .broadcast_add(&self.token_type.forward(&zeros)?)?;
        self.norm.forward(&x)
    }
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    out: Linear,
    out_norm: LayerNorm,
    heads: usize,
    exact_gelu: bool,
}

impl Layer {
    fn load(cfg: &BertConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let att = vb.pp("attention");
        let exact_gelu = match cfg.hidden_act.as_str() {
            "gelu" => true,
            "gelu_new" | "gelu_pytorch_tanh" => false,
            other => candle_core::bail!("unsupported BERT activation {other}"),
        };
        Ok(Self {
            query: linear(h, h, att.pp("self.query"))?,
            key: linear(h, h, att.pp("self.key"))?,
            value: linear(h, h, att.pp("self.value"))?,
            attn_out: linear(h, h, att.pp("output.dense"))?,
            attn_norm: layer_norm(h, cfg.layer_norm_eps, att.pp("output.LayerNorm"))?,
            intermediate: linear(h, cfg.intermediate_size, vb.pp("intermediate.dense"))?,
            out: linear(cfg.intermediate_size, h, vb.pp("output.dense"))?,
            out_norm: layer_norm(h, cfg.layer_norm_eps, vb.pp("output.LayerNorm"))?,
            heads: cfg.num_attention_heads,
            exact_gelu,
        })
    }

    /// `mask_bias`: (batch, 1, 1, len), 0 where attended and a huge negative where padded;
    /// `has_keys`: (batch, 1, 1, 1), 0 for a row with no attended position at all.
    fn forward(&self, x: &Tensor, mask_bias: &Tensor, has_keys: &Tensor) -> Result<Tensor> {
        let (b, len, h) = x.dims3()?;
        let hd = h / self.heads;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, len, self.heads, hd))?.transpose(1, 2)?.contiguous()
        };
        let q = split(self.query.forward(x)?)?;
        let k = split(self.key.forward(x)?)?;
        let v = split(self.value.forward(x)?)?;
        let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?.broadcast_add(mask_bias)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.broadcast_mul(has_keys)?;
        let ctx = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, len, h))?;
        let x = self.attn_norm.forward(&(self.attn_out.forward(&ctx)? + x)?)?;
        let inner = self.intermediate.forward(&x)?;
        let inner = if self.exact_gelu {
            inner.gelu_erf()?
        } else {
            inner.gelu()?
        };
        self.out_norm.forward(&(self.out.forward(&inner)? + x)?)
    }
}

/// A BERT encoder without pooler.
pub struct BertModel {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    max_positions: usize,
}

impl BertModel {
    /// Loads the weights; `vb` is rooted where `embeddings.` and `encoder.` live.
    pub fn load(cfg: &BertConfig, vb: VarBuilder) -> Result<Self> {
        let e = vb.pp("embeddings");
        let embeddings = Embeddings {
            word: embedding(cfg.vocab_size, cfg.hidden_size, e.pp("word_embeddings"))?,
            position: embedding(
                cfg.max_position_embeddings,
                cfg.hidden_size,
                e.pp("position_embeddings"),
            )?,
            token_type: embedding(cfg.type_vocab_size, cfg.hidden_size, e.pp("token_type_embeddings"))?,
            norm: layer_norm(cfg.hidden_size, cfg.layer_norm_eps, e.pp("LayerNorm"))?,
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::load(cfg, vb.pp(format!("encoder.layer.{i}"))))
            .collect::<Result<_>>()?;
        Ok(Self {
            embeddings,
            layers,
            max_positions: cfg.max_position_embeddings,
        })
    }

    /// The longest sequence one forward pass takes.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// `ids` (batch, len) u32 and `mask` (batch, len) of 0/1 to `last_hidden_state`
    /// (batch, len, hidden). Padding positions are computed too, as the reference returns them.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let mut x = self.embeddings.forward(ids)?;
        let dtype = x.dtype();
        // (1 - mask) * finfo(dtype).min is added to the scores. A row with no attended position
        // (a 512-token piece made only of padding) gets a zero attention context, as PyTorch's
        // scaled_dot_product_attention returns for fully masked rows; the reference carries that.
        let min = match dtype {
            DType::BF16 => half::bf16::MIN.to_f64(),
            DType::F16 => half::f16::MIN.to_f64(),
            _ => f32::MIN as f64,
        };
        let (b, len) = mask.dims2()?;
        let bias = ((1.0 - mask.to_dtype(DType::F32)?)? * min)?
            .to_dtype(dtype)?
            .reshape((b, 1, 1, len))?;
        let has_keys = mask
            .to_dtype(DType::F32)?
            .max_keepdim(1)?
            .to_dtype(dtype)?
            .reshape((b, 1, 1, 1))?;
        for layer in &self.layers {
            x = layer.forward(&x, &bias, &has_keys)?;
        }
        Ok(x)
    }
}
