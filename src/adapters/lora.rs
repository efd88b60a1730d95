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

    /// Fails if any weight is NaN or infinite: such an adapter must never reach a model.
    pub fn check_finite(&self) -> Result<()> {
        for (t, p) in &self.pairs {
            for (name, w) in [("A", &p.a), ("B", &p.b)] {
                let bad = w
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .any(|v| !v.is_finite());
                if bad {
                    return Err(DndError::NonFinite(format!(
                        "layer {} {} lora_{name} holds non-finite values",
                        t.layer,
                        t.module.name()
                    )));
                }
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
