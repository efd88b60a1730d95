//! The hyper-convolutional decoder and the condition projection against the reference.

use dnd_core::test_util as common;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use common::{assert_close, Golden, GOLDEN_TOL};
use dnd_core::generator::{ConditionProjection, Features, HyperConvDecoder};

fn features(meta: &serde_json::Value) -> Vec<Features> {
    serde_json::from_value(meta["features"].clone()).unwrap()
}

fn decoder_from(g: &Golden, prefix: &str) -> HyperConvDecoder {
    let k = g.meta["kernel_size"].as_u64().unwrap() as usize;
    let vb = VarBuilder::from_tensors(g.with_prefix(prefix), DType::F32, &Device::Cpu);
    HyperConvDecoder::new(&features(&g.meta), k, vb.pp("decoder")).unwrap()
}

#[test]
fn small_k3_decoder_matches_reference() {
    let g = Golden::load("decoder_small_k3.safetensors");
    let dec = decoder_from(&g, "weights");
    let out = dec.forward(g.get("input")).unwrap();
    assert_close("decoder_small_k3", &out, g.get("output"), GOLDEN_TOL);
}

#[test]
fn residual_k5_decoder_matches_reference() {
    let g = Golden::load("decoder_residual_k5.safetensors");
    let f = features(&g.meta);
    assert_eq!(f[0], f[1], "the fixture must exercise the residual path");
    let dec = decoder_from(&g, "weights");
    let out = dec.forward(g.get("input")).unwrap();
    assert_close("decoder_residual_k5", &out, g.get("output"), GOLDEN_TOL);
}

#[test]
fn residual_path_matters() {
    // The reference output is far from the stages composed without the residual add, so the
    // decoder's match with it (residual_k5_decoder_matches_reference) needs the add.
    let g = Golden::load("decoder_residual_k5.safetensors");
    let dec = decoder_from(&g, "weights");
    let mut h = g.get("input").clone();
    for stage in dec.stages() {
        h = stage.forward(&h).unwrap();
    }
    let err = common::rel_err(&h, g.get("output"));
    assert!(
        err > 1e-2,
        "the reference output equals the residual-free composition ({err}): the fixture does \
         not exercise the residual path"
    );
}

#[test]
fn bf16_decoder_stays_near_f32() {
    let g = Golden::load("decoder_small_k3.safetensors");
    let k = g.meta["kernel_size"].as_u64().unwrap() as usize;
    let vb = VarBuilder::from_tensors(g.with_prefix("weights"), DType::BF16, &Device::Cpu);
    let dec = HyperConvDecoder::new(&features(&g.meta), k, vb.pp("decoder")).unwrap();
    let out = dec
        .forward(&g.get("input").to_dtype(DType::BF16).unwrap())
        .unwrap();
    assert_eq!(out.dtype(), DType::BF16);
    let err = common::rel_err(&out, g.get("output"));
    assert!(err < 5e-2, "bf16 error {err}");
}

#[test]
fn wrong_weight_shapes_are_refused() {
    let g = Golden::load("decoder_small_k3.safetensors");
    let mut f = features(&g.meta);
    f[1][2] += 2;
    let vb = VarBuilder::from_tensors(g.with_prefix("weights"), DType::F32, &Device::Cpu);
    assert!(HyperConvDecoder::new(&f, 3, vb.pp("decoder")).is_err());
    let vb = VarBuilder::from_tensors(g.with_prefix("weights"), DType::F32, &Device::Cpu);
    assert!(HyperConvDecoder::new(&features(&g.meta), 4, vb.pp("decoder")).is_err());
}

#[test]
fn condition_projection_is_a_raw_view() {
    // The projection alone, checked against plain matrix products on the raw reinterpretation.
    let g = Golden::load("pipeline_superlarge.safetensors");
    let w = g.with_prefix("weights");
    let vb = VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu);
    let (l, lp) = (64, 16);
    let proj = ConditionProjection::new(l, lp, vb).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, 2, l, 384), &Device::Cpu).unwrap();
    let got = proj.forward(&x).unwrap();
    let flat = x.reshape((2 * 384, l)).unwrap();
    let d = flat
        .matmul(&w["down_proj.weight"].t().unwrap())
        .unwrap()
        .broadcast_add(&w["down_proj.bias"])
        .unwrap();
    let e = d
        .matmul(&w["gate_proj.weight"].t().unwrap())
        .unwrap()
        .broadcast_add(&w["gate_proj.bias"])
        .unwrap()
        .reshape((1, 2, lp, 384))
        .unwrap();
    assert_close("projection", &got, &e, 1e-5);
}
