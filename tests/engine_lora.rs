//! Per-sequence LoRA through the real (patched) mistral.rs engine: the golden tiny models with
//! adapter1 / adapter2 / no adapter reproduce the transformers+peft logits and greedy tokens,
//! also when submitted together so that they share batches; the prefix cache never crosses
//! adapters; provider errors become request errors; a slow provider stalls only its request.
#![cfg(feature = "engine")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, golden_path, Golden};
use mistralrs::{
    ModelDType, MultimodalLoaderType, MultimodalModelBuilder, TextModelBuilder, TokenSource,
};
use mistralrs_core::Response;
use mistralrs_dnd::adapters::{BaseModelShape, LoraAdapter};
use mistralrs_dnd::engine::load::{load_gguf, GgufOptions};
use mistralrs_dnd::engine::{
    set_adapter_provider, to_sequence_lora, AdapterError, AdapterProvider, AdapterRequest,
    SequenceLora,
};
use tokio::sync::mpsc::Receiver;

/// Request ids encode what the test provider does: `kind * 1000 + n`.
const BASE: usize = 0;
const ADAPTER1: usize = 1;
const ADAPTER2: usize = 2;
const REFUSE: usize = 5;
const FAIL: usize = 6;
const SLOW_ADAPTER1: usize = 7;

struct TestProvider {
    adapters: [Arc<SequenceLora>; 2],
}

#[async_trait::async_trait]
impl AdapterProvider for TestProvider {
    async fn adapter_for(
        &self,
        request: &AdapterRequest<'_>,
    ) -> Result<Option<Arc<SequenceLora>>, AdapterError> {
        match request.request_id / 1000 {
            BASE => Ok(None),
            ADAPTER1 => Ok(Some(self.adapters[0].clone())),
            ADAPTER2 => Ok(Some(self.adapters[1].clone())),
            REFUSE => Err(AdapterError::InvalidRequest(
                "test: too many prompts".into(),
            )),
            FAIL => Err(AdapterError::Failed("test: generator produced NaN".into())),
            SLOW_ADAPTER1 => {
                tokio::time::sleep(Duration::from_secs(3)).await;
                Ok(Some(self.adapters[0].clone()))
            }
            other => panic!("no test behaviour for request kind {other}"),
        }
    }
}

/// How a golden model is loaded: its safetensors folder, or its GGUF copy
/// (`model-f32.gguf`, scripts/make_tiny_gguf.py) through mistral.rs's GGUF loader for the
/// family, or Phi-2's second GGUF copy in llama.cpp's current layout (`model-f32-split.gguf`:
/// q, k and v apart), or its safetensors folder through the multimodal loader (Gemma 3, whose
/// text-only checkpoints mistral.rs 0.8.1 loads only there).
#[derive(Clone, Copy, Debug)]
enum Format {
    Safetensors,
    Gguf,
    GgufSplitQkv,
    Gemma3,
}

/// Loads golden model `name` and registers the test provider for it; the provider's two
/// adapters (kept in f32) with it.
async fn load(name: &str, format: Format) -> (mistralrs::Model, [Arc<SequenceLora>; 2]) {
    load_with(name, format, DType::F32, None).await
}

