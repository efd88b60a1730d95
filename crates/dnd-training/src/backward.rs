//! The answer loss of a batch and its gradients with respect to the LoRA factors only, by a
//! backward pass written out by hand over the frozen decoder.
//!
//! Why not candle's autograd ([`super::model::CausalLm::hidden`] with variables): it takes
//! the gradient of both operands of every matrix product, so each step also computes a
//! full-size gradient for every frozen weight matrix (a third more arithmetic, and memory the
//! size of the model that lives until the step ends), and its graph keeps every intermediate
//! of the forward alive. Here:
//! - only input gradients go through the frozen weights (`dx = dy W`), and the LoRA factors
//!   get theirs from their own small products;
//! - the forward keeps only what the backward reads (per layer: inputs of the norms and
//!   projections, the attention probabilities, the MLP's gate and up);
//! - q/k/v and gate/up are one product each (over their stacked weights);
//! - the batch is packed: sequences are concatenated without padding for every projection,
//!   and attention runs per sequence (grouped-query heads as one product per key/value
//!   head), so no arithmetic is spent on pad positions. Under a causal mask, right padding
//!   never reaches real positions, so the loss equals the padded batch's.
//!
//! CPU only (as all training here): the fused kernels work on CPU memory.
//!
//! The forward is the same arithmetic as the plain one (RMSNorm, rotary halves, softmax
//! attention, SwiGLU, `scale · x Aᵀ Bᵀ`); `crates/dnd-training/tests/training_backward.rs` checks the loss and
//! every factor's gradient against candle's autograd on the golden tiny models.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, D};
use rayon::prelude::*;

use super::data::Sequence;
use super::kernels::{self, Accumulator};
use super::model::CausalLm;
use dnd_core::adapters::{LoraAdapter, LoraPair, LoraTarget, Module};
use dnd_core::error::{DndError, Result};

/// The loss of one batch and the gradient of every LoRA factor of the adapter.
pub struct LoraGradients {
    /// Mean cross-entropy over the batch's answer tokens.
    pub loss: f32,
    /// `d loss / d A`, `d loss / d B` per adapted projection (same shapes as the factors).
    pub grads: BTreeMap<LoraTarget, LoraPair>,
    /// Tokens in the batch (no padding).
    pub tokens: usize,
    /// Answer tokens the loss averages over.
    pub answer_tokens: usize,
}

/// The LoRA of one group of projections that share an input and one product (q/k/v,
/// gate/up; o and down alone) during a step, as a single LoRA of rank `k·r`: the members' A
/// stacked `(k·r, in)`, their B scaled and placed block-diagonally `(group out, k·r)` (zero
/// rows for members without an adapter). Two products per group in the forward and four in
/// the backward, instead of as many per member, on less skinny shapes.
struct GroupLora {
    /// Adapted members: module, first column in the group's output, width.
    members: Vec<(Module, usize, usize)>,
    rank: usize,
    scale: f64,
    a: Tensor,
    scaled_b: Tensor,
    /// `x Aᵀ` of the forward `(N, k·r)`.
    xa: Option<Tensor>,
}

impl GroupLora {
    /// The group of `parts` (module, output width), in output order; `None` when no member
    /// is adapted.
    fn new(adapter: &LoraAdapter, layer: usize, parts: &[(Module, usize)]) -> Result<Option<Self>> {
        let (r, scale) = (adapter.rank(), adapter.scale());
        let total: usize = parts.iter().map(|p| p.1).sum();
        let mut members = Vec::new();
        let (mut a_rows, mut b_cols) = (Vec::new(), Vec::new());
        let mut col = 0;
        for &(m, out) in parts {
            if let Some(pair) = adapter.get(layer, m) {
                members.push((m, col, out));
                a_rows.push(pair.a.clone());
                // This member's B in its rows of the group's output, zeros elsewhere.
                let b = (&pair.b * scale)?;
                b_cols.push(b.pad_with_zeros(0, col, total - col - out)?);
            }
            col += out;
        }
        if members.is_empty() {
            return Ok(None);
        }
        Ok(Some(Self {
            members,
            rank: r,
            scale,
            a: Tensor::cat(&a_rows, 0)?,
            scaled_b: Tensor::cat(&b_cols, 1)?,
            xa: None,
        }))
    }

