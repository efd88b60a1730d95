//! The golden tiny models run through the real mistral.rs 0.8.1 engine reproduce the
//! transformers logits and greedy tokens: the ground the per-sequence LoRA work stands on.
#![cfg(feature = "engine")]

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, golden_path, Golden};
use mistralrs::{ModelDType, TextModelBuilder, TokenSource};
use mistralrs_core::Response;

async fn load(name: &str) -> mistralrs::Model {
    TextModelBuilder::new(golden_path(name).to_str().unwrap())
        .with_token_source(TokenSource::None)
        .with_dtype(ModelDType::F32)
        .with_force_cpu()
        .build()
        .await
        .unwrap_or_else(|e| panic!("{name} loads: {e}"))
}

/// The full-prompt logits `(len, vocab)` the engine computes for `ids`.
async fn prompt_logits(model: &mistralrs::Model, ids: Vec<u32>, id: usize) -> Tensor {
    let (mut req, mut rx) = common::engine::token_request(ids, id, 1);
    req.return_raw_logits = true;
    common::engine::send(model, req).await;
    match rx.recv().await {
        Some(Response::Raw { logits_chunks, .. }) => {
            let chunks: Vec<Tensor> = logits_chunks
                .into_iter()
                .map(|t| {
                    t.to_device(&Device::Cpu)
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap()
                })
                .collect();
            Tensor::cat(&chunks, 0).unwrap()
        }
        other => panic!(
            "expected raw logits, got {:?}",
            other.map(|_| "another response")
        ),
    }
}

async fn base_matches(name: &str) {
    let g = Golden::load(&format!("{name}/expected.safetensors"));
    let model = load(name).await;
    for seq in 0..2 {
        let prompt = common::token_ids(g.get(&format!("input.seq{seq}.ids")));
        let want = g.get(&format!("base.seq{seq}.logits"));
        let got = prompt_logits(&model, prompt.clone(), 100 + seq).await;
        let got = got.reshape(want.dims()).unwrap();
        assert_close(&format!("{name} seq{seq} logits"), &got, want, 1e-4);
        // The adapters move these logits far beyond the tolerance: the comparison can tell.
        let adapted = g.get(&format!("adapter1.seq{seq}.logits"));
        assert!(common::rel_err(&got, adapted) > 1e-2);

        // Greedy continuation, one prefill per step.
        let mut toks = prompt.clone();
        for step in 0..8 {
            let l = prompt_logits(&model, toks.clone(), 200 + seq * 10 + step).await;
            let last = l.get(l.dim(0).unwrap() - 1).unwrap();
            toks.push(last.argmax(0).unwrap().to_scalar::<u32>().unwrap());
        }
        assert_eq!(
            &toks[prompt.len()..],
            common::token_ids(g.get(&format!("base.seq{seq}.greedy"))).as_slice(),
            "{name} seq{seq} greedy tokens"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_qwen2_base_matches_transformers() {
    base_matches("tiny-qwen2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_llama_base_matches_transformers() {
    base_matches("tiny-llama").await;
}