/// [`load`] with the adapters kept in `adapters` (the server's `--lora-dtype`), and a `tag` for
/// a test that must not share its model with another of the same format and dtype. The engine
/// names a model by its folder and providers are registered by that name, process-wide, so
/// tests of one golden model running side by side would take over each other's requests: all
/// but the plain load (safetensors, f32, no tag) go through a link of their own to the folder.
async fn load_with(
    name: &str,
    format: Format,
    adapters: DType,
    tag: Option<&str>,
) -> (mistralrs::Model, [Arc<SequenceLora>; 2]) {
    let golden = golden_path(name);
    let dir = match (format, adapters, tag) {
        (Format::Safetensors, DType::F32, None) => golden.clone(),
        _ => {
            let link = std::env::temp_dir().join(format!(
                "dnd-engine-lora-{}-{name}-{format:?}-{adapters:?}-{}",
                std::process::id(),
                tag.unwrap_or("")
            ));
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&golden, &link).unwrap();
            link
        }
    };
    let (model, shape) = match format {
        Format::Safetensors => (
            TextModelBuilder::new(dir.to_str().unwrap())
                .with_token_source(TokenSource::None)
                .with_dtype(ModelDType::F32)
                .with_force_cpu()
                .build()
                .await,
            BaseModelShape::from_path(&dir),
        ),
        Format::Gemma3 => (
            MultimodalModelBuilder::new(dir.to_str().unwrap())
                .with_loader_type(MultimodalLoaderType::Gemma3)
                .with_token_source(TokenSource::None)
                .with_dtype(ModelDType::F32)
                .with_force_cpu()
                .build()
                .await,
            BaseModelShape::from_path(&dir),
        ),
        Format::Gguf => (
            load_gguf_f32(&dir, GGUF_FILE).await,
            // The shape from the GGUF metadata, as the server reads it for a GGUF model.
            BaseModelShape::from_path(dir.join(GGUF_FILE)),
        ),
        Format::GgufSplitQkv => (
            load_gguf_f32(&dir, GGUF_SPLIT_FILE).await,
            BaseModelShape::from_path(dir.join(GGUF_SPLIT_FILE)),
        ),
    };
    let model = model.unwrap_or_else(|e| panic!("{name} loads: {e:#}"));
    // The model's shape splits fused projections (Phi-3) into their parts.
    let shape = shape.unwrap();
    let lora = |adapter: &str| {
        let a =
            LoraAdapter::load_peft_for(golden.join(adapter), &Device::Cpu, Some(&shape)).unwrap();
        Arc::new(to_sequence_lora(&a, format!("{name}/{adapter}"), &Device::Cpu, adapters).unwrap())
    };
    let adapters = [lora("adapter1"), lora(second_adapter(name))];
    let provider = TestProvider {
        adapters: adapters.clone(),
    };
    let models = model.inner().list_models().unwrap();
    assert_eq!(models.len(), 1, "one model: {models:?}");
    set_adapter_provider(&models[0], Some(Arc::new(provider)));
    (model, adapters)
}

/// The adapter in the provider's second slot: adapter2, or where the fixture has none (Phi-2's,
/// Starcoder2's and Mixtral's, to keep the repository small) a second copy of adapter1, which has its own
/// uid and so is a different adapter to the engine.
fn second_adapter(name: &str) -> &'static str {
    if golden_path(name).join("adapter2").exists() {
        "adapter2"
    } else {
        "adapter1"
    }
}

/// The GGUF copy of a golden model, next to its safetensors.
const GGUF_FILE: &str = "model-f32.gguf";
/// Phi-2's GGUF copy in llama.cpp's current layout.
const GGUF_SPLIT_FILE: &str = "model-f32-split.gguf";

/// Loads a golden model's GGUF copy with f32 activations (mistral.rs's own choice, bf16 on a
/// CPU, would move its logits about 1e-3 from the f32 goldens, beyond the 1e-4 tolerance that
/// tells the adapters' effect apart). The tokenizer comes from the folder (the GGUF copies
/// carry none).
async fn load_gguf_f32(dir: &std::path::Path, file: &str) -> anyhow::Result<mistralrs::Model> {
    load_gguf(&GgufOptions {
        dir: dir.to_path_buf(),
        files: vec![file.to_string()],
        tokenizer_dir: Some(dir.to_path_buf()),
        chat_template: None,
        dtype: ModelDType::F32,
        force_cpu: true,
        max_seqs: 32,
        prefix_cache_n: None,
    })
    .await
}

async fn submit(
    model: &mistralrs::Model,
    ids: Vec<u32>,
    id: usize,
    raw_logits: bool,
) -> Receiver<Response> {
    let (mut req, rx) = common::engine::token_request(ids, id, if raw_logits { 1 } else { 8 });
    req.sampling_params.top_n_logprobs = 1;
    req.return_raw_logits = raw_logits;
    req.return_logprobs = !raw_logits;
    common::engine::send(model, req).await;
    rx
}

async fn logits_of(rx: &mut Receiver<Response>) -> Tensor {
    match rx.recv().await {
        Some(Response::Raw { logits_chunks, .. }) => {
            let chunks: Vec<Tensor> = logits_chunks
                .into_iter()
                .map(|t| t.to_device(&Device::Cpu).unwrap())
                .collect();
            Tensor::cat(&chunks, 0).unwrap()
        }
        other => panic!("expected raw logits, got {}", describe(&other)),
    }
}

