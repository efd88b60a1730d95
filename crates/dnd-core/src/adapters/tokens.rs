//! DnD parameter tokens: a LoRA adapter cut into fixed-size, standardised chunks and back.
//!
//! For each target (layer-major, then module in token order), `A (r, in)` and `B^T (r, out)`
//! are cut along their columns into chunks of width `c`; each `(r, c)` chunk becomes one token of
//! shape `(r+2, c+2)`: the standardised chunk, plus its mean and std encoded in the last two rows
//! (alternating along the width) and the last two columns (in every row).

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::lora::{LoraAdapter, LoraPair, LoraTarget};
use super::shapes::{BaseModelShape, Module};
use crate::error::{DndError, Result};

/// Encoded statistics: `m' = 8 mean`, `s' = ln(0.9 std + 0.1) + 1.6`.
fn encode_stats(mean: f64, std: f64) -> (f64, f64) {
    (8.0 * mean, (0.9 * std + 0.1).ln() + 1.6)
}

/// Inverse of [`encode_stats`].
fn decode_stats(m: f64, s: f64) -> (f64, f64) {
    (m / 8.0, ((s - 1.6).exp() - 0.1) / 0.9)
}

/// LoRA hyper-parameters that fix the token layout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    /// LoRA rank (even: the statistics are encoded in pairs of rows).
    pub rank: usize,
    /// LoRA alpha written into generated adapters.
    pub alpha: f64,
    /// Chunk width `c` (even).
    pub chunk_width: usize,
    /// Adapted modules, in token order.
    pub target_modules: Vec<Module>,
}

/// How adapters of one base model and LoRA spec map to a `(T, r+2, c+2)` token tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLayout {
    shape: BaseModelShape,
    spec: LoraSpec,
}

/// One token's place in the adapter.
#[derive(Debug, Clone, Copy)]
struct Slot {
    target: LoraTarget,
    is_a: bool,
    chunk: usize,
}

impl TokenLayout {
    /// Checks the spec against the model's widths.
    pub fn new(shape: BaseModelShape, mut spec: LoraSpec) -> Result<Self> {
        if spec.rank == 0 || !spec.rank.is_multiple_of(2) {
            return Err(DndError::InvalidInput(format!(
                "LoRA rank {} must be even and positive: token statistics are stored in row pairs",
                spec.rank
            )));
        }
        if spec.chunk_width == 0 || !spec.chunk_width.is_multiple_of(2) {
            return Err(DndError::InvalidInput(format!(
                "chunk width {} must be even and positive",
                spec.chunk_width
            )));
        }
        if spec.target_modules.is_empty() {
            return Err(DndError::InvalidInput("no target modules".into()));
        }
        spec.target_modules.sort();
        spec.target_modules.dedup();
        for &m in &spec.target_modules {
            if !shape.has_module(m) {
                // Its LoRAs would be generated and then applied nowhere.
                let (model, module) = (&shape.model_type, m.name());
                return Err(DndError::InvalidInput(format!(
                    "the base model ({model}) has no {module}: its MLP has no gate; leave \
                     {module} out of the target modules (--modules)"
                )));
            }
            let (inp, out) = shape.in_out(m);
            for (side, dim) in [("input", inp), ("output", out)] {
                if dim % spec.chunk_width != 0 {
                    return Err(DndError::ChunkWidth {
                        module: m.name().to_string(),
                        side,
                        dim,
                        chunk_width: spec.chunk_width,
                        suggestions: Self::valid_chunk_widths(&shape, &spec.target_modules),
                    });
                }
            }
        }
        Ok(Self { shape, spec })
    }

    /// Even chunk widths (at most 512) that divide both widths of every given module.
    pub fn valid_chunk_widths(shape: &BaseModelShape, modules: &[Module]) -> Vec<usize> {
        (2..=512)
            .step_by(2)
            .filter(|c| {
                modules.iter().all(|&m| {
                    let (i, o) = shape.in_out(m);
                    i % c == 0 && o % c == 0
                })
            })
            .collect()
    }

    /// The base model shape.
    pub fn base_shape(&self) -> &BaseModelShape {
        &self.shape
    }

    /// The LoRA spec.
    pub fn spec(&self) -> &LoraSpec {
        &self.spec
    }

    /// Token shape `(r+2, c+2)`.
    pub fn token_shape(&self) -> (usize, usize) {
        (self.spec.rank + 2, self.spec.chunk_width + 2)
    }

