//! The training forward reproduces the transformers (+ PEFT) logits of the golden tiny models:
//! base, base + adapter1, base + adapter2, on both fixture prompts.

use dnd_core::test_util as common;

use candle_core::{Device, Tensor};
use common::{assert_close, golden_path, token_ids, Golden, GOLDEN_TOL};
use dnd_core::adapters::LoraAdapter;
use dnd_training::model::KvCache;
use dnd_training::CausalLm;

fn check(name: &str) {
    let dev = Device::Cpu;
    let model = CausalLm::load(golden_path(name), &dev).unwrap();
    let golden = Golden::load(&format!("{name}/expected.safetensors"));
    for case in ["base", "adapter1", "adapter2"] {
        let adapter = (case != "base")
            .then(|| LoraAdapter::load_peft(golden_path(name).join(case), &dev).unwrap());
        for seq in ["seq0", "seq1"] {
            let ids = token_ids(golden.get(&format!("input.{seq}.ids")));
            let ids = Tensor::new(ids.as_slice(), &dev)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = model
                .forward(&ids, adapter.as_ref())
                .unwrap()
                .squeeze(0)
                .unwrap();
            let want = golden.get(&format!("{case}.{seq}.logits"));
            assert_close(&format!("{name} {case} {seq}"), &logits, want, GOLDEN_TOL);
        }
    }
}

#[test]
fn qwen2_training_forward_matches_transformers() {
    check("tiny-qwen2");
}

#[test]
fn llama_training_forward_matches_transformers() {
    check("tiny-llama");
}

/// Incremental decoding over the key/value cache (a prefix, then one token at a time) gives the
/// transformers logits of every position, with an adapter (the path `dnd eval` decodes on).
fn check_cached(name: &str) {
    let dev = Device::Cpu;
    let model = CausalLm::load(golden_path(name), &dev).unwrap();
    let golden = Golden::load(&format!("{name}/expected.safetensors"));
    let adapter = LoraAdapter::load_peft(golden_path(name).join("adapter1"), &dev).unwrap();
    let ids = token_ids(golden.get("input.seq0.ids"));
    let want = golden.get("adapter1.seq0.logits");
    let split = ids.len() / 2;
    let mut cache = KvCache::default();
    let mut rows = Vec::new();
    for chunk in std::iter::once(&ids[..split]).chain(ids[split..].chunks(1)) {
        let x = Tensor::new(chunk, &dev).unwrap().unsqueeze(0).unwrap();
        let hidden = model.hidden(&x, Some(&adapter), Some(&mut cache)).unwrap();
        rows.push(model.logits(&hidden.squeeze(0).unwrap()).unwrap());
    }
    assert_eq!(cache.len(), ids.len());
    let logits = Tensor::cat(&rows, 0).unwrap();
    assert_close(&format!("{name} cached"), &logits, want, GOLDEN_TOL);
}

#[test]
fn qwen2_cached_decoding_matches_transformers() {
    check_cached("tiny-qwen2");
}

#[test]
fn llama_cached_decoding_matches_transformers() {
    check_cached("tiny-llama");
}