async fn text_of(rx: &mut Receiver<Response>) -> String {
    match rx.recv().await {
        Some(Response::CompletionDone(done)) => done.choices[0].text.clone(),
        other => panic!("expected a completion, got {}", describe(&other)),
    }
}

/// Per generated step, the top logprobs as (token id, logprob), best first.
async fn steps_of(rx: &mut Receiver<Response>) -> Vec<Vec<(u32, f32)>> {
    match rx.recv().await {
        Some(Response::CompletionDone(done)) => done.choices[0]
            .logprobs
            .as_ref()
            .and_then(|l| l.content.as_ref())
            .expect("logprobs were requested")
            .iter()
            .map(|step| {
                step.top_logprobs
                    .iter()
                    .map(|t| (t.token, t.logprob))
                    .collect()
            })
            .collect(),
        other => panic!("expected a completion, got {}", describe(&other)),
    }
}

fn describe(r: &Option<Response>) -> String {
    match r {
        None => "a closed channel".into(),
        Some(Response::ValidationError(e)) => format!("validation error: {e}"),
        Some(Response::InternalError(e)) => format!("internal error: {e}"),
        Some(Response::CompletionModelError(e, _)) => format!("model error: {e}"),
        Some(_) => "another response".into(),
    }
}

/// EOS of both tiny models (generation_config.json).
const EOS: u32 = 258;

const VARIANTS: [(&str, usize); 3] = [
    ("base", BASE),
    ("adapter1", ADAPTER1),
    ("adapter2", ADAPTER2),
];

/// The golden greedy tokens `key` up to and including the first EOS: generation stops there,
/// the golden run went on.
fn golden_greedy(g: &Golden, key: &str) -> Vec<u32> {
    let mut toks = common::token_ids(g.get(key));
    if let Some(i) = toks.iter().position(|&t| t == EOS) {
        toks.truncate(i + 1);
    }
    toks
}

/// A raw-logits request's full-prompt logits are the golden `{variant}.seq{seq}.logits`.
async fn assert_golden_logits(
    rx: &mut Receiver<Response>,
    name: &str,
    g: &Golden,
    variant: &str,
    seq: usize,
    tol: f32,
) {
    let want = g.get(&format!("{variant}.seq{seq}.logits"));
    let got = logits_of(rx).await.reshape(want.dims()).unwrap();
    assert_close(
        &format!("{name} {variant} seq{seq} logits"),
        &got,
        want,
        tol,
    );
}

/// A generation's token ids (the top-1 logprob entry of every step) are the golden
/// `{variant}.seq{seq}.greedy`.
async fn assert_golden_greedy(
    rx: &mut Receiver<Response>,
    what: &str,
    g: &Golden,
    variant: &str,
    seq: usize,
) {
    let got: Vec<u32> = steps_of(rx).await.iter().map(|s| s[0].0).collect();
    let greedy = golden_greedy(g, &format!("{variant}.seq{seq}.greedy"));
    assert_eq!(got, greedy, "{what} {variant} seq{seq}: greedy tokens");
}

/// The text the engine should print for the golden greedy tokens (up to the first EOS).
fn expected_text(name: &str, g: &Golden, key: &str) -> String {
    let tok = tokenizers::Tokenizer::from_file(golden_path(name).join("tokenizer.json")).unwrap();
    let mut toks = golden_greedy(g, key);
    if toks.last() == Some(&EOS) {
        toks.pop();
    }
    tok.decode(&toks, true).unwrap()
}

/// Base, adapter1 and adapter2 (where the fixture has none, a second copy of adapter1) on both
/// golden prompts.
///
/// Full-prompt logits one request at a time (mistral.rs returns raw logits only at batch size
/// 1); then the greedy generations submitted together, so that the scheduler batches the
/// variants together through prefill and decode. Each generation's token ids (the top-1
/// logprob entry of every step) must be the golden greedy tokens.
async fn mixed_batches_match_peft(name: &str, format: Format) {
    mixed_batches_match_peft_with(name, format, DType::F32, 1e-4).await;
}