    /// Tokens per decoder layer.
    pub fn tokens_per_layer(&self) -> usize {
        self.spec
            .target_modules
            .iter()
            .map(|&m| {
                let (i, o) = self.shape.in_out(m);
                (i + o) / self.spec.chunk_width
            })
            .sum()
    }

    /// Total token count `T`.
    pub fn num_tokens(&self) -> usize {
        self.tokens_per_layer() * self.shape.num_layers
    }

    fn slots(&self) -> Vec<Slot> {
        let c = self.spec.chunk_width;
        let mut slots = Vec::with_capacity(self.num_tokens());
        for layer in 0..self.shape.num_layers {
            for &module in &self.spec.target_modules {
                let target = LoraTarget { layer, module };
                let (inp, out) = self.shape.in_out(module);
                slots.extend((0..inp / c).map(|chunk| Slot {
                    target,
                    is_a: true,
                    chunk,
                }));
                slots.extend((0..out / c).map(|chunk| Slot {
                    target,
                    is_a: false,
                    chunk,
                }));
            }
        }
        slots
    }

    /// Turns an adapter into its `(T, r+2, c+2)` f32 token tensor on `device`.
    ///
    /// The adapter must cover exactly this layout's layers and modules with this rank.
    pub fn tokenize(&self, adapter: &LoraAdapter, device: &Device) -> Result<Tensor> {
        let r = self.spec.rank;
        if adapter.rank() != r {
            return Err(DndError::Incompatible(format!(
                "adapter rank {} differs from the layout's rank {r}",
                adapter.rank()
            )));
        }
        adapter.check_fits(&self.shape)?;
        if adapter.pairs().len() != self.shape.num_layers * self.spec.target_modules.len() {
            return Err(DndError::Incompatible(format!(
                "adapter has {} LoRA pairs; the layout expects {} layers x {:?}",
                adapter.pairs().len(),
                self.shape.num_layers,
                self.spec
                    .target_modules
                    .iter()
                    .map(|m| m.name())
                    .collect::<Vec<_>>()
            )));
        }
        let c = self.spec.chunk_width;
        let (th, tw) = self.token_shape();
        let mut out = vec![0f32; self.num_tokens() * th * tw];
        // Host copies of A and B^T, (r, width) row-major, for the target being written.
        let mut host: Option<HostPair> = None;
        for (i, slot) in self.slots().into_iter().enumerate() {
            if host.as_ref().is_none_or(|h| h.target != slot.target) {
                let p = adapter
                    .get(slot.target.layer, slot.target.module)
                    .ok_or_else(|| {
                        DndError::Incompatible(format!(
                            "adapter lacks layer {} {}",
                            slot.target.layer,
                            slot.target.module.name()
                        ))
                    })?;
                host = Some(HostPair::new(slot.target, p)?);
            }
            let h = host.as_ref().expect("set above");
            let (m, width) = if slot.is_a {
                (&h.a, h.a_width)
            } else {
                (&h.bt, h.bt_width)
            };
            let col0 = slot.chunk * c;
            let chunk: Vec<f64> = (0..r)
                .flat_map(|row| m[row * width + col0..row * width + col0 + c].iter())
                .map(|&v| v as f64)
                .collect();
            write_token(&chunk, r, c, &mut out[i * th * tw..(i + 1) * th * tw]);
        }
        Ok(Tensor::from_vec(out, (self.num_tokens(), th, tw), device)?)
    }

