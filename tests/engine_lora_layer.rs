//! Per-sequence LoRA on a real mistral.rs projection: each batch row gets its own adapter's
//! update, equal to running that row through the merged weights `W + alpha/r B A`.
#![cfg(feature = "engine")]

mod common;

use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::{assert_close, golden_path};
use mistralrs_dnd::adapters::{LoraAdapter, Module};
use mistralrs_dnd::engine::lora_layer::{LoraRouter, PerSequenceLora};
use mistralrs_quant::{QuantMethod, QuantMethodConfig, UnquantLinear};

struct Setup {
    w: Tensor,
    b: Tensor,
    base: Arc<dyn QuantMethod>,
    a1: Arc<LoraAdapter>,
    a2: Arc<LoraAdapter>,
}

fn setup() -> Setup {
    let dev = Device::Cpu;
    let weights =
        candle_core::safetensors::load(golden_path("tiny-qwen2/model.safetensors"), &dev).unwrap();
    let w = weights["model.layers.1.self_attn.q_proj.weight"].clone();
    let b = weights["model.layers.1.self_attn.q_proj.bias"].clone();
    let linear = candle_nn::Linear::new(w.clone(), Some(b.clone()));
    let base: Arc<dyn QuantMethod> =
        Arc::new(UnquantLinear::new(QuantMethodConfig::Unquantized(linear)).unwrap());
    let load = |n: &str| {
        Arc::new(LoraAdapter::load_peft(golden_path(&format!("tiny-qwen2/{n}")), &dev).unwrap())
    };
    Setup {
        w,
        b,
        base,
        a1: load("adapter1"),
        a2: load("adapter2"),
    }
}

/// `x (seq, in)` through `W + delta` with bias.
fn merged(s: &Setup, adapter: Option<&LoraAdapter>, x: &Tensor) -> Tensor {
    let w = match adapter {
        Some(a) => (&s.w + a.delta_weight(1, Module::Q).unwrap().unwrap()).unwrap(),
        None => s.w.clone(),
    };
    x.matmul(&w.t().unwrap())
        .unwrap()
        .broadcast_add(&s.b)
        .unwrap()
}

#[test]
fn each_row_gets_its_own_adapter() {
    let s = setup();
    let router = LoraRouter::new();
    let layer = PerSequenceLora::wrap(s.base.clone(), 1, Module::Q, router.clone());
    let x = Tensor::randn(0f32, 1.0, (5, 7, 64), &Device::Cpu).unwrap();
    let rows = [Some(&s.a1), Some(&s.a1), None, Some(&s.a2), Some(&s.a1)];
    router.set_batch(rows.iter().map(|r| r.cloned()).collect());
    let y = layer.forward(&x).unwrap();
    for (i, r) in rows.iter().enumerate() {
        let want = merged(&s, r.map(|a| a.as_ref()), &x.get(i).unwrap());
        assert_close(&format!("row {i}"), &y.get(i).unwrap(), &want, 1e-5);
    }
    // The adapters really differ from the base and from each other on these rows.
    let base_row0 = merged(&s, None, &x.get(0).unwrap());
    assert!(common::rel_err(&y.get(0).unwrap(), &base_row0) > 1e-2);
    // Base weights are never modified.
    assert_close("W", &s.base.dequantize_w().unwrap(), &s.w, 0.0);
}

#[test]
fn no_adapter_is_the_base_layer() {
    let s = setup();
    let router = LoraRouter::new();
    let layer = PerSequenceLora::wrap(s.base.clone(), 1, Module::Q, router.clone());
    let x = Tensor::randn(0f32, 1.0, (2, 3, 64), &Device::Cpu).unwrap();
    let want = s.base.forward(&x).unwrap();
    assert_close("cleared", &layer.forward(&x).unwrap(), &want, 0.0);
    router.set_batch(vec![None, None]);
    assert_close("all none", &layer.forward(&x).unwrap(), &want, 0.0);
    // An adapter without this (layer, module) leaves the row as the base computes it.
    let other = PerSequenceLora::wrap(s.base.clone(), 7, Module::Q, router.clone());
    router.set_batch(vec![Some(s.a1.clone()), None]);
    assert_close("untargeted", &other.forward(&x).unwrap(), &want, 0.0);
}

#[test]
fn a_routing_mismatch_is_an_error() {
    let s = setup();
    let router = LoraRouter::new();
    let layer = PerSequenceLora::wrap(s.base, 1, Module::Q, router.clone());
    router.set_batch(vec![Some(s.a1.clone())]);
    let x = Tensor::randn(0f32, 1.0, (2, 3, 64), &Device::Cpu).unwrap();
    let err = layer.forward(&x).unwrap_err().to_string();
    assert!(err.contains("1 adapters routed for a batch of 2"), "{err}");
}
