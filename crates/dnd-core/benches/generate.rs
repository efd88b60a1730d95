//! Time and memory to generate one adapter, per configuration, encoder and decoder apart.
//!
//! `cargo bench --manifest-path crates/Cargo.toml --bench generate` measures every preset (or, in
//! `DND_BENCH_CONFIGS`, a trained checkpoint's path), each in a child process of its own
//! so that peak memory is per configuration, and prints a table. Random decoder weights (timing
//! does not depend on them) and the real all-MiniLM-L6-v2 encoder (`scripts/fetch-assets.sh`).
//!
//! Environment: `DND_BENCH_CONFIGS` (comma-separated preset names), `DND_BENCH_REPS` (timed
//! runs, default 3; 1 for the 1.1 B-parameter preset), `DND_BENCH_DTYPES` (comma-separated,
//! default `f32`; `bf16` keeps the weights in bf16 and runs the products on the CPU's bf16 dot
//! products where it has them), `DND_BENCH_BASELINE` (a Python with torch: runs
//! `crates/dnd-core/benches/pytorch_baseline.py` on the same shapes and dtype in the same run and
//! prints the ratio), `DND_BENCH_ROUNDS` (default 1: rounds of every configuration and dtype,
//! each Rust run followed by its PyTorch run, and the median ratio over the rounds),
//! `DND_BENCH_PREPARE=0` (a preset's decoder without its kernels readied once, as
//! `Generator::load` readies a checkpoint's: what `ConditionDecoder::prepare` buys).

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

fn parse_dtype(name: &str) -> DType {
    match name {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        other => panic!("DND_BENCH_DTYPES: unknown dtype {other} (f32 or bf16)"),
    }
}