/// [`mixed_batches_match_peft`] with the adapters kept in `dtype`, the logits within `tol`;
/// every adapter's decode steps must have gone through the CPU decode loop.
async fn mixed_batches_match_peft_with(name: &str, format: Format, dtype: DType, tol: f32) {
    let g = Golden::load(&format!("{name}/expected.safetensors"));
    let (model, adapters) = load_with(name, format, dtype, None).await;
    // Each variant is checked against the goldens of the adapter in its slot.
    let golden_of = |variant: &'static str| match variant {
        "adapter2" => second_adapter(name),
        other => other,
    };
    let cases: Vec<(usize, &str, usize)> = (0..2)
        .flat_map(|seq| VARIANTS.map(|(variant, kind)| (seq, golden_of(variant), kind)))
        .collect();
    let prompt = |seq: usize| common::token_ids(g.get(&format!("input.seq{seq}.ids")));

    for &(seq, variant, kind) in &cases {
        let mut rx = submit(&model, prompt(seq), kind * 1000 + seq * 10, true).await;
        assert_golden_logits(&mut rx, name, &g, variant, seq, tol).await;
    }

    // Together, each one twice: the scheduler batches sequences of one length in id order, so
    // the two copies are rows next to each other, whose half-width factors the decode loop
    // widens once.
    let mut pending = Vec::new();
    for &(seq, variant, kind) in &cases {
        for copy in 1..=2 {
            let id = kind * 1000 + seq * 10 + copy;
            pending.push((seq, variant, submit(&model, prompt(seq), id, false).await));
        }
    }
    for (seq, variant, mut rx) in pending {
        assert_golden_greedy(&mut rx, &format!("{name} (batched)"), &g, variant, seq).await;
    }
    // They did share batches: forward passes carried each adapter next to other rows (the
    // adapters are this test's own, so the counts are this test's).
    for (i, a) in adapters.iter().enumerate() {
        assert!(
            a.mixed_steps() > 0,
            "{name}: adapter{} never shared a forward pass with another variant",
            i + 1
        );
        // Decode steps carry one token a row, at most 16 rows: the loop's inputs.
        let (updates, widenings) = (a.decode_loop_updates(), a.decode_loop_widenings());
        assert!(
            updates > 0,
            "{name}: adapter{} in {dtype:?} never went through the CPU decode loop",
            i + 1
        );
        // f32 factors are read in place; half-width ones are widened, once for adjacent rows.
        if dtype == DType::F32 {
            assert_eq!(widenings, 0, "{name}: adapter{} in f32 was widened", i + 1);
        } else {
            assert!(
                0 < widenings && widenings < updates,
                "{name}: adapter{} in {dtype:?}: {widenings} widenings in {updates} updates",
                i + 1
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_qwen2_mixed_adapters_match_peft() {
    mixed_batches_match_peft("tiny-qwen2", Format::Safetensors).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_llama_mixed_adapters_match_peft() {
    mixed_batches_match_peft("tiny-llama", Format::Safetensors).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_qwen3_mixed_adapters_match_peft() {
    mixed_batches_match_peft("tiny-qwen3", Format::Safetensors).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_mistral_mixed_adapters_match_peft() {
    mixed_batches_match_peft("tiny-mistral", Format::Safetensors).await;
}

/// Phi-3: fused qkv_proj and gate_up_proj, which its PEFT adapters target as such (loaded as
/// q/k/v and gate/up LoRAs sharing A), each part of the fused output getting its own update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_phi3_mixed_adapters_match_peft() {
    mixed_batches_match_peft("tiny-phi3", Format::Safetensors).await;
}

/// Qwen3 from GGUF (mistral.rs's quantized_qwen3 model file): the same weights in f32, the
/// same goldens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_qwen3_gguf_mixed_adapters_match_peft() {
    mixed_batches_match_peft("tiny-qwen3", Format::Gguf).await;
}

/// Adapters kept in f16 (the server's `--lora-dtype f16`) on a model computing in f32:
/// prefill casts their factors, and decode widens them in the CPU loop. Logits agree with
/// transformers+peft to f16's rounding of the factors (2e-3; in f32, 1e-4; measured 1.1e-3),
/// and greedy decoding in mixed batches gives the golden tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_qwen3_gguf_adapters_kept_in_f16_match_peft() {
    mixed_batches_match_peft_with("tiny-qwen3", Format::Gguf, DType::F16, 2e-3).await;
}

/// The same in bf16, whose 8-bit mantissa rounds the factors 8 times as coarsely (1e-2;
/// measured 4.8e-3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_qwen3_gguf_adapters_kept_in_bf16_match_peft() {
    mixed_batches_match_peft_with("tiny-qwen3", Format::Gguf, DType::BF16, 1e-2).await;
}

/// Phi-3 from GGUF (quantized_phi3): fused attn_qkv and ffn_up (gate, up) as in the
/// safetensors model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_phi3_gguf_mixed_adapters_match_peft() {
    mixed_batches_match_peft("tiny-phi3", Format::Gguf).await;
}

/// Phi-2 from GGUF (quantized_phi2): fused attn_qkv with biases (each part its own update),
/// partial rotary embeddings, parallel attention and MLP, fc1/fc2 with no gate (its PEFT
/// adapters name them dense, fc1, fc2). mistral.rs 0.8.1's loader panicked on unquantized
/// weights and had lost the MLP activation (patch 0006).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_phi2_gguf_mixed_adapters_match_peft() {
    mixed_batches_match_peft("tiny-phi2", Format::Gguf).await;
}