    /// Adds `scale · x Aᵀ Bᵀ` of every member into its columns of the group's output.
    fn forward(&mut self, x: &Tensor, y: &mut Accumulator) -> Result<()> {
        let xa = x.matmul(&self.a.t()?)?;
        y.add_product(0, &xa, &self.scaled_b.t()?)?;
        self.xa = Some(xa);
        Ok(())
    }

    /// With the group input `x` and the gradient `dy` of the group's whole output: records
    /// each member's factor gradients and adds the LoRA path's share of `dx` into `dx`.
    fn backward(
        &self,
        layer: usize,
        x: &Tensor,
        dy: &Tensor,
        dx: &mut Accumulator,
        grads: &mut BTreeMap<LoraTarget, LoraPair>,
    ) -> Result<()> {
        let xa = self.xa.as_ref().expect("the forward ran");
        // y = s (x Aᵀ) Bᵀ: with dz = s dy B, dA = dzᵀ x, dB = s dyᵀ (x Aᵀ), dx = dz A.
        let dz = dy.matmul(&self.scaled_b)?; // (N, k·r)
        let da = dz.t()?.matmul(x)?; // (k·r, in)
                                     // The diagonal blocks of s dyᵀ (x Aᵀ) are the members' dB.
        let db = (dy.t()?.matmul(xa)? * self.scale)?; // (group out, k·r)
        for (j, &(module, col, out)) in self.members.iter().enumerate() {
            let r = self.rank;
            grads.insert(
                LoraTarget { layer, module },
                LoraPair {
                    a: da.narrow(0, j * r, r)?.contiguous()?,
                    b: db.narrow(0, col, out)?.narrow(1, j * r, r)?.contiguous()?,
                },
            );
        }
        dx.add_product(0, &dz, &self.a)
    }
}

/// A layer's LoRA groups.
struct LayerLora {
    qkv: Option<GroupLora>,
    o: Option<GroupLora>,
    gate_up: Option<GroupLora>,
    down: Option<GroupLora>,
}

impl LayerLora {
    fn new(adapter: &LoraAdapter, layer: usize, cfg: &super::model::LmConfig) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (qd, kvd) = (
            cfg.num_attention_heads * cfg.head_dim(),
            cfg.kv_heads() * cfg.head_dim(),
        );
        Ok(Self {
            qkv: GroupLora::new(
                adapter,
                layer,
                &[(Module::Q, qd), (Module::K, kvd), (Module::V, kvd)],
            )?,
            o: GroupLora::new(adapter, layer, &[(Module::O, h)])?,
            gate_up: GroupLora::new(adapter, layer, &[(Module::Gate, i), (Module::Up, i)])?,
            down: GroupLora::new(adapter, layer, &[(Module::Down, h)])?,
        })
    }
}

/// What the backward pass reads of one layer's forward.
struct Saved {
    x: Tensor,
    h1: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    probs: Vec<Tensor>,
    ctx: Tensor,
    x2: Tensor,
    h2: Tensor,
    g: Tensor,
    u: Tensor,
    lora: LayerLora,
}

/// Rotary embedding (rotate-half layout) of `(N, heads, hd)` with per-row `cos`, `sin`
/// `(N, hd/2)`. Its backward is the same map with `−sin`: the rotation's transpose.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?.unsqueeze(0)?;
    Ok(candle_nn::rotary_emb::rope_thd(&x, cos, sin)?.squeeze(0)?)
}

/// Geometry shared by the attention helpers.
#[derive(Clone, Copy)]
struct Heads {
    nh: usize,
    nkv: usize,
    hd: usize,
}

impl Heads {
    fn rep(&self) -> usize {
        self.nh / self.nkv
    }

    /// Query rows `(L, nh·hd)` as `(nkv, rep·L, hd)`: the queries of each key/value head's
    /// group stacked, so grouped-query attention is one product per key/value head.
    fn group_q(&self, q: &Tensor) -> Result<Tensor> {
        let l = q.dim(0)?;
        Ok(q.reshape((l, self.nkv, self.rep(), self.hd))?
            .permute((1, 2, 0, 3))?
            .contiguous()?
            .reshape((self.nkv, self.rep() * l, self.hd))?)
    }

    /// Inverse of [`Self::group_q`].
    fn ungroup_q(&self, x: &Tensor, l: usize) -> Result<Tensor> {
        Ok(x.reshape((self.nkv, self.rep(), l, self.hd))?
            .permute((2, 0, 1, 3))?
            .contiguous()?
            .reshape((l, self.nh * self.hd))?)
    }

