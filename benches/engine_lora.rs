//! Decode throughput of per-sequence LoRA in the patched mistral.rs engine.
//!
//! SmolLM2-135M-Instruct (Q4_1 GGUF, CPU) from `scripts/fetch-assets.sh smollm2`. Prints decode
//! tokens/s for: base with no provider registered; a provider registered but the request
//! without an adapter; one rank-8 all-module adapter at batch 1, its factors in f32 and in f16
//! (`--lora-dtype f16`); and 8 sequences with 8 distinct adapters, with one adapter, and with
//! that adapter in f16, against 8 base sequences, each as a ratio to its baseline in the same
//! run.
//!
//!   cargo bench --features engine --bench engine_lora [-- --tokens 64 --rounds 3]

mod util;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use util::{arg, median};

use candle_core::{DType, Device, Tensor};
use mistralrs::{GgufModelBuilder, TokenSource};
use mistralrs_core::{NormalRequest, Request, RequestMessage, Response, SamplingParams};
use mistralrs_dnd::adapters::{BaseModelShape, Module};
use mistralrs_dnd::engine::{
    engine_module, set_adapter_provider, AdapterError, AdapterProvider, AdapterRequest,
    SequenceLora,
};

/// Request ids per adapter slot: rounds and sequences number the ids within a slot.
const SLOT: usize = 1_000_000;

const PROMPT: &str = "The history of the printing press begins";

/// Request ids `SLOT * (n + 1) + k` get adapter `n` of the pool; ids below `SLOT` get none.
struct PoolProvider {
    pool: Vec<Arc<SequenceLora>>,
}

#[async_trait::async_trait]
impl AdapterProvider for PoolProvider {
    async fn adapter_for(
        &self,
        request: &AdapterRequest<'_>,
    ) -> Result<Option<Arc<SequenceLora>>, AdapterError> {
        Ok(match request.request_id / SLOT {
            0 => None,
            n => Some(self.pool[(n - 1) % self.pool.len()].clone()),
        })
    }
}

