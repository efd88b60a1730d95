//! The provider on the golden tiny Qwen2 shape with a small random generator.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use mistralrs_core::adapter_provider::{AdapterError, AdapterProvider, AdapterRequest};
use mistralrs_core::RequestMessage;

use super::*;
use crate::adapters::{LoraSpec, Module};
use crate::encoder::TextEncoder;
use crate::generator::{presets, ConditionDecoder, GeneratorConfig};
use crate::policy::{PromptSource, Turn};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn encoder() -> TextEncoder {
    let dir = root().join(".assets/all-MiniLM-L6-v2");
    TextEncoder::load(&dir, &Device::Cpu, DType::F32)
        .unwrap_or_else(|e| panic!("{e}: run scripts/fetch-assets.sh first"))
}

/// The golden tiny Qwen2's shape and a small generator config for it (rank 2, 4 prompts).
fn tiny_config() -> (BaseModelShape, GeneratorConfig) {
    let shape = BaseModelShape::from_path(root().join("tests/fixtures/golden/tiny-qwen2")).unwrap();
    let spec = LoraSpec {
        rank: 2,
        alpha: 4.0,
        chunk_width: 32,
        target_modules: Module::ALL.to_vec(),
    };
    let cfg =
        GeneratorConfig::new(shape.clone(), spec, presets::minilm(), 4, 16, None, &[], 3).unwrap();
    (shape, cfg)
}

/// A random generator for tiny-qwen2; `poison` sets one decoder weight to NaN.
fn generator(poison: bool) -> Generator {
    let (_, cfg) = tiny_config();
    let (dec, tensors) =
        ConditionDecoder::random(cfg.clone(), 7, &Device::Cpu, DType::F32).unwrap();
    let dec = if poison {
        let mut tensors = tensors;
        let (name, t) = tensors
            .iter()
            .next()
            .map(|(k, v)| (k.clone(), v.clone()))
            .unwrap();
        let nan = Tensor::full(f32::NAN, t.shape(), &Device::Cpu).unwrap();
        tensors.insert(name, nan);
        let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        ConditionDecoder::new(cfg, vb).unwrap()
    } else {
        dec
    };
    Generator::from_parts(encoder(), dec).unwrap()
}

fn provider(poison: bool, source: PromptSource) -> Arc<DndProvider> {
    let mut opts = options(2);
    opts.policy.source = source;
    DndProvider::new(generator(poison), if poison { "nan" } else { "gen" }, opts).unwrap()
}

/// Options for the tiny model on the CPU: the auto policy, room for `entries` adapters, no
/// abstention, no reuse.
fn options(entries: usize) -> ProviderOptions {
    ProviderOptions {
        policy: PromptPolicy {
            source: PromptSource::Auto,
            max_prompts: 0,
            max_chars: 1000,
        },
        limits: CacheLimits {
            max_entries: entries,
            max_bytes: 1 << 30,
            wait_timeout: Duration::from_secs(1),
        },
        device: Device::Cpu,
        dtype: DType::F32,
        base_model_id: "tiny-qwen2".into(),
        abstain_distance: None,
        reuse_distance: None,
        host_cache_bytes: None,
        generator_dtype: candle_core::DType::F32,
        generation: Default::default(),
    }
}