    /// Key/value rows `(L, nkv·hd)` as `(nkv, L, hd)`.
    fn group_kv(&self, x: &Tensor) -> Result<Tensor> {
        let l = x.dim(0)?;
        Ok(x.reshape((l, self.nkv, self.hd))?
            .transpose(0, 1)?
            .contiguous()?)
    }

    /// Inverse of [`Self::group_kv`].
    fn ungroup_kv(&self, x: &Tensor, l: usize) -> Result<Tensor> {
        Ok(x.transpose(0, 1)?
            .contiguous()?
            .reshape((l, self.nkv * self.hd))?)
    }
}

/// Additive causal mask `(rep·L, L)` for grouped queries (row `i` is position `i mod L`).
fn grouped_mask(l: usize, rep: usize, device: &candle_core::Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..rep * l)
        .flat_map(|i| {
            let p = i % l;
            (0..l).map(move |j| if j > p { f32::NEG_INFINITY } else { 0.0 })
        })
        .collect();
    Ok(Tensor::from_vec(m, (rep * l, l), device)?)
}

/// A batch packed without padding.
struct Packed {
    ids: Tensor,
    /// `(start, len)` of each sequence.
    spans: Vec<(usize, usize)>,
    /// Rows predicting an answer token, and those tokens.
    rows: Tensor,
    targets: Tensor,
    n_answer: usize,
}

fn pack(batch: &[Sequence], device: &candle_core::Device) -> Result<Packed> {
    let mut ids = Vec::new();
    let mut spans = Vec::with_capacity(batch.len());
    let (mut rows, mut targets) = (Vec::new(), Vec::new());
    for s in batch {
        let start = ids.len();
        ids.extend_from_slice(&s.ids);
        spans.push((start, s.ids.len()));
        for (p, token) in s.answer_targets() {
            rows.push((start + p) as u32);
            targets.push(token);
        }
    }
    if rows.is_empty() {
        return Err(DndError::InvalidInput(
            "a batch without answer tokens".into(),
        ));
    }
    let n = ids.len();
    let n_answer = rows.len();
    Ok(Packed {
        ids: Tensor::from_vec(ids, n, device)?,
        spans,
        rows: Tensor::from_vec(rows, n_answer, device)?,
        targets: Tensor::from_vec(targets, (n_answer, 1), device)?,
        n_answer,
    })
}

