//! End to end: the real `mistralrs-server` binary on loopback with the golden tiny Qwen2 and a
//! small random generator, driven by the real `openai` Python client
//! (`tests/e2e/openai_client.py`, installed by `scripts/fetch-assets.sh openai`).
#![cfg(feature = "server")]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use candle_core::Device;
use common::{golden_path, tiny_generator, token_ids, Golden};
use mistralrs_dnd::generator::checkpoint;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The server process; killed when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The tiny generator with one training-condition anchor, the instruction `trained`.
fn anchored_generator(dir: &Path, trained: &str) -> PathBuf {
    let path = tiny_generator(dir);
    let g = mistralrs_dnd::Generator::load(
        &path,
        root().join(".assets/all-MiniLM-L6-v2"),
        &mistralrs_dnd::LoadOptions::default(),
    )
    .unwrap();
    let mut cfg = checkpoint::read_config(&path).unwrap();
    cfg.anchor_names = vec!["sum: system 1".into()];
    let mut tensors: std::collections::HashMap<_, _> =
        candle_core::safetensors::load(&path, &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
    let row = g.pooled(&[trained]).unwrap().unsqueeze(0).unwrap();
    tensors.insert(
        mistralrs_dnd::generator::anchors::CONDITION_ANCHORS.to_string(),
        row,
    );
    checkpoint::save(&path, &cfg, &tensors).unwrap();
    path
}

fn start_server(extra: &[&str], name: &str) -> Server {
    start_server_with(extra, name, None)
}

fn start_server_with(extra: &[&str], name: &str, anchor: Option<&str>) -> Server {
    let dir = std::env::temp_dir().join(format!("dnd-e2e-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let gen = match anchor {
        Some(a) => anchored_generator(&dir, a),
        None => tiny_generator(&dir),
    };
    let model: [std::ffi::OsString; 5] = [
        "plain".into(),
        "-m".into(),
        golden_path("tiny-qwen2").into(),
        "-d".into(),
        "f32".into(),
    ];
    spawn_server(&gen, extra, &model)
}

/// `mistralrs-server` with the DnD provider, generator `gen`, options `extra` and the model
/// subcommand `model`; waits for its address.
fn spawn_server(gen: &Path, extra: &[&str], model: &[std::ffi::OsString]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mistralrs-server"))
        .current_dir(root())
        .args(["--port", "0", "--cpu", "--max-seqs", "16"])
        .args(["--adapter-provider", "dnd", "--dnd-generator"])
        .arg(gen)
        .args(extra)
        .args(model)
        .stdout(Stdio::piped())
        .spawn()
        .expect("mistralrs-server starts");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("listening on ") {
                let _ = tx.send(url.to_string());
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(300))
        .expect("the server printed its address");
    Server { child, url }
}

fn python(args: &[&str]) {
    let venv = root().join(".assets/venv/bin/python");
    assert!(
        venv.exists(),
        "{} missing: run scripts/fetch-assets.sh openai",
        venv.display()
    );
    let out = Command::new(venv)
        .arg(root().join("tests/e2e/openai_client.py"))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "client failed:\n{stdout}\n{stderr}");
    eprintln!("client summary: {stdout}");
}

/// The transformers reference's greedy continuation of the golden prompt 0, up to the first
/// end-of-sequence token (where the server stops), and the five likeliest first tokens with
/// their natural-log probabilities (JSON `[[text, logprob], ...]`).
fn golden_base_continuation() -> (String, String, String) {
    let golden = Golden::load("tiny-qwen2/expected.safetensors");
    let prompt = golden.meta["prompts"][0].as_str().unwrap().to_string();
    let ids = token_ids(golden.get("base.seq0.greedy"));
    let eos = 258;
    let ids: Vec<u32> = ids.into_iter().take_while(|&t| t != eos).collect();
    let tok = tokenizers::Tokenizer::from_file(golden_path("tiny-qwen2/tokenizer.json")).unwrap();
    // The logits after the prompt's last token give the first generated token.
    let logits = golden.get("base.seq0.logits");
    let last = logits.get(logits.dim(0).unwrap() - 1).unwrap();
    let logprobs = candle_nn::ops::log_softmax(&last, candle_core::D::Minus1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut order: Vec<usize> = (0..logprobs.len()).collect();
    order.sort_by(|&a, &b| logprobs[b].total_cmp(&logprobs[a]));
    let top: Vec<(String, f32)> = order[..5]
        .iter()
        .map(|&i| (tok.decode(&[i as u32], false).unwrap(), logprobs[i]))
        .collect();
    (
        prompt,
        tok.decode(&ids, true).unwrap(),
        serde_json::to_string(&top).unwrap(),
    )
}

/// transformers+peft's greedy continuation of the golden prompt 0 with the golden PEFT
/// adapter `adapter` (`adapter1`, `adapter2`), up to the first end-of-sequence token.
fn golden_adapter_continuation(adapter: &str) -> String {
    let golden = Golden::load("tiny-qwen2/expected.safetensors");
    let ids = token_ids(golden.get(&format!("{adapter}.seq0.greedy")));
    let ids: Vec<u32> = ids.into_iter().take_while(|&t| t != 258).collect();
    let tok = tokenizers::Tokenizer::from_file(golden_path("tiny-qwen2/tokenizer.json")).unwrap();
    tok.decode(&ids, true).unwrap()
}

/// The golden prompt 0 of golden model `model` (text and token ids) and, for positions 1..,
/// each prompt token's natural-log probability under transformers (`base`) and
/// transformers+peft with adapter1 (`adapter1`): log_softmax of the golden logits at the
/// position before it (JSON).
fn golden_prompt_logprobs(model: &str) -> String {
    let golden = Golden::load(&format!("{model}/expected.safetensors"));
    let ids = token_ids(golden.get("input.seq0.ids"));
    let of = |variant: &str| -> Vec<f32> {
        let logits = golden.get(&format!("{variant}.seq0.logits"));
        let lp = candle_nn::ops::log_softmax(logits, candle_core::D::Minus1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        (1..ids.len()).map(|i| lp[i - 1][ids[i] as usize]).collect()
    };
    serde_json::json!({
        "prompt": golden.meta["prompts"][0],
        "ids": ids,
        "base": of("base"),
        "adapter1": of("adapter1"),
    })
    .to_string()
}

#[test]
fn openai_client_sees_specialised_cached_and_base_answers() {
    // Named adapters: the golden PEFT adapter1 as `a1`, and a prompt set as `yesno`.
    let dir = std::env::temp_dir().join(format!("dnd-e2e-{}-named", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let preset = dir.join("yesno.txt");
    std::fs::write(&preset, "Is snow hot?\nIs grass green?\n").unwrap();
    let lora = format!("a1={}", golden_path("tiny-qwen2/adapter1").display());
    let preset = format!("yesno={}", preset.display());
    // The adapter root for runtime loading: both golden adapters, a pickled folder, and a
    // link to a folder outside it.
    let root = dir.join("root");
    let outside = dir.join("outside");
    for a in ["adapter1", "adapter2"] {
        std::fs::create_dir_all(root.join(a)).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(
                golden_path(&format!("tiny-qwen2/{a}/{f}")),
                root.join(a).join(f),
            )
            .unwrap();
        }
    }
    std::fs::create_dir_all(root.join("pickle")).unwrap();
    std::fs::copy(
        golden_path("tiny-qwen2/adapter1/adapter_config.json"),
        root.join("pickle/adapter_config.json"),
    )
    .unwrap();
    std::fs::write(root.join("pickle/adapter_model.bin"), b"not loaded").unwrap();
    let _ = std::fs::remove_dir_all(&outside);
    std::fs::create_dir_all(&outside).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(
            golden_path(&format!("tiny-qwen2/adapter1/{f}")),
            outside.join(f),
        )
        .unwrap();
    }
    let escape = root.join("escape");
    let _ = std::fs::remove_file(&escape);
    std::os::unix::fs::symlink(&outside, &escape).unwrap();
    let server = start_server(
        &[
            "--dnd-cache-entries",
            "8",
            "--lora",
            &lora,
            "--dnd-preset",
            &preset,
            "--adapter-root",
            root.to_str().unwrap(),
        ],
        "e2e",
    );
    let (prompt, expected, top) = golden_base_continuation();
    let with_a1 = golden_adapter_continuation("adapter1");
    let with_a2 = golden_adapter_continuation("adapter2");
    assert_ne!(with_a1, with_a2, "the two golden adapters answer alike");
    python(&[
        &server.url,
        "e2e",
        &prompt,
        &expected,
        &top,
        &with_a1,
        &with_a2,
        outside.to_str().unwrap(),
        &golden_prompt_logprobs("tiny-qwen2"),
    ]);
}

#[test]
fn sixty_four_concurrent_requests_over_sixteen_prompt_sets_with_room_for_four_and_six_in_host_memory(
) {
    // Room for exactly four adapters of the tiny generator (17 920 bytes each) on the device,
    // and six more in the host-memory tier.
    let budget = 4 * 17_920;
    let host = 6 * 17_920;
    let (size, host_size) = (budget.to_string(), host.to_string());
    let server = start_server(
        &[
            "--dnd-cache-entries",
            "16",
            "--dnd-cache-size",
            &size,
            "--dnd-host-cache-size",
            &host_size,
            "--dnd-cache-wait-secs",
            "600",
        ],
        "load",
    );
    python(&[&server.url, "load", &size, &host_size]);
}

#[test]
fn ordinary_chat_far_from_the_trained_conditions_gets_the_base_model() {
    let trained = "Add the two numbers and reply with the sum.";
    let server = start_server_with(
        &[
            "--dnd-abstain-distance",
            "0.5",
            "--dnd-reuse-distance",
            "0.3",
        ],
        "abstain",
        Some(trained),
    );
    python(&[&server.url, "abstain", trained]);
}

/// A GGUF model served with f32 activations (`gguf -d f32`, the tokenizer from `-t`, since
/// the golden GGUF copies carry none): the prompt's logprobs, on the base model and under a
/// named PEFT adapter, are transformers+peft's to 1e-4. mistral.rs's own choice for GGUF
/// (`-d auto`, bf16 on a CPU) misses that by about 1e-3.
#[test]
fn gguf_served_in_f32_scores_prompts_as_transformers_peft_does() {
    let name = "tiny-qwen3";
    let file = "model-f32.gguf";
    serve_and_score(
        name,
        file,
        &[
            "gguf",
            "-m",
            golden_path(name).to_str().unwrap(),
            "-f",
            file,
            "-t",
            golden_path(name).to_str().unwrap(),
            "-d",
            "f32",
        ],
    );
}

/// A text-only Gemma 3 checkpoint (`Gemma3ForCausalLM`) given to `plain`, which mistral.rs
/// 0.8.1 loads only through its multimodal pipeline: served, and scored as transformers+peft
/// scores it, base and under a named PEFT adapter.
#[test]
fn text_only_gemma3_served_through_plain_scores_prompts_as_transformers_peft_does() {
    let name = "tiny-gemma3";
    let dir = golden_path(name);
    serve_and_score(
        name,
        name,
        &["plain", "-m", dir.to_str().unwrap(), "-d", "f32"],
    );
}

/// Serves golden model `name` (model subcommand `model`, served as `served`) with its
/// adapter1 as the named adapter `a1`, and checks prompt logprobs against the golden logits.
fn serve_and_score(name: &str, served: &str, model: &[&str]) {
    serve_and_score_with(name, served, model, &[], "1e-4", None);
}

/// [`serve_and_score`] with `extra` server flags, within `tol`; with `resident`, the adapter
/// cache must then hold that many bytes (a1's).
fn serve_and_score_with(
    name: &str,
    served: &str,
    model: &[&str],
    extra: &[&str],
    tol: &str,
    resident: Option<usize>,
) {
    // Tests of one model with other flags run side by side: each writes its own folder.
    let dir = std::env::temp_dir().join(format!(
        "dnd-e2e-{}-score-{name}{}",
        std::process::id(),
        extra.concat()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let gen = common::tiny_generator_for(&dir, name);
    let model: Vec<std::ffi::OsString> = model.iter().map(|a| a.into()).collect();
    let lora = format!("a1={}", golden_path(&format!("{name}/adapter1")).display());
    let args: Vec<&str> = ["--lora", lora.as_str()]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    let server = spawn_server(&gen, &args, &model);
    let mut golden: serde_json::Value =
        serde_json::from_str(&golden_prompt_logprobs(name)).unwrap();
    if let Some(bytes) = resident {
        golden["adapter_bytes"] = bytes.into();
    }
    python(&[&server.url, "scoring", served, &golden.to_string(), tol]);
}

/// `--lora-dtype f16` on a model computing in f32: the named adapter is kept in half the bytes
/// (the cache's resident bytes are its PEFT file's factor count times 2), and the prompt still
/// scores as transformers+peft scores it, to f16's rounding of the factors (2e-3 against 1e-4
/// in f32).
#[test]
fn named_adapter_kept_in_f16_takes_two_bytes_a_weight_and_scores_to_f16_rounding() {
    let name = "tiny-qwen3";
    let file = "model-f32.gguf";
    let weights: usize = candle_core::safetensors::load(
        golden_path(&format!("{name}/adapter1/adapter_model.safetensors")),
        &candle_core::Device::Cpu,
    )
    .unwrap()
    .values()
    .map(|t| t.elem_count())
    .sum();
    let dir = golden_path(name);
    let model = [
        "gguf",
        "-m",
        dir.to_str().unwrap(),
        "-f",
        file,
        "-t",
        dir.to_str().unwrap(),
        "-d",
        "f32",
    ];
    serve_and_score_with(
        name,
        file,
        &model,
        &["--lora-dtype", "f16"],
        "2e-3",
        Some(2 * weights),
    );
}

#[test]
fn greedy_replies_do_not_depend_on_what_else_is_running() {
    // SmolLM2 with the shipped skills generator: small prompts whose replies a perturbed KV
    // cache or a misrouted adapter row visibly changes. With mistral.rs's prefix cache on
    // (`--prefix-cache-n 16`) this fails: a base reply changes when it runs beside adapter
    // requests.
    let gguf = root().join(".assets/smollm2");
    let file = "SmolLM2-135M-Instruct.Q4_1.gguf";
    assert!(
        gguf.join(file).exists(),
        "run scripts/fetch-assets.sh smollm2"
    );
    let model: [std::ffi::OsString; 5] = [
        "gguf".into(),
        "-m".into(),
        gguf.into(),
        "-f".into(),
        file.into(),
    ];
    let gen = root().join("generators/smollm2-135m-skills.safetensors");
    let server = spawn_server(&gen, &[], &model);
    python(&[&server.url, "concurrent", file]);
}

/// lm-evaluation-harness, a client no one here wrote, against the server under the named PEFT
/// adapter `a1`: a loglikelihood task (`local-completions`, tokenizing through `/tokenize`,
/// continuations scored by `echo` with `logprobs` on token prompts), whose every
/// continuation's loglikelihood and greediness must be transformers+peft's from the golden
/// logits; and a generative task through its chat client (`local-chat-completions` with the
/// chat template), whose replies must be transformers+peft's greedy ones.
#[test]
fn lm_evaluation_harness_scores_and_generates_as_transformers_peft_does() {
    let lm_eval = root().join(".assets/lmeval/bin/lm_eval");
    assert!(
        lm_eval.exists(),
        "{} missing: run scripts/fetch-assets.sh lmeval",
        lm_eval.display()
    );
    let lora = format!("a1={}", golden_path("tiny-qwen2/adapter1").display());
    let server = start_server(&["--lora", &lora], "lmeval");
    let out = std::env::temp_dir().join(format!("dnd-e2e-{}-lmeval-out", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let task_dir = root().join("tests/e2e/lm_eval");
    // Runs lm_eval with `model` on `task` (from tests/e2e/lm_eval); the samples it logged.
    let run_lm_eval = |model: &str, endpoint: &str, task: &str, extra: &[&str]| {
        let run = Command::new(&lm_eval)
            .current_dir(&task_dir)
            .env("HF_DATASETS_OFFLINE", "1")
            .env("HF_HUB_OFFLINE", "1")
            .args(["--model", model, "--model_args"])
            .arg(format!(
                "base_url={}{endpoint},model=a1,num_concurrent=2,max_retries=1",
                server.url
            ))
            .args(["--tasks", task, "--include_path"])
            .arg(&task_dir)
            .args(extra)
            .args(["--log_samples", "--output_path"])
            .arg(out.join(task))
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "lm_eval {task} failed:\n{}\n{}",
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        );
        let samples = walk_files(&out.join(task))
            .into_iter()
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("samples_"))
            })
            .expect("lm_eval wrote its samples");
        std::fs::read_to_string(samples)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .collect::<Vec<_>>()
    };

    let samples = run_lm_eval(
        "local-completions",
        "/v1/completions",
        "dnd_continuation",
        &[],
    );
    // The expectation: golden prompt k split into the task's context and continuation.
    let golden = Golden::load("tiny-qwen2/expected.safetensors");
    let tok = tokenizers::Tokenizer::from_file(golden_path("tiny-qwen2/tokenizer.json")).unwrap();
    let expected = |context: &str| -> Option<(f64, bool)> {
        let seq = (0..2).find(|k| {
            golden.meta["prompts"][*k]
                .as_str()
                .is_some_and(|p| p.starts_with(context))
        })?;
        let ids = token_ids(golden.get(&format!("input.seq{seq}.ids")));
        let ctx = tok.encode(context, false).unwrap().get_ids().len();
        let lp = candle_nn::ops::log_softmax(
            golden.get(&format!("adapter1.seq{seq}.logits")),
            candle_core::D::Minus1,
        )
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
        let sum = (ctx..ids.len())
            .map(|i| lp[i - 1][ids[i] as usize] as f64)
            .sum();
        let greedy = (ctx..ids.len()).all(|i| {
            let row = &lp[i - 1];
            row.iter().all(|&v| v <= row[ids[i] as usize])
        });
        Some((sum, greedy))
    };
    let mut checked = 0;
    for s in &samples {
        let context = s["doc"]["context"].as_str().unwrap();
        // The first choice is the golden prompt's own continuation.
        let (want, want_greedy) = expected(context).expect("a golden prompt");
        let got: f64 = s["resps"][0][0][0].as_str().unwrap().parse().unwrap();
        let got_greedy = s["resps"][0][0][1].as_str().unwrap() == "True";
        assert!(
            (got - want).abs() < 1e-3,
            "{context:?}: lm-eval's loglikelihood {got}, transformers+peft's {want}"
        );
        assert_eq!(got_greedy, want_greedy, "{context:?}: is_greedy");
        checked += 1;
    }
    assert_eq!(checked, 2, "both documents scored");

    let replies = run_lm_eval(
        "local-chat-completions",
        "/v1/chat/completions",
        "dnd_chat_reply",
        &["--apply_chat_template"],
    );
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(task_dir.join("chat_expected.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(replies.len(), 2, "both documents answered");
    for s in &replies {
        let context = s["doc"]["context"].as_str().unwrap();
        let got = s["resps"][0][0].as_str().unwrap();
        assert_eq!(got, expected[context], "{context:?}: lm-eval's chat reply");
    }
}

/// Every file under `dir`, recursively.
fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk_files(&path));
        } else {
            files.push(path);
        }
    }
    files
}