/// `DND_BENCH_REPS`, or `default`.
fn bench_reps(default: usize) -> usize {
    std::env::var("DND_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Times `reps` generations (after one untimed warm-up when `warmup`: allocator, page faults)
/// split into encode, decode and detokenize by [`dnd_core::Generator::generate_timed`], and
/// prints the row the parent process collects (medians).
fn time_generator(name: &str, dtype: DType, g: &dnd_core::Generator, reps: usize, warmup: bool) {
    let p = prompts(g.config().num_prompts);
    let (mut te, mut td, mut tk) = (vec![], vec![], vec![]);
    for i in 0..reps + usize::from(warmup) {
        let (adapter, t) = g.generate_timed(&p).unwrap();
        assert!(adapter.size_in_bytes() > 0);
        if !warmup || i > 0 {
            te.push(t.encode.as_secs_f64());
            td.push(t.decode.as_secs_f64());
            tk.push(t.detokenize.as_secs_f64());
        }
    }
    let (e, d, k) = (median(te), median(td), median(tk));
    let dec = g.condition_decoder().decoder();
    let gmac = dec.macs() as f64 / 1e9;
    println!(
        "ROW|{name}|{}|{:.1}|{gmac:.1}|{e:.3}|{d:.3}|{k:.3}|{:.3}|{:.1}|{:.0}|{reps}",
        dtype.as_str(),
        dec.num_params() as f64 / 1e6,
        e + d + k,
        gmac / d,
        peak_rss_mib()
    );
}

/// A trained generator checkpoint (a config named by its path), modulation and token offset
/// included.
fn run_checkpoint(path: &str, dtype: DType) {
    let opts = dnd_core::LoadOptions {
        device: Device::Cpu,
        dtype,
    };
    let g = dnd_core::Generator::load(path, dnd_core::test_util::encoder_dir(), &opts)
        .expect("generator checkpoint and encoder");
    time_generator(path, dtype, &g, bench_reps(5), true);
}

fn run_one(name: &str, dtype: DType) {
    if name.ends_with(".safetensors") {
        return run_checkpoint(name, dtype);
    }
    let cfg = presets::by_name(name).expect("known preset").unwrap();
    let reps = bench_reps(if cfg.num_prompts >= 128 { 1 } else { 3 });
    let dev = Device::Cpu;
    let encoder = TextEncoder::load(dnd_core::test_util::encoder_dir(), &dev, dtype)
        .expect("encoder (run scripts/fetch-assets.sh)");
    let (mut dec, _weights) = ConditionDecoder::random(cfg, 0, &dev, dtype).unwrap();
    // As a loaded generator is (`Generator::load`); DND_BENCH_PREPARE=0 times it without.
    if std::env::var("DND_BENCH_PREPARE").as_deref() != Ok("0") {
        dec.prepare().unwrap();
    }
    let g = dnd_core::Generator::from_parts(encoder, dec).unwrap();
    // The 1.1 B-parameter preset runs once, without a warm-up.
    time_generator(name, dtype, &g, reps, reps > 1);
}

/// Batched misses: `b` prompt sets generated one after another and as one batch
/// (`Generator::generate_batch`, what the server does with misses that queue up), for the
/// small SmolLM2 configuration. `--batches` runs only this table.
fn batch_table() {
    let cfg = presets::smollm2_135m_small().unwrap();
    let dev = Device::Cpu;
    let encoder = TextEncoder::load(dnd_core::test_util::encoder_dir(), &dev, DType::F32)
        .expect("encoder (run scripts/fetch-assets.sh)");
    let (mut dec, _) = ConditionDecoder::random(cfg.clone(), 0, &dev, DType::F32).unwrap();
    // As the server's generator, loaded by `Generator::load`, is.
    dec.prepare().unwrap();
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

/// f32 and bf16 products side by side on the generator's shapes (`--products`): GMAC/s of
/// each, the median of 5 after a warm-up.
fn products_table() {
    use dnd_core::matmul::{gemm_in, Operand, Precision};
    // (m, n, k, what): BERT's projections for 16 prompts of 60 tokens, a Winograd position of
    // the small config's widest convolution, and one of the authors' config.
    let shapes = [
        (960, 1152, 384, "BERT q,k,v"),
        (960, 1536, 384, "BERT feed-forward in"),
        (960, 384, 1536, "BERT feed-forward out"),
        (
            256,
            485,
            256,
            "Winograd position, small config's last ConvL",
        ),
        (1024, 512, 1024, "square-ish 1024"),
        (64, 200, 64, "narrow 64"),
    ];
    let par = dnd_core::generator::conv::gemm_parallelism();
    println!(
        "\nMatrix products, f32 (gemm crate) vs bf16 dot products (available: {})\n",
        dnd_core::matmul::bf16::available()
    );
    println!("| m x n x k | what | f32 GMAC/s | bf16 GMAC/s | bf16 / f32 |");
    println!("|---|---|---|---|---|");
    for (m, n, k, what) in shapes {
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 104729) % 1000) as f32 / 1000.0)
            .collect();
        let mut c = vec![0f32; m * n];
        let mut rate = |p: Precision| {
            let mut t = vec![];
            for _ in 0..6 {
                let t0 = Instant::now();
                // SAFETY: row-major a (m, k), b (k, n), c (m, n), all allocated at those sizes.
                unsafe {
                    gemm_in(
                        p,
                        m,
                        n,
                        k,
                        c.as_mut_ptr(),
                        n,
                        false,
                        Operand::rows(a.as_ptr(), k),
                        Operand::rows(b.as_ptr(), n),
                        1.0,
                        par,
                    )
                };
                t.push(t0.elapsed().as_secs_f64());
            }
            t.remove(0);
            (m * n * k) as f64 / median(t) / 1e9
        };
        let (f, h) = (rate(Precision::F32), rate(Precision::Bf16));
        println!(
            "| {m} x {n} x {k} | {what} | {f:.0} | {h:.0} | {:.2} |",
            h / f
        );
    }
}