fn prompts(p: &[&str]) -> Condition {
    Condition::Prompts(p.iter().map(|s| s.to_string()).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_prompt_sets_share_one_adapter_of_the_announced_size() {
    let p = provider(false, PromptSource::Auto);
    assert_eq!(
        p.options().policy.max_prompts,
        4,
        "clamped to the generator's N"
    );
    let a = p
        .resolve(prompts(&["Is the sky blue?", "Is 2 even?"]))
        .await
        .unwrap();
    assert_eq!(a.source, Some(Source::Generated));
    let lora = a.adapter.unwrap();
    // Two layers, seven modules, rank 2: r·(in+out) floats per projection.
    let per_layer = 2 * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 160) * 2 + (160 + 64));
    assert_eq!(lora.size_in_bytes(), 2 * per_layer * 4);
    assert_eq!(p.adapter_bytes(), lora.size_in_bytes());
    assert_eq!(lora.num_projections(), 14);
    let b = p
        .resolve(prompts(&[" Is 2 even?", "Is the sky blue?\r\n"]))
        .await
        .unwrap();
    assert_eq!(b.source, Some(Source::Cached));
    assert_eq!(b.key, a.key);
    // Each request gets its own copy (owning its cache lease) of the same weights.
    assert_eq!(lora.uid(), b.adapter.as_ref().unwrap().uid());
    assert!(!Arc::ptr_eq(&lora, b.adapter.as_ref().unwrap()));
    let entry = &p.cache().entries()[0];
    assert!(entry.in_use, "both requests hold the adapter");
    drop((lora, b));
    assert!(
        !p.cache().entries()[0].in_use,
        "released with the requests' copies"
    );
    let c = p
        .resolve(prompts(&["Translate to French: cat"]))
        .await
        .unwrap();
    assert_ne!(c.key, a.key);
    assert_eq!(
        p.resolve(Condition::Base)
            .await
            .unwrap()
            .adapter
            .map(|a| a.uid()),
        None
    );
    // The exported adapter is the generator's output for the normalised prompts.
    let key = a.key.unwrap();
    let exported = p.export(key.as_str()).await.unwrap();
    let direct = p
        .generator()
        .generate(&normalize_prompts(&["Is the sky blue?", "Is 2 even?"]))
        .unwrap();
    for (t, pair) in direct.pairs() {
        let e = exported.get(t.layer, t.module).unwrap();
        assert_eq!(
            pair.a.to_vec2::<f32>().unwrap(),
            e.a.to_vec2::<f32>().unwrap()
        );
    }
    assert!(matches!(
        p.by_key(key.as_str()).await,
        Ok(Served {
            source: Some(Source::Cached),
            ..
        })
    ));
    assert_eq!(
        p.by_key("0123456789abcdef0123456789abcdef")
            .await
            .unwrap_err()
            .code(),
        "adapter_not_found"
    );
}

#[tokio::test]
async fn non_finite_weights_are_refused_with_a_clear_code() {
    let p = provider(true, PromptSource::Auto);
    let err = p.resolve(prompts(&["anything"])).await.unwrap_err();
    assert_eq!(err.code(), "adapter_not_finite", "{err}");
    assert!(!err.is_client_error());
    assert!(p.cache().is_empty());
}

