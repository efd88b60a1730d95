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

/// A linear layer over (batch, len, in) as one 2-D product: candle's batched path for 3-D
/// inputs multiplies per batch row, several times slower on the CPU.
fn lin(l: &Linear, x: &Tensor) -> Result<Tensor> {
    let (b, len, h) = x.dims3()?;
    let y = l.forward(&x.reshape((b * len, h))?)?;
    let out = y.dim(1)?;
    y.reshape((b, len, out))
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

    /// Self-attention context for every position, (batch, len, hidden).
    ///
    /// Rows are right-padded: `valid[i]` leading positions of row i are attended. A masked key
    /// gets weight exp(min - max) = 0 exactly, so attending only to the valid keys gives the
    /// same context at a fraction of the cost (prompts are often far shorter than L). Queries at
    /// padding positions are still computed: their outputs are part of the condition. A row with
    /// no valid key gets a zero context, as PyTorch's attention returns for fully masked rows.
    fn attention(&self, x: &Tensor, valid: &[usize]) -> Result<Tensor> {
        let (b, len, h) = x.dims3()?;
        let hd = h / self.heads;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, len, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = (split(lin(&self.query, x)?)? / (hd as f64).sqrt())?;
        let k = split(lin(&self.key, x)?)?;
        let v = split(lin(&self.value, x)?)?;
        let mut rows = Vec::with_capacity(b);
        for (i, &n) in valid.iter().enumerate() {
            if n == 0 {
                rows.push(Tensor::zeros((1, len, h), x.dtype(), x.device())?);
                continue;
            }
            let qi = q.narrow(0, i, 1)?.squeeze(0)?; // (heads, len, hd)
            let ki = k.narrow(0, i, 1)?.squeeze(0)?.narrow(1, 0, n)?;
            let vi = v
                .narrow(0, i, 1)?
                .squeeze(0)?
                .narrow(1, 0, n)?
                .contiguous()?;
            let probs = candle_nn::ops::softmax_last_dim(&qi.matmul(&ki.t()?)?)?;
            let ctx = probs.matmul(&vi)?; // (heads, len, hd)
            rows.push(ctx.transpose(0, 1)?.reshape((1, len, h))?);
        }
        Tensor::cat(&rows, 0)
    }

    fn forward(&self, x: &Tensor, valid: &[usize]) -> Result<Tensor> {
        let ctx = self.attention(x, valid)?;
        let x = self.attn_norm.forward(&(lin(&self.attn_out, &ctx)? + x)?)?;
        let inner = lin(&self.intermediate, &x)?;
        let inner = if self.exact_gelu {
            super::gelu::gelu_erf(&inner)?
        } else {
            inner.gelu()?
        };
        self.out_norm.forward(&(lin(&self.out, &inner)? + x)?)
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
            token_type: embedding(
                cfg.type_vocab_size,
                cfg.hidden_size,
                e.pp("token_type_embeddings"),
            )?,
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

    /// `ids` (batch, len) u32 and the number of leading attended positions of each row (the
    /// rest is right padding) to `last_hidden_state` (batch, len, hidden). Padding positions are
    /// computed too, as the reference returns them.
    pub fn forward(&self, ids: &Tensor, valid: &[usize]) -> Result<Tensor> {
        let (b, len) = ids.dims2()?;
        if valid.len() != b || valid.iter().any(|&n| n > len) {
            candle_core::bail!(
                "{} valid lengths for {b} rows of {len}: {valid:?}",
                valid.len()
            );
        }
        let mut x = self.embeddings.forward(ids)?;
        for layer in &self.layers {
            x = layer.forward(&x, valid)?;
        }
        Ok(x)
    }
}