fn main() {
    // Relative paths on the command line are the repository root's, as the README writes them
    // (cargo runs a bench in its package's folder).
    std::env::set_current_dir(dnd_core::test_util::repo_root()).expect("the repository root");
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--one") {
        run_one(&args[i + 1], parse_dtype(&args[i + 2]));
        return;
    }
    if args.iter().any(|a| a == "--products") {
        products_table();
        return;
    }
    if args.iter().any(|a| a == "--batches") {
        batch_table();
        return;
    }
    let configs = std::env::var("DND_BENCH_CONFIGS")
        .unwrap_or_else(|_| "smollm2-135m-small,qwen25-05b-common-sense".into());
    let dtypes = std::env::var("DND_BENCH_DTYPES").unwrap_or_else(|_| "f32".into());
    let dtypes: Vec<&str> = dtypes
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    dtypes.iter().for_each(|d| {
        parse_dtype(d);
    });
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "DnD adapter generation, CPU, {threads} threads (median of timed runs); bf16 dot products: {}\n",
        if dnd_core::matmul::bf16::available() { "yes" } else { "no (bf16 computes in f32)" }
    );
    println!(
        "| config | dtype | decoder params (M) | decoder GMAC | encode s | decode s | detokenize s | total s | decoder GMAC/s | peak RSS MiB | runs |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let exe = std::env::current_exe().unwrap();
    let names: Vec<&str> = configs
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let python = std::env::var("DND_BENCH_BASELINE").ok();
    // Each round times every (config, dtype) in Rust and, right after it, in PyTorch: on a
    // shared machine whose speed drifts, a ratio is only fair between neighbouring runs.
    let rounds: usize = std::env::var("DND_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let mut paired: Vec<(String, String, String, Option<[f64; 2]>)> = vec![];
    for _ in 0..rounds {
        for (name, dtype) in names
            .iter()
            .flat_map(|n| dtypes.iter().map(move |d| (*n, *d)))
        {
            let out = Command::new(&exe)
                .args(["--one", name, dtype])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            let Some(row) = text.lines().find_map(|l| l.strip_prefix("ROW|")) else {
                eprintln!("{name} failed:\n{}", String::from_utf8_lossy(&out.stderr));
                std::process::exit(1);
            };
            println!("| {} |", row.replace('|', " | "));
            let base = python
                .as_ref()
                .and_then(|py| pytorch_row(py, name, dtype, threads));
            paired.push((name.to_string(), dtype.to_string(), row.to_string(), base));
        }
    }
    if python.is_none() {
        return;
    }
    println!("\nPyTorch baseline (same shapes, same machine, same threads; each run right after its Rust run):\n");
    println!("| config | dtype | PyTorch encode s | PyTorch decode s | Rust encode s | Rust decode s | speed-up (encode+decode) |");
    println!("|---|---|---|---|---|---|---|");
    let mut ratios: Vec<(String, String, f64)> = vec![];
    for (name, dtype, row, base) in &paired {
        let Some(b) = base else { continue };
        let f: Vec<&str> = row.split('|').collect();
        let (re, rd): (f64, f64) = (f[4].parse().unwrap(), f[5].parse().unwrap());
        let ratio = (b[0] + b[1]) / (re + rd);
        println!(
            "| {name} | {dtype} | {:.3} | {:.3} | {re:.3} | {rd:.3} | {ratio:.2}x |",
            b[0], b[1]
        );
        ratios.push((name.clone(), dtype.clone(), ratio));
    }
    if rounds > 1 {
        println!("\n| config | dtype | speed-up, median of {rounds} rounds | lowest | highest |");
        println!("|---|---|---|---|---|");
        for name in &names {
            for dtype in &dtypes {
                let r: Vec<f64> = ratios
                    .iter()
                    .filter(|(n, d, _)| n == name && d == dtype)
                    .map(|(_, _, r)| *r)
                    .collect();
                if r.is_empty() {
                    continue;
                }
                let (lo, hi) = r
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                println!(
                    "| {name} | {dtype} | {:.2}x | {lo:.2}x | {hi:.2}x |",
                    median(r.clone())
                );
            }
        }
    }
}

/// PyTorch's encode and decode seconds for one configuration and dtype
/// (`pytorch_baseline.py`), or `None` (with its error printed) if it failed.
fn pytorch_row(python: &str, name: &str, dtype: &str, threads: usize) -> Option<[f64; 2]> {
    let out = Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/benches/pytorch_baseline.py"
        ))
        .args(["--config", name, "--threads", &threads.to_string()])
        .args(["--dtype", dtype])
        .output()
        .expect("baseline python runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(b) = text.lines().find_map(|l| l.strip_prefix("ROW|")) else {
        eprintln!(
            "baseline {name} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    };
    let b: Vec<f64> = b.split('|').map(|v| v.parse().unwrap()).collect();
    Some([b[0], b[1]])
}