/// The loss of `batch` under `adapter` (factors of any layers and modules, `f32`) and the
/// gradient of each factor. The model's weights are never changed.
pub fn lora_gradients(
    model: &CausalLm,
    batch: &[Sequence],
    adapter: &LoraAdapter,
) -> Result<LoraGradients> {
    let cfg = model.config();
    let dev = &model.device;
    let eps = cfg.rms_norm_eps;
    let heads = Heads {
        nh: cfg.num_attention_heads,
        nkv: cfg.kv_heads(),
        hd: cfg.head_dim(),
    };
    let (qd, kvd) = (heads.nh * heads.hd, heads.nkv * heads.hd);
    let inter = cfg.intermediate_size;
    let packed = pack(batch, dev)?;
    let n = packed.ids.dim(0)?;
    let longest = packed.spans.iter().map(|s| s.1).max().unwrap_or(1);
    let (cos_all, sin_all) = model.rope(0, longest)?;
    let per_row = |t: &Tensor| -> Result<Tensor> {
        let parts = packed
            .spans
            .iter()
            .map(|&(_, l)| t.narrow(0, 0, l))
            .collect::<candle_core::Result<Vec<_>>>()?;
        // The first half: the layout repeats the frequencies over both halves.
        Ok(Tensor::cat(&parts, 0)?
            .narrow(1, 0, heads.hd / 2)?
            .contiguous()?)
    };
    let (cos, sin) = (per_row(&cos_all)?, per_row(&sin_all)?);
    let neg_sin = sin.neg()?;
    let masks: BTreeMap<usize, Tensor> = packed
        .spans
        .iter()
        .map(|&(_, l)| Ok((l, grouped_mask(l, heads.rep(), dev)?)))
        .collect::<Result<_>>()?;
    let att_scale = 1.0 / (heads.hd as f64).sqrt();

    // Forward, keeping what the backward reads.
    let mut x = model.embed.index_select(&packed.ids, 0)?;
    let mut saved = Vec::with_capacity(model.layers.len());
    for (l, layer) in model.layers.iter().enumerate() {
        let mut lora = LayerLora::new(adapter, l, cfg)?;
        let h1 = kernels::rms_norm(&x, &layer.norm1, eps)?;
        let mut qkv = Accumulator::product(&h1, &layer.qkv.w.t()?)?;
        if let Some(b) = &layer.qkv.b {
            qkv.add_row(b)?;
        }
        if let Some(g) = &mut lora.qkv {
            g.forward(&h1, &mut qkv)?;
        }
        let qkv = qkv.into_tensor()?;
        let q = rope(
            &qkv.narrow(1, 0, qd)?.reshape((n, heads.nh, heads.hd))?,
            &cos,
            &sin,
        )?
        .reshape((n, qd))?;
        let k = rope(
            &qkv.narrow(1, qd, kvd)?.reshape((n, heads.nkv, heads.hd))?,
            &cos,
            &sin,
        )?
        .reshape((n, kvd))?;
        let v = qkv.narrow(1, qd + kvd, kvd)?.contiguous()?;
        drop(qkv);
        // Sequences are independent: attention runs on them in parallel (its small products
        // and copies would leave the second core idle).
        let (ctxs, probs): (Vec<Tensor>, Vec<Tensor>) = packed
            .spans
            .par_iter()
            .map(|&(start, len)| -> Result<(Tensor, Tensor)> {
                let qs = heads.group_q(&q.narrow(0, start, len)?)?;
                let ks = heads.group_kv(&k.narrow(0, start, len)?)?;
                let vs = heads.group_kv(&v.narrow(0, start, len)?)?;
                let scores = (qs.matmul(&ks.t()?)? * att_scale)?.broadcast_add(&masks[&len])?;
                let p = candle_nn::ops::softmax_last_dim(&scores)?;
                Ok((heads.ungroup_q(&p.matmul(&vs)?, len)?, p))
            })
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .unzip();
        let ctx = Tensor::cat(&ctxs, 0)?;
        drop(ctxs);
        // x2 = x + o(ctx), accumulated onto the residual.
        let mut x2 = Accumulator::from(&x)?;
        x2.add_product(0, &ctx, &layer.o.w.t()?)?;
        if let Some(g) = &mut lora.o {
            g.forward(&ctx, &mut x2)?;
        }
        let x2 = x2.into_tensor()?;
        let h2 = kernels::rms_norm(&x2, &layer.norm2, eps)?;
        let mut gu = Accumulator::product(&h2, &layer.gate_up.w.t()?)?;
        if let Some(g) = &mut lora.gate_up {
            g.forward(&h2, &mut gu)?;
        }
        let gu = gu.into_tensor()?;
        let (g, u) = (gu.narrow(1, 0, inter)?, gu.narrow(1, inter, inter)?);
        let act = kernels::swiglu(&g, &u)?;
        let mut x3 = Accumulator::from(&x2)?;
        x3.add_product(0, &act, &layer.down.w.t()?)?;
        if let Some(g) = &mut lora.down {
            g.forward(&act, &mut x3)?;
        }
        drop(act);
        let x3 = x3.into_tensor()?;
        saved.push(Saved {
            x,
            h1,
            q,
            k,
            v,
            probs,
            ctx,
            x2,
            h2,
            g,
            u,
            lora,
        });
        x = x3;
    }

    // The loss at the answer positions.
    let hf = kernels::rms_norm(&x, &model.norm, eps)?;
    let picked = hf.index_select(&packed.rows, 0)?;
    drop(hf);
    let logits = picked.matmul(&model.lm_head.t()?)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    drop(logits);
    let na = packed.n_answer as f64;
    let loss = (logp.gather(&packed.targets, D::Minus1)?.sum_all()? / -na)?.to_scalar::<f32>()?;
    // d loss / d logits = (softmax − one-hot) / n.
    let onehot = Tensor::zeros(logp.shape(), DType::F32, dev)?.scatter_add(
        &packed.targets,
        &Tensor::ones((packed.n_answer, 1), DType::F32, dev)?,
        D::Minus1,
    )?;
    let dlogits = ((logp.exp()? - onehot)? / na)?;
    drop(logp);
    let dpicked = dlogits.matmul(&model.lm_head)?;
    let dhf = Tensor::zeros((n, cfg.hidden_size), DType::F32, dev)?.index_add(
        &packed.rows,
        &dpicked,
        0,
    )?;
    let mut dx = kernels::rms_norm_backward(&x, &model.norm, &dhf, eps)?;
    drop((x, dhf));

    // Backward, last layer first.
    let mut grads = BTreeMap::new();
    for (l, (layer, s)) in model.layers.iter().zip(saved).enumerate().rev() {
        let lora = &s.lora;
        // MLP: x3 = x2 + down(silu(g) · u).
        let mut dact = Accumulator::product(&dx, &layer.down.w)?;
        if let Some(g) = &lora.down {
            let act = kernels::swiglu(&s.g, &s.u)?;
            g.backward(l, &act, &dx, &mut dact, &mut grads)?;
        }
        let dact = dact.into_tensor()?;
        let dgu = kernels::swiglu_backward(&dact, &s.g, &s.u)?;
        drop(dact);
        let mut dh2 = Accumulator::product(&dgu, &layer.gate_up.w)?;
        if let Some(g) = &lora.gate_up {
            g.backward(l, &s.h2, &dgu, &mut dh2, &mut grads)?;
        }
        drop(dgu);
        let dh2 = dh2.into_tensor()?;
        let dx2 = (&dx + kernels::rms_norm_backward(&s.x2, &layer.norm2, &dh2, eps)?)?;
        drop(dh2);
        // Attention: x2 = x + o(ctx).
        let mut dctx = Accumulator::product(&dx2, &layer.o.w)?;
        if let Some(g) = &lora.o {
            g.backward(l, &s.ctx, &dx2, &mut dctx, &mut grads)?;
        }
        let dctx = dctx.into_tensor()?;
        let parts = packed
            .spans
            .par_iter()
            .zip(&s.probs)
            .map(|(&(start, len), p)| -> Result<[Tensor; 3]> {
                let qs = heads.group_q(&s.q.narrow(0, start, len)?)?;
                let ks = heads.group_kv(&s.k.narrow(0, start, len)?)?;
                let vs = heads.group_kv(&s.v.narrow(0, start, len)?)?;
                let dc = heads.group_q(&dctx.narrow(0, start, len)?)?;
                let dp = dc.matmul(&vs.t()?)?;
                let dv = heads.ungroup_kv(&p.t()?.matmul(&dc)?, len)?;
                // Softmax: ds = p (dp − Σ p dp), then the 1/√d of the scores.
                let dot = (&dp * p)?.sum_keepdim(D::Minus1)?;
                let ds = ((p * dp.broadcast_sub(&dot)?)? * att_scale)?;
                let dq = heads.ungroup_q(&ds.matmul(&ks)?, len)?;
                let dk = heads.ungroup_kv(&ds.t()?.matmul(&qs)?, len)?;
                Ok([dq, dk, dv])
            })
            .collect::<Result<Vec<_>>>()?;
        let (mut dqs, mut dks, mut dvs) = (Vec::new(), Vec::new(), Vec::new());
        for [dq, dk, dv] in parts {
            dqs.push(dq);
            dks.push(dk);
            dvs.push(dv);
        }
        drop(dctx);
        let dq = rope(
            &Tensor::cat(&dqs, 0)?.reshape((n, heads.nh, heads.hd))?,
            &cos,
            &neg_sin,
        )?
        .reshape((n, qd))?;
        let dk = rope(
            &Tensor::cat(&dks, 0)?.reshape((n, heads.nkv, heads.hd))?,
            &cos,
            &neg_sin,
        )?
        .reshape((n, kvd))?;
        let dv = Tensor::cat(&dvs, 0)?;
        drop((dqs, dks, dvs));
        let dqkv = Tensor::cat(&[&dq, &dk, &dv], 1)?;
        drop((dq, dk, dv));
        let mut dh1 = Accumulator::product(&dqkv, &layer.qkv.w)?;
        if let Some(g) = &lora.qkv {
            g.backward(l, &s.h1, &dqkv, &mut dh1, &mut grads)?;
        }
        let dh1 = dh1.into_tensor()?;
        dx = (&dx2 + kernels::rms_norm_backward(&s.x, &layer.norm1, &dh1, eps)?)?;
    }
    Ok(LoraGradients {
        loss,
        grads,
        tokens: n,
        answer_tokens: packed.n_answer,
    })
}