fn chat(system: Option<&str>, user: &str) -> RequestMessage {
    let msg = |role: &str, text: &str| {
        indexmap::IndexMap::from([
            ("role".to_string(), either::Either::Left(role.to_string())),
            (
                "content".to_string(),
                either::Either::Left(text.to_string()),
            ),
        ])
    };
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(msg("system", s));
    }
    messages.push(msg("user", user));
    RequestMessage::Chat {
        messages,
        enable_thinking: None,
        reasoning_effort: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_hook_applies_the_policy() {
    let p = provider(false, PromptSource::System);
    let ask = |id: usize, m: &RequestMessage| {
        let p = p.clone();
        let m = m.clone();
        async move {
            p.adapter_for(&AdapterRequest {
                request_id: id,
                model_id: "tiny",
                messages: &m,
            })
            .await
        }
    };
    let with_system = chat(Some("You grade essays."), "hi");
    let got = ask(1, &with_system).await.unwrap().expect("an adapter");
    let key = p.key_for(&["You grade essays.".to_string()]);
    assert_eq!(got.name(), format!("dnd-{key}"));
    assert!(
        ask(2, &chat(None, "hi")).await.unwrap().is_none(),
        "no system prompt: base"
    );
    assert!(ask(3, &with_system).await.unwrap().is_some());
    let long = chat(Some(&"x".repeat(1001)), "hi");
    match ask(4, &long).await {
        Err(AdapterError::InvalidRequest(m)) => assert!(m.contains("prompt_too_long"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let turns = turns_of(&with_system);
    assert_eq!(turns.len(), 2);
    assert_eq!(
        (turns[0].role.as_str(), turns[0].text.as_str()),
        ("system", "You grade essays.")
    );
    let _ = Turn::new("user", "x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn far_conditions_get_the_base_model_and_say_so() {
    let mut g = generator(false);
    // Anchors: two trained conditions (arithmetic and sentiment instructions).
    let trained = [
        "Add the two numbers and reply with the sum.",
        "Classify the review as [positive] or [negative].",
    ];
    let rows: Vec<Tensor> = trained.iter().map(|t| g.pooled(&[*t]).unwrap()).collect();
    let anchors = crate::generator::anchors::Anchors::new(
        vec!["add: system 1".into(), "sentiment: system 1".into()],
        Tensor::stack(&rows, 0).unwrap(),
    )
    .unwrap();
    // Without anchors, abstaining is refused at construction.
    let opts = |limit| ProviderOptions {
        abstain_distance: limit,
        ..options(4)
    };
    let bare = DndProvider::new(generator(false), "gen", opts(Some(0.5)));
    assert!(bare.err().unwrap().to_string().contains("anchors"));
    g.set_anchors(Some(anchors));
    let p = DndProvider::new(g, "gen", opts(Some(0.5))).unwrap();
    // A paraphrase of a trained instruction is near: an adapter.
    let near = p
        .resolve(prompts(&["Add both numbers and answer with their sum."]))
        .await
        .unwrap();
    assert_eq!(near.source, Some(Source::Generated));
    assert!(near.abstained.is_none() && near.adapter.is_some());
    // Ordinary chat is far: no adapter, the nearest condition and its distance reported,
    // and nothing generated or cached.
    let far = p
        .resolve(prompts(&["Write a haiku about autumn."]))
        .await
        .unwrap();
    let n = far.abstained.clone().expect("abstained");
    assert!(far.adapter.is_none() && far.key.is_none() && far.source.is_none());
    assert!(n.distance > 0.5, "{n:?}");
    let again = p
        .resolve(prompts(&["Write a haiku about autumn."]))
        .await
        .unwrap();
    assert_eq!(again.abstained, Some(n));
    assert_eq!(p.cache().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_adapters_are_checked_at_start_and_served_by_name() {
    let p = provider(false, PromptSource::Auto);
    let golden = root().join("tests/fixtures/golden");
    let qwen = BaseModelShape::from_path(golden.join("tiny-qwen2")).unwrap();
    let a1 = golden.join("tiny-qwen2/adapter1");
    // An adapter for another shape (here: a model with one layer less), a missing folder
    // and a taken name are refused up front.
    let mut shallower = qwen.clone();
    shallower.num_layers -= 1;
    assert!(p.add_peft("x", &a1, Some(&shallower), &[]).is_err());
    assert!(p
        .add_peft("x", &golden.join("nowhere"), Some(&qwen), &[])
        .is_err());
    assert!(p
        .add_peft("tiny-qwen2", &a1, Some(&qwen), &["tiny-qwen2"])
        .is_err());
    p.add_peft("a1", &a1, Some(&qwen), &[]).unwrap();
    assert!(p.add_peft("a1", &a1, Some(&qwen), &[]).is_err());
    p.add_preset("yesno", &["Is fire cold?".to_string()], &[])
        .unwrap();
    assert_eq!(
        p.names(),
        [("a1".to_string(), "peft"), ("yesno".to_string(), "preset")]
    );
    assert!(p.resolve_named("nobody").await.is_none());
    let first = p.resolve_named("a1").await.unwrap().unwrap();
    assert!(first.peft && first.source == Some(Source::Generated));
    let again = p.resolve_named("a1").await.unwrap().unwrap();
    assert_eq!(
        (&again.key, again.source),
        (&first.key, Some(Source::Cached))
    );
    // The export is the folder's own weights.
    let exported = p
        .export(first.key.as_ref().unwrap().as_str())
        .await
        .unwrap();
    let on_disk = LoraAdapter::load_peft(&a1, &Device::Cpu).unwrap();
    assert_eq!(exported.pairs().len(), on_disk.pairs().len());
    // A preset is the adapter of its prompts.
    let preset = p.resolve_named("yesno").await.unwrap().unwrap();
    assert_eq!(preset.key, Some(p.key_for(&["Is fire cold?".to_string()])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_adapters_are_replaced_and_removed_at_runtime() {
    let p = provider(false, PromptSource::Auto);
    let golden = root().join("tests/fixtures/golden");
    let qwen = BaseModelShape::from_path(golden.join("tiny-qwen2")).unwrap();
    let (a1, a2) = (
        golden.join("tiny-qwen2/adapter1"),
        golden.join("tiny-qwen2/adapter2"),
    );
    p.add_peft("x", &a1, Some(&qwen), &[]).unwrap();
    let first = p.resolve_named("x").await.unwrap().unwrap();
    let k1 = first.key.clone().unwrap();
    drop(first);
    assert!(p.cache().peek_meta(&k1).is_some());
    // A refused replacement leaves the old adapter served.
    assert!(p
        .replace_peft("x", &golden.join("nowhere"), Some(&qwen), &[])
        .is_err());
    assert_eq!(
        p.resolve_named("x").await.unwrap().unwrap().key,
        Some(k1.clone())
    );
    // Replaced: the new folder's adapter under the old name, the old one's copy evicted.
    p.replace_peft("x", &a2, Some(&qwen), &[]).unwrap();
    let second = p.resolve_named("x").await.unwrap().unwrap();
    assert_ne!(second.key, Some(k1.clone()));
    assert!(p.cache().peek_meta(&k1).is_none());
    // Removed while a request holds it: no longer served by name, its copy leaves later.
    assert_eq!(p.remove_named("x"), Some("peft"));
    assert!(p.resolve_named("x").await.is_none());
    assert!(p.cache().peek_meta(second.key.as_ref().unwrap()).is_some());
    assert_eq!(p.remove_named("x"), None);
}

/// A condition, its paraphrase and another task's, with the paraphrase's and the other
/// task's distances to the first (the paraphrase nearer).
fn reuse_conditions() -> ([&'static str; 3], f32, f32) {
    let (first, para, other) = (
        "Add the two numbers and reply with the sum.",
        "Add both numbers and answer with their sum.",
        "Translate the sentence into French.",
    );
    let (d_para, d_other) = (distance(first, para), distance(first, other));
    assert!(d_para < d_other, "{d_para} {d_other}");
    ([first, para, other], d_para, d_other)
}

/// The reuse distance of two one-prompt conditions, computed here from the encoder alone.
fn distance(a: &str, b: &str) -> f32 {
    let g = generator(false);
    let (x, y) = (g.pooled(&[a]).unwrap(), g.pooled(&[b]).unwrap());
    let cos = (x * y).unwrap().sum_all().unwrap().to_scalar::<f32>();
    1.0 - cos.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_similar_condition_reuses_the_cached_adapter_within_the_distance() {
    let opts = |reuse| ProviderOptions {
        reuse_distance: reuse,
        host_cache_bytes: None,
        generator_dtype: candle_core::DType::F32,
        ..options(4)
    };
    let ([first, para, other], d_para, d_other) = reuse_conditions();
    let limit = (d_para + d_other) / 2.0;

    let p = DndProvider::new(generator(false), "gen", opts(Some(limit))).unwrap();
    let made = p.resolve(prompts(&[first])).await.unwrap();
    assert_eq!(made.source, Some(Source::Generated));
    // The paraphrase gets the cached adapter, with its distance; the other task its own.
    let reused = p.resolve(prompts(&[para])).await.unwrap();
    assert_eq!(reused.key, made.key);
    assert_eq!(reused.source, Some(Source::Cached));
    let d = reused.similar.expect("reused");
    assert!((d - d_para).abs() < 1e-4, "{d} vs {d_para}");
    let own = p.resolve(prompts(&[other])).await.unwrap();
    assert_eq!((own.source, own.similar), (Some(Source::Generated), None));
    assert_eq!(p.cache().len(), 2);
    // A distance no cosine can give is refused, NaN included.
    for bad in [f32::NAN, -0.1, 2.5] {
        assert!(DndProvider::new(generator(false), "gen", opts(Some(bad))).is_err());
    }
    // Off: every condition gets its own adapter.
    let off = DndProvider::new(generator(false), "gen", opts(None)).unwrap();
    off.resolve(prompts(&[first])).await.unwrap();
    let again = off.resolve(prompts(&[para])).await.unwrap();
    assert_eq!(
        (again.source, again.similar),
        (Some(Source::Generated), None)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_similar_condition_reuses_an_adapter_from_the_host_tier() {
    let ([first, para, other], d_para, d_other) = reuse_conditions();
    // Room for one adapter on the device and two in host memory.
    let p = DndProvider::new(
        generator(false),
        "gen",
        ProviderOptions {
            reuse_distance: Some((d_para + d_other) / 2.0),
            host_cache_bytes: Some(2 * options(1).limits.max_bytes),
            generator_dtype: candle_core::DType::F32,
            ..options(1)
        },
    )
    .unwrap();
    let made = p.resolve(prompts(&[first])).await.unwrap();
    let uid = made.adapter.as_ref().unwrap().uid();
    drop(made);
    // The other task's adapter pushes the first one out to host memory.
    drop(p.resolve(prompts(&[other])).await.unwrap());
    assert_eq!(p.cache().host_usage().1, 1);
    // The paraphrase finds it there and gets it copied back, not a new generation.
    let reused = p.resolve(prompts(&[para])).await.unwrap();
    assert_eq!(reused.source, Some(Source::Restored));
    assert_eq!(reused.adapter.as_ref().unwrap().uid(), uid);
    let d = reused.similar.expect("reused");
    assert!((d - d_para).abs() < 1e-4, "{d} vs {d_para}");
    assert_eq!(p.cache().stats().generations.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_misses_are_generated_together_each_with_its_own_adapter() {
    // Room for all of them, in batches of up to 16.
    let batched = |o: ProviderOptions| ProviderOptions {
        generation: GenerationShare {
            max_batch: 16,
            ..Default::default()
        },
        ..o
    };
    let p = DndProvider::new(generator(false), "gen", batched(options(8))).unwrap();
    let sets: Vec<String> = (0..6)
        .map(|i| format!("Task {i}: answer briefly."))
        .collect();
    let served = futures_join(&p, &sets).await;
    let mut keys = std::collections::HashSet::new();
    for (set, s) in sets.iter().zip(&served) {
        let s = s.as_ref().unwrap();
        assert_eq!(s.source, Some(Source::Generated));
        assert_eq!(s.key, Some(p.key_for(std::slice::from_ref(set))));
        assert_eq!(
            s.adapter.as_ref().unwrap().size_in_bytes(),
            p.adapter_bytes()
        );
        keys.insert(s.key.clone());
    }
    assert_eq!(keys.len(), 6);
    // A generator that makes non-finite weights fails every request of a batch, each clearly.
    let bad = DndProvider::new(generator(true), "nan", batched(options(8))).unwrap();
    for s in futures_join(&bad, &sets[..2]).await {
        assert_eq!(s.unwrap_err().code(), "adapter_not_finite");
    }
}

/// Resolves every set at once.
async fn futures_join(
    p: &Arc<DndProvider>,
    sets: &[String],
) -> Vec<std::result::Result<Served, ProviderError>> {
    let tasks: Vec<_> = sets
        .iter()
        .map(|s| {
            let (p, s) = (p.clone(), s.clone());
            tokio::spawn(async move { p.resolve(Condition::Prompts(vec![s])).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_evicted_to_the_host_tier_come_back_as_the_same_adapter() {
    // Room for one adapter on the device and two in host memory.
    let p = DndProvider::new(
        generator(false),
        "gen",
        ProviderOptions {
            host_cache_bytes: Some(2 * options(1).limits.max_bytes),
            generator_dtype: candle_core::DType::F32,
            ..options(1)
        },
    )
    .unwrap();
    let sky = || prompts(&["Is the sky blue?", "Is 2 even?"]);
    let first = p.resolve(sky()).await.unwrap();
    assert_eq!(first.source, Some(Source::Generated));
    let (uid, key) = (first.adapter.as_ref().unwrap().uid(), first.key.clone());
    drop(first);
    let other = p.resolve(prompts(&["Name a colour."])).await.unwrap();
    assert_eq!(other.source, Some(Source::Generated));
    drop(other);
    assert_eq!(
        p.cache().host_usage().1,
        1,
        "the first adapter went to host memory"
    );
    // Back by a copy: the same adapter object's weights (uid kept), not a new generation.
    let back = p.resolve(sky()).await.unwrap();
    assert_eq!(back.source, Some(Source::Restored));
    assert_eq!(
        (back.adapter.as_ref().unwrap().uid(), &back.key),
        (uid, &key)
    );
    drop(back);
    // By key too, once evicted again.
    let other = p.resolve(prompts(&["Name a colour."])).await.unwrap();
    assert_eq!(other.source, Some(Source::Restored));
    let other_key = other.key.clone().unwrap();
    drop(other);
    let by_key = p.by_key(other_key.as_str()).await.unwrap();
    assert_eq!(by_key.source, Some(Source::Cached));
    drop(by_key);
    drop(p.resolve(sky()).await.unwrap());
    assert_eq!(
        p.by_key(other_key.as_str()).await.unwrap().source,
        Some(Source::Restored)
    );
    assert_eq!(p.cache().stats().generations.load(Ordering::SeqCst), 2);
}

#[test]
fn a_bf16_generator_makes_the_f32_generators_adapters_within_bf16_rounding() {
    // The tiny-qwen2 generator of `generator(false)`, as a checkpoint the provider loads.
    let (shape, cfg) = tiny_config();
    let (_, tensors) = ConditionDecoder::random(cfg.clone(), 7, &Device::Cpu, DType::F32).unwrap();
    let path = std::env::temp_dir().join(format!(
        "dnd-provider-bf16-{}.safetensors",
        std::process::id()
    ));
    crate::generator::checkpoint::save(&path, &cfg, &tensors).unwrap();
    let load = |dtype| {
        DndProvider::load(
            &path,
            root().join(".assets/all-MiniLM-L6-v2"),
            Some(&shape),
            ProviderOptions {
                generator_dtype: dtype,
                ..options(2)
            },
        )
        .unwrap()
    };
    let (full, half) = (load(DType::F32), load(DType::BF16));
    let p = [
        "Answer in capital letters.",
        "Say whether the review is positive.",
    ];
    assert_eq!(half.generator().condition(&p).unwrap().dtype(), DType::BF16);
    assert_eq!(full.generator().condition(&p).unwrap().dtype(), DType::F32);
    let (a, b) = (
        full.generator().generate(&p).unwrap(),
        half.generator().generate(&p).unwrap(),
    );
    let cos = a.inner(&b).unwrap() / (a.inner(&a).unwrap() * b.inner(&b).unwrap()).sqrt();
    // The same adapter up to bf16 rounding: close, but not the f32 one.
    assert!(cos > 0.99 && cos < 1.0 - 1e-6, "cosine {cos}");
    std::fs::remove_file(&path).ok();
}
