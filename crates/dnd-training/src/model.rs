//! A differentiable Qwen2 / Llama decoder for LoRA training, built from plain tensor ops so
//! that candle's autograd reaches every LoRA factor.
//!
//! The base weights are frozen tensors; only the LoRA factors handed to
//! [`CausalLm::forward`] (variables, when training) receive gradients. Numerics follow the
//! Hugging Face implementations: RMSNorm in f32, rotary embeddings on halves
//! (`rotate_half`), grouped-query attention with a causal mask, SwiGLU MLP, q/k/v biases for
//! Qwen2, tied embeddings when the config says so.

use std::path::Path;

use candle_core::{DType, Device, Module as _, Tensor, D};
use candle_nn::VarBuilder;
use serde::Deserialize;

use dnd_core::adapters::{LoraAdapter, Module};
use dnd_core::error::{read_to_string, DndError, Result};

/// The architecture numbers of a Hugging Face `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct LmConfig {
    /// `qwen2` or `llama`.
    pub model_type: String,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Whether the output projection is the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// End-of-sequence token id(s).
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

impl LmConfig {
    /// Reads a model folder's `config.json`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let path = dir.as_ref().join("config.json");
        let text = read_to_string(&path)?;
        let cfg: Self =
            serde_json::from_str(&text).map_err(|e| DndError::json(path.display(), e))?;
        if !matches!(cfg.model_type.as_str(), "qwen2" | "llama") {
            return Err(DndError::Incompatible(format!(
                "{}: model_type {:?}; training supports qwen2 and llama",
                path.display(),
                cfg.model_type
            )));
        }
        Ok(cfg)
    }

    /// The (first) end-of-sequence token id.
    pub fn eos_token_id(&self) -> Option<u32> {
        match self.eos_token_id.as_ref()? {
            serde_json::Value::Number(n) => n.as_u64().map(|v| v as u32),
            serde_json::Value::Array(v) => v.first()?.as_u64().map(|v| v as u32),
            _ => None,
        }
    }

    pub(super) fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    pub(super) fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
}

/// One projection's LoRA in the plain forward: `A`, `B` and `alpha / r`.
type LoraRef<'a> = (&'a Tensor, &'a Tensor, f64);

/// A frozen projection: `w` `(out, in)`, optional bias.
pub(super) struct Linear {
    pub(super) w: Tensor,
    pub(super) b: Option<Tensor>,
}

impl Linear {
    fn load(vb: &VarBuilder, out: usize, inp: usize, bias: bool) -> Result<Self> {
        Ok(Self {
            w: vb.get((out, inp), "weight")?,
            b: if bias {
                Some(vb.get(out, "bias")?)
            } else {
                None
            },
        })
    }

    /// A bias-free projection whose weight is kept transposed in memory (`(in, out)`
    /// contiguous; `w` is a view): a product with a wide inner dimension (the MLP's down
    /// projection) runs half again as fast with the weight in this order in both directions
    /// of the training step.
    fn load_transposed(vb: &VarBuilder, out: usize, inp: usize) -> Result<Self> {
        let w = vb.get((out, inp), "weight")?;
        Ok(Self {
            w: w.t()?.contiguous()?.t()?,
            b: None,
        })
    }

    /// `x W^T (+ b) (+ scale · x A^T B^T)`, x of shape (B, T, in).
    fn forward(&self, x: &Tensor, lora: Option<LoraRef>) -> Result<Tensor> {
        let mut y = matmul_t(x, &self.w)?;
        if let Some(b) = &self.b {
            y = y.broadcast_add(b)?;
        }
        if let Some((a, b, scale)) = lora {
            let d = matmul_t(&matmul_t(x, a)?, b)?;
            y = (y + (d * scale)?)?;
        }
        Ok(y)
    }
}

/// `x wᵀ` for `x` `(..., in)` and `w` `(out, in)`: the leading dimensions flattened into one
/// 2-D product, because candle's `broadcast_matmul` makes the transposed weight contiguous
/// (a full copy of the matrix) on every call.
fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let inp = *dims.last().expect("a matrix");
    let rows = x.elem_count() / inp.max(1);
    let y = x.reshape((rows, inp))?.matmul(&w.t()?)?;
    let mut out = dims.to_vec();
    *out.last_mut().expect("a matrix") = w.dim(0)?;
    Ok(y.reshape(out)?)
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_div(&(var + eps)?.sqrt()?)?.broadcast_mul(w)?)
}

/// Projections that read the same input (q/k/v, gate/up), stored as one matrix (their weights
/// stacked by rows) so that both the plain forward and the explicit backward pass
/// ([`super::backward`]) multiply once for all of them.
pub(super) struct Fused {
    /// `(sum of outs, in)`.
    pub(super) w: Tensor,
    /// The stacked biases, when the projections have them.
    pub(super) b: Option<Tensor>,
}

