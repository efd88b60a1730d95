//! Time and memory to generate one adapter, per configuration, encoder and decoder apart.
//!
//! `cargo bench --manifest-path crates/Cargo.toml --bench generate` measures every preset, each in a child process of its own
//! so that peak memory is per configuration, and prints a table. Random decoder weights (timing
//! does not depend on them) and the real all-MiniLM-L6-v2 encoder (`scripts/fetch-assets.sh`).
//!
//! Environment: `DND_BENCH_CONFIGS` (comma-separated preset names), `DND_BENCH_REPS` (timed
//! runs, default 3; 1 for the 1.1 B-parameter preset), `DND_BENCH_BASELINE` (a Python with torch:
//! runs `crates/dnd-core/benches/pytorch_baseline.py` on the same shapes in the same run and prints the ratio).

#[path = "../../../benches/util/mod.rs"]
mod util;

use std::process::Command;

use std::time::Instant;
use util::{median, peak_rss_mib};

use candle_core::{DType, Device};
use dnd_core::encoder::TextEncoder;
use dnd_core::generator::{presets, ConditionDecoder};

/// Synthetic prompts of a realistic length (a question with four choices).
fn prompts(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            format!(
                "Question {i}: which of these best explains why a metal spoon left in hot soup \
                 becomes warm after a few minutes?\nA: conduction of heat\nB: radiation from the \
                 bowl\nC: convection in the air\nD: chemical reaction number {i}"
            )
        })
        .collect()
}

