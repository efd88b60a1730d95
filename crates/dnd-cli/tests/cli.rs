//! The `dnd` tool end to end: init, inspect, generate; its adapter equals the library's.

use dnd_core::test_util as common;

use std::path::Path;
use std::process::Command;

use candle_core::Device;
use common::{assert_close, encoder_dir, golden_path};
use dnd_core::{Generator, LoadOptions, LoraAdapter};

fn dnd<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_dnd"))
        .args(args)
        .output()
        .expect("dnd runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "dnd {args:?} failed:\n{stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned() + &stderr
}

fn dnd_err<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_dnd"))
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "dnd {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `dnd init` of a small seeded generator (N = 4, L = 16, one 8x8x32 stage) for a tiny model.
fn init_tiny(base_model: &str, out: &str) -> String {
    dnd(&[
        "init",
        "--base-model",
        base_model,
        "--chunk-width",
        "16",
        "--num-prompts",
        "4",
        "--max-length",
        "16",
        "--stages",
        "8x8x32",
        "--seed",
        "3",
        "--out",
        out,
    ])
}

#[test]
fn init_inspect_generate() {
    let dir = std::env::temp_dir().join(format!("dnd-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ckpt = dir.join("gen.safetensors");
    let tiny = golden_path("tiny-llama");
    let (ckpt_s, tiny_s) = (ckpt.to_str().unwrap(), tiny.to_str().unwrap());
    let enc = encoder_dir();
    let enc_s = enc.to_str().unwrap();

    let init = |out: &str| init_tiny(tiny_s, out);
    let msg = init(ckpt_s);
    assert!(msg.contains("tokens of (10, 18)"), "{msg}");
    let cfg: serde_json::Value = serde_json::from_str(&dnd(&["inspect", ckpt_s])).unwrap();
    assert_eq!(cfg["num_prompts"], 4);
    assert_eq!(cfg["base_model"]["kv_dim"], 32);
    assert_eq!(cfg["untrained"], true);

    // Seeded: the same seed writes the same weights.
    let again = dir.join("again.safetensors");
    init(again.to_str().unwrap());
    assert_eq!(
        std::fs::read(&ckpt).unwrap(),
        std::fs::read(&again).unwrap()
    );

    let prompts = dir.join("p.txt");
    std::fs::write(&prompts, "Is water wet?\nCan fish fly?\n").unwrap();
    let generate_args = |base: &str, out: &Path| -> Vec<String> {
        [
            "generate",
            "--checkpoint",
            ckpt_s,
            "--encoder",
            enc_s,
            "--prompts",
            prompts.to_str().unwrap(),
            "--base-model",
            base,
            "--out",
            out.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };
    let out = dir.join("adapter");
    let msg = dnd(&generate_args(tiny_s, &out));
    assert!(msg.contains("WARNING: RANDOM WEIGHTS"), "{msg}");
    let from_cli = LoraAdapter::load_peft(&out, &Device::Cpu).unwrap();
    let gen = Generator::load(&ckpt, &enc, &LoadOptions::default()).unwrap();
    let from_lib = gen.generate(&["Is water wet?", "Can fish fly?"]).unwrap();
    assert_eq!(from_cli.pairs().len(), 14);
    for (t, p) in from_lib.pairs() {
        let q = from_cli.get(t.layer, t.module).unwrap();
        assert_close("A", &q.a, &p.a, 1e-6);
        assert_close("B", &q.b, &p.b, 1e-6);
    }

    // A base model of other widths is refused before anything is written.
    let other = dir.join("other.json");
    std::fs::write(
        &other,
        r#"{"hidden_size":32,"intermediate_size":64,"num_hidden_layers":2,"num_attention_heads":2}"#,
    )
    .unwrap();
    let err = dnd_err(&generate_args(other.to_str().unwrap(), &dir.join("x")));
    assert!(err.contains("trained for tiny-llama"), "{err}");
    assert!(!Path::new(&dir.join("x")).exists());

    let err = dnd_err(&[
        "init",
        "--base-model",
        tiny_s,
        "--chunk-width",
        "24",
        "--out",
        ckpt_s,
    ]);
    assert!(
        err.contains("chunk width 24") && err.contains("[2, 4, 8, 16, 32]"),
        "{err}"
    );
}

#[test]
fn collect_writes_the_last_steps_and_refuses_bad_options() {
    let dir = std::env::temp_dir().join(format!("dnd-cli-collect-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let task = dir.join("task.json");
    std::fs::write(
        &task,
        r#"[{"prompt":"Is 2 even?","response":"[True]"},{"prompt":"Is 3 even?","response":"[False]"}]"#,
    )
    .unwrap();
    let out = dir.join("ckpt");
    let tiny = golden_path("tiny-llama");
    let args = |keep: &str| {
        vec![
            "collect".to_string(),
            "--model".into(),
            tiny.to_str().unwrap().into(),
            "--task".into(),
            task.to_str().unwrap().into(),
            "--out".into(),
            out.to_str().unwrap().into(),
            "--steps".into(),
            "4".into(),
            "--rank".into(),
            "2".into(),
            "--keep-last".into(),
            keep.into(),
        ]
    };
    let log = dnd(&args("2"));
    assert!(log.contains("4 steps"), "{log}");
    for step in ["step-00003", "step-00004"] {
        let a = LoraAdapter::load_peft(out.join(step), &Device::Cpu).unwrap();
        assert_eq!(a.rank(), 2);
    }
    assert!(!out.join("step-00002").exists());
    assert!(dnd_err(&args("9")).contains("--keep-last"));

    // train: a rank-2 generator for tiny-llama on that task's checkpoints.
    let init = dir.join("init.safetensors");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    dnd(&[
        "init",
        "--base-model",
        &s(&tiny),
        "--chunk-width",
        "32",
        "--rank",
        "2",
        "--alpha",
        "16",
        "--num-prompts",
        "2",
        "--max-length",
        "8",
        "--out",
        &s(&init),
    ]);
    let gen = dir.join("gen.safetensors");
    let enc = encoder_dir();
    let log = dnd(&[
        "train",
        "--init",
        &s(&init),
        "--encoder",
        &s(&enc),
        "--task",
        &format!("parity={}:{}", s(&task), s(&out)),
        "--steps",
        "3",
        "--warmup",
        "1",
        "--out",
        &s(&gen),
        "--loss-png",
        &s(&dir.join("loss.png")),
    ]);
    assert!(log.contains("3 steps"), "{log}");
    assert!(dir.join("loss.png").exists() && dir.join("gen.state.json").exists());
    assert!(dnd_err(&[
        "train",
        "--init",
        &s(&init),
        "--task",
        "x=nothing",
        "--out",
        "o"
    ])
    .contains("NAME=PROMPTS_FILE:CHECKPOINTS_DIR"));
    // A task without checkpoints serves --objective sft only; sft needs the base model.
    let bare = format!("x={}", s(&task));
    let err = dnd_err(&["train", "--init", &s(&init), "--task", &bare, "--out", "o"]);
    assert!(err.contains("needs at least one checkpoint"), "{err}");
    let err = dnd_err(&[
        "train",
        "--init",
        &s(&init),
        "--task",
        &bare,
        "--out",
        "o",
        "--objective",
        "sft",
    ]);
    assert!(err.contains("needs --model"), "{err}");

    // eval: base and one checkpoint, as a Markdown table.
    let table = dnd(&[
        "eval",
        "--model",
        &s(&tiny),
        "--task",
        &s(&task),
        "--adapter",
        &format!("last={}", s(&out.join("step-00004"))),
        "--out-md",
        &s(&dir.join("t.md")),
    ]);
    assert!(
        table.contains("| base |") && table.contains("| last |"),
        "{table}"
    );
    // Header, rule, the two rows and the constant-answer reference.
    let md = std::fs::read_to_string(dir.join("t.md")).unwrap();
    assert_eq!(md.lines().count(), 5, "{md}");
    assert!(
        md.lines()
            .last()
            .unwrap()
            .starts_with("| constant answer `"),
        "{md}"
    );
}

/// `dnd tasks` writes a train and a test file per task and the task list; the same seed
/// writes the same files.
#[test]
fn tasks_are_written_reproducibly() {
    let dir = std::env::temp_dir().join(format!("dnd-cli-tasks-{}", std::process::id()));
    let s = |p: &std::path::Path| p.to_string_lossy().into_owned();
    // `dnd tasks` into `sub`, 20 train and 10 test examples each, seed 3, and `extra` flags.
    let write = |sub: &str, extra: &[&str]| {
        let out = s(&dir.join(sub));
        let mut args = vec![
            "tasks", "--out", &out, "--train", "20", "--test", "10", "--seed", "3",
        ];
        args.extend_from_slice(extra);
        dnd(&args);
    };
    write("a", &[]);
    write("b", &[]);
    let list: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("a/tasks.json")).unwrap()).unwrap();
    let tasks = list.as_array().unwrap();
    assert_eq!(tasks.len(), 48);
    // `--count 24`: the first 24 tasks (an earlier generator's), their files as in the full run.
    write("c", &["--count", "24"]);
    let first: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("c/tasks.json")).unwrap()).unwrap();
    let first = first.as_array().unwrap();
    assert_eq!(first.len(), 24);
    for (t, full) in first.iter().zip(tasks) {
        assert_eq!(t["name"], full["name"]);
        let file = format!("{}_test.json", t["name"].as_str().unwrap());
        assert_eq!(
            std::fs::read(dir.join("c").join(&file)).unwrap(),
            std::fs::read(dir.join("a").join(&file)).unwrap(),
            "{file}"
        );
    }
    // `--suite params`: the parametric tasks, their instructions naming their parameter.
    write("p", &["--suite", "params"]);
    let params: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("p/tasks.json")).unwrap()).unwrap();
    let params = params.as_array().unwrap();
    assert_eq!(params.len(), 66);
    let add7 = params.iter().find(|t| t["name"] == "add_7").unwrap();
    assert!(add7["systems"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s.as_str().unwrap().contains('7')));
    let items: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("p/add_7_test.json")).unwrap())
            .unwrap();
    for e in &items {
        let n: u32 = e["prompt"].as_str().unwrap().parse().unwrap();
        assert_eq!(e["response"].as_str().unwrap(), (n + 7).to_string());
    }
    for t in tasks {
        let name = t["name"].as_str().unwrap();
        for (split, n) in [("train", 20), ("test", 10)] {
            let file = format!("{name}_{split}.json");
            let a = std::fs::read_to_string(dir.join("a").join(&file)).unwrap();
            let items: Vec<serde_json::Value> = serde_json::from_str(&a).unwrap();
            assert_eq!(items.len(), n, "{file}");
            assert!(items.iter().all(|e| e["prompt"].is_string()
                && e["response"].is_string()
                && e["system"].is_string()));
            assert_eq!(
                a,
                std::fs::read_to_string(dir.join("b").join(&file)).unwrap()
            );
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn score_rates_replies_from_elsewhere_by_the_eval_rules() {
    let dir = std::env::temp_dir().join(format!("dnd-cli-score-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let task = dir.join("t.json");
    std::fs::write(
        &task,
        r#"[{"prompt":"a","response":"[yes]"},{"prompt":"b","response":"[no]"},
            {"prompt":"c","response":"[no]"}]"#,
    )
    .unwrap();
    let replies = dir.join("r.json");
    // Examples 2 and 0: the server answered [no] to both, then [maybe] and [yes].
    std::fs::write(
        &replies,
        r#"{"examples":[2,0],"replies":{"served":["[no]","[no]"],"other":["[maybe]","[yes] sure"]}}"#,
    )
    .unwrap();
    let s = |p: &Path| p.display().to_string();
    let out = dir.join("s.json");
    let table = dnd(&[
        "score",
        "--task",
        &s(&task),
        "--replies",
        &s(&replies),
        "--out-json",
        &s(&out),
    ]);
    assert!(table.contains("| served | 50.0% |"), "{table}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let row = |label: &str| {
        v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["label"] == label)
            .unwrap()
            .clone()
    };
    assert_eq!(row("served")["correct"], 1);
    assert_eq!(row("other")["correct"], 1);
    assert_eq!(row("other")["label_space"], 0.5);
    assert_eq!(v["constant"]["n"], 2);
    std::fs::write(&replies, r#"{"examples":[7],"replies":{"x":["[no]"]}}"#).unwrap();
    let err = dnd_err(&["score", "--task", &s(&task), "--replies", &s(&replies)]);
    assert!(err.contains("example 7 is beyond"), "{err}");
    std::fs::write(&replies, r#"{"examples":[0,1],"replies":{"x":["[no]"]}}"#).unwrap();
    let err = dnd_err(&["score", "--task", &s(&task), "--replies", &s(&replies)]);
    assert!(err.contains("1 replies for 2 examples"), "{err}");
}

#[test]
fn anchors_measure_how_far_prompts_are_from_the_training_conditions() {
    let dir = std::env::temp_dir().join(format!("dnd-cli-anchors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let s = |p: &Path| p.display().to_string();
    let (ckpt, anchored) = (dir.join("g.safetensors"), dir.join("a.safetensors"));
    init_tiny(&s(&golden_path("tiny-llama")), &s(&ckpt));
    let task = dir.join("sum.json");
    std::fs::write(
        &task,
        r#"[{"prompt":"3 and 4","response":"7","system":"Add the two numbers."},
            {"prompt":"1 and 9","response":"10","system":"Reply with the sum of the numbers."}]"#,
    )
    .unwrap();
    let enc = s(&encoder_dir());
    let probe = dir.join("probe.txt");
    std::fs::write(
        &probe,
        "Add the two numbers.\nWrite a haiku about autumn.\n",
    )
    .unwrap();
    let gen_args = |ckpt: &Path| {
        [
            "--checkpoint".to_string(),
            s(ckpt),
            "--encoder".into(),
            enc.clone(),
        ]
    };
    let probe_args = ["--prompts".to_string(), s(&probe)];
    let err = dnd_err(&[&["distance".to_string()][..], &gen_args(&ckpt), &probe_args].concat());
    assert!(err.contains("no anchors"), "{err}");
    let task_arg = [
        "--task".to_string(),
        format!("sum={}", s(&task)),
        "--out".into(),
        s(&anchored),
    ];
    let log = dnd(&[&["anchors".to_string()][..], &gen_args(&ckpt), &task_arg].concat());
    assert!(log.contains("3 anchors from 1 tasks"), "{log}");
    let each = ["--each".to_string()];
    let out = dnd(&[
        &["distance".to_string()][..],
        &gen_args(&anchored),
        &probe_args,
        &each,
    ]
    .concat());
    let lines: Vec<Vec<&str>> = out.lines().map(|l| l.split('\t').collect()).collect();
    // The trained instruction is its own anchor; the haiku request is far from all three.
    assert_eq!(lines[0][1], "sum: system 1");
    assert!(lines[0][0].parse::<f32>().unwrap() < 1e-4, "{out}");
    assert!(lines[1][0].parse::<f32>().unwrap() > 0.3, "{out}");
    // The weights are the input's: the same adapter from both checkpoints.
    let a = Generator::load(&ckpt, encoder_dir(), &LoadOptions::default()).unwrap();
    let b = Generator::load(&anchored, encoder_dir(), &LoadOptions::default()).unwrap();
    assert!(a.anchors().is_none() && b.anchors().unwrap().names().len() == 3);
    let (la, lb) = (
        a.generate(&["3 and 4"]).unwrap(),
        b.generate(&["3 and 4"]).unwrap(),
    );
    for (t, p) in la.pairs() {
        assert_close("A", &p.a, &lb.pairs()[t].a, 0.0);
    }
}