    /// The LoRA factors `(target, A (r, in), B (out, r))` of a `(T, r+2, c+2)` token tensor,
    /// computed with tensor operations so that gradients flow back to the tokens: what
    /// training a generator through the base model's loss needs. The same numbers as
    /// [`Self::detokenize`] (in the tokens' dtype instead of f64), without its finiteness check.
    pub fn factors(&self, tokens: &Tensor) -> Result<Vec<(LoraTarget, Tensor, Tensor)>> {
        let (th, tw) = self.token_shape();
        let t = self.num_tokens();
        if tokens.dims() != [t, th, tw] {
            return Err(DndError::Incompatible(format!(
                "token tensor has shape {:?}, this layout needs {:?}",
                tokens.dims(),
                [t, th, tw]
            )));
        }
        let tokens = &tokens.contiguous()?;
        let (r, c) = (self.spec.rank, self.spec.chunk_width);
        let dev = tokens.device();
        let index = |v: Vec<u32>| Tensor::new(v.as_slice(), dev);
        let even = index((0..tw as u32).step_by(2).collect())?;
        let odd = index((1..tw as u32).step_by(2).collect())?;
        // Each pair of statistics rows (and the interleaved rows of the last two columns)
        // holds one encoded (mean, std); the token's are their decoded averages.
        let (mut mean, mut std) = (None::<Tensor>, None::<Tensor>);
        for q in 0..2 {
            let row = tokens.narrow(1, r + q, 1)?.squeeze(1)?.contiguous()?;
            let cols =
                tokens.index_select(&index((q as u32..th as u32).step_by(2).collect())?, 1)?;
            let m = ((row.index_select(&even, 1)?.mean(1)?
                + cols.narrow(2, c, 1)?.squeeze(2)?.mean(1)?)?
                * 0.5)?;
            let s = ((row.index_select(&odd, 1)?.mean(1)?
                + cols.narrow(2, c + 1, 1)?.squeeze(2)?.mean(1)?)?
                * 0.5)?;
            let m = (m / 16.0)?;
            let s = ((((s - 1.6)?.exp()? - 0.1)? / 0.9)? * 0.5)?;
            mean = Some(match mean {
                Some(x) => (x + m)?,
                None => m,
            });
            std = Some(match std {
                Some(x) => (x + s)?,
                None => s,
            });
        }
        let (mean, std) = (
            mean.expect("two rows").reshape((t, 1, 1))?,
            std.expect("two rows").reshape((t, 1, 1))?,
        );
        let w = tokens
            .narrow(1, 0, r)?
            .narrow(2, 0, c)?
            .broadcast_mul(&std)?
            .broadcast_add(&mean)?;
        // Token order: per layer and module, A's column chunks, then B^T's.
        let mut out = Vec::with_capacity(self.shape.num_layers * self.spec.target_modules.len());
        let mut i = 0;
        let chunks = |i: usize, n: usize| -> Result<Tensor> {
            Ok(w.narrow(0, i, n)?.transpose(0, 1)?.reshape((r, n * c))?)
        };
        for layer in 0..self.shape.num_layers {
            for &module in &self.spec.target_modules {
                let (inp, outp) = self.shape.in_out(module);
                let a = chunks(i, inp / c)?;
                i += inp / c;
                let b = chunks(i, outp / c)?.t()?;
                i += outp / c;
                out.push((LoraTarget { layer, module }, a, b));
            }
        }
        Ok(out)
    }

    /// Turns a `(T, r+2, c+2)` token tensor (exact or generated) back into an adapter on
    /// `device`, using the spec's alpha. Non-finite tokens are an error.
    pub fn detokenize(&self, tokens: &Tensor, device: &Device) -> Result<LoraAdapter> {
        let (th, tw) = self.token_shape();
        let expect = [self.num_tokens(), th, tw];
        if tokens.dims() != expect {
            return Err(DndError::Incompatible(format!(
                "token tensor has shape {:?}, this layout needs {expect:?}",
                tokens.dims()
            )));
        }
        let host: Vec<f32> = tokens
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        if let Some(pos) = host.iter().position(|v| !v.is_finite()) {
            return Err(DndError::NonFinite(format!(
                "generated token {} holds a non-finite value",
                pos / (th * tw)
            )));
        }
        let (r, c) = (self.spec.rank, self.spec.chunk_width);
        // Per target: A (r, in) and B^T (r, out) row-major, filled chunk by chunk.
        let mut mats: BTreeMap<LoraTarget, (Vec<f32>, Vec<f32>)> = BTreeMap::new();
        for (i, slot) in self.slots().into_iter().enumerate() {
            let (inp, out) = self.shape.in_out(slot.target.module);
            let entry = mats
                .entry(slot.target)
                .or_insert_with(|| (vec![0.0; r * inp], vec![0.0; r * out]));
            let (m, width) = if slot.is_a {
                (&mut entry.0, inp)
            } else {
                (&mut entry.1, out)
            };
            let w = read_token(&host[i * th * tw..(i + 1) * th * tw], r, c);
            for row in 0..r {
                let dst = &mut m[row * width + slot.chunk * c..row * width + (slot.chunk + 1) * c];
                dst.copy_from_slice(&w[row * c..(row + 1) * c]);
            }
        }
        let mut pairs = BTreeMap::new();
        for (target, (a, bt)) in mats {
            let (inp, out) = self.shape.in_out(target.module);
            let a = Tensor::from_vec(a, (r, inp), device)?;
            let b = Tensor::from_vec(bt, (r, out), device)?.t()?.contiguous()?;
            pairs.insert(target, LoraPair { a, b });
        }
        LoraAdapter::new(r, self.spec.alpha, pairs)
    }
}