/// Phi-2 GGUF in llama.cpp's current layout: attn_q, attn_k and attn_v apart, the LayerNorm
/// epsilon under its own key; mistral.rs 0.8.1 loaded only the legacy fused layout (patch 0010).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_phi2_gguf_split_qkv_mixed_adapters_match_peft() {
    mixed_batches_match_peft("tiny-phi2", Format::GgufSplitQkv).await;
}

/// Phi-2 from safetensors (mistral.rs's phi2 model file), whose partial rotary embeddings
/// 0.8.1 applied to whole heads, failing every request (patch 0009).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_phi2_mixed_adapters_match_peft() {
    mixed_batches_match_peft("tiny-phi2", Format::Safetensors).await;
}

/// Starcoder2 from GGUF (quantized_starcoder2): biased projections and LayerNorms, GQA, c_fc/c_proj
/// with no gate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_starcoder2_gguf_mixed_adapters_match_peft() {
    mixed_batches_match_peft("tiny-starcoder2", Format::Gguf).await;
}

/// Starcoder2 from safetensors (mistral.rs's starcoder2 model file): the same layers as its
/// GGUF loader's, and an untied output layer (patch 0008).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_starcoder2_mixed_adapters_match_peft() {
    mixed_batches_match_peft("tiny-starcoder2", Format::Safetensors).await;
}

/// A family whose layers the patch does not wrap (Mixtral, a mixture-of-experts MLP): the base
/// model answers as transformers does, and a request with an adapter (on its attention) fails
/// with an error naming the missing support instead of getting the base model's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwrapped_family_refuses_adapters() {
    let name = "tiny-mixtral";
    let g = Golden::load(&format!("{name}/expected.safetensors"));
    let (model, _) = load(name, Format::Safetensors).await;
    for seq in 0..2 {
        let prompt = common::token_ids(g.get(&format!("input.seq{seq}.ids")));
        let mut rx = submit(&model, prompt.clone(), BASE * 1000 + seq * 10, true).await;
        assert_golden_logits(&mut rx, name, &g, "base", seq, 1e-4).await;
        let mut rx = submit(&model, prompt.clone(), BASE * 1000 + seq * 10 + 1, false).await;
        assert_golden_greedy(&mut rx, name, &g, "base", seq).await;

        let mut rx = submit(&model, prompt, ADAPTER1 * 1000 + seq * 10, false).await;
        let reply = rx.recv().await;
        let error = describe(&reply);
        assert!(
            error.contains("does not support per-sequence LoRA adapters"),
            "{name} seq{seq}: a request with an adapter got {error}"
        );
    }
}

/// Gemma: tied and scaled embeddings, (1 + w) norms, GeGLU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_gemma_mixed_adapters_match_peft() {
    mixed_batches_match_peft("tiny-gemma", Format::Safetensors).await;
}

