//! The in-memory LoRA adapter: per layer and module, `A (r, in)`, `B (out, r)` and one scale.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use super::shapes::{BaseModelShape, Module};
use crate::error::{DndError, Result};

/// Where one LoRA pair applies: a decoder layer and one of its projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LoraTarget {
    /// Decoder layer index.
    pub layer: usize,
    /// Projection inside the layer.
    pub module: Module,
}

/// One low-rank update `delta W = scale * B A`.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// Down projection, shape (rank, in).
    pub a: Tensor,
    /// Up projection, shape (out, rank).
    pub b: Tensor,
}

/// A LoRA adapter for a decoder-only model, as PEFT defines it (no DoRA, no bias).
///
/// Every pair shares one rank and one `alpha`; the update applied to a projection is
/// `x A^T B^T * alpha / rank`.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    rank: usize,
    alpha: f64,
    pairs: BTreeMap<LoraTarget, LoraPair>,
}

impl LoraAdapter {
    /// Builds an adapter from its pairs, checking that every pair has the given rank and
    /// consistent shapes.
    pub fn new(rank: usize, alpha: f64, pairs: BTreeMap<LoraTarget, LoraPair>) -> Result<Self> {
        if rank == 0 {
            return Err(DndError::InvalidInput("LoRA rank must be positive".into()));
        }
        if !alpha.is_finite() {
            return Err(DndError::InvalidInput(format!(
                "LoRA alpha {alpha} is not finite"
            )));
        }
        for (t, p) in &pairs {
            let (ra, _) = p.a.dims2()?;
            let (_, rb) = p.b.dims2()?;
            if ra != rank || rb != rank {
                return Err(DndError::Incompatible(format!(
                    "layer {} {}: A is {:?} and B is {:?}, expected rank {rank}",
                    t.layer,
                    t.module.name(),
                    p.a.dims(),
                    p.b.dims()
                )));
            }
        }
        Ok(Self { rank, alpha, pairs })
    }

    /// The LoRA rank `r`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The LoRA `alpha`.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// The factor applied to `B A`: `alpha / r`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// All pairs, ordered by layer then module token order.
    pub fn pairs(&self) -> &BTreeMap<LoraTarget, LoraPair> {
        &self.pairs
    }

    /// The pair for one target, if the adapter covers it.
    pub fn get(&self, layer: usize, module: Module) -> Option<&LoraPair> {
        self.pairs.get(&LoraTarget { layer, module })
    }

    /// The modules this adapter touches, in token order.
    pub fn target_modules(&self) -> Vec<Module> {
        let mut ms: Vec<Module> = self.pairs.keys().map(|t| t.module).collect();
        ms.sort();
        ms.dedup();
        ms
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.pairs
            .values()
            .next()
            .map(|p| p.a.device().clone())
            .unwrap_or(Device::Cpu)
    }

    /// Bytes taken by the weights.
    pub fn size_in_bytes(&self) -> usize {
        self.pairs
            .values()
            .map(|p| (p.a.elem_count() + p.b.elem_count()) * p.a.dtype().size_in_bytes())
            .sum()
    }

    /// The same factors without autograd tracking (storage shared, nothing copied): what a
    /// computation that takes its own gradients reads, so that no graph is recorded.
    pub fn detached(&self) -> Result<Self> {
        let pairs = self
            .pairs
            .iter()
            .map(|(t, p)| {
                (
                    *t,
                    LoraPair {
                        a: p.a.detach(),
                        b: p.b.detach(),
                    },
                )
            })
            .collect();
        Self::new(self.rank, self.alpha, pairs)
    }

