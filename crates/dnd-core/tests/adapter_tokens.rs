//! Parameter tokenization against the reference fixture, and PEFT round trips.

use dnd_core::test_util as common;

use candle_core::{Device, Tensor};
use common::{assert_close, golden_path, Golden, GOLDEN_TOL};
use dnd_core::adapters::{BaseModelShape, LoraAdapter, LoraSpec, Module, TokenLayout};

/// The fixture's two Qwen2.5-0.5B layers as an adapter (layer indices as stored).
fn fixture_adapter(g: &Golden, prefix: &str, alpha: f64) -> LoraAdapter {
    let dir = tempdir("fixture-adapter");
    let tensors: std::collections::HashMap<String, Tensor> = g
        .with_prefix(prefix)
        .into_iter()
        .map(|(k, v)| (format!("base_model.model.{k}"), v))
        .collect();
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        format!(r#"{{"peft_type":"LORA","r":8,"lora_alpha":{alpha}}}"#),
    )
    .unwrap();
    LoraAdapter::load_peft(&dir, &Device::Cpu).unwrap()
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("dnd-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn qwen_two_layers() -> TokenLayout {
    let shape = BaseModelShape {
        num_layers: 2,
        ..BaseModelShape::qwen25_05b()
    };
    TokenLayout::new(
        shape,
        LoraSpec {
            rank: 8,
            alpha: 16.0,
            chunk_width: 128,
            target_modules: Module::ALL.to_vec(),
        },
    )
    .unwrap()
}

#[test]
fn tokens_match_reference() {
    let g = Golden::load("tokenizer_qwen25_05b.safetensors");
    let layout = qwen_two_layers();
    let adapter = fixture_adapter(&g, "lora", 16.0);
    let tokens = layout.tokenize(&adapter, &Device::Cpu).unwrap();
    assert_eq!(tokens.dims(), g.get("tokens").dims());
    assert_close("tokens", &tokens, g.get("tokens"), GOLDEN_TOL);
}

fn assert_adapter_matches(layout: &TokenLayout, got: &LoraAdapter, g: &Golden, prefix: &str) {
    for layer in 0..2 {
        for m in Module::ALL {
            let p = got.get(layer, m).unwrap();
            let key = |ab: &str| {
                format!(
                    "{prefix}.model.layers.{layer}.{}.lora_{ab}.weight",
                    m.path()
                )
            };
            assert_close(&key("A"), &p.a, g.get(&key("A")), GOLDEN_TOL);
            assert_close(&key("B"), &p.b, g.get(&key("B")), GOLDEN_TOL);
        }
    }
    assert_eq!(got.pairs().len(), 2 * 7);
    assert_eq!(got.rank(), layout.spec().rank);
}

#[test]
fn detokenize_restores_lora_and_matches_noisy_reference() {
    let g = Golden::load("tokenizer_qwen25_05b.safetensors");
    let layout = qwen_two_layers();
    // Tokenization loses nothing: the reference's own round trip equalled its input within 9e-8.
    let rt = layout.detokenize(g.get("tokens"), &Device::Cpu).unwrap();
    assert_adapter_matches(&layout, &rt, &g, "lora");
    // A generator's output is never an exact token: the noisy decode pins the averaging rule.
    let noisy = layout
        .detokenize(g.get("noisy_tokens"), &Device::Cpu)
        .unwrap();
    assert_adapter_matches(&layout, &noisy, &g, "from_noisy");
}

#[test]
fn peft_adapter_round_trips_through_tokens_and_disk() {
    // The golden tiny-qwen2 adapter2 is a real PEFT export (r=8, alpha=8, seven modules).
    let dir = golden_path("tiny-qwen2/adapter2");
    let adapter = LoraAdapter::load_peft(&dir, &Device::Cpu).unwrap();
    let shape = BaseModelShape::from_config_file(golden_path("tiny-qwen2")).unwrap();
    let spec = LoraSpec {
        rank: adapter.rank(),
        alpha: adapter.alpha(),
        chunk_width: 16,
        target_modules: adapter.target_modules(),
    };
    let layout = TokenLayout::new(shape, spec).unwrap();
    let tokens = layout.tokenize(&adapter, &Device::Cpu).unwrap();
    let back = layout.detokenize(&tokens, &Device::Cpu).unwrap();
    let out = tempdir("peft-roundtrip");
    back.save_peft(&out, Some("tiny-qwen2")).unwrap();
    let reloaded = LoraAdapter::load_peft(&out, &Device::Cpu).unwrap();
    assert_eq!(reloaded.alpha(), 8.0);
    assert_eq!(reloaded.rank(), 8);
    assert_eq!(reloaded.pairs().len(), adapter.pairs().len());
    for (t, p) in adapter.pairs() {
        let q = reloaded.get(t.layer, t.module).unwrap();
        assert_close("A", &q.a, &p.a, 1e-5);
        assert_close("B", &q.b, &p.b, 1e-5);
    }
}

#[test]
fn tokenize_refuses_a_mismatched_adapter() {
    let adapter = LoraAdapter::load_peft(golden_path("tiny-qwen2/adapter1"), &Device::Cpu).unwrap();
    let err = qwen_two_layers()
        .tokenize(&adapter, &Device::Cpu)
        .unwrap_err();
    assert!(err.to_string().contains("rank"), "{err}");
}