/// SmolLM3: every second layer without rotary embeddings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_smollm3_mixed_adapters_match_peft() {
    mixed_batches_match_peft("tiny-smollm3", Format::Safetensors).await;
}

/// Gemma 3 (text-only, `Gemma3ForCausalLM`): q/k norms, a sliding and a global layer with
/// rope bases of their own; through mistral.rs's multimodal pipeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_gemma3_mixed_adapters_match_peft() {
    mixed_batches_match_peft("tiny-gemma3", Format::Gemma3).await;
}

/// Gemma 2: tied and scaled embeddings, soft-capped attention and logits, sliding layers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_gemma2_mixed_adapters_match_peft() {
    mixed_batches_match_peft("tiny-gemma2", Format::Safetensors).await;
}

/// The same prompt with and without an adapter, one after the other, twice: each answer is its
/// own variant's, so no request reused KV state (prefix cache) computed under the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alternating_adapter_and_base_never_share_cache() {
    let name = "tiny-llama";
    let g = Golden::load(&format!("{name}/expected.safetensors"));
    let (model, _) = load_with(name, Format::Safetensors, DType::F32, Some("alternating")).await;
    let prompt = common::token_ids(g.get("input.seq1.ids"));
    let base = expected_text(name, &g, "base.seq1.greedy");
    let adapted = expected_text(name, &g, "adapter1.seq1.greedy");
    // Otherwise a wrongly shared cache could go unnoticed.
    assert_ne!(base, adapted, "the fixture's variants must differ");
    for round in 0..2 {
        for (kind, want) in [(BASE, &base), (ADAPTER1, &adapted)] {
            let mut rx = submit(&model, prompt.clone(), kind * 1000 + 500 + round, false).await;
            assert_eq!(&text_of(&mut rx).await, want, "round {round} kind {kind}");
        }
    }
}

/// Provider errors reach the client as that request's error; the engine keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_errors_fail_only_their_request() {
    let name = "tiny-qwen2";
    let g = Golden::load(&format!("{name}/expected.safetensors"));
    let (model, _) = load_with(name, Format::Safetensors, DType::F32, Some("errors")).await;
    let prompt = common::token_ids(g.get("input.seq0.ids"));

    let mut refused = submit(&model, prompt.clone(), REFUSE * 1000, false).await;
    match refused.recv().await {
        Some(Response::ValidationError(e)) => assert!(e.to_string().contains("too many prompts")),
        other => panic!("expected a validation error, got {}", describe(&other)),
    }
    let mut failed = submit(&model, prompt.clone(), FAIL * 1000, false).await;
    match failed.recv().await {
        Some(Response::InternalError(e)) => {
            assert!(e.to_string().contains("generator produced NaN"), "{e}")
        }
        other => panic!("expected an internal error, got {}", describe(&other)),
    }
    let mut ok = submit(&model, prompt.clone(), ADAPTER2 * 1000 + 900, false).await;
    assert_eq!(
        text_of(&mut ok).await,
        expected_text(name, &g, "adapter2.seq0.greedy")
    );
}

/// A provider that takes seconds for one request does not hold up another request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_provider_stalls_only_its_request() {
    let name = "tiny-qwen2";
    let g = Golden::load(&format!("{name}/expected.safetensors"));
    let (model, _) = load_with(name, Format::Safetensors, DType::F32, Some("slow")).await;
    let prompt = common::token_ids(g.get("input.seq1.ids"));

    let mut slow = submit(&model, prompt.clone(), SLOW_ADAPTER1 * 1000, false).await;
    let mut fast = submit(&model, prompt.clone(), BASE * 1000 + 700, false).await;
    let first = tokio::select! {
        _ = slow.recv() => "slow",
        r = fast.recv() => {
            match r {
                Some(Response::CompletionDone(d)) => assert_eq!(
                    d.choices[0].text,
                    expected_text(name, &g, "base.seq1.greedy")
                ),
                other => panic!("expected a completion, got {}", describe(&other)),
            }
            "fast"
        }
    };
    assert_eq!(
        first, "fast",
        "the base request waited for the slow provider"
    );
    assert_eq!(
        text_of(&mut slow).await,
        expected_text(name, &g, "adapter1.seq1.greedy")
    );
}