fn run_one(name: &str) {
    let cfg = presets::by_name(name).expect("known preset").unwrap();
    let reps: usize = std::env::var("DND_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if cfg.num_prompts >= 128 { 1 } else { 3 });
    let dev = Device::Cpu;
    let encoder = TextEncoder::load(dnd_core::test_util::encoder_dir(), &dev, DType::F32)
        .expect("encoder (run scripts/fetch-assets.sh)");
    let (dec, _weights) = ConditionDecoder::random(cfg.clone(), 0, &dev, DType::F32).unwrap();
    let p = prompts(cfg.num_prompts);
    let refs: Vec<&str> = p.iter().map(String::as_str).collect();

    let (mut te, mut td, mut tk) = (vec![], vec![], vec![]);
    // One untimed warm-up for the small presets (allocator, page faults).
    let runs = if reps > 1 { reps + 1 } else { reps };
    for i in 0..runs {
        let t0 = Instant::now();
        let cond = encoder
            .encode(&refs, cfg.max_length)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let t1 = Instant::now();
        let tokens = dec.forward(&cond).unwrap().squeeze(0).unwrap();
        let t2 = Instant::now();
        let adapter = dec.layout().detokenize(&tokens, &dev).unwrap();
        let t3 = Instant::now();
        assert!(adapter.size_in_bytes() > 0);
        if runs == reps || i > 0 {
            te.push((t1 - t0).as_secs_f64());
            td.push((t2 - t1).as_secs_f64());
            tk.push((t3 - t2).as_secs_f64());
        }
    }
    let (e, d, k) = (median(te), median(td), median(tk));
    let gmac = dec.decoder().macs() as f64 / 1e9;
    println!(
        "ROW|{name}|{:.1}|{gmac:.1}|{:.3}|{:.3}|{:.3}|{:.3}|{:.1}|{:.0}|{reps}",
        dec.decoder().num_params() as f64 / 1e6,
        e,
        d,
        k,
        e + d + k,
        gmac / d,
        peak_rss_mib()
    );
}

/// Batched misses: `b` prompt sets generated one after another and as one batch
/// (`Generator::generate_batch`, what the server does with misses that queue up), for the
/// small SmolLM2 configuration. `--batches` runs only this table.
fn batch_table() {
    let cfg = presets::smollm2_135m_small().unwrap();
    let dev = Device::Cpu;
    let encoder = TextEncoder::load(dnd_core::test_util::encoder_dir(), &dev, DType::F32)
        .expect("encoder (run scripts/fetch-assets.sh)");
    let (dec, _) = ConditionDecoder::random(cfg.clone(), 0, &dev, DType::F32).unwrap();
    let g = dnd_core::Generator::from_parts(encoder, dec).unwrap();
    let set = |i: usize| -> Vec<String> {
        prompts(cfg.num_prompts)
            .into_iter()
            .map(|p| format!("Set {i}. {p}"))
            .collect()
    };
    g.generate(&set(0)).unwrap();
    println!(
        "\nBatched misses (smollm2-135m-small, {} prompts per set, median of 3)\n",
        cfg.num_prompts
    );
    println!("| cold sets | one after another s | one batch s | speed-up | batch peak RSS MiB |");
    println!("|---|---|---|---|---|");
    for b in [1usize, 4, 16] {
        let sets: Vec<Vec<String>> = (0..b).map(|i| set(1000 * b + i)).collect();
        let (mut seq, mut bat) = (vec![], vec![]);
        for _ in 0..3 {
            let t = Instant::now();
            for s in &sets {
                g.generate(s).unwrap();
            }
            seq.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let slices: Vec<&[String]> = sets.iter().map(Vec::as_slice).collect();
            assert_eq!(g.generate_batch(&slices).unwrap().len(), b);
            bat.push(t.elapsed().as_secs_f64());
        }
        let (s, t) = (median(seq), median(bat));
        println!(
            "| {b} | {s:.2} | {t:.2} | {:.2}x | {:.0} |",
            s / t,
            peak_rss_mib()
        );
    }
}

fn main() {
    // Relative paths on the command line are the repository root's, as the README writes them
    // (cargo runs a bench in its package's folder).
    std::env::set_current_dir(dnd_core::test_util::repo_root()).expect("the repository root");
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--one") {
        run_one(&args[i + 1]);
        return;
    }
    if args.iter().any(|a| a == "--batches") {
        batch_table();
        return;
    }
    let configs = std::env::var("DND_BENCH_CONFIGS")
        .unwrap_or_else(|_| "smollm2-135m-small,qwen25-05b-common-sense".into());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("DnD adapter generation, CPU f32, {threads} threads (median of timed runs)\n");
    println!(
        "| config | decoder params (M) | decoder GMAC | encode s | decode s | detokenize s | total s | decoder GMAC/s | peak RSS MiB | runs |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let exe = std::env::current_exe().unwrap();
    let mut rows = vec![];
    for name in configs.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let out = Command::new(&exe).args(["--one", name]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let Some(row) = text.lines().find_map(|l| l.strip_prefix("ROW|")) else {
            eprintln!("{name} failed:\n{}", String::from_utf8_lossy(&out.stderr));
            std::process::exit(1);
        };
        println!("| {} |", row.replace('|', " | "));
        rows.push((name.to_string(), row.to_string()));
    }
    if let Ok(python) = std::env::var("DND_BENCH_BASELINE") {
        println!("\nPyTorch baseline (same shapes, same machine, same threads):\n");
        println!("| config | PyTorch encode s | PyTorch decode s | Rust encode s | Rust decode s | speed-up (encode+decode) |");
        println!("|---|---|---|---|---|---|");
        for (name, row) in rows {
            let f: Vec<&str> = row.split('|').collect();
            let out = Command::new(&python)
                .arg(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/benches/pytorch_baseline.py"
                ))
                .args(["--config", &name, "--threads", &threads.to_string()])
                .output()
                .expect("baseline python runs");
            let text = String::from_utf8_lossy(&out.stdout);
            let Some(b) = text.lines().find_map(|l| l.strip_prefix("ROW|")) else {
                eprintln!(
                    "baseline {name} failed:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                continue;
            };
            let b: Vec<f64> = b.split('|').map(|v| v.parse().unwrap()).collect();
            let (re, rd): (f64, f64) = (f[3].parse().unwrap(), f[4].parse().unwrap());
            println!(
                "| {name} | {:.3} | {:.3} | {re:.3} | {rd:.3} | {:.2}x |",
                b[0],
                b[1],
                (b[0] + b[1]) / (re + rd)
            );
        }
    }
}
