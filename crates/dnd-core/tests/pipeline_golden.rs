//! Prompts to tokens end to end through the public `Generator` API, against the reference
//! pipelines; checkpoints built by the converter.

use dnd_core::test_util as common;

use std::path::PathBuf;

use candle_core::Device;
use common::{assert_close, encoder_dir, golden_path, Golden, GOLDEN_TOL};
use dnd_core::adapters::{BaseModelShape, LoraSpec, Module};
use dnd_core::convert::{convert_pth, convert_state_dict, ConvertOptions};
use dnd_core::generator::checkpoint;
use dnd_core::{Generator, LoadOptions};

/// A fresh path per call: tests run in parallel and must not share files.
fn tmp(name: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let i = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("dnd-pipeline-{}-{i}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// A one-layer base model whose q_proj alone yields `in/c + out/c` tokens.
fn q_only(hidden: usize, q_dim: usize, rank: usize, chunk: usize) -> ConvertOptions {
    ConvertOptions {
        base_model: BaseModelShape {
            model_type: "test".into(),
            num_layers: 1,
            hidden,
            intermediate: hidden,
            q_dim,
            kv_dim: hidden,
        },
        base_model_name: Some("fixture".into()),
        lora: LoraSpec {
            rank,
            alpha: 2.0 * rank as f64,
            chunk_width: chunk,
            target_modules: vec![Module::Q],
        },
        encoder_name: "all-MiniLM-L6-v2".into(),
    }
}

/// The fullcond fixture's tokens are (6, 10, 20): rank 8, chunk 18, q_proj 54 -> 54.
fn fullcond_generator() -> (Golden, Generator) {
    let g = Golden::load("pipeline_fullcond.safetensors");
    let conv = convert_state_dict(g.with_prefix("weights"), &q_only(54, 54, 8, 18)).unwrap();
    assert!(conv.dropped.is_empty());
    assert_eq!(conv.config.num_prompts, 3);
    assert_eq!(conv.config.max_length, 32);
    assert_eq!(conv.config.kernel_size, 3);
    let path = tmp("fullcond.safetensors");
    checkpoint::save(&path, &conv.config, &conv.tensors).unwrap();
    let gen = Generator::load(&path, encoder_dir(), &LoadOptions::default()).unwrap();
    (g, gen)
}

fn prompts(g: &Golden) -> Vec<String> {
    serde_json::from_value(g.meta["prompts"].clone()).unwrap()
}

#[test]
fn fullcond_pipeline_matches_reference() {
    let (g, gen) = fullcond_generator();
    let p = prompts(&g);
    let cond = gen.condition(&p).unwrap();
    let tokens = gen.condition_decoder().forward(&cond).unwrap();
    assert_close("pipeline_fullcond", &tokens, g.get("output"), GOLDEN_TOL);

    // generate() is detokenize(tokens).
    let adapter = gen.generate(&p).unwrap();
    let want = gen
        .layout()
        .detokenize(&g.get("output").squeeze(0).unwrap(), &Device::Cpu)
        .unwrap();
    let (a, b) = (
        adapter.get(0, Module::Q).unwrap(),
        want.get(0, Module::Q).unwrap(),
    );
    assert_close("A", &a.a, &b.a, 1e-3);
    assert_close("B", &a.b, &b.b, 1e-3);
    assert_eq!(adapter.get(0, Module::Q).unwrap().a.dims(), [8, 54]);
}

#[test]
fn superlarge_pth_converts_and_matches_reference() {
    // tokens (3, 8, 16): rank 6, chunk 14, q_proj 14 -> 28.
    let g = Golden::load("pipeline_superlarge.safetensors");
    let pth = golden_path("../pth/superlarge.pth");
    let out = tmp("superlarge.safetensors");
    let conv = convert_pth(&pth, &out, &q_only(14, 28, 6, 14)).unwrap();
    assert_eq!(conv.config.max_length, 64);
    assert_eq!(conv.config.modified_length, Some(16));
    assert!(conv.tensors.contains_key("criterion_weight"));
    let gen = Generator::load(&out, encoder_dir(), &LoadOptions::default()).unwrap();
    let tokens = gen
        .condition_decoder()
        .forward(&gen.condition(&prompts(&g)).unwrap())
        .unwrap();
    assert_close("pipeline_superlarge", &tokens, g.get("output"), GOLDEN_TOL);
}

#[test]
fn fewer_prompts_are_cycled() {
    let (g, gen) = fullcond_generator();
    let p = prompts(&g);
    let two = gen.condition(&p[..2]).unwrap();
    let cycled = gen.condition(&[&p[0], &p[1], &p[0]]).unwrap();
    assert_close("cycled", &two, &cycled, 0.0);
}

#[test]
fn bad_prompt_sets_get_clear_errors() {
    let (_, gen) = fullcond_generator();
    let empty: [&str; 0] = [];
    assert!(gen
        .generate(&empty)
        .unwrap_err()
        .to_string()
        .contains("no prompts"));
    assert!(gen
        .generate(&["ok", ""])
        .unwrap_err()
        .to_string()
        .contains("prompt 1"));
    assert!(gen
        .generate(&["a", "b", "c", "d"])
        .unwrap_err()
        .to_string()
        .contains("at most 3"));
}

#[test]
fn another_base_model_is_refused() {
    let (_, gen) = fullcond_generator();
    let tiny = BaseModelShape::from_config_file(golden_path("tiny-qwen2")).unwrap();
    let err = gen.check_base_model(&tiny).unwrap_err().to_string();
    assert!(err.contains("trained for fixture"), "{err}");
    gen.check_base_model(&gen.config().base_model.clone())
        .unwrap();
}

#[test]
fn converter_checks_the_token_shape() {
    let g = Golden::load("pipeline_fullcond.safetensors");
    // Rank 6 would need tokens of height 8, the decoder ends at 10.
    let err = convert_state_dict(g.with_prefix("weights"), &q_only(54, 54, 6, 18)).unwrap_err();
    assert!(err.to_string().contains("last stage"), "{err}");
}

#[test]
fn plain_safetensors_is_not_a_checkpoint() {
    let path = golden_path("decoder_small_k3.safetensors");
    let err = Generator::load(&path, encoder_dir(), &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not a DnD generator checkpoint"), "{err}");
    let junk = tmp("junk.pth");
    std::fs::write(&junk, b"not a zip").unwrap();
    assert!(dnd_core::convert::read_pth(&junk).is_err());
}

#[test]
fn bf16_generator_follows_f32() {
    let (g, _) = fullcond_generator();
    let conv = convert_state_dict(g.with_prefix("weights"), &q_only(54, 54, 8, 18)).unwrap();
    let path = tmp("fullcond-bf16.safetensors");
    checkpoint::save(&path, &conv.config, &conv.tensors).unwrap();
    let opts = LoadOptions {
        device: Device::Cpu,
        dtype: candle_core::DType::BF16,
    };
    let gen = Generator::load(&path, encoder_dir(), &opts).unwrap();
    let cond = gen.condition(&prompts(&g)).unwrap();
    assert_eq!(cond.dtype(), candle_core::DType::BF16);
    let tokens = gen.condition_decoder().forward(&cond).unwrap();
    assert_close("bf16 pipeline", &tokens, g.get("output"), 5e-2);
    let adapter = gen.generate(&prompts(&g)).unwrap();
    adapter.check_finite().unwrap();
}
