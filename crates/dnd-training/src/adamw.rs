//! AdamW over LoRA factors, with state that can be saved and restored (so an interrupted
//! `collect` resumes exactly where it stopped; candle's optimiser keeps its moments private).
//!
//! The update is PyTorch's `torch.optim.AdamW` (decoupled weight decay `p ← p (1 − lr·wd)`,
//! bias-corrected moments, `eps` added to `√v̂`), so a run matches a PEFT run with the same
//! hyper-parameters.

use std::collections::{BTreeMap, HashMap};

use candle_core::{Device, Tensor};

use super::lora::TrainableLora;
use dnd_core::adapters::{LoraPair, LoraTarget};
use dnd_core::error::{DndError, Result};

/// AdamW hyper-parameters (defaults: PyTorch's, with its `weight_decay = 0.01`).
#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to `√v̂`.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// The optimiser: its configuration, the step count and both moments of every factor.
pub struct AdamW {
    cfg: AdamWConfig,
    steps: u64,
    /// First and second moments per target, `(m, v)` each shaped like the factor pair.
    moments: BTreeMap<LoraTarget, (LoraPair, LoraPair)>,
}

impl AdamW {
    /// A fresh optimiser (moments zero).
    pub fn new(cfg: AdamWConfig) -> Self {
        Self {
            cfg,
            steps: 0,
            moments: BTreeMap::new(),
        }
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One update of every factor that has a gradient.
    pub fn step(
        &mut self,
        lora: &TrainableLora,
        grads: &BTreeMap<LoraTarget, LoraPair>,
    ) -> Result<()> {
        self.steps += 1;
        let c = self.cfg;
        let t = self.steps as i32;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        for (target, g) in grads {
            let (a, b) = lora.var(*target).ok_or_else(|| {
                DndError::InvalidInput(format!("a gradient for {target:?}, which is not trained"))
            })?;
            let (m, v) = match self.moments.get(target) {
                Some(mv) => mv.clone(),
                None => (zeros_like(g)?, zeros_like(g)?),
            };
            let update = |p: &candle_core::Var, g: &Tensor, m: &Tensor, v: &Tensor| {
                let m = ((m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
                let v = ((v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
                let decayed = (p.as_tensor() * (1.0 - c.lr * c.weight_decay))?;
                let denom = ((&v / bc2)?.sqrt()? + c.eps)?;
                let next = (decayed - ((&m / bc1)? / denom)?.affine(c.lr, 0.0)?)?;
                p.set(&next)?;
                Ok::<_, DndError>((m, v))
            };
            let (ma, va) = update(a, &g.a, &m.a, &v.a)?;
            let (mb, vb) = update(b, &g.b, &m.b, &v.b)?;
            self.moments.insert(
                *target,
                (LoraPair { a: ma, b: mb }, LoraPair { a: va, b: vb }),
            );
        }
        Ok(())
    }

    /// The moments as named tensors (`{layer}.{module}.{m|v}.{a|b}`); the step count is
    /// [`Self::steps`].
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (t, (m, v)) in &self.moments {
            let key = format!("{}.{}", t.layer, t.module.name());
            out.insert(format!("{key}.m.a"), m.a.clone());
            out.insert(format!("{key}.m.b"), m.b.clone());
            out.insert(format!("{key}.v.a"), v.a.clone());
            out.insert(format!("{key}.v.b"), v.b.clone());
        }
        out
    }

    /// Restores what [`Self::state`] returned for the targets of `lora`.
    pub fn restore(
        cfg: AdamWConfig,
        lora: &TrainableLora,
        tensors: &HashMap<String, Tensor>,
        steps: u64,
        device: &Device,
    ) -> Result<Self> {
        let mut moments = BTreeMap::new();
        for t in lora.targets() {
            let key = format!("{}.{}", t.layer, t.module.name());
            let get = |k: &str| -> Result<Option<Tensor>> {
                tensors
                    .get(&format!("{key}.{k}"))
                    .map(|x| x.to_device(device))
                    .transpose()
                    .map_err(Into::into)
            };
            if let (Some(ma), Some(mb), Some(va), Some(vb)) =
                (get("m.a")?, get("m.b")?, get("v.a")?, get("v.b")?)
            {
                moments.insert(t, (LoraPair { a: ma, b: mb }, LoraPair { a: va, b: vb }));
            }
        }
        Ok(Self {
            cfg,
            steps,
            moments,
        })
    }
}

fn zeros_like(p: &LoraPair) -> Result<LoraPair> {
    Ok(LoraPair {
        a: p.a.zeros_like()?,
        b: p.b.zeros_like()?,
    })
}
