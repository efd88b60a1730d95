//! The DnD server under load: cache-hit overhead, time to first token on a cache miss, and
//! requests/s with 1, 4 and 16 distinct prompt sets against base requests, all in one run.
//!
//! SmolLM2-135M-Instruct (Q4_1 GGUF, CPU) with a random-weight `smollm2-135m-small` generator,
//! the server in-process on loopback, driven over HTTP.
//!
//!   scripts/fetch-assets.sh encoder smollm2
//!   cargo bench --profile dev --features server --bench server [-- --requests 32 --tokens 16]

mod util;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use util::{arg, median};

use candle_core::{DType, Device};
use mistralrs::GgufModelBuilder;
use mistralrs_dnd::adapters::BaseModelShape;
use mistralrs_dnd::cache::CacheLimits;
use mistralrs_dnd::engine::set_adapter_provider;
use mistralrs_dnd::generator::{presets, ConditionDecoder};
use mistralrs_dnd::policy::{Condition, PromptPolicy, PromptSource};
use mistralrs_dnd::provider::{DndProvider, GenerationShare, ProviderOptions};
use mistralrs_dnd::server::{router, ServerState};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn prompts(set: usize) -> Vec<String> {
    (0..4)
        .map(|j| format!("Task {set}: which answer is right for question {j}? A, B, C or D."))
        .collect()
}

/// A minimal HTTP/1.1 client over loopback (one connection per request), so the benchmark
/// adds no HTTP client dependency to the build.
struct Client {
    addr: String,
}

impl Client {
    async fn send(&self, body: &Value) -> TcpStream {
        let mut s = TcpStream::connect(&self.addr).await.unwrap();
        let b = body.to_string();
        let head = format!(
            "POST /v1/completions HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            self.addr,
            b.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(b.as_bytes()).await.unwrap();
        s
    }

    async fn complete(&self, dnd: Value, max_tokens: usize) -> Value {
        let body = json!({
            "prompt": "The history of the printing press begins",
            "max_tokens": max_tokens,
            "temperature": 0,
            "dnd": dnd,
        });
        let mut s = self.send(&body).await;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        let text = String::from_utf8(buf).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}\n{body}");
        serde_json::from_str(body).unwrap()
    }

    /// Seconds to the first streamed event that carries text.
    async fn time_to_first_token(&self, dnd: Value) -> f64 {
        let body = json!({
            "prompt": "The history of the printing press begins",
            "max_tokens": 4,
            "temperature": 0,
            "stream": true,
            "dnd": dnd,
        });
        let t0 = Instant::now();
        let mut s = self.send(&body).await;
        let mut seen = Vec::new();
        let mut chunk = [0u8; 4096];
        let mut first = None;
        loop {
            let n = s.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&chunk[..n]);
            if first.is_none() && String::from_utf8_lossy(&seen).contains("\"text\"") {
                first = Some(t0.elapsed().as_secs_f64());
            }
        }
        first.unwrap_or_else(|| panic!("no text event in {}", String::from_utf8_lossy(&seen)))
    }
}

