//! Condition modulation (ours, not the paper's): the condition's summary scales and shifts
//! every stage's normalised input per channel, as adaptive layer norm does in diffusion
//! transformers.
//!
//! The paper's decoder sees a task only through convolutions of its encoder states, each stage
//! behind a layer norm. Trained on many tasks it makes nearly one adapter for all of them (mean
//! pairwise cosine 0.95 on the skills generator, `dnd similarity`), and two instructions that
//! differ in one word (upper case, lower case) get adapters with cosine 0.998. Modulation gives
//! the condition a direct, linear path into every stage: the summary `z` (the mean of the
//! condition over prompts and positions) is standardised with statistics of the training
//! conditions, `u = (z - mean) * scale`, and stage `i` computes
//! `LN(x) * (1 + u Γᵢᵀ) + u Βᵢᵀ` per channel before its convolutions. Γ and Β start at zero, so
//! a modulated generator starts out computing what its unmodulated checkpoint did (to
//! rounding).
//!
//! Checkpoint keys: `modulation.mean`, `modulation.scale` (`C`), `modulation.{i}.gamma` and
//! `modulation.{i}.beta` (`(Nᵢ, C)`, stage `i`'s input channels).

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use super::Features;

/// Checkpoint name of the summary's mean.
pub const MODULATION_MEAN: &str = "modulation.mean";
/// Checkpoint name of the summary's scale (one over its standard deviation).
pub const MODULATION_SCALE: &str = "modulation.scale";

/// The modulation weights of every stage, and the summary's standardisation.
#[derive(Debug, Clone)]
pub struct Modulation {
    mean: Tensor,
    scale: Tensor,
    /// Per stage: `(Γ, Β)`, each `(Nᵢ, C)`.
    stages: Vec<(Tensor, Tensor)>,
}

impl Modulation {
    /// Loads (or, with a `VarMap`-backed builder, creates at zero) the weights of a decoder
    /// with stage boundaries `features` over `hidden`-wide condition states. `mean` and
    /// `scale` are read from `vb` when it holds them (a trained checkpoint), else taken from
    /// `stats` (a first training run computes them); neither is an error.
    pub fn new(
        features: &[Features],
        hidden: usize,
        stats: Option<(Tensor, Tensor)>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let (mean, scale) = if vb.contains_tensor(MODULATION_MEAN) {
            (
                vb.get_unchecked(MODULATION_MEAN)?,
                vb.get_unchecked(MODULATION_SCALE)?,
            )
        } else {
            match stats {
                Some(s) => s,
                None => candle_core::bail!(
                    "a modulated generator needs {MODULATION_MEAN} and {MODULATION_SCALE}"
                ),
            }
        };
        for (name, t) in [(MODULATION_MEAN, &mean), (MODULATION_SCALE, &scale)] {
            if t.dims() != [hidden] {
                candle_core::bail!("{name} has shape {:?}, want [{hidden}]", t.dims());
            }
        }
        let vb = vb.pp("modulation");
        let stages = features[..features.len() - 1]
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let zero = candle_nn::Init::Const(0.0);
                Ok((
                    vb.pp(i).get_with_hints((f[0], hidden), "gamma", zero)?,
                    vb.pp(i).get_with_hints((f[0], hidden), "beta", zero)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            mean,
            scale,
            stages,
        })
    }

    /// The standardisation `(mean, scale)` of the condition summary.
    pub fn stats(&self) -> (&Tensor, &Tensor) {
        (&self.mean, &self.scale)
    }

    /// Per stage, the `(B, Nᵢ)` gain (`u Γᵢᵀ`, applied as `1 + gain`) and shift of a
    /// `(B, N, L, C)` condition.
    pub fn terms(&self, condition: &Tensor) -> Result<Vec<(Tensor, Tensor)>> {
        let dtype = condition.dtype();
        let u = summary(&condition.to_dtype(DType::F32)?)?
            .broadcast_sub(&self.mean.to_dtype(DType::F32)?)?
            .broadcast_mul(&self.scale.to_dtype(DType::F32)?)?;
        self.stages
            .iter()
            .map(|(g, b)| {
                let gain = u.matmul(&g.to_dtype(DType::F32)?.t()?)?;
                let shift = u.matmul(&b.to_dtype(DType::F32)?.t()?)?;
                Ok((gain.to_dtype(dtype)?, shift.to_dtype(dtype)?))
            })
            .collect()
    }

    /// Number of trained weights (the standardisation excluded).
    pub fn num_params(&self) -> usize {
        self.stages
            .iter()
            .map(|(g, b)| g.elem_count() + b.elem_count())
            .sum()
    }
}

/// The summary `(B, C)` of a `(B, N, L, C)` condition: its mean over prompts and positions.
pub fn summary(condition: &Tensor) -> Result<Tensor> {
    let (b, n, l, c) = condition.dims4()?;
    condition.reshape((b, n * l, c))?.mean(1)
}