impl Fused {
    /// Loads the named projections under `vb` (each `(out, in)`) and stacks them.
    fn load(vb: &VarBuilder, parts: &[(&str, usize)], inp: usize, bias: bool) -> Result<Self> {
        let ws = parts
            .iter()
            .map(|(name, out)| vb.pp(name).get((*out, inp), "weight"))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let w = Tensor::cat(&ws, 0)?;
        drop(ws);
        let b = if bias {
            let bs = parts
                .iter()
                .map(|(name, out)| vb.pp(name).get(*out, "bias"))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Some(Tensor::cat(&bs, 0)?)
        } else {
            None
        };
        Ok(Self { w, b })
    }

    /// The projections of `x` `(B, T, in)`, one product for all: for each `(out, lora)` its
    /// column block of `x Wᵀ (+ b)`, plus `scale · x Aᵀ Bᵀ` when adapted.
    fn forward(&self, x: &Tensor, parts: &[(usize, Option<LoraRef>)]) -> Result<Vec<Tensor>> {
        let mut y = matmul_t(x, &self.w)?;
        if let Some(b) = &self.b {
            y = y.broadcast_add(b)?;
        }
        let mut at = 0;
        parts
            .iter()
            .map(|&(out, lora)| {
                let mut p = y.narrow(D::Minus1, at, out)?;
                at += out;
                if let Some((a, b, scale)) = lora {
                    let d = matmul_t(&matmul_t(x, a)?, b)?;
                    p = (p + (d * scale)?)?;
                }
                Ok(p)
            })
            .collect()
    }
}

pub(super) struct Layer {
    pub(super) norm1: Tensor,
    pub(super) norm2: Tensor,
    /// q, k, v stacked.
    pub(super) qkv: Fused,
    /// gate, up stacked.
    pub(super) gate_up: Fused,
    pub(super) o: Linear,
    pub(super) down: Linear,
}

/// Keys and values of the positions decoded so far, per layer (before the grouped-query
/// repeat), for incremental decoding with [`CausalLm::hidden`].
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
}

impl KvCache {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The frozen base model.
pub struct CausalLm {
    cfg: LmConfig,
    pub(super) embed: Tensor,
    pub(super) layers: Vec<Layer>,
    pub(super) norm: Tensor,
    pub(super) lm_head: Tensor,
    pub(super) device: Device,
}

impl CausalLm {
    /// Loads `config.json` and `model.safetensors` (f32) from a model folder.
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg = LmConfig::from_dir(dir)?;
        let files: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| DndError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        if files.is_empty() {
            return Err(DndError::Incompatible(format!(
                "{}: no .safetensors weights",
                dir.display()
            )));
        }
        // SAFETY: the files are not modified while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, device)? };
        Self::from_parts(cfg, vb, device)
    }

