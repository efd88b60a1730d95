//! Trainable LoRA factors, initialised as PEFT does (A Kaiming-uniform, B zero).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};

use dnd_core::adapters::{BaseModelShape, LoraAdapter, LoraPair, LoraTarget, Module};
use dnd_core::error::Result;

/// LoRA factors as training variables.
pub struct TrainableLora {
    vars: VarMap,
    pairs: BTreeMap<LoraTarget, (Var, Var)>,
    rank: usize,
    alpha: f64,
}

impl TrainableLora {
    /// Factors for `modules` of every layer of `shape`: A uniform in ±1/√in (PEFT's
    /// `kaiming_uniform_(a=√5)`), B zero, so training starts from the base model. Seeded.
    pub fn new(
        shape: &BaseModelShape,
        modules: &[Module],
        rank: usize,
        alpha: f64,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let vars = VarMap::new();
        let mut pairs = BTreeMap::new();
        for layer in 0..shape.num_layers {
            for &module in modules {
                let (inp, out) = shape.in_out(module);
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..rank * inp)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (rank, inp), device)?)?;
                let b = Var::zeros((out, rank), DType::F32, device)?;
                let target = LoraTarget { layer, module };
                let mut data = vars.data().lock().expect("varmap lock");
                data.insert(format!("{layer}.{}.a", module.name()), a.clone());
                data.insert(format!("{layer}.{}.b", module.name()), b.clone());
                drop(data);
                pairs.insert(target, (a, b));
            }
        }
        Ok(Self {
            vars,
            pairs,
            rank,
            alpha,
        })
    }

    /// Variables initialised from an adapter's factors (copied).
    pub fn from_adapter(adapter: &LoraAdapter) -> Result<Self> {
        let vars = VarMap::new();
        let mut pairs = BTreeMap::new();
        for (t, p) in adapter.pairs() {
            let a = Var::from_tensor(&p.a.to_dtype(DType::F32)?)?;
            let b = Var::from_tensor(&p.b.to_dtype(DType::F32)?)?;
            let mut data = vars.data().lock().expect("varmap lock");
            data.insert(format!("{}.{}.a", t.layer, t.module.name()), a.clone());
            data.insert(format!("{}.{}.b", t.layer, t.module.name()), b.clone());
            drop(data);
            pairs.insert(*t, (a, b));
        }
        Ok(Self {
            vars,
            pairs,
            rank: adapter.rank(),
            alpha: adapter.alpha(),
        })
    }

    /// The variables of one target, `(A, B)`.
    pub fn var(&self, target: LoraTarget) -> Option<(&Var, &Var)> {
        self.pairs.get(&target).map(|(a, b)| (a, b))
    }

    /// The trained targets, in order.
    pub fn targets(&self) -> impl Iterator<Item = LoraTarget> + '_ {
        self.pairs.keys().copied()
    }

    /// The current factors without autograd tracking (shared storage): what
    /// [`super::backward::lora_gradients`] reads.
    pub fn detached(&self) -> Result<LoraAdapter> {
        self.adapter()?.detached()
    }

    /// All variables (for the optimiser).
    pub fn vars(&self) -> Vec<Var> {
        self.vars.all_vars()
    }

    /// The current factors as an adapter whose tensors are the variables themselves, so a
    /// forward pass through it reaches them in the backward pass.
    pub fn adapter(&self) -> Result<LoraAdapter> {
        let pairs = self
            .pairs
            .iter()
            .map(|(t, (a, b))| {
                (
                    *t,
                    LoraPair {
                        a: a.as_tensor().clone(),
                        b: b.as_tensor().clone(),
                    },
                )
            })
            .collect();
        LoraAdapter::new(self.rank, self.alpha, pairs)
    }

    /// A detached copy of the current factors (for saving a checkpoint).
    pub fn snapshot(&self) -> Result<LoraAdapter> {
        let pairs = self
            .pairs
            .iter()
            .map(|(t, (a, b))| {
                Ok((
                    *t,
                    LoraPair {
                        a: a.as_tensor().detach().copy()?,
                        b: b.as_tensor().detach().copy()?,
                    },
                ))
            })
            .collect::<Result<_>>()?;
        LoraAdapter::new(self.rank, self.alpha, pairs)
    }
}
