//! Helpers for the tests of this workspace and of the server's (feature `test-util`): golden
//! fixtures, tolerance checks, the encoder's folder, a tiny random generator. They panic on
//! failure, as test helpers do; nothing in the library uses them.
#![allow(missing_docs)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// The repository's root (this crate lives in `crates/dnd-core`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// `tests/fixtures/golden/<name>`.
pub fn golden_path(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures/golden").join(name)
}

/// A golden safetensors file: its tensors (f32, CPU) and its `json` metadata entry.
pub struct Golden {
    pub tensors: HashMap<String, Tensor>,
    pub meta: serde_json::Value,
}

impl Golden {
    pub fn load(name: &str) -> Golden {
        let path = golden_path(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, md) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let json = md
            .metadata()
            .as_ref()
            .and_then(|m| m.get("json"))
            .expect("fixture has a json metadata entry");
        let meta = serde_json::from_str(json).unwrap();
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
        Golden { tensors, meta }
    }

    pub fn get(&self, key: &str) -> &Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("fixture lacks {key}"))
    }

    /// The tensors under `prefix.` with the prefix removed.
    pub fn with_prefix(&self, prefix: &str) -> HashMap<String, Tensor> {
        let p = format!("{prefix}.");
        self.tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(&p).map(|s| (s.to_string(), v.clone())))
            .collect()
    }
}

/// Max |a - b| over all elements, in f32 on the CPU.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let f32_cpu = |t: &Tensor| {
        t.to_dtype(DType::F32)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap()
    };
    (f32_cpu(a) - f32_cpu(b))
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Max |actual - expected| relative to max |expected|.
pub fn rel_err(actual: &Tensor, expected: &Tensor) -> f32 {
    let scale = max_abs_diff(expected, &expected.zeros_like().unwrap());
    max_abs_diff(actual, expected) / scale.max(f32::MIN_POSITIVE)
}

/// The tolerance the golden README states for a float32 port.
pub const GOLDEN_TOL: f32 = 1e-4;

/// Panics unless `actual` is within `tol` relative max error of `expected`.
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, tol: f32) {
    let e = rel_err(actual, expected);
    assert!(e <= tol, "{what}: relative max error {e:e} > {tol:e}");
}

/// The all-MiniLM-L6-v2 folder installed by `scripts/fetch-assets.sh` (or `$DND_ENCODER_DIR`).
pub fn encoder_dir() -> PathBuf {
    let dir = std::env::var_os("DND_ENCODER_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".assets/all-MiniLM-L6-v2"));
    assert!(
        dir.join("model.safetensors").exists(),
        "{} has no encoder: run scripts/fetch-assets.sh first",
        dir.display()
    );
    dir
}

/// Token ids stored as f32 in a fixture.
pub fn token_ids(t: &Tensor) -> Vec<u32> {
    t.to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

/// A rank-2 random generator for tiny-qwen2 (N = 4 prompts), written to `dir`.
pub fn tiny_generator(dir: &std::path::Path) -> PathBuf {
    tiny_generator_for(dir, "tiny-qwen2")
}

/// A rank-2 random generator for the golden model `model` (N = 4 prompts), written to `dir`.
pub fn tiny_generator_for(dir: &std::path::Path, model: &str) -> PathBuf {
    use crate::adapters::{BaseModelShape, LoraSpec, Module};
    use crate::generator::{checkpoint, presets, ConditionDecoder, GeneratorConfig};
    let shape = BaseModelShape::from_path(golden_path(model)).unwrap();
    let spec = LoraSpec {
        rank: 2,
        alpha: 16.0,
        chunk_width: 32,
        target_modules: Module::ALL.to_vec(),
    };
    let mut cfg =
        GeneratorConfig::new(shape, spec, presets::minilm(), 4, 16, None, &[], 3).unwrap();
    cfg.untrained = true;
    cfg.note = Some("random weights (test)".into());
    let (_, tensors) = ConditionDecoder::random(cfg.clone(), 3, &Device::Cpu, DType::F32).unwrap();
    let path = dir.join(format!("{model}-generator.safetensors"));
    checkpoint::save(&path, &cfg, &tensors).unwrap();
    path
}

/// Checks a "same" convolution `(x, w) -> y` against candle's `conv2d` on each
/// `(b, ci, co, h, w, k)` case, to `tol` relative error.
pub fn check_conv_same(
    cases: &[(usize, usize, usize, usize, usize, usize)],
    tol: f32,
    conv: impl Fn(&Tensor, &Tensor) -> Tensor,
) {
    let dev = candle_core::Device::Cpu;
    for &(b, ci, co, h, w, k) in cases {
        let x = Tensor::randn(0f32, 1.0, (b, ci, h, w), &dev).unwrap();
        let wt = Tensor::randn(0f32, 1.0, (co, ci, k, k), &dev).unwrap();
        let want = x.conv2d(&wt, k / 2, 1, 1, 1).unwrap();
        let err = rel_err(&conv(&x, &wt), &want);
        assert!(err < tol, "b{b} ci{ci} co{co} {h}x{w} k{k}: {err}");
    }
}
