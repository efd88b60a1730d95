//! Seeded weight initialisation: the same seed gives the same generator on every run.
//!
//! candle's own initialisers draw from an unseedable thread RNG; this backend answers each
//! `VarBuilder` request with tensors drawn from an RNG seeded by (seed, tensor name), so the
//! result does not depend on the order modules are built in.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha12Rng;
use sha2::{Digest, Sha256};

/// A `VarBuilder` backend that creates seeded tensors and remembers them.
pub struct SeededInit {
    seed: u64,
    created: Mutex<HashMap<String, Tensor>>,
}

impl SeededInit {
    /// A builder over a fresh backend; `take` the tensors once the modules are built.
    pub fn builder(
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> (VarBuilder<'static>, std::sync::Arc<Self>) {
        let backend = std::sync::Arc::new(Self {
            seed,
            created: Mutex::new(HashMap::new()),
        });
        let vb = VarBuilder::from_backend(Box::new(Shared(backend.clone())), dtype, device.clone());
        (vb, backend)
    }

    /// The tensors created so far, by full name.
    pub fn take(&self) -> HashMap<String, Tensor> {
        std::mem::take(&mut self.created.lock().expect("init lock"))
    }

    fn rng(&self, name: &str) -> ChaCha12Rng {
        ChaCha12Rng::seed_from_u64(self.seed ^ name_seed(name))
    }
}

/// A tensor name's share of its RNG seed: the first 8 bytes of its SHA-256, little-endian.
/// Both halves are fixed algorithms (std's `DefaultHasher` and rand's `StdRng` promise no
/// stability across releases), so a seed gives the same generator on every build.
fn name_seed(name: &str) -> u64 {
    let d = Sha256::digest(name.as_bytes());
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

struct Shared(std::sync::Arc<SeededInit>);

fn uniform(rng: &mut impl Rng, n: usize, lo: f64, up: f64) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..up) as f32).collect()
}

fn normal(rng: &mut impl Rng, n: usize, mean: f64, std: f64) -> Vec<f32> {
    // Box-Muller: two uniforms per pair of normals.
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
        let u2: f64 = rng.random();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        out.push((mean + std * r * t.cos()) as f32);
        out.push((mean + std * r * t.sin()) as f32);
    }
    out.truncate(n);
    out
}

impl SimpleBackend for Shared {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let n = s.elem_count();
        let mut rng = self.0.rng(name);
        let data = match h {
            Init::Const(v) => vec![v as f32; n],
            Init::Uniform { lo, up } => uniform(&mut rng, n, lo, up),
            Init::Randn { mean, stdev } => normal(&mut rng, n, mean, stdev),
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let std = non_linearity.gain() / (fan.for_shape(&s) as f64).sqrt();
                match dist {
                    NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        uniform(&mut rng, n, -bound, bound)
                    }
                    NormalOrUniform::Normal => normal(&mut rng, n, 0.0, std),
                }
            }
        };
        let t = Tensor::from_vec(data, s, dev)?.to_dtype(dtype)?;
        self.0
            .created
            .lock()
            .expect("init lock")
            .insert(name.to_string(), t.clone());
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("seeded init cannot produce {name} without a shape")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_seeds_are_the_sha256_prefix() {
        // sha256sum of "decoder.0.weight" starts 8b5f418f67080a2a.
        assert_eq!(name_seed("decoder.0.weight"), 0x2a0a_0867_8f41_5f8b);
    }

    #[test]
    fn same_seed_same_tensors_other_seed_other_tensors() {
        let draw = |seed| {
            let (vb, backend) = SeededInit::builder(seed, DType::F32, &Device::Cpu);
            vb.get_with_hints(
                (4, 3),
                "w",
                Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            )
            .unwrap();
            backend.take()["w"]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }
}
