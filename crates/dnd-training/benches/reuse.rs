//! Semantic reuse on paraphrased system prompts: what `--dnd-reuse-distance D` buys and risks.
//!
//! The cache holds the adapters of the two training paraphrases of every skill task
//! (`dnd tasks`: 40 conditions); the queries are each task's third, unseen paraphrase (which
//! should reuse its own task's adapter) and ordinary chat instructions (which should reuse
//! nothing). For each distance, the table gives the share of paraphrases served from the cache,
//! how many of those got their own task's adapter, and how many chat instructions were served
//! another task's. Distances are the server's (1 - cosine of pooled MiniLM embeddings), so this
//! needs only the encoder. `--out FILE` writes each query's nearest cached condition, which
//! `scripts/reuse_eval.sh` scores through the base model.
//!
//!   scripts/fetch-assets.sh encoder
//!   cargo bench --manifest-path crates/Cargo.toml --bench reuse [-- --out runs/reuse/nearest.json]

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use dnd_core::encoder::TextEncoder;
use dnd_core::generator::anchors::{pooled, Anchors};
use dnd_core::generator::checkpoint;
use dnd_training::tasks::{all_tasks, SHIPPED_TASKS};

/// Instructions of ordinary chat, unlike every skill task (none from the reserved BIG-bench
/// tasks).
const CHAT: &[&str] = &[
    "You are a helpful assistant.",
    "You are a friendly assistant who answers questions clearly.",
    "Write a short poem about the sea.",
    "Explain how a bicycle gear works.",
    "You are a travel guide. Suggest things to do in a city.",
    "Help me plan a birthday party for my daughter.",
    "You are a patient tutor who explains history.",
    "Give me three tips for sleeping better.",
    "Tell me a joke about cats.",
    "You are an assistant that helps people write emails.",
    "What should I cook for dinner tonight?",
    "Summarise the plot of a famous novel.",
];

fn main() {
    // Relative paths on the command line are the repository root's, as the README writes them
    // (cargo runs a bench in its package's folder).
    std::env::set_current_dir(dnd_core::test_util::repo_root()).expect("the repository root");
    let args: Vec<String> = std::env::args().collect();
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    let root = dnd_core::test_util::repo_root();
    let encoder = TextEncoder::load(dnd_core::test_util::encoder_dir(), &Device::Cpu, DType::F32)
        .unwrap_or_else(|e| panic!("{e}: run scripts/fetch-assets.sh encoder"));
    // Conditions are cut at the shipped generator's length, as the server cuts them.
    let cfg =
        checkpoint::read_config(root.join("generators/smollm2-135m-skills.safetensors")).unwrap();
    let embed = |s: &str| pooled(&encoder, &[s], cfg.max_length).unwrap();

    // The shipped generator's tasks (all 48 since 2026-12-07; the README's table is older).
    let tasks: Vec<_> = all_tasks().into_iter().take(SHIPPED_TASKS).collect();
    let mut names = Vec::new();
    let mut rows = Vec::new();
    for t in &tasks {
        for (i, s) in t.systems[..2].iter().enumerate() {
            names.push(format!("{}#{}", t.name, i + 1));
            rows.push(embed(s));
        }
    }
    let cached = Anchors::new(names, Tensor::stack(&rows, 0).unwrap()).unwrap();
    let paraphrases: Vec<_> = tasks
        .iter()
        .map(|t| {
            (
                t.name.as_str(),
                cached.nearest(&embed(&t.systems[2])).unwrap(),
            )
        })
        .collect();
    let chat: Vec<_> = CHAT
        .iter()
        .map(|c| cached.nearest(&embed(c)).unwrap())
        .collect();

    println!(
        "\nSemantic reuse: {} cached conditions (two paraphrases of {} tasks), {} unseen paraphrases, {} chat instructions",
        cached.names().len(),
        tasks.len(),
        paraphrases.len(),
        chat.len()
    );
    println!("| reuse distance | paraphrases served from the cache | of those, own task's adapter | chat served a task's adapter |");
    println!("|---|---|---|---|");
    for d in [0.05f32, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5] {
        let hits: Vec<_> = paraphrases
            .iter()
            .filter(|(_, n)| n.distance <= d)
            .collect();
        let own = hits
            .iter()
            .filter(|(t, n)| n.name.split('#').next() == Some(*t))
            .count();
        let chat_hits = chat.iter().filter(|n| n.distance <= d).count();
        println!(
            "| {d:.2} | {}/{} ({:.0}%) | {own}/{} | {chat_hits}/{} |",
            hits.len(),
            paraphrases.len(),
            100.0 * hits.len() as f64 / paraphrases.len() as f64,
            hits.len(),
            chat.len()
        );
    }
    let mut by_distance: Vec<_> = paraphrases.iter().collect();
    by_distance.sort_by(|a, b| a.1.distance.total_cmp(&b.1.distance));
    println!("\n| unseen paraphrase of | nearest cached condition | distance |");
    println!("|---|---|---|");
    for (t, n) in &by_distance {
        println!("| {t} | {} | {:.3} |", n.name, n.distance);
    }
    let nearest_chat = chat
        .iter()
        .map(|n| n.distance)
        .fold(f32::INFINITY, f32::min);
    println!("\nnearest chat instruction to a cached condition: {nearest_chat:.3}");

    if let Some(path) = out {
        let json: Vec<_> = paraphrases
            .iter()
            .map(|(t, n)| {
                let (task, k) = n.name.split_once('#').expect("NAME#K");
                serde_json::json!({"task": t, "nearest_task": task, "nearest_paraphrase": k.parse::<usize>().unwrap(), "distance": n.distance})
            })
            .collect();
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
        println!("wrote {}", path.display());
    }
}
