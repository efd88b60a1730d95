//! How far a prompt set lies from the conditions a generator was trained on: the signal for
//! abstaining on requests unlike every trained skill (ordinary chat), which should get the base
//! model rather than an adapter for the nearest task.
//!
//! An anchor is the pooled embedding of one training condition (a task's system prompt, or a
//! sample of its prompts): per prompt the attention-masked mean of the encoder's token states,
//! averaged over the prompts, L2-normalised. The distance of a prompt set is one minus the
//! cosine to its nearest anchor. Anchors are stored in the generator checkpoint
//! ([`CONDITION_ANCHORS`], names in the config's `anchor_names`); `dnd anchors` adds them.

use candle_core::{DType, Tensor};

use crate::encoder::TextEncoder;
use crate::error::{DndError, Result};

/// Checkpoint name of the `(K, C)` anchor matrix.
pub const CONDITION_ANCHORS: &str = "condition_anchors";

/// The pooled, normalised embedding `(C)` of a prompt set.
pub fn pooled(encoder: &TextEncoder, prompts: &[&str], max_length: usize) -> Result<Tensor> {
    if prompts.is_empty() {
        return Err(DndError::InvalidInput("no prompts to embed".into()));
    }
    let n = prompts.len();
    let (ids, mask) = encoder.tokenize(prompts, max_length)?;
    let states = encoder
        .encode_ids(&ids, &mask, n, max_length)?
        .to_dtype(DType::F32)?;
    let m: Vec<f32> = mask.iter().map(|&v| v as f32).collect();
    let m = Tensor::from_vec(m, (n, max_length, 1), states.device())?;
    let per_prompt = states
        .broadcast_mul(&m)?
        .sum(1)?
        .broadcast_div(&m.sum(1)?.clamp(1.0, f32::MAX)?)?;
    normalise(&per_prompt.mean(0)?)
}

fn normalise(v: &Tensor) -> Result<Tensor> {
    let norm = v.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    Ok((v / f64::from(norm.max(1e-12)))?)
}

/// The nearest training condition of a prompt set.
#[derive(Debug, Clone, PartialEq)]
pub struct Nearest {
    /// Its anchor's name (`TASK: system 1`, `TASK: prompts`).
    pub name: String,
    /// One minus the cosine of the two embeddings (0: the same direction, up to 2).
    pub distance: f32,
}

/// Named anchors, one row each.
#[derive(Debug, Clone)]
pub struct Anchors {
    names: Vec<String>,
    vectors: Tensor,
}

impl Anchors {
    /// Anchors from names and `(K, C)` rows (normalised here).
    pub fn new(names: Vec<String>, vectors: Tensor) -> Result<Self> {
        let (k, _) = vectors.dims2()?;
        if k != names.len() || k == 0 {
            return Err(DndError::Incompatible(format!(
                "{k} anchor rows for {} anchor names",
                names.len()
            )));
        }
        let vectors = vectors.to_dtype(DType::F32)?;
        let norms = vectors
            .sqr()?
            .sum_keepdim(1)?
            .sqrt()?
            .clamp(1e-12, f32::MAX)?;
        Ok(Self {
            names,
            vectors: vectors.broadcast_div(&norms)?,
        })
    }

    /// The names, in row order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The normalised `(K, C)` rows.
    pub fn vectors(&self) -> &Tensor {
        &self.vectors
    }

    /// The anchor nearest to an embedding `(C)` (normalised here).
    pub fn nearest(&self, embedding: &Tensor) -> Result<Nearest> {
        let v = normalise(
            &embedding
                .to_dtype(DType::F32)?
                .to_device(self.vectors.device())?,
        )?;
        let cos = self
            .vectors
            .matmul(&v.unsqueeze(1)?)?
            .squeeze(1)?
            .to_vec1::<f32>()?;
        let (i, c) = cos
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .expect("at least one anchor");
        Ok(Nearest {
            name: self.names[i].clone(),
            distance: 1.0 - c,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn nearest_is_the_largest_cosine() {
        let dev = Device::Cpu;
        let rows = Tensor::new(&[[3f32, 0.0], [0.0, 0.5], [-1.0, -1.0]], &dev).unwrap();
        let a = Anchors::new(vec!["x".into(), "y".into(), "z".into()], rows).unwrap();
        let n = a
            .nearest(&Tensor::new(&[0.1f32, 1.0], &dev).unwrap())
            .unwrap();
        assert_eq!(n.name, "y");
        let want = 1.0 - 1.0 / (1.01f32).sqrt();
        assert!((n.distance - want).abs() < 1e-6, "{}", n.distance);
        let n = a
            .nearest(&Tensor::new(&[-2f32, -2.0], &dev).unwrap())
            .unwrap();
        assert_eq!(n.name, "z");
        assert!(n.distance.abs() < 1e-6);
        assert!(Anchors::new(
            vec!["x".into()],
            Tensor::zeros((2, 2), DType::F32, &dev).unwrap()
        )
        .is_err());
    }
}
