//! A BERT encoder (Sentence-BERT's MiniLM family) returning `last_hidden_state`.

use candle_core::{DType, Module, Result, Tensor};

use crate::matmul::Precision;
use candle_nn::{embedding, layer_norm, linear, Embedding, LayerNorm, Linear, VarBuilder};
use rayon::prelude::*;

use crate::generator::conv::{with_cpu_f32, with_scratch};
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
    /// `[Wq | Wk | Wv]ᵀ` (hidden, 3 hidden) and `[bq | bk | bv]`, for the CPU f32 attention.
    qkv_t: Tensor,
    qkv_bias: Tensor,
    /// Arithmetic of the CPU path's projections (q, k, v and the feed-forward).
    precision: Precision,
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
        let (query, key, value) = (
            linear(h, h, att.pp("self.query"))?,
            linear(h, h, att.pp("self.key"))?,
            linear(h, h, att.pp("self.value"))?,
        );
        let parts = [&query, &key, &value];
        let qkv_t = Tensor::cat(&parts.map(|l| l.weight()), 0)?
            .t()?
            .contiguous()?;
        let biases = parts.map(|l| l.bias().cloned());
        let qkv_bias = match biases {
            [Some(q), Some(k), Some(v)] => Tensor::cat(&[q, k, v], 0)?,
            _ => Tensor::zeros(3 * h, qkv_t.dtype(), qkv_t.device())?,
        };
        Ok(Self {
            query,
            key,
            value,
            attn_out: linear(h, h, att.pp("output.dense"))?,
            attn_norm: layer_norm(h, cfg.layer_norm_eps, att.pp("output.LayerNorm"))?,
            intermediate: linear(h, cfg.intermediate_size, vb.pp("intermediate.dense"))?,
            out: linear(cfg.intermediate_size, h, vb.pp("output.dense"))?,
            out_norm: layer_norm(h, cfg.layer_norm_eps, vb.pp("output.LayerNorm"))?,
            heads: cfg.num_attention_heads,
            exact_gelu,
            qkv_t,
            qkv_bias,
            precision: Precision::F32,
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
        if x.device().is_cpu() && x.dtype() == DType::F32 && self.qkv_t.dtype() == DType::F32 {
            return self.attention_cpu(x, valid);
        }
        self.attention_tensors(x, valid)
    }

    /// [`Self::attention`] with candle's tensor ops (any device and dtype).
    fn attention_tensors(&self, x: &Tensor, valid: &[usize]) -> Result<Tensor> {
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

    /// [`Self::attention`] on the CPU (f32, the q, k, v product in the layer's precision),
    /// without the per-head copies: q, k and v come from one product with the stacked weights,
    /// and every (row, head) pair's scores and context are two small products reading q, k, v
    /// and writing the context in place (strided), one pair per job.
    fn attention_cpu(&self, x: &Tensor, valid: &[usize]) -> Result<Tensor> {
        let (b, len, h) = x.dims3()?;
        let (heads, hd) = (self.heads, h / self.heads);
        let tokens = b * len;
        // qkv (tokens, 3h) = bias rows + x (tokens, h) @ [Wq|Wk|Wv]ᵀ.
        let mut qkv = bias_rows(Some(&self.qkv_bias), tokens, 3 * h)?;
        let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        with_cpu_f32(&self.qkv_t, |w| {
            // SAFETY: qkv is (tokens, 3h) row-major, xs (tokens, h), w (h, 3h); all in bounds.
            unsafe {
                crate::matmul::gemm_in(
                    self.precision,
                    tokens,
                    3 * h,
                    h,
                    qkv.as_mut_ptr(),
                    3 * h,
                    true,
                    crate::matmul::Operand::rows(xs.as_ptr(), h),
                    crate::matmul::Operand::rows(w.as_ptr(), 3 * h),
                    1.0,
                    crate::generator::conv::gemm_parallelism(),
                );
            }
        })?;
        let mut ctx = vec![0f32; tokens * h];
        let out = crate::generator::conv::SyncPtr(ctx.as_mut_ptr());
        let scale = 1.0 / (hd as f32).sqrt();
        let qkv = &qkv;
        (0..b * heads).into_par_iter().for_each(|job| {
            let (i, head) = (job / heads, job % heads);
            let n = valid[i];
            if n == 0 {
                // No valid key: a zero context, as PyTorch returns for fully masked rows.
                return;
            }
            let row = 3 * h;
            // q, k, v of this row and head: (len, hd) blocks with row stride 3h.
            let q = qkv[i * len * row + head * hd..].as_ptr();
            let k = qkv[i * len * row + h + head * hd..].as_ptr();
            let v = qkv[i * len * row + 2 * h + head * hd..].as_ptr();
            let mut scores = vec![0f32; len * n];
            // SAFETY: scores (len, n); q (len, hd) with row stride 3h; kᵀ (hd, n) read as k's
            // columns (element (d, j) at j*3h + d): all inside qkv.
            unsafe {
                crate::matmul::gemm_f32(
                    len,
                    n,
                    hd,
                    scores.as_mut_ptr(),
                    n,
                    false,
                    crate::matmul::Operand::rows(q, row),
                    crate::matmul::Operand::transposed(k, row),
                    scale,
                    gemm::Parallelism::None,
                );
            }
            for s in scores.chunks_exact_mut(n) {
                let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for e in s.iter_mut() {
                    *e = (*e - max).exp();
                    sum += *e;
                }
                let inv = 1.0 / sum;
                s.iter_mut().for_each(|e| *e *= inv);
            }
            // SAFETY: the context block of row i, head `head` is (len, hd) at row i*len,
            // column head*hd of ctx (row stride h), written by this job only; v (n, hd) with
            // row stride 3h inside qkv.
            unsafe {
                crate::matmul::gemm_f32(
                    len,
                    hd,
                    n,
                    out.at(i * len * h + head * hd),
                    h,
                    false,
                    crate::matmul::Operand::rows(scores.as_ptr(), n),
                    crate::matmul::Operand::rows(v, row),
                    1.0,
                    gemm::Parallelism::None,
                );
            }
        });
        Tensor::from_vec(ctx, (b, len, h), x.device())
    }

    /// `x + out(gelu(intermediate(x)))` on the CPU in f32 (exact GELU; the two products in the
    /// layer's precision): both products write into buffers that start as their bias rows (and,
    /// for the second, the residual), the GELU runs in place, and the inner activations use the
    /// thread's scratch buffer: no intermediate tensors, no separate bias, residual or
    /// activation passes.
    fn feed_forward_cpu(&self, x: &Tensor) -> Result<Tensor> {
        let (b, len, h) = x.dims3()?;
        let tokens = b * len;
        let (wi, wo) = (
            self.intermediate.weight().contiguous()?,
            self.out.weight().contiguous()?,
        );
        let inner_dim = wi.dim(0)?;
        let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        // out starts as bias + x (the residual).
        let mut out = bias_rows(self.out.bias(), tokens, h)?;
        out.iter_mut().zip(&xs).for_each(|(o, v)| *o += v);
        let bias_i = bias_rows(self.intermediate.bias(), tokens, inner_dim)?;
        with_cpu_f32(&wi, |wi_s| {
            with_cpu_f32(&wo, |wo_s| {
                with_scratch(|inner| {
                    inner.clear();
                    inner.extend_from_slice(&bias_i);
                    let par = crate::generator::conv::gemm_parallelism();
                    // SAFETY: inner (tokens, I) row-major, xs (tokens, h), the weights (I, h)
                    // read as their transpose (element (k, n) at n*h + k); all in bounds.
                    unsafe {
                        crate::matmul::gemm_in(
                            self.precision,
                            tokens,
                            inner_dim,
                            h,
                            inner.as_mut_ptr(),
                            inner_dim,
                            true,
                            crate::matmul::Operand::rows(xs.as_ptr(), h),
                            crate::matmul::Operand::transposed(wi_s.as_ptr(), h),
                            1.0,
                            par,
                        );
                    }
                    super::gelu::gelu_erf_in_place(inner);
                    // SAFETY: out (tokens, h), inner (tokens, I), the weights (h, I) read as
                    // their transpose (element (k, n) at n*I + k); all in bounds.
                    unsafe {
                        crate::matmul::gemm_in(
                            self.precision,
                            tokens,
                            h,
                            inner_dim,
                            out.as_mut_ptr(),
                            h,
                            true,
                            crate::matmul::Operand::rows(inner.as_ptr(), inner_dim),
                            crate::matmul::Operand::transposed(wo_s.as_ptr(), inner_dim),
                            1.0,
                            par,
                        );
                    }
                })
            })
        })??;
        Tensor::from_vec(out, (b, len, h), x.device())
    }

    fn forward(&self, x: &Tensor, valid: &[usize]) -> Result<Tensor> {
        let ctx = self.attention(x, valid)?;
        let x = self.attn_norm.forward(&(lin(&self.attn_out, &ctx)? + x)?)?;
        if self.exact_gelu && x.device().is_cpu() && x.dtype() == DType::F32 {
            return self.out_norm.forward(&self.feed_forward_cpu(&x)?);
        }
        let inner = lin(&self.intermediate, &x)?;
        let inner = if self.exact_gelu {
            super::gelu::gelu_erf(&inner)?
        } else {
            inner.gelu()?
        };
        self.out_norm.forward(&(lin(&self.out, &inner)? + x)?)
    }
}

/// `bias` (width) repeated for `tokens` rows, row-major; zeros without a bias.
fn bias_rows(bias: Option<&Tensor>, tokens: usize, width: usize) -> Result<Vec<f32>> {
    match bias {
        Some(bias) => bias
            .unsqueeze(0)?
            .broadcast_as((tokens, width))?
            .flatten_all()?
            .to_vec1::<f32>(),
        None => Ok(vec![0f32; tokens * width]),
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

    /// Runs the CPU path's projections in `precision` (their weights and activations stay f32;
    /// see [`crate::matmul::Precision`]).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        for layer in &mut self.layers {
            layer.precision = precision;
        }
        self
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    /// A one-layer config and a layer with random weights and biases.
    fn random_layer() -> Layer {
        let cfg: BertConfig = serde_json::from_str(
            r#"{"vocab_size": 10, "hidden_size": 12, "num_hidden_layers": 1,
                "num_attention_heads": 3, "intermediate_size": 16, "max_position_embeddings": 8}"#,
        )
        .unwrap();
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        // The first load creates the variables; biases start at zero, so give them values
        // (their stacking is checked too) and load again.
        Layer::load(&cfg, vb.clone()).unwrap();
        for (name, var) in vm.data().lock().unwrap().iter() {
            if name.ends_with("bias") {
                let r = Tensor::randn(0f32, 1.0, var.shape(), &Device::Cpu).unwrap();
                var.set(&r).unwrap();
            }
        }
        Layer::load(&cfg, vb).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn cpu_feed_forward_matches_the_tensor_path() {
        let layer = random_layer();
        let x = Tensor::randn(0f32, 1.0, (2, 5, 12), &Device::Cpu).unwrap();
        let inner = super::super::gelu::gelu_erf(&lin(&layer.intermediate, &x).unwrap()).unwrap();
        let want = (lin(&layer.out, &inner).unwrap() + &x).unwrap();
        // Twice: the second call reuses the thread's buffer.
        for _ in 0..2 {
            let got = layer.feed_forward_cpu(&x).unwrap();
            assert!(max_diff(&got, &want) < 1e-5, "{}", max_diff(&got, &want));
        }
    }

    #[test]
    fn cpu_attention_matches_the_tensor_path_with_padding_and_empty_rows() {
        let layer = random_layer();
        let x = Tensor::randn(0f32, 1.0, (3, 5, 12), &Device::Cpu).unwrap();
        // A full row, a padded one and one without any valid key.
        let valid = [5, 2, 0];
        let fast = layer.attention_cpu(&x, &valid).unwrap();
        let slow = layer.attention_tensors(&x, &valid).unwrap();
        let diff = max_diff(&fast, &slow);
        assert!(diff < 1e-5, "max difference {diff}");
        let empty = slow
            .narrow(0, 2, 1)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap();
        assert_eq!(empty.to_scalar::<f32>().unwrap(), 0.0);
    }
}