/// A LoRA pair copied to the host as `A` and `B^T`, both `(r, width)` row-major.
struct HostPair {
    target: LoraTarget,
    a: Vec<f32>,
    a_width: usize,
    bt: Vec<f32>,
    bt_width: usize,
}

impl HostPair {
    fn new(target: LoraTarget, p: &LoraPair) -> Result<Self> {
        let a = p.a.to_dtype(candle_core::DType::F32)?;
        let bt = p.b.to_dtype(candle_core::DType::F32)?.t()?.contiguous()?;
        Ok(Self {
            target,
            a_width: a.dim(1)?,
            bt_width: bt.dim(1)?,
            a: a.flatten_all()?.to_vec1()?,
            bt: bt.flatten_all()?.to_vec1()?,
        })
    }
}

/// Writes one `(r, c)` chunk as an `(r+2, c+2)` token into `dst`.
fn write_token(w: &[f64], r: usize, c: usize, dst: &mut [f32]) {
    let n = w.len() as f64;
    let mean = w.iter().sum::<f64>() / n;
    // Unbiased std; a chunk of one value has none, so it is taken as 1.
    let std = if w.len() > 1 {
        (w.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        1.0
    };
    // A constant chunk (PEFT's zero-initialised B) standardises to zeros and decodes to its mean.
    let inv = if std > 0.0 { 1.0 / std } else { 0.0 };
    let tw = c + 2;
    for row in 0..r {
        for col in 0..c {
            dst[row * tw + col] = ((w[row * c + col] - mean) * inv) as f32;
        }
    }
    let (m, s) = encode_stats(mean, std);
    let (m, s) = (m as f32, s as f32);
    for row in r..r + 2 {
        for col in 0..tw {
            dst[row * tw + col] = if col % 2 == 0 { m } else { s };
        }
    }
    for row in 0..r + 2 {
        dst[row * tw + c] = m;
        dst[row * tw + c + 1] = s;
    }
}

/// Reads one `(r+2, c+2)` token back into an `(r, c)` chunk.
///
/// The statistics are estimated twice per row parity q in {0, 1}: from last row `r+q`
/// (its (m', s') pairs along the width) and from the last two columns of the rows of parity q.
/// The two estimates are averaged, each parity's (m', s') is decoded, and the two decoded
/// (mean, std) are averaged.
fn read_token(t: &[f32], r: usize, c: usize) -> Vec<f32> {
    let (th, tw) = (r + 2, c + 2);
    let at = |row: usize, col: usize| t[row * tw + col] as f64;
    let (mut mean, mut std) = (0.0, 0.0);
    for q in 0..2 {
        let row = r + q;
        let pairs = tw / 2;
        let m_row = (0..pairs).map(|p| at(row, 2 * p)).sum::<f64>() / pairs as f64;
        let s_row = (0..pairs).map(|p| at(row, 2 * p + 1)).sum::<f64>() / pairs as f64;
        let rows: Vec<usize> = (q..th).step_by(2).collect();
        let m_col = rows.iter().map(|&i| at(i, c)).sum::<f64>() / rows.len() as f64;
        let s_col = rows.iter().map(|&i| at(i, c + 1)).sum::<f64>() / rows.len() as f64;
        let (m, s) = decode_stats((m_row + m_col) / 2.0, (s_row + s_col) / 2.0);
        mean += m / 2.0;
        std += s / 2.0;
    }
    let mut w = Vec::with_capacity(r * c);
    for row in 0..r {
        for col in 0..c {
            w.push((at(row, col) * std + mean) as f32);
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_encoding_inverts() {
        for (m, s) in [(0.0, 1.0), (-0.03, 0.002), (1.5, 7.0)] {
            let (em, es) = encode_stats(m, s);
            let (dm, ds) = decode_stats(em, es);
            assert!((dm - m).abs() < 1e-12 && (ds - s).abs() < 1e-12);
        }
    }

    #[test]
    fn token_round_trip_and_layout() {
        let (r, c) = (2, 4);
        let w: Vec<f64> = (0..r * c).map(|i| (i as f64 * 0.37).sin()).collect();
        let mut t = vec![0f32; (r + 2) * (c + 2)];
        write_token(&w, r, c, &mut t);
        // Last two columns hold (m', s') in every row, last rows alternate them.
        let (m, s) = (t[c], t[c + 1]);
        for row in 0..r + 2 {
            assert_eq!((t[row * (c + 2) + c], t[row * (c + 2) + c + 1]), (m, s));
        }
        assert_eq!(&t[r * (c + 2)..(r + 1) * (c + 2)], &[m, s, m, s, m, s]);
        let back = read_token(&t, r, c);
        for (a, b) in w.iter().zip(back) {
            assert!((*a as f32 - b).abs() < 1e-6);
        }
    }

    #[test]
    fn constant_chunk_decodes_to_its_value() {
        let (r, c) = (2, 2);
        let w = vec![0.0; 4];
        let mut t = vec![0f32; 16];
        write_token(&w, r, c, &mut t);
        assert!(t.iter().all(|v| v.is_finite()));
        let back = read_token(&t, r, c);
        assert!(back.iter().all(|v| v.abs() < 1e-6), "{back:?}");
    }

    #[test]
    fn a_module_the_model_lacks_is_refused() {
        let mut shape = BaseModelShape::smollm2_135m();
        shape.model_type = "phi2".into();
        let spec = |modules: Vec<Module>| LoraSpec {
            rank: 8,
            alpha: 16.0,
            chunk_width: 64,
            target_modules: modules,
        };
        let err = TokenLayout::new(shape.clone(), spec(Module::ALL.to_vec()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("gate_proj") && err.contains("no gate"),
            "{err}"
        );
        let gateless: Vec<Module> = Module::ALL
            .into_iter()
            .filter(|m| *m != Module::Gate)
            .collect();
        TokenLayout::new(shape, spec(gateless)).unwrap();
    }

    #[test]
    fn bad_chunk_width_names_module_and_suggests() {
        let spec = LoraSpec {
            rank: 8,
            alpha: 16.0,
            chunk_width: 100,
            target_modules: Module::ALL.to_vec(),
        };
        let err = TokenLayout::new(BaseModelShape::qwen25_05b(), spec).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("q_proj") && msg.contains("896"), "{msg}");
        assert!(msg.contains("128"), "suggestions must include 128: {msg}");
    }

    #[test]
    fn qwen_token_count_matches_the_paper() {
        let spec = LoraSpec {
            rank: 8,
            alpha: 16.0,
            chunk_width: 128,
            target_modules: Module::ALL.to_vec(),
        };
        let l = TokenLayout::new(BaseModelShape::qwen25_05b(), spec).unwrap();
        assert_eq!(l.tokens_per_layer(), 179);
        assert_eq!(l.num_tokens(), 4296);
        assert_eq!(l.token_shape(), (10, 130));
    }

    #[test]
    fn tensor_factors_equal_detokenize_and_carry_gradients() {
        let spec = LoraSpec {
            rank: 2,
            alpha: 4.0,
            chunk_width: 4,
            target_modules: vec![Module::Q, Module::Down],
        };
        let shape = BaseModelShape {
            model_type: "llama".into(),
            num_layers: 2,
            hidden: 8,
            intermediate: 12,
            q_dim: 8,
            kv_dim: 4,
        };
        let layout = TokenLayout::new(shape, spec).unwrap();
        let (th, tw) = layout.token_shape();
        // Random tokens whose statistics rows decode to positive stds.
        let dev = Device::Cpu;
        let tokens =
            (Tensor::randn(0f32, 0.5, (layout.num_tokens(), th, tw), &dev).unwrap() + 1.0).unwrap();
        let var = candle_core::Var::from_tensor(&tokens).unwrap();
        let adapter = layout.detokenize(&tokens, &dev).unwrap();
        let factors = layout.factors(var.as_tensor()).unwrap();
        assert_eq!(factors.len(), adapter.pairs().len());
        let mut total = Tensor::zeros((), candle_core::DType::F32, &dev).unwrap();
        for (target, a, b) in &factors {
            let p = adapter.get(target.layer, target.module).unwrap();
            assert_eq!((a.dims(), b.dims()), (p.a.dims(), p.b.dims()));
            let d = crate::test_util::max_abs_diff;
            assert!(d(a, &p.a) < 1e-5 && d(b, &p.b) < 1e-5, "{target:?}");
            total = (total + (a.sum_all().unwrap() + b.sum_all().unwrap()).unwrap()).unwrap();
        }
        // Every token reaches some factor: its core values with nonzero gradient.
        let g = total.backward().unwrap();
        let gt = g.get(var.as_tensor()).unwrap();
        let core = gt.narrow(1, 0, 2).unwrap().narrow(2, 0, 4).unwrap();
        let min = core.abs().unwrap().flatten_all().unwrap().min(0).unwrap();
        assert!(min.to_scalar::<f32>().unwrap() > 0.0);
    }
}