    /// Builds the model from a configuration and its weights under Hugging Face names.
    pub fn from_parts(cfg: LmConfig, vb: VarBuilder, device: &Device) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (q_dim, kv_dim) = (
            cfg.num_attention_heads * cfg.head_dim(),
            cfg.kv_heads() * cfg.head_dim(),
        );
        let bias = cfg.model_type == "qwen2";
        let m = vb.pp("model");
        let embed = m.get((cfg.vocab_size, h), "embed_tokens.weight")?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let lb = m.pp(format!("layers.{l}"));
            let at = lb.pp("self_attn");
            let mlp = lb.pp("mlp");
            layers.push(Layer {
                norm1: lb.get(h, "input_layernorm.weight")?,
                norm2: lb.get(h, "post_attention_layernorm.weight")?,
                qkv: Fused::load(
                    &at,
                    &[("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)],
                    h,
                    bias,
                )?,
                gate_up: Fused::load(&mlp, &[("gate_proj", i), ("up_proj", i)], h, false)?,
                o: Linear::load(&at.pp("o_proj"), h, q_dim, false)?,
                down: Linear::load_transposed(&mlp.pp("down_proj"), h, i)?,
            });
        }
        let norm = m.get(h, "norm.weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            vb.get((cfg.vocab_size, h), "lm_head.weight")?
        };
        Ok(Self {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            device: device.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LmConfig {
        &self.cfg
    }

    /// Logits `(B, T, vocab)` for token ids `(B, T)`, with an optional LoRA adapter (whose
    /// factors may be training variables).
    pub fn forward(&self, ids: &Tensor, lora: Option<&LoraAdapter>) -> Result<Tensor> {
        self.logits(&self.hidden(ids, lora, None)?)
    }

    /// Logits of final hidden states (`(N, hidden)` or `(B, T, hidden)`).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        matmul_t(hidden, &self.lm_head)
    }

    /// Final (normed) hidden states `(B, T, hidden)` for token ids `(B, T)`. With a cache, the
    /// ids continue the cached positions and their keys and values are appended to it.
    ///
    /// Split from [`Self::logits`] because the output projection is the widest matrix of a
    /// small model: training needs it only at answer positions, decoding only at the last.
    pub fn hidden(
        &self,
        ids: &Tensor,
        lora: Option<&LoraAdapter>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        let offset = cache.as_ref().map_or(0, |c| c.len);
        let mut x = candle_nn::Embedding::new(self.embed.clone(), cfg.hidden_size).forward(ids)?;
        let (cos, sin) = self.rope(offset, t)?;
        let mask = causal_mask(t, offset, &self.device)?;
        let scale_of = |layer: usize, m: Module| {
            lora.and_then(|a| a.get(layer, m).map(|p| (&p.a, &p.b, a.scale())))
        };
        for (l, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.norm1, cfg.rms_norm_eps)?;
            let heads = |y: Tensor, n: usize| -> Result<Tensor> {
                Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
            };
            let mut qkv = layer
                .qkv
                .forward(
                    &h,
                    &[
                        (nh * hd, scale_of(l, Module::Q)),
                        (nkv * hd, scale_of(l, Module::K)),
                        (nkv * hd, scale_of(l, Module::V)),
                    ],
                )?
                .into_iter();
            let mut next = || qkv.next().expect("three projections");
            let q = heads(next(), nh)?;
            let k = heads(next(), nkv)?;
            let v = heads(next(), nkv)?;
            let q = apply_rope(&q, &cos, &sin)?;
            let mut k = apply_rope(&k, &cos, &sin)?;
            let mut v = v;
            if let Some(c) = cache.as_deref_mut() {
                if let Some((pk, pv)) = c.layers.get(l) {
                    k = Tensor::cat(&[pk, &k], 2)?;
                    v = Tensor::cat(&[pv, &v], 2)?;
                }
                if c.layers.len() > l {
                    c.layers[l] = (k.clone(), v.clone());
                } else {
                    c.layers.push((k.clone(), v.clone()));
                }
            }
            let k = repeat_kv(k, nh / nkv)?;
            let v = repeat_kv(v, nh / nkv)?;
            let att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?.broadcast_add(&mask)?;
            let att = candle_nn::ops::softmax(&att, D::Minus1)?;
            let ctx = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, nh * hd))?;
            x = (x + layer.o.forward(&ctx, scale_of(l, Module::O))?)?;
            let h = rms_norm(&x, &layer.norm2, cfg.rms_norm_eps)?;
            let i = cfg.intermediate_size;
            let gu = layer.gate_up.forward(
                &h,
                &[(i, scale_of(l, Module::Gate)), (i, scale_of(l, Module::Up))],
            )?;
            let (g, u) = (&gu[0], &gu[1]);
            let act = (g * candle_nn::ops::sigmoid(g)?)?;
            x = (x + layer.down.forward(&(act * u)?, scale_of(l, Module::Down))?)?;
        }
        if let Some(c) = cache {
            c.len += t;
        }
        rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)
    }

    /// `cos`, `sin` of positions `offset..offset + t`, shape (T, head_dim), in the Hugging Face
    /// layout (halves repeated).
    pub(super) fn rope(&self, offset: usize, t: usize) -> Result<(Tensor, Tensor)> {
        let hd = self.cfg.head_dim();
        let theta = self.cfg.rope_theta.unwrap_or(10_000.0);
        let inv: Vec<f32> = (0..hd / 2)
            .map(|i| 1.0 / theta.powf(2.0 * i as f64 / hd as f64) as f32)
            .collect();
        let inv = Tensor::new(inv.as_slice(), &self.device)?;
        let pos = Tensor::arange(offset as u32, (offset + t) as u32, &self.device)?
            .to_dtype(DType::F32)?;
        let freqs = pos.unsqueeze(1)?.broadcast_mul(&inv.unsqueeze(0)?)?;
        let emb = Tensor::cat(&[&freqs, &freqs], 1)?;
        Ok((emb.cos()?, emb.sin()?))
    }
}

fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

fn repeat_kv(x: Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x);
    }
    let (b, h, t, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .expand((b, h, n, t, d))?
        .reshape((b, h * n, t, d))?)
}

/// Additive mask of `t` new positions over `offset` cached ones plus themselves.
fn causal_mask(t: usize, offset: usize, device: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..offset + t).map(move |j| {
                if j > i + offset {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(m, (t, offset + t), device)?)
}