/// A rank-8 adapter on all seven projections of every layer, weights of LoRA size drawn from
/// `seed` (A with std 1/sqrt(in), B with std 0.01), kept in `dtype`: the same seed gives the
/// same weights in any dtype.
fn random_adapter(shape: &BaseModelShape, seed: u64, dtype: DType) -> SequenceLora {
    let dev = Device::Cpu;
    // SplitMix64: candle's CPU device cannot be seeded.
    let mut state = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut uniform = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // In [-1, 1): variance 1/3.
        (z >> 11) as f32 / (1u64 << 52) as f32 - 1.0
    };
    let mut draw = |rows: usize, cols: usize, std: f32| {
        let scale = std * 3f32.sqrt();
        let v: Vec<f32> = (0..rows * cols).map(|_| uniform() * scale).collect();
        Tensor::from_vec(v, (rows, cols), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let mut lora = SequenceLora::new(format!("random-{seed}-{dtype:?}"));
    let r = 8;
    for layer in 0..shape.num_layers {
        for module in Module::ALL {
            let (d_in, d_out) = shape.in_out(module);
            let a = draw(r, d_in, 1.0 / (d_in as f32).sqrt());
            let b = draw(d_out, r, 0.01);
            lora.insert(layer, engine_module(module), &a, &b, 2.0)
                .unwrap();
        }
    }
    lora
}

struct Run {
    tokens: usize,
    seconds: f64,
}

/// Submits one request per id together and returns decode tokens and decode seconds (the
/// longest completion time: the sequences decode side by side).
async fn run(model: &mistralrs::Model, ids: &[usize], max_len: usize, ban: &[u32]) -> Run {
    let mut rxs = Vec::new();
    for &id in ids {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut sampling = SamplingParams::deterministic();
        sampling.max_len = Some(max_len);
        // Every run decodes exactly max_len tokens.
        sampling.logits_bias = Some(ban.iter().map(|&t| (t, -1e9)).collect::<HashMap<_, _>>());
        let req = NormalRequest::new_simple(
            RequestMessage::Completion {
                text: format!("{PROMPT} ({id})"),
                echo_prompt: false,
                best_of: None,
            },
            sampling,
            tx,
            id,
            None,
            None,
        );
        model
            .inner()
            .get_sender(None)
            .unwrap()
            .send(Request::Normal(Box::new(req)))
            .await
            .unwrap();
        rxs.push(rx);
    }
    let mut tokens = 0;
    let mut seconds: f64 = 0.0;
    for mut rx in rxs {
        match rx.recv().await {
            Some(Response::CompletionDone(done)) => {
                tokens += done.usage.completion_tokens;
                seconds = seconds.max(done.usage.total_completion_time_sec as f64);
            }
            Some(Response::ValidationError(e)) | Some(Response::InternalError(e)) => {
                panic!("request failed: {e}")
            }
            Some(Response::CompletionModelError(e, _)) => panic!("request failed: {e}"),
            _ => panic!("unexpected response"),
        }
    }
    Run { tokens, seconds }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let max_len = arg("--tokens", 64);
    let rounds = arg("--rounds", 3);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join(".assets/smollm2");
    let file = "SmolLM2-135M-Instruct.Q4_1.gguf";
    if !dir.join(file).exists() {
        eprintln!(
            "missing {}: run scripts/fetch-assets.sh smollm2",
            dir.join(file).display()
        );
        std::process::exit(2);
    }
    let shape = BaseModelShape::from_gguf(dir.join(file)).unwrap();
    let model = GgufModelBuilder::new(dir.to_str().unwrap(), vec![file])
        .with_token_source(TokenSource::None)
        .with_force_cpu()
        .with_max_num_seqs(16)
        .build()
        .await
        .expect("SmolLM2 loads");
    let model_id = model.inner().list_models().unwrap().remove(0);
    // <|endoftext|>, <|im_start|>, <|im_end|>
    let ban = [0u32, 1, 2];
    let provider: Arc<dyn AdapterProvider> = Arc::new(PoolProvider {
        // Eight f32 adapters, then the first one's weights in f16 (slot 9).
        pool: (0..8)
            .map(|s| Arc::new(random_adapter(&shape, s, DType::F32)))
            .chain([Arc::new(random_adapter(&shape, 0, DType::F16))])
            .collect(),
    });

    type Case = (&'static str, bool, Vec<usize>);
    let cases: Vec<Case> = vec![
        ("base, no provider registered (batch 1)", false, vec![1]),
        ("provider registered, no adapter (batch 1)", true, vec![2]),
        (
            "one rank-8 adapter, all modules (batch 1)",
            true,
            vec![SLOT + 1],
        ),
        (
            "the same adapter in f16 (batch 1)",
            true,
            vec![9 * SLOT + 1],
        ),
        ("8 base sequences (batch 8)", false, (10..18).collect()),
        (
            "8 sequences, 8 distinct adapters (batch 8)",
            true,
            (1..=8).map(|n| n * SLOT + 20).collect(),
        ),
        (
            "8 sequences, one adapter (batch 8)",
            true,
            (30..38).map(|n| SLOT + n).collect(),
        ),
        (
            "8 sequences, one adapter in f16 (batch 8)",
            true,
            (30..38).map(|n| 9 * SLOT + n).collect(),
        ),
    ];
    // Warm-up, then rounds with the cases interleaved so drift hits them alike.
    run(&model, &[3], 8, &ban).await;
    let mut tps: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for round in 0..rounds {
        for (i, (_, with_provider, ids)) in cases.iter().enumerate() {
            set_adapter_provider(&model_id, with_provider.then(|| provider.clone()));
            // New ids each round: no prefix-cache hits across rounds.
            let ids: Vec<usize> = ids.iter().map(|id| id + 1000 * (round + 1)).collect();
            let r = run(&model, &ids, max_len, &ban).await;
            tps[i].push(r.tokens as f64 / r.seconds);
        }
    }
    set_adapter_provider(&model_id, None);

    let t: Vec<f64> = tps.into_iter().map(median).collect();
    println!(
        "SmolLM2-135M-Instruct Q4_1, CPU, {max_len} decode tokens per sequence, median of {rounds} rounds"
    );
    println!("| case | decode tok/s | ratio | baseline | goal |");
    println!("|---|---|---|---|---|");
    let rows = [
        (0, 0, "-"),
        (1, 0, ">= 0.98"),
        (2, 0, ">= 0.95"),
        (3, 0, "-"),
        (4, 4, "-"),
        (5, 4, ">= 0.85"),
        (6, 4, "-"),
        (7, 4, "-"),
    ];
    for (i, base, goal) in rows {
        println!(
            "| {} | {:.1} | {:.3} | {} | {goal} |",
            cases[i].0,
            t[i],
            t[i] / t[base],
            if i == base { "itself" } else { cases[base].0 }
        );
    }
}