/// The standardisation of summaries `(K, C)` of training conditions: their mean, and one over
/// their standard deviation per channel (floored, so that a channel no condition moves is not
/// blown up).
pub fn standardisation(summaries: &Tensor) -> Result<(Tensor, Tensor)> {
    let mean = summaries.mean(0)?;
    let var = summaries.broadcast_sub(&mean)?.sqr()?.mean(0)?;
    let scale = var.sqrt()?.clamp(1e-3, f32::MAX)?.recip()?;
    Ok((mean, scale))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generator::hyperconv::HyperConvStage;
    use crate::generator::{presets, ConditionDecoder};
    use crate::test_util::max_abs_diff;
    use candle_core::Device;
    use candle_nn::VarMap;

    /// Deterministic values in (-1.7, 1.7), different per seed.
    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((i as f32 + 1.0) * (seed as f32 * 0.731 + 1.3)).sin() * 1.7)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn standardised_summaries_have_zero_mean_and_unit_spread() {
        let s = randn(&[12, 5], 1);
        let (mean, scale) = standardisation(&s).unwrap();
        let u = s
            .broadcast_sub(&mean)
            .unwrap()
            .broadcast_mul(&scale)
            .unwrap();
        let m = u.mean(0).unwrap().abs().unwrap().max(0).unwrap();
        assert!(m.to_scalar::<f32>().unwrap() < 1e-5);
        let v = u.sqr().unwrap().mean(0).unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|v| (v - 1.0).abs() < 1e-4), "{v:?}");
        // The summary is the mean over prompts and positions.
        let c = randn(&[2, 3, 4, 5], 2);
        let want = c.mean(1).unwrap().mean(1).unwrap();
        assert!(max_abs_diff(&summary(&c).unwrap(), &want) < 1e-6);
    }

    #[test]
    fn one_channel_modulation_equals_a_rescaled_layer_norm() {
        // With one channel, a gain g and shift s on the normalised input are the layer norm
        // with weight w (1 + g) and bias b (1 + g) + s.
        let dev = Device::Cpu;
        let (g, s) = (0.7f32, -0.3f32);
        let mut vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let stage = HyperConvStage::new([1, 6, 8], [2, 4, 6], 3, vb.clone()).unwrap();
        let x = randn(&[1, 1, 6, 8], 3);
        let gain = Tensor::new(&[[g]], &dev).unwrap();
        let shift = Tensor::new(&[[s]], &dev).unwrap();
        let modulated = stage.forward_modulated(&x, Some((&gain, &shift))).unwrap();
        // (Before the norm is rewritten below: the stage shares the variables' storage.)
        let unmodulated = stage.forward(&x).unwrap();
        // The stage's norm, read back (the varmap made it at weight 1, bias 0).
        let norm = |name: &str| vm.data().lock().unwrap()[name].as_tensor().clone();
        let (w, b) = (norm("linear1.norm.weight"), norm("linear1.norm.bias"));
        vm.set_one("linear1.norm.weight", (&w * f64::from(1.0 + g)).unwrap())
            .unwrap();
        vm.set_one(
            "linear1.norm.bias",
            ((&b * f64::from(1.0 + g)).unwrap() + f64::from(s)).unwrap(),
        )
        .unwrap();
        let rescaled = HyperConvStage::new([1, 6, 8], [2, 4, 6], 3, vb).unwrap();
        let plain = rescaled.forward(&x).unwrap();
        assert!(max_abs_diff(&modulated, &plain) < 1e-5);
        assert!(max_abs_diff(&modulated, &unmodulated) > 1e-2);
    }

    #[test]
    fn zero_modulation_keeps_the_decoder_and_trained_terms_follow_the_condition() {
        let dev = Device::Cpu;
        let mut cfg = presets::smollm2_135m_small().unwrap();
        cfg.stages = vec![[4, 8, 16], [6, 4, 8], *cfg.stages.last().unwrap()];
        cfg.num_prompts = 4;
        cfg.max_length = 8;
        cfg.encoder.hidden = 16;
        let (plain, tensors) = ConditionDecoder::random(cfg.clone(), 5, &dev, DType::F32).unwrap();
        let mut vm = VarMap::new();
        {
            let mut data = vm.data().lock().unwrap();
            for (k, t) in &tensors {
                data.insert(k.clone(), candle_core::Var::from_tensor(t).unwrap());
            }
        }
        cfg.modulated = true;
        let stats = (
            randn(&[16], 6),
            (randn(&[16], 7).abs().unwrap() + 0.5).unwrap(),
        );
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let modulated =
            ConditionDecoder::with_modulation_stats(cfg.clone(), vb.clone(), Some(stats.clone()))
                .unwrap();
        let c = randn(&[1, 4, 8, 16], 8);
        let d = max_abs_diff(&modulated.forward(&c).unwrap(), &plain.forward(&c).unwrap());
        assert!(d < 1e-6, "zero modulation changed the tokens by {d}");
        // Stage 1's gain is u Γ₁ᵀ with u the standardised summary.
        let gamma = randn(&[6, 16], 9);
        vm.set_one("modulation.1.gamma", &gamma).unwrap();
        let m = modulated.modulation().unwrap();
        let terms = m.terms(&c).unwrap();
        let u = summary(&c)
            .unwrap()
            .broadcast_sub(&stats.0)
            .unwrap()
            .broadcast_mul(&stats.1)
            .unwrap();
        let want = u.matmul(&gamma.t().unwrap()).unwrap();
        assert!(max_abs_diff(&terms[1].0, &want) < 1e-4);
        assert_eq!(
            terms[0].0.sum_all().unwrap().to_scalar::<f32>().unwrap(),
            0.0
        );
        assert!(max_abs_diff(&modulated.forward(&c).unwrap(), &plain.forward(&c).unwrap()) > 1e-3);
        // Without its statistics a modulated checkpoint does not load.
        let err = ConditionDecoder::new(cfg, vb).err().unwrap().to_string();
        assert!(err.contains(MODULATION_MEAN), "{err}");
    }
}