    /// Copies the adapter to a device and dtype.
    pub fn to(&self, device: &Device, dtype: DType) -> Result<Self> {
        let pairs = self
            .pairs
            .iter()
            .map(|(t, p)| {
                Ok((
                    *t,
                    LoraPair {
                        a: p.a.to_device(device)?.to_dtype(dtype)?,
                        b: p.b.to_device(device)?.to_dtype(dtype)?,
                    },
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            rank: self.rank,
            alpha: self.alpha,
            pairs,
        })
    }

    /// The dense update `scale * B A` (out, in) of one target, for tests and merging.
    pub fn delta_weight(&self, layer: usize, module: Module) -> Result<Option<Tensor>> {
        let Some(p) = self.get(layer, module) else {
            return Ok(None);
        };
        let d =
            p.b.to_dtype(DType::F32)?
                .matmul(&p.a.to_dtype(DType::F32)?)?;
        Ok(Some((d * self.scale())?))
    }

    /// The Frobenius inner product of the two adapters' dense updates, summed over every
    /// target (a target one of them lacks is a zero update there): with `inner(a, a)` the
    /// squared norm, it gives the cosine between what two adapters do to the model. Computed
    /// through the rank-sized products `B1ᵀ B2` and `A1 A2ᵀ`, never the dense `(out, in)`
    /// matrices, in f64.
    pub fn inner(&self, other: &LoraAdapter) -> Result<f64> {
        let mut total = 0.0;
        for (t, p) in &self.pairs {
            let Some(q) = other.pairs.get(t) else {
                continue;
            };
            let f64_of = |w: &Tensor| w.to_dtype(DType::F64);
            let bb = f64_of(&p.b)?.t()?.matmul(&f64_of(&q.b)?)?;
            let aa = f64_of(&p.a)?.matmul(&f64_of(&q.a)?.t()?)?;
            total += (bb * aa)?.sum_all()?.to_scalar::<f64>()?;
        }
        Ok(total * self.scale() * other.scale())
    }

    /// The adapter whose update on every target is the mean of the adapters' updates, exactly:
    /// ranks are stacked (`A` rows and `B` columns of all adapters, each `B` scaled by its
    /// adapter's `alpha / r` over their number), so the rank is the sum of theirs and the scale
    /// is 1. A target some adapter lacks counts as a zero update there. The baseline a
    /// generated adapter must beat on a task none of them was trained on.
    pub fn mean(adapters: &[LoraAdapter]) -> Result<Self> {
        let n = adapters.len();
        if n == 0 {
            return Err(DndError::InvalidInput("no adapters to average".into()));
        }
        // Every target any adapter covers, with one of its pairs for the shapes.
        let mut targets: BTreeMap<LoraTarget, &LoraPair> = BTreeMap::new();
        for (t, p) in adapters.iter().flat_map(|a| a.pairs.iter()) {
            targets.entry(*t).or_insert(p);
        }
        let rank: usize = adapters.iter().map(|a| a.rank).sum();
        let mut pairs = BTreeMap::new();
        for (t, first) in targets {
            let (inp, out) = (first.a.dim(1)?, first.b.dim(0)?);
            let (dtype, dev) = (first.a.dtype(), first.a.device());
            let mut a_parts = Vec::with_capacity(n);
            let mut b_parts = Vec::with_capacity(n);
            for ad in adapters {
                match ad.pairs.get(&t) {
                    Some(p) => {
                        a_parts.push(p.a.to_dtype(DType::F32)?);
                        b_parts.push((p.b.to_dtype(DType::F32)? * (ad.scale() / n as f64))?);
                    }
                    None => {
                        a_parts.push(Tensor::zeros((ad.rank, inp), DType::F32, dev)?);
                        b_parts.push(Tensor::zeros((out, ad.rank), DType::F32, dev)?);
                    }
                }
            }
            let a = Tensor::cat(&a_parts, 0)?.to_dtype(dtype)?;
            let b = Tensor::cat(&b_parts, 1)?.to_dtype(dtype)?;
            pairs.insert(t, LoraPair { a, b });
        }
        Self::new(rank, rank as f64, pairs)
    }

    /// Fails if any weight is NaN or infinite: such an adapter must never reach a model.
    pub fn check_finite(&self) -> Result<()> {
        for (t, p) in &self.pairs {
            for (name, w) in [("A", &p.a), ("B", &p.b)] {
                check_finite_tensor(w, || {
                    format!("layer {} {} lora_{name}", t.layer, t.module.name())
                })?;
            }
        }
        Ok(())
    }

    /// Fails unless the adapter's matrices fit a base model of the given shape.
    pub fn check_fits(&self, shape: &BaseModelShape) -> Result<()> {
        for (t, p) in &self.pairs {
            if t.layer >= shape.num_layers {
                return Err(DndError::Incompatible(format!(
                    "adapter targets layer {} but the base model has {} layers",
                    t.layer, shape.num_layers
                )));
            }
            if !shape.has_module(t.module) {
                return Err(DndError::Incompatible(format!(
                    "layer {}: the adapter has {} weights, but the base model ({}) has no \
                     such projection (its MLP has no gate)",
                    t.layer,
                    t.module.name(),
                    shape.model_type
                )));
            }
            let (inp, out) = shape.in_out(t.module);
            if p.a.dims() != [self.rank, inp] || p.b.dims() != [out, self.rank] {
                return Err(DndError::Incompatible(format!(
                    "layer {} {}: adapter has A {:?}, B {:?}; the base model needs A [{}, {inp}], B [{out}, {}]",
                    t.layer,
                    t.module.name(),
                    p.a.dims(),
                    p.b.dims(),
                    self.rank,
                    self.rank
                )));
            }
        }
        Ok(())
    }
}

/// Fails with [`DndError::NonFinite`] (naming `what`) if `t` holds NaN or infinite values.
pub fn check_finite_tensor(t: &Tensor, what: impl FnOnce() -> String) -> Result<()> {
    let bad = t
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .any(|v| !v.is_finite());
    if bad {
        return Err(DndError::NonFinite(format!(
            "{} holds non-finite values",
            what()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter(rank: usize, alpha: f64, seed: f64, modules: &[Module]) -> LoraAdapter {
        let pairs = modules
            .iter()
            .map(|&module| {
                let a = Tensor::arange(0f32, (rank * 6) as f32, &Device::Cpu)
                    .unwrap()
                    .affine(0.1, seed)
                    .unwrap()
                    .sin()
                    .unwrap()
                    .reshape((rank, 6))
                    .unwrap();
                let b = Tensor::arange(0f32, (4 * rank) as f32, &Device::Cpu)
                    .unwrap()
                    .affine(0.3, -seed)
                    .unwrap()
                    .cos()
                    .unwrap()
                    .reshape((4, rank))
                    .unwrap();
                (LoraTarget { layer: 0, module }, LoraPair { a, b })
            })
            .collect();
        LoraAdapter::new(rank, alpha, pairs).unwrap()
    }

    #[test]
    fn inner_product_is_that_of_the_dense_updates() {
        let x = adapter(2, 16.0, 0.5, &[Module::Q, Module::V]);
        let y = adapter(3, 6.0, -1.5, &[Module::Q, Module::K]);
        let dense = |a: &LoraAdapter, module| a.delta_weight(0, module).unwrap();
        let dot = |u: Option<Tensor>, v: Option<Tensor>| match (u, v) {
            (Some(u), Some(v)) => (u * v)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            _ => 0.0,
        };
        let modules = [Module::Q, Module::K, Module::V];
        let want: f32 = modules
            .iter()
            .map(|&m| dot(dense(&x, m), dense(&y, m)))
            .sum();
        let got = x.inner(&y).unwrap();
        // Only Q is shared, and it is far from zero.
        assert!(want.abs() > 1.0, "{want}");
        assert!(
            (got - want as f64).abs() < 1e-4 * want.abs() as f64,
            "{got} vs {want}"
        );
        let norm2: f32 = modules
            .iter()
            .map(|&m| dot(dense(&x, m), dense(&x, m)))
            .sum();
        let got = x.inner(&x).unwrap();
        assert!(
            (got - norm2 as f64).abs() < 1e-4 * norm2 as f64,
            "{got} vs {norm2}"
        );
        let (xy, yx) = (x.inner(&y).unwrap(), y.inner(&x).unwrap());
        assert!((xy - yx).abs() < 1e-9 * xy.abs(), "{xy} vs {yx}");
    }

    #[test]
    fn mean_adapter_applies_the_mean_update() {
        use crate::test_util::max_abs_diff;
        let x = adapter(2, 16.0, 0.5, &[Module::Q, Module::V]);
        let y = adapter(3, 6.0, -1.5, &[Module::Q]);
        let m = LoraAdapter::mean(&[x.clone(), y.clone()]).unwrap();
        assert_eq!(m.rank(), 5);
        let dw = |a: &LoraAdapter, module| a.delta_weight(0, module).unwrap().unwrap();
        let want_q = ((dw(&x, Module::Q) + dw(&y, Module::Q)).unwrap() / 2.0).unwrap();
        assert!(max_abs_diff(&dw(&m, Module::Q), &want_q) < 1e-5);
        // V only in x: half of x's update.
        let want_v = (dw(&x, Module::V) / 2.0).unwrap();
        assert!(max_abs_diff(&dw(&m, Module::V), &want_v) < 1e-5);
        // The update is not trivially zero.
        assert!(max_abs_diff(&want_q, &want_q.zeros_like().unwrap()) > 0.1);
        assert!(LoraAdapter::mean(&[]).is_err());
    }
}