/// `n` requests, at most `concurrency` at a time, cycling over `sets` prompt sets (0: base).
async fn throughput(
    client: &Arc<Client>,
    n: usize,
    sets: usize,
    tokens: usize,
    concurrency: usize,
) -> f64 {
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let (client, sem) = (client.clone(), sem.clone());
        // A fresh offset per run, so every run starts with cold adapters (misses included).
        let dnd = if sets == 0 {
            json!({"base": true})
        } else {
            json!({"prompts": prompts(1000 * sets + i % sets)})
        };
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.unwrap();
            client.complete(dnd, tokens).await
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n = arg("--requests", 32);
    let tokens = arg("--tokens", 16);
    let concurrency = arg("--concurrency", 8);
    // `--only-decode 1`: just the decoding-under-arrivals rows.
    let only_decode = arg("--only-decode", 0) == 1;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join(".assets/smollm2");
    if !dir.join(FILE).exists() {
        eprintln!(
            "missing {}: run scripts/fetch-assets.sh encoder smollm2",
            dir.join(FILE).display()
        );
        std::process::exit(2);
    }
    let model = GgufModelBuilder::new(dir.to_string_lossy(), vec![FILE])
        .with_force_cpu()
        .with_max_num_seqs(16)
        .build()
        .await
        .unwrap();
    let cfg = presets::smollm2_135m_small().unwrap();
    let (mut dec, _) = ConditionDecoder::random(cfg, 0, &Device::Cpu, DType::F32).unwrap();
    // Kernels readied once, as `Generator::load` readies a served checkpoint's.
    dec.prepare().unwrap();
    let encoder = mistralrs_dnd::encoder::TextEncoder::load(
        root.join(".assets/all-MiniLM-L6-v2"),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let generator = mistralrs_dnd::Generator::from_parts(encoder, dec).unwrap();
    generator
        .check_base_model(&BaseModelShape::from_path(dir.join(FILE)).unwrap())
        .unwrap();
    let provider = DndProvider::new(
        generator,
        "bench-random",
        ProviderOptions {
            policy: PromptPolicy {
                source: PromptSource::Auto,
                max_prompts: 0,
                max_chars: 4000,
            },
            limits: CacheLimits {
                max_entries: 64,
                max_bytes: 1 << 30,
                wait_timeout: Duration::from_secs(600),
            },
            device: Device::Cpu,
            dtype: DType::F32,
            base_model_id: FILE.into(),
            abstain_distance: None,
            reuse_distance: None,
            host_cache_bytes: None,
            generator_dtype: candle_core::DType::F32,
            generation: Default::default(),
        },
    )
    .unwrap();
    let model_id = model.inner().list_models().unwrap()[0].clone();
    set_adapter_provider(&model_id, Some(provider.clone()));
    let app = router(ServerState::new(model, FILE, Some(provider.clone())));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = Arc::new(Client { addr });

    if only_decode {
        print_stalls(&stalls(&provider, &client).await);
        return;
    }

    // 1. Cache-hit overhead: the lookup itself (normalise, hash, LRU) and whole requests.
    let hot = prompts(0);
    provider
        .resolve(Condition::Prompts(hot.clone()))
        .await
        .unwrap();
    let mut lookups = Vec::new();
    for _ in 0..2000 {
        let t = Instant::now();
        let s = provider
            .resolve(Condition::Prompts(hot.clone()))
            .await
            .unwrap();
        lookups.push(t.elapsed().as_secs_f64());
        drop(s);
    }
    let lookup_us = median(lookups) * 1e6;
    // `--only-lookup 1`: just the cache-hit lookup row.
    if arg("--only-lookup", 0) == 1 {
        println!("| cache-hit lookup (normalise + key + LRU + the request's leased copy), median of 2000 | {lookup_us:.1} µs |");
        return;
    }
    // Whole one-token requests, alternating base and cached adapter.
    let (mut base_lat, mut hit_lat) = (Vec::new(), Vec::new());
    for _ in 0..15 {
        let t = Instant::now();
        client.complete(json!({"base": true}), 1).await;
        base_lat.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let v = client.complete(json!({"prompts": hot}), 1).await;
        hit_lat.push(t.elapsed().as_secs_f64());
        assert_eq!(v["dnd"]["source"], "cached");
    }
    let (base_ms, hit_ms) = (median(base_lat) * 1e3, median(hit_lat) * 1e3);

    // 2. Time to first token: base, cache hit, cache miss (fresh prompts each time).
    let mut ttft = [Vec::new(), Vec::new(), Vec::new()];
    for i in 0..5 {
        ttft[0].push(client.time_to_first_token(json!({"base": true})).await);
        ttft[1].push(client.time_to_first_token(json!({"prompts": hot})).await);
        ttft[2].push(
            client
                .time_to_first_token(json!({"prompts": prompts(500 + i)}))
                .await,
        );
    }
    let [t_base, t_hit, t_miss] = ttft.map(|v| median(v) * 1e3);

    // 3. Throughput with 0 (base), 1, 4 and 16 distinct prompt sets.
    let base_rps = throughput(&client, n, 0, tokens, concurrency).await;
    let mut rows = Vec::new();
    for sets in [1, 4, 16] {
        rows.push((
            sets,
            throughput(&client, n, sets, tokens, concurrency).await,
        ));
    }

    let stall_rows = stalls(&provider, &client).await;

    println!(
        "\nDnD server, SmolLM2-135M Q4_1 GGUF, CPU ({} threads)",
        rayon_threads()
    );
    println!("| measure | value | vs base | goal |");
    println!("|---|---|---|---|");
    println!("| cache-hit lookup (normalise + key + LRU), median | {lookup_us:.1} µs | | < 1 ms |");
    println!(
        "| 1-token request, base / cached adapter, median | {base_ms:.1} / {hit_ms:.1} ms | {:+.1} ms | |",
        hit_ms - base_ms
    );
    println!("| time to first token, base | {t_base:.1} ms | 1.00 | |");
    println!(
        "| time to first token, cache hit | {t_hit:.1} ms | {:.2} | |",
        t_hit / t_base
    );
    println!(
        "| time to first token, cache miss | {t_miss:.1} ms | {:.2} | |",
        t_miss / t_base
    );
    println!(
        "| {n} requests x {tokens} tokens, {concurrency} at a time, base | {base_rps:.2} req/s | 1.00 | |"
    );
    for (sets, rps) in rows {
        println!(
            "| same, {sets} distinct prompt set(s) (cold cache) | {rps:.2} req/s | {:.2} | |",
            rps / base_rps
        );
    }
    print_stalls(&stall_rows);
}

/// One row of the decoding-under-arrivals table: share, decode tok/s alone, with cached
/// arrivals, with cold arrivals, cold / alone (median of the paired ratios), and the cold
/// requests' median completion time in ms.
type StallRow = (&'static str, f64, f64, f64, f64, f64);

/// Section 4, decoding while prompt sets arrive: `--decoders` base requests decode `--decode-tokens`
/// each, alone, with 16 one-token requests for cached prompt sets sent at the same moment, and
/// with 16 for cold ones, under each generation share (the provider's pool is swapped between
/// rows), `--reps` times each.
async fn stalls(provider: &Arc<DndProvider>, client: &Arc<Client>) -> Vec<StallRow> {
    let (decoders, tokens, reps) = (
        arg("--decoders", 4),
        arg("--decode-tokens", 48),
        arg("--reps", 3),
    );
    let share = |threads, nice, idle, max_batch| GenerationShare {
        threads,
        nice,
        idle,
        max_batch,
    };
    let shares = [
        ("every core, one set at a time", share(0, 0, false, 1)),
        ("every core, batches of up to 16", share(0, 0, false, 16)),
        ("1 thread, engine priority", share(1, 0, false, 1)),
        ("1 thread, nice 10", share(1, 10, false, 1)),
        ("1 thread, SCHED_IDLE", share(1, 0, true, 1)),
        ("every core, SCHED_IDLE", share(2, 0, true, 1)),
    ];
    // `--rows N`: only the first N shares.
    let shares = &shares[..arg("--rows", shares.len()).min(shares.len())];
    let mut rows = Vec::new();
    for (round, (label, share)) in shares.iter().enumerate() {
        provider.set_generation_share(*share).unwrap();
        let (mut alone, mut warm, mut cold, mut cold_ms) = (vec![], vec![], vec![], vec![]);
        for rep in 0..reps {
            // Fresh sets per repetition; the cached ones are generated beforehand.
            let sets = 100_000 * (round + 1) + 1000 * rep;
            for i in 0..16 {
                provider
                    .resolve(Condition::Prompts(prompts(sets + i)))
                    .await
                    .unwrap();
            }
            alone.push(decode_rate(client, decoders, tokens, None).await.0);
            warm.push(
                decode_rate(client, decoders, tokens, Some((sets, "cached")))
                    .await
                    .0,
            );
            let (rate, ms) =
                decode_rate(client, decoders, tokens, Some((sets + 500, "generated"))).await;
            cold.push(rate);
            cold_ms.push(ms);
        }
        let ratio = median(cold.iter().zip(&alone).map(|(c, a)| c / a).collect());
        rows.push((
            *label,
            median(alone),
            median(warm),
            median(cold),
            ratio,
            median(cold_ms),
        ));
    }
    rows
}

fn print_stalls(rows: &[StallRow]) {
    let (decoders, tokens, reps) = (
        arg("--decoders", 4),
        arg("--decode-tokens", 48),
        arg("--reps", 3),
    );
    println!(
        "\n{decoders} base requests decoding {tokens} tokens: alone, while 16 one-token requests \
         with cached adapters arrive, and while 16 for cold prompt sets arrive (medians of {reps})"
    );
    println!("| generation share | decode tok/s alone | with 16 cached sets | with 16 cold sets | cold / alone | cold request, median | goal |");
    println!("|---|---|---|---|---|---|---|");
    for (label, alone, warm, cold, ratio, cold_ms) in rows {
        println!(
            "| {label} | {alone:.1} | {warm:.1} | {cold:.1} | {ratio:.2} | {cold_ms:.0} ms | ≥ 0.85 |"
        );
    }
}

/// Aggregate decode tokens/s of `decoders` concurrent base requests of `tokens` tokens, and,
/// when `arrivals` gives a prompt-set offset and the source those sets are expected to have,
/// with 16 one-token requests for them sent at the same time: then also their median
/// completion time (generation included when cold), in ms.
async fn decode_rate(
    client: &Arc<Client>,
    decoders: usize,
    tokens: usize,
    arrivals: Option<(usize, &'static str)>,
) -> (f64, f64) {
    let t0 = Instant::now();
    let base: Vec<_> = (0..decoders)
        .map(|_| {
            let c = client.clone();
            tokio::spawn(async move {
                let v = c.complete(json!({"base": true}), tokens).await;
                v["usage"]["completion_tokens"].as_u64().unwrap_or(0)
            })
        })
        .collect();
    let others: Vec<_> = (0..arrivals.map_or(0, |_| 16))
        .map(|i| {
            let c = client.clone();
            let (offset, source) = arrivals.unwrap_or((0, ""));
            tokio::spawn(async move {
                let t = Instant::now();
                let v = c.complete(json!({"prompts": prompts(offset + i)}), 1).await;
                assert_eq!(v["dnd"]["source"], source, "{v}");
                t.elapsed().as_secs_f64()
            })
        })
        .collect();
    let mut generated = 0;
    for t in base {
        generated += t.await.unwrap();
    }
    let rate = generated as f64 / t0.elapsed().as_secs_f64();
    let mut waits = Vec::new();
    for t in others {
        waits.push(t.await.unwrap());
    }
    let ms = if waits.is_empty() {
        0.0
    } else {
        median(waits) * 1e3
    };
    (rate, ms)
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
