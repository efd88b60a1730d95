//! Helpers shared by the integration tests: golden fixtures and tolerance checks.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// `tests/fixtures/golden/<name>`.
pub fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/golden")
        .join(name)
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

pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, tol: f32) {
    let e = rel_err(actual, expected);
    assert!(e <= tol, "{what}: relative max error {e:e} > {tol:e}");
}

/// The all-MiniLM-L6-v2 folder installed by `scripts/fetch-assets.sh` (or `$DND_ENCODER_DIR`).
pub fn encoder_dir() -> PathBuf {
    let dir = std::env::var_os("DND_ENCODER_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".assets/all-MiniLM-L6-v2")
        });
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

/// Requests to the mistral.rs engine (feature `engine`).
#[cfg(feature = "engine")]
pub mod engine {
    use mistralrs_core::{NormalRequest, Request, RequestMessage, Response, SamplingParams};
    use tokio::sync::mpsc::Receiver;

    /// A greedy request continuing token ids `ids` by up to `max_len` tokens, and its receiver.
    pub fn token_request(
        ids: Vec<u32>,
        id: usize,
        max_len: usize,
    ) -> (NormalRequest, Receiver<Response>) {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let mut sampling = SamplingParams::deterministic();
        // deterministic() clears max_len; set it after.
        sampling.max_len = Some(max_len);
        let req = NormalRequest::new_simple(
            RequestMessage::CompletionTokens(ids),
            sampling,
            tx,
            id,
            None,
            None,
        );
        (req, rx)
    }

    /// Hands `req` to the model's engine.
    pub async fn send(model: &mistralrs::Model, req: NormalRequest) {
        model
            .inner()
            .get_sender(None)
            .unwrap()
            .send(Request::Normal(Box::new(req)))
            .await
            .unwrap();
    }
}

/// A rank-2 random generator for tiny-qwen2 (N = 4 prompts), written to `dir`.
pub fn tiny_generator(dir: &std::path::Path) -> PathBuf {
    use mistralrs_dnd::adapters::{BaseModelShape, LoraSpec, Module};
    use mistralrs_dnd::generator::{checkpoint, presets, ConditionDecoder, GeneratorConfig};
    let shape = BaseModelShape::from_path(golden_path("tiny-qwen2")).unwrap();
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
    let path = dir.join("tiny-generator.safetensors");
    checkpoint::save(&path, &cfg, &tensors).unwrap();
    path
}
