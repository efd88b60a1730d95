//! A BERT encoder (Sentence-BERT's MiniLM family) returning `last_hidden_state`.

use candle_core::{DType, Module, Result, Tensor};

use crate::matmul::bf16::{Input, Packed};
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
    /// Arithmetic of the CPU path's projections (q, k, v, the attention output and the
    /// feed-forward).
    precision: Precision,
    /// Their weights packed once for bf16 products ([`Layer::set_precision`]), where the CPU has them.
    packed: Option<std::sync::Arc<PackedWeights>>,
}

/// A layer's projection weights as bf16 products read them: `[Wq|Wk|Wv]ᵀ` (hidden, 3 hidden),
/// the attention output's transpose (hidden, hidden), `Wiᵀ` (hidden, intermediate), `Woᵀ`
/// (intermediate, hidden).
struct PackedWeights {
    qkv: Packed,
    attn_out: Packed,
    intermediate: Packed,
    out: Packed,
}

/// One projection `dst (tokens, n) += x (tokens, k) @ w (k, n)` in `precision`, with `w`
/// packed beforehand when given, on the threads `par` allows.
///
/// # Safety
/// As [`crate::matmul::gemm_f32`].
#[allow(clippy::too_many_arguments)]
unsafe fn project(
    precision: Precision,
    packed: Option<&Packed>,
    tokens: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    x: crate::matmul::Operand,
    w: crate::matmul::Operand,
    par: gemm::Parallelism,
) {
    match packed {
        Some(p) => crate::matmul::bf16::gemm_bf16_with(
            tokens,
            n,
            k,
            dst,
            n,
            true,
            Input::Strided(x),
            Input::Packed(p),
            1.0,
            par,
        ),
        None => crate::matmul::gemm_in(precision, tokens, n, k, dst, n, true, x, w, 1.0, par),
    }
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
            packed: None,
        })
    }

    /// Sets the projections' precision; for bf16 on a CPU with the instructions, packs their
    /// f32 weights once (the encoder's weights never change).
    fn set_precision(&mut self, precision: Precision) -> Result<()> {
        self.precision = precision;
        self.packed = None;
        if precision != Precision::Bf16
            || !crate::matmul::bf16::available()
            || ![
                &self.qkv_t,
                self.attn_out.weight(),
                self.intermediate.weight(),
                self.out.weight(),
            ]
            .iter()
            .all(|t| cpu_f32(t))
        {
            return Ok(());
        }
        let (h, three_h) = self.qkv_t.dims2()?;
        let (inner, _) = self.intermediate.weight().dims2()?;
        let (wa, wi, wo) = (
            self.attn_out.weight().contiguous()?,
            self.intermediate.weight().contiguous()?,
            self.out.weight().contiguous()?,
        );
        // `t` stored row-major as (k, n), or as (n, k) when `transposed`, packed as (k, n).
        let pack = |t: &Tensor, transposed: bool, k: usize, n: usize| -> Result<Packed> {
            with_cpu_f32(t, |s| {
                let w = if transposed {
                    crate::matmul::Operand::transposed(s.as_ptr(), k)
                } else {
                    crate::matmul::Operand::rows(s.as_ptr(), n)
                };
                // SAFETY: `w` addresses the k x n elements of `s`.
                unsafe { Packed::rhs(w, k, n) }
            })?
            .ok_or_else(|| candle_core::Error::Msg("bf16 packing unavailable".into()))
        };
        let packed = PackedWeights {
            qkv: pack(&self.qkv_t, false, h, three_h)?,
            attn_out: pack(&wa, true, h, h)?,
            intermediate: pack(&wi, true, h, inner)?,
            out: pack(&wo, true, inner, h)?,
        };
        self.packed = Some(std::sync::Arc::new(packed));
        Ok(())
    }

    /// Self-attention context for every position, (batch, len, hidden).
    ///
    /// Rows are right-padded: `valid[i]` leading positions of row i are attended. A masked key
    /// gets weight exp(min - max) = 0 exactly, so attending only to the valid keys gives the
    /// same context at a fraction of the cost (prompts are often far shorter than L). Queries at
    /// padding positions are still computed: their outputs are part of the condition. A row with
    /// no valid key gets a zero context, as PyTorch's attention returns for fully masked rows.
    fn attention(&self, x: &Tensor, valid: &[usize], par: gemm::Parallelism) -> Result<Tensor> {
        if cpu_f32(x) && cpu_f32(&self.qkv_t) {
            return self.attention_cpu(x, valid, par);
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
    fn attention_cpu(&self, x: &Tensor, valid: &[usize], par: gemm::Parallelism) -> Result<Tensor> {
        let (b, len, h) = x.dims3()?;
        let (heads, hd) = (self.heads, h / self.heads);
        let tokens = b * len;
        // qkv (tokens, 3h) = bias rows + x (tokens, h) @ [Wq|Wk|Wv]ᵀ.
        let mut qkv = bias_rows(Some(&self.qkv_bias), None, tokens, 3 * h)?;
        let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        with_cpu_f32(&self.qkv_t, |w| {
            // SAFETY: qkv is (tokens, 3h) row-major, xs (tokens, h), w (h, 3h); all in bounds.
            unsafe {
                project(
                    self.precision,
                    self.packed.as_ref().map(|p| &p.qkv),
                    tokens,
                    3 * h,
                    h,
                    qkv.as_mut_ptr(),
                    crate::matmul::Operand::rows(xs.as_ptr(), h),
                    crate::matmul::Operand::rows(w.as_ptr(), 3 * h),
                    par,
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
                // Apart from the sum, so that the exponentials vectorise.
                s.iter_mut()
                    .for_each(|e| *e = crate::fastmath::exp(*e - max));
                let sum: f32 = s.iter().sum();
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
    fn feed_forward_cpu(&self, x: &Tensor, par: gemm::Parallelism) -> Result<Tensor> {
        let (b, len, h) = x.dims3()?;
        let tokens = b * len;
        let (wi, wo) = (
            self.intermediate.weight().contiguous()?,
            self.out.weight().contiguous()?,
        );
        let inner_dim = wi.dim(0)?;
        let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        // out starts as bias + x (the residual).
        let mut out = bias_rows(self.out.bias(), Some(&xs), tokens, h)?;
        with_cpu_f32(&wi, |wi_s| {
            with_cpu_f32(&wo, |wo_s| {
                with_scratch(|inner| {
                    fill_bias_rows(inner, self.intermediate.bias(), None, tokens, inner_dim)?;
                    let packed = self.packed.as_deref();
                    // SAFETY: inner (tokens, I) row-major, xs (tokens, h), the weights (I, h)
                    // read as their transpose (element (k, n) at n*h + k); all in bounds.
                    unsafe {
                        project(
                            self.precision,
                            packed.map(|p| &p.intermediate),
                            tokens,
                            inner_dim,
                            h,
                            inner.as_mut_ptr(),
                            crate::matmul::Operand::rows(xs.as_ptr(), h),
                            crate::matmul::Operand::transposed(wi_s.as_ptr(), h),
                            par,
                        );
                    }
                    super::gelu::gelu_erf_in_place(inner);
                    // SAFETY: out (tokens, h), inner (tokens, I), the weights (h, I) read as
                    // their transpose (element (k, n) at n*I + k); all in bounds.
                    unsafe {
                        project(
                            self.precision,
                            packed.map(|p| &p.out),
                            tokens,
                            h,
                            inner_dim,
                            out.as_mut_ptr(),
                            crate::matmul::Operand::rows(inner.as_ptr(), inner_dim),
                            crate::matmul::Operand::transposed(wo_s.as_ptr(), inner_dim),
                            par,
                        );
                    }
                    Ok::<(), candle_core::Error>(())
                })
            })
        })???;
        Tensor::from_vec(out, (b, len, h), x.device())
    }

    /// `x + attn_out(ctx)` on the CPU in f32 (the product in the layer's precision): the
    /// product accumulates into a buffer that starts as the bias rows plus the residual.
    fn attention_output_cpu(
        &self,
        ctx: &Tensor,
        x: &Tensor,
        par: gemm::Parallelism,
    ) -> Result<Tensor> {
        let (b, len, h) = x.dims3()?;
        let tokens = b * len;
        let (x, ctx, w) = (
            x.contiguous()?,
            ctx.contiguous()?,
            self.attn_out.weight().contiguous()?,
        );
        // Read in place: the context and the residual are already contiguous buffers.
        let out = with_cpu_f32(&x, |xs| {
            let mut out = bias_rows(self.attn_out.bias(), Some(xs), tokens, h)?;
            with_cpu_f32(&ctx, |cs| {
                with_cpu_f32(&w, |ws| {
                    // SAFETY: out (tokens, h), cs (tokens, h), the weights (h, h) read as
                    // their transpose; all in bounds.
                    unsafe {
                        project(
                            self.precision,
                            self.packed.as_ref().map(|p| &p.attn_out),
                            tokens,
                            h,
                            h,
                            out.as_mut_ptr(),
                            crate::matmul::Operand::rows(cs.as_ptr(), h),
                            crate::matmul::Operand::transposed(ws.as_ptr(), h),
                            par,
                        );
                    }
                })
            })??;
            Ok::<_, candle_core::Error>(out)
        })??;
        Tensor::from_vec(out, (b, len, h), x.device())
    }

    /// The layer's output, its CPU products on the threads `par` allows.
    fn forward(&self, x: &Tensor, valid: &[usize], par: gemm::Parallelism) -> Result<Tensor> {
        let ctx = self.attention(x, valid, par)?;
        let x = if cpu_f32(x) && cpu_f32(self.attn_out.weight()) {
            self.attn_norm
                .forward(&self.attention_output_cpu(&ctx, x, par)?)?
        } else {
            self.attn_norm.forward(&(lin(&self.attn_out, &ctx)? + x)?)?
        };
        if self.exact_gelu && cpu_f32(&x) {
            return self.out_norm.forward(&self.feed_forward_cpu(&x, par)?);
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

/// Whether the CPU fast paths take `t`: an f32 tensor on the CPU.
fn cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// `dst` set to `bias` (width) repeated for `tokens` rows, row-major (zeros without a bias),
/// plus `residual` (tokens, width) when given; rows filled on the rayon pool.
fn fill_bias_rows(
    dst: &mut Vec<f32>,
    bias: Option<&Tensor>,
    residual: Option<&[f32]>,
    tokens: usize,
    width: usize,
) -> Result<()> {
    let row = match bias {
        Some(b) => b.to_vec1::<f32>()?,
        None => vec![0f32; width],
    };
    if row.len() != width {
        candle_core::bail!("bias of {} for rows of {width}", row.len());
    }
    if let Some(r) = residual.filter(|r| r.len() != tokens * width) {
        candle_core::bail!("residual of {} for {tokens} rows of {width}", r.len());
    }
    dst.clear();
    dst.resize(tokens * width, 0.0);
    // Blocks of rows, so that each job copies a few hundred KB.
    let rows = (1 << 16) / width.max(1) + 1;
    dst.par_chunks_mut(rows * width)
        .enumerate()
        .for_each(|(i, block)| match residual {
            Some(r) => {
                let r = &r[i * rows * width..][..block.len()];
                for (d, x) in block.chunks_exact_mut(width).zip(r.chunks_exact(width)) {
                    d.iter_mut()
                        .zip(row.iter().zip(x))
                        .for_each(|(d, (b, x))| *d = b + x);
                }
            }
            None => block
                .chunks_exact_mut(width)
                .for_each(|d| d.copy_from_slice(&row)),
        });
    Ok(())
}

/// [`fill_bias_rows`] into a new buffer.
fn bias_rows(
    bias: Option<&Tensor>,
    residual: Option<&[f32]>,
    tokens: usize,
    width: usize,
) -> Result<Vec<f32>> {
    let mut v = Vec::new();
    fill_bias_rows(&mut v, bias, residual, tokens, width)?;
    Ok(v)
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
    /// see [`crate::matmul::Precision`]); for bf16 on a CPU with the instructions, each layer
    /// also keeps its projection weights packed for them (about half the f32 weights' bytes).
    pub fn with_precision(mut self, precision: Precision) -> Result<Self> {
        for layer in &mut self.layers {
            layer.set_precision(precision)?;
        }
        Ok(self)
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
        // On a CPU, rows are independent all the way through: each thread runs a share of
        // them through every layer with one-thread products, instead of every product being
        // split over the threads and joined again (dozens of hand-offs per layer).
        let threads = rayon::current_num_threads();
        if !cpu_f32(self.embeddings.word.embeddings()) || threads < 2 || b < 2 {
            return self.forward_rows(ids, valid, crate::generator::conv::gemm_parallelism());
        }
        let groups = threads.min(b);
        let bounds: Vec<(usize, usize)> = (0..groups)
            .map(|g| (g * b / groups, (g + 1) * b / groups))
            .collect();
        let parts = bounds
            .par_iter()
            .map(|&(lo, hi)| {
                self.forward_rows(
                    &ids.narrow(0, lo, hi - lo)?,
                    &valid[lo..hi],
                    gemm::Parallelism::None,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)
    }

    /// [`Self::forward`] of some rows, the CPU products on the threads `par` allows.
    fn forward_rows(
        &self,
        ids: &Tensor,
        valid: &[usize],
        par: gemm::Parallelism,
    ) -> Result<Tensor> {
        let mut x = self.embeddings.forward(ids)?;
        for layer in &self.layers {
            x = layer.forward(&x, valid, par)?;
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    /// The layers' products split over two threads (the one-thread form is the row-split
    /// forward's, checked against the golden fixtures).
    const PAR: gemm::Parallelism = gemm::Parallelism::Rayon(2);

    /// A tiny config: hidden 12, three heads, intermediate 16, 8 positions.
    fn tiny_config(layers: usize, vocab: usize) -> BertConfig {
        serde_json::from_str(&format!(
            r#"{{"vocab_size": {vocab}, "hidden_size": 12, "num_hidden_layers": {layers},
                "num_attention_heads": 3, "intermediate_size": 16, "max_position_embeddings": 8}}"#
        ))
        .unwrap()
    }

    /// A one-layer config and a layer with random weights and biases.
    fn random_layer() -> Layer {
        let cfg = tiny_config(1, 10);
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
            let got = layer.feed_forward_cpu(&x, PAR).unwrap();
            assert!(max_diff(&got, &want) < 1e-5, "{}", max_diff(&got, &want));
        }
    }

    #[test]
    fn bias_rows_repeat_the_bias_and_add_the_residual() {
        // Several blocks of rows, the last one partial.
        let (tokens, width) = (700, 130);
        let bias = Tensor::arange(0f32, width as f32, &Device::Cpu).unwrap();
        let residual: Vec<f32> = (0..tokens * width).map(|i| (i % 97) as f32).collect();
        let got = bias_rows(Some(&bias), Some(&residual), tokens, width).unwrap();
        for (i, v) in got.iter().enumerate() {
            assert_eq!(*v, (i % width) as f32 + (i % 97) as f32, "{i}");
        }
        let mut buf = vec![7f32; 3];
        fill_bias_rows(&mut buf, None, None, tokens, width).unwrap();
        assert!(buf.len() == tokens * width && buf.iter().all(|&v| v == 0.0));
        assert!(bias_rows(Some(&bias), None, tokens, width + 1).is_err());
    }

    #[test]
    fn cpu_attention_output_matches_the_tensor_path() {
        let layer = random_layer();
        let x = Tensor::randn(0f32, 1.0, (2, 5, 12), &Device::Cpu).unwrap();
        let ctx = Tensor::randn(0f32, 1.0, (2, 5, 12), &Device::Cpu).unwrap();
        let want = (lin(&layer.attn_out, &ctx).unwrap() + &x).unwrap();
        let got = layer.attention_output_cpu(&ctx, &x, PAR).unwrap();
        assert!(max_diff(&got, &want) < 1e-5, "{}", max_diff(&got, &want));
    }

    #[test]
    fn cpu_attention_matches_the_tensor_path_with_padding_and_empty_rows() {
        let layer = random_layer();
        let x = Tensor::randn(0f32, 1.0, (3, 5, 12), &Device::Cpu).unwrap();
        // A full row, a padded one and one without any valid key.
        let valid = [5, 2, 0];
        let fast = layer.attention_cpu(&x, &valid, PAR).unwrap();
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

    #[test]
    fn packed_bf16_weights_give_the_per_call_products() {
        let mut per_call = random_layer();
        per_call.precision = Precision::Bf16;
        let mut packed = random_layer();
        // Same weights: random_layer draws them anew, so copy them over before packing.
        packed.qkv_t = per_call.qkv_t.clone();
        packed.qkv_bias = per_call.qkv_bias.clone();
        packed.intermediate = per_call.intermediate.clone();
        packed.out = per_call.out.clone();
        packed.set_precision(Precision::Bf16).unwrap();
        assert_eq!(packed.packed.is_some(), crate::matmul::bf16::available());
        let x = Tensor::randn(0f32, 1.0, (2, 5, 12), &Device::Cpu).unwrap();
        let same = |a: Tensor, b: Tensor| {
            let (a, b) = (
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits())
        };
        assert!(same(
            packed.feed_forward_cpu(&x, PAR).unwrap(),
            per_call.feed_forward_cpu(&x, PAR).unwrap()
        ));
        let valid = [5, 3];
        assert!(same(
            packed.attention_cpu(&x, &valid, PAR).unwrap(),
            per_call.attention_cpu(&x, &valid, PAR).unwrap()
        ));
        packed.attn_out = per_call.attn_out.clone();
        packed.attn_norm = per_call.attn_norm.clone();
        packed.out_norm = per_call.out_norm.clone();
        packed.set_precision(Precision::Bf16).unwrap();
        assert!(same(
            packed.forward(&x, &valid, PAR).unwrap(),
            per_call.forward(&x, &valid, PAR).unwrap()
        ));
        // And bf16 is really in use: the f32 products differ.
        let mut f32_layer = random_layer();
        f32_layer.qkv_t = per_call.qkv_t.clone();
        f32_layer.qkv_bias = per_call.qkv_bias.clone();
        f32_layer.intermediate = per_call.intermediate.clone();
        f32_layer.out = per_call.out.clone();
        let f = f32_layer.feed_forward_cpu(&x, PAR).unwrap();
        let b = packed.feed_forward_cpu(&x, PAR).unwrap();
        let d = max_diff(&f, &b);
        if crate::matmul::bf16::available() {
            assert!(d > 0.0 && d < 5e-2, "bf16 vs f32 feed-forward: {d}");
        }
    }

    #[test]
    fn rows_split_over_threads_give_the_whole_batch_forward() {
        let cfg = tiny_config(2, 20);
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let model = BertModel::load(&cfg, vb).unwrap();
        let ids: Vec<u32> = (0..5 * 7).map(|i| (i * 7 % 20) as u32).collect();
        let ids = Tensor::from_vec(ids, (5, 7), &Device::Cpu).unwrap();
        let valid = [7, 3, 0, 5, 1];
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        // Three threads: groups of 1, 2 and 2 rows.
        let split = pool.install(|| model.forward(&ids, &valid)).unwrap();
        let whole = model.forward_rows(&ids, &valid, PAR).unwrap();
        assert_eq!(split.dims(), [5, 7, 12]);
        // Same arithmetic up to the products' blocking (rows of layer-normed values, ~1).
        assert!(
            max_diff(&split, &whole) < 1e-5,
            "{}",
            max_diff(&split, &whole)
        );
    }
}
