//! `mistralrs-server`: an OpenAI-compatible mistral.rs server; with `--adapter-provider dnd`
//! every request is served with a LoRA adapter generated from its own prompts.
//!
//!   mistralrs-server --port 1234 --cpu --adapter-provider dnd --dnd-generator G.safetensors \
//!       gguf -m .assets/smollm2 -f SmolLM2-135M-Instruct.Q4_1.gguf

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Parser, Subcommand, ValueEnum};
use mistralrs::{
    ModelDType, MultimodalLoaderType, MultimodalModelBuilder, TextModelBuilder, TokenSource,
};
use mistralrs_dnd::adapters::BaseModelShape;
use mistralrs_dnd::cache::CacheLimits;
use mistralrs_dnd::engine::load::{load_gguf, GgufOptions};
use mistralrs_dnd::engine::set_adapter_provider;
use mistralrs_dnd::policy::{PromptPolicy, PromptSource};
use mistralrs_dnd::provider::{DndProvider, GenerationShare, ProviderOptions};
use mistralrs_dnd::server::{router, RuntimeLoading, ServerState};

#[derive(Parser)]
#[command(
    version,
    about = "OpenAI-compatible mistral.rs server with per-request DnD adapters"
)]
struct Args {
    /// IP to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    serve_ip: String,
    /// Port to listen on (0: any free port; the address is printed on stdout).
    #[arg(short, long, default_value_t = 1234)]
    port: u16,
    /// Most sequences running at once.
    #[arg(long, default_value_t = 16)]
    max_seqs: usize,
    /// Most finished sequences whose KV cache mistral.rs keeps for later prompts with the same
    /// prefix (0: off). Off by default: with it on, greedy replies to concurrent requests that
    /// share a system prompt differ from the same requests sent one at a time (README, "Prefix
    /// cache").
    #[arg(long, default_value_t = 0)]
    prefix_cache_n: usize,
    /// Run on the CPU even when an accelerator is available.
    #[arg(long)]
    cpu: bool,
    /// A chat template (Jinja literal, or a .json / .jinja file) overriding the model's.
    #[arg(long)]
    chat_template: Option<String>,
    /// Per-request adapters: `dnd` generates them from each request's prompts.
    #[arg(long, value_enum)]
    adapter_provider: Option<ProviderKind>,
    #[command(flatten)]
    dnd: DndArgs,
    #[command(subcommand)]
    model: ModelArgs,
}

#[derive(Clone, Copy, ValueEnum)]
enum ProviderKind {
    /// Drag-and-Drop LLMs: a generator turns the request's prompts into a LoRA adapter.
    Dnd,
}

/// The dtype adapters are kept in (`--lora-dtype`).
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LoraDtype {
    /// f32 on a CPU; elsewhere bf16 or f16 where `-d` names it, else f32.
    Auto,
    F32,
    F16,
    Bf16,
}

/// The dtype the generator runs in (`--dnd-dtype`).
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum GeneratorDtype {
    /// The reference numerics.
    F32,
    /// Half the generator's weights; on a CPU with AVX512-BF16 its products run in bf16.
    Bf16,
}

#[derive(clap::Args)]
struct DndArgs {
    /// Generator checkpoint (.safetensors) made for this base model.
    #[arg(long)]
    dnd_generator: Option<PathBuf>,
    /// Sentence-BERT folder of the generator (scripts/fetch-assets.sh installs it).
    #[arg(long, default_value = ".assets/all-MiniLM-L6-v2")]
    dnd_encoder: PathBuf,
    /// Most cached adapters.
    #[arg(long, default_value_t = 16)]
    dnd_cache_entries: usize,
    /// Cache budget on the model's device: bytes, or with a KiB / MiB / GiB suffix.
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    dnd_cache_size: usize,
    /// Seconds a request waits for cache room while every cached adapter is in use.
    #[arg(long, default_value_t = 60.0)]
    dnd_cache_wait_secs: f64,
    /// Host memory for adapters evicted from the device (bytes, or with a KiB / MiB / GiB
    /// suffix): a later request copies them back (source `restored`) instead of generating or
    /// loading them again. Off when absent; on a CPU it only adds a second budget.
    #[arg(long, value_parser = parse_size)]
    dnd_host_cache_size: Option<usize>,
    /// Where prompts come from when a request lists none: system, user or auto.
    #[arg(long, default_value = "auto")]
    dnd_prompt_source: PromptSource,
    /// Most prompts per adapter (0: the generator's N).
    #[arg(long, default_value_t = 0)]
    dnd_max_prompts: usize,
    /// Most characters per prompt.
    #[arg(long, default_value_t = 4000)]
    dnd_max_prompt_chars: usize,
    /// Serve the base model (source `abstained`, with the distance) to requests whose
    /// condition is farther than this from every condition the generator was trained on
    /// (1 - cosine of pooled encodings; the generator needs anchors, `dnd anchors`). Off when
    /// absent; README "Abstention" gives the measured choice.
    #[arg(long)]
    dnd_abstain_distance: Option<f32>,
    /// Serve a cached adapter whose condition lies within this distance of a new request's
    /// (1 - cosine of pooled encodings) instead of generating one: source `similar`, with the
    /// distance. Off when absent; README "Semantic reuse" gives the measured trade-off.
    #[arg(long)]
    dnd_reuse_distance: Option<f32>,
    /// The dtype the generator runs in: f32, or bf16 (half its weights; faster misses on a CPU
    /// with AVX512-BF16, README "Speed"; skill measured in README "Skill results").
    #[arg(long, value_enum, default_value = "f32")]
    dnd_dtype: GeneratorDtype,
    /// The dtype adapters (generated and named) are kept in. Half-width adapters take half
    /// the cache budget, their weights rounded to f16 or bf16 (README "Adapter dtype").
    #[arg(long, value_enum, default_value = "auto")]
    lora_dtype: LoraDtype,
    /// Serve a PEFT LoRA folder under a name, NAME=DIR (repeatable): requests whose `model`
    /// is NAME get it. Loaded into the adapter cache when used.
    #[arg(long = "lora", value_name = "NAME=DIR")]
    lora: Vec<String>,
    /// Serve the adapter generated from a prompts file (as `dnd generate --prompts` reads)
    /// under a name, NAME=FILE (repeatable).
    #[arg(long = "dnd-preset", value_name = "NAME=FILE")]
    dnd_preset: Vec<String>,
    /// Allow `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` (vLLM's runtime LoRA
    /// updating): PEFT folders inside DIR, safetensors weights only, may be served by name
    /// while the server runs. Off when absent.
    #[arg(long, value_name = "DIR")]
    adapter_root: Option<PathBuf>,
    /// Threads adapter generation uses, in a pool of its own (0: every core, shared with
    /// decoding). README "Server benchmark" measures what bounding it does.
    #[arg(long, default_value_t = 0)]
    dnd_generation_threads: usize,
    /// Nice value of the generation threads (Linux, 0-19; needs --dnd-generation-threads).
    #[arg(long, default_value_t = 0)]
    dnd_generation_nice: i32,
    /// Most prompt sets generated together when cache misses queue up (1: one at a time; on
    /// 2 CPU cores batches were no faster, README "Server benchmark").
    #[arg(long, default_value_t = 1)]
    dnd_generation_batch: usize,
}

/// `NAME=VALUE` of `--lora` and `--dnd-preset`.
fn named_arg<'a>(flag: &str, arg: &'a str) -> Result<(&'a str, &'a str)> {
    match arg.split_once('=') {
        Some((n, v)) if !n.is_empty() && !v.is_empty() => Ok((n, v)),
        _ => bail!("{flag} {arg:?}: expected NAME=PATH"),
    }
}

#[derive(Subcommand)]
enum ModelArgs {
    /// A safetensors model folder (config.json, tokenizer.json, weights).
    Plain {
        /// The model folder.
        #[arg(short = 'm', long)]
        model_id: PathBuf,
        /// Architecture (qwen2, llama, ...); detected from config.json when absent.
        #[arg(short = 'a', long)]
        arch: Option<String>,
        /// Weight and activation dtype: auto, f32, bf16, f16.
        #[arg(short = 'd', long, default_value = "auto")]
        dtype: String,
    },
    /// A GGUF file (tokenizer and chat template inside).
    Gguf {
        /// Folder holding the file.
        #[arg(short = 'm', long)]
        quantized_model_id: PathBuf,
        /// The .gguf file name in that folder.
        #[arg(short = 'f', long)]
        quantized_filename: String,
        /// A folder with tokenizer.json (and tokenizer_config.json) to use instead of the
        /// tokenizer inside the file (for GGUF files that carry none).
        #[arg(short = 't', long)]
        tok_model_id: Option<PathBuf>,
        /// Activation dtype: auto (mistral.rs's choice: bf16 on a CPU), f32, bf16, f16. The
        /// quantized weights stay as stored.
        #[arg(short = 'd', long, default_value = "auto")]
        dtype: String,
    },
}

/// `1234`, `64KiB`, `256MiB`, `1GiB` to bytes.
fn parse_size(s: &str) -> std::result::Result<usize, String> {
    let s = s.trim();
    let (num, mult) = [
        ("GiB", 1usize << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("B", 1),
    ]
    .iter()
    .find_map(|(suffix, m)| s.strip_suffix(suffix).map(|n| (n.trim(), *m)))
    .unwrap_or((s, 1));
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 256MiB, 64KiB, 1048576)"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("{s:?}: the size must be positive"));
    }
    Ok((v * mult as f64).round() as usize)
}

fn model_dtype(s: &str) -> Result<ModelDType> {
    Ok(match s {
        "auto" => ModelDType::Auto,
        "f32" => ModelDType::F32,
        "bf16" => ModelDType::BF16,
        "f16" => ModelDType::F16,
        other => bail!("unknown dtype {other:?} (auto, f32, bf16, f16)"),
    })
}

/// The dtype adapters are built in for a model run in `dtype` (f32 where mistral.rs chooses:
/// the patch casts each adapter's output to the activations' dtype).
fn adapter_dtype(dtype: &str) -> DType {
    match dtype {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => DType::F32,
    }
}

/// Whether `model_dir` holds a text-only Gemma 3 (`Gemma3ForCausalLM`, e.g. gemma-3-1b-it),
/// which mistral.rs 0.8.1 loads only through its multimodal pipeline.
fn text_only_gemma3(model_dir: &Path) -> Result<bool> {
    let path = model_dir.join("config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        // No config.json: mistral.rs's loader reports it.
        return Ok(false);
    };
    let cfg: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(cfg["architectures"]
        .as_array()
        .is_some_and(|a| a.iter().any(|x| x == "Gemma3ForCausalLM")))
}

/// mistral.rs's prefix-cache size, `None` when turned off.
fn prefix_cache(args: &Args) -> Option<usize> {
    (args.prefix_cache_n > 0).then_some(args.prefix_cache_n)
}

/// Builds the engine; returns it with the served name and the base model's shape file.
async fn load_model(args: &Args) -> Result<(mistralrs::Model, String, PathBuf, DType)> {
    let str_path = |p: &Path| p.to_string_lossy().into_owned();
    match &args.model {
        ModelArgs::Plain {
            model_id,
            arch,
            dtype,
        } => {
            let name = model_id
                .file_name()
                .map_or("model".into(), |n| n.to_string_lossy().into_owned());
            // mistral.rs's builders share these methods through one macro, not a trait.
            macro_rules! configured {
                ($b:expr) => {{
                    let mut b = $b
                        .with_token_source(TokenSource::None)
                        .with_dtype(model_dtype(dtype)?)
                        .with_max_num_seqs(args.max_seqs)
                        .with_prefix_cache_n(prefix_cache(args));
                    if args.cpu {
                        b = b.with_force_cpu();
                    }
                    if let Some(t) = &args.chat_template {
                        b = b.with_chat_template(t);
                    }
                    b
                }};
            }
            let model = if arch.is_none() && text_only_gemma3(model_id)? {
                configured!(MultimodalModelBuilder::new(str_path(model_id))
                    .with_loader_type(MultimodalLoaderType::Gemma3))
                .build()
                .await?
            } else {
                let mut b = configured!(TextModelBuilder::new(str_path(model_id)));
                if let Some(a) = arch {
                    b = b.with_loader_type(a.parse().map_err(anyhow::Error::msg)?);
                }
                b.build().await?
            };
            Ok((model, name, model_id.clone(), adapter_dtype(dtype)))
        }
        ModelArgs::Gguf {
            quantized_model_id,
            quantized_filename,
            tok_model_id,
            dtype,
        } => {
            let model = load_gguf(&GgufOptions {
                dir: quantized_model_id.clone(),
                files: vec![quantized_filename.clone()],
                tokenizer_dir: tok_model_id.clone(),
                chat_template: args.chat_template.clone(),
                dtype: model_dtype(dtype)?,
                force_cpu: args.cpu,
                max_seqs: args.max_seqs,
                prefix_cache_n: prefix_cache(args),
            })
            .await?;
            Ok((
                model,
                quantized_filename.clone(),
                quantized_model_id.join(quantized_filename),
                adapter_dtype(dtype),
            ))
        }
    }
}

fn build_provider(
    args: &Args,
    name: &str,
    shape_path: &Path,
    device: Device,
    act: DType,
) -> Result<Arc<DndProvider>> {
    let d = &args.dnd;
    let gen = d
        .dnd_generator
        .as_ref()
        .context("--adapter-provider dnd needs --dnd-generator")?;
    let shape = BaseModelShape::from_path(shape_path)
        .with_context(|| format!("reading the base model shape from {}", shape_path.display()))?;
    let dtype = match d.lora_dtype {
        LoraDtype::Auto if device.is_cpu() => DType::F32,
        LoraDtype::Auto => act,
        LoraDtype::F32 => DType::F32,
        LoraDtype::F16 => DType::F16,
        LoraDtype::Bf16 => DType::BF16,
    };
    let provider = DndProvider::load(
        gen,
        &d.dnd_encoder,
        Some(&shape),
        ProviderOptions {
            policy: PromptPolicy {
                source: d.dnd_prompt_source,
                max_prompts: d.dnd_max_prompts,
                max_chars: d.dnd_max_prompt_chars,
            },
            limits: CacheLimits {
                max_entries: d.dnd_cache_entries.max(1),
                max_bytes: d.dnd_cache_size,
                wait_timeout: Duration::from_secs_f64(d.dnd_cache_wait_secs),
            },
            device,
            dtype,
            base_model_id: name.to_string(),
            abstain_distance: d.dnd_abstain_distance,
            reuse_distance: d.dnd_reuse_distance,
            host_cache_bytes: d.dnd_host_cache_size,
            generator_dtype: match d.dnd_dtype {
                GeneratorDtype::F32 => DType::F32,
                GeneratorDtype::Bf16 => DType::BF16,
            },
            generation: GenerationShare {
                threads: d.dnd_generation_threads,
                nice: d.dnd_generation_nice,
                idle: false,
                max_batch: d.dnd_generation_batch,
            },
        },
    )
    .with_context(|| format!("loading the generator {}", gen.display()))?;
    if provider.generator().config().is_untrained() {
        let bar = "!".repeat(78);
        eprintln!(
            "{bar}\n!! The generator {} has RANDOM WEIGHTS: its adapters are noise, not task\n\
             !! specialisations. Train one (dnd train) or use a shipped checkpoint.\n{bar}",
            gen.display()
        );
        tracing::warn!(generator = %gen.display(), "generator has random weights");
    }
    let reserved = [name, "default"];
    for arg in &d.lora {
        let (n, dir) = named_arg("--lora", arg)?;
        provider
            .add_peft(n, Path::new(dir), Some(&shape), &reserved)
            .with_context(|| format!("--lora {arg}"))?;
    }
    for arg in &d.dnd_preset {
        let (n, file) = named_arg("--dnd-preset", arg)?;
        let prompts = mistralrs_dnd::prompts::read_prompts(file)
            .with_context(|| format!("--dnd-preset {arg}"))?;
        provider
            .add_preset(n, &prompts, &reserved)
            .with_context(|| format!("--dnd-preset {arg}"))?;
    }
    tracing::info!(
        generator = provider.generator_id(),
        adapter_bytes = provider.adapter_bytes(),
        named = ?provider.names(),
        "DnD adapter provider ready"
    );
    Ok(provider)
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,mistralrs_core=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.adapter_provider.is_none() && args.dnd.dnd_generator.is_some() {
        bail!("--dnd-generator given without --adapter-provider dnd");
    }
    if args.adapter_provider.is_none()
        && !(args.dnd.lora.is_empty() && args.dnd.dnd_preset.is_empty())
    {
        bail!("--lora and --dnd-preset need --adapter-provider dnd (the per-request adapter hook)");
    }
    if args.adapter_provider.is_none() && args.dnd.lora_dtype != LoraDtype::Auto {
        bail!("--lora-dtype needs --adapter-provider dnd (the per-request adapter hook)");
    }
    if args.adapter_provider.is_none() && args.dnd.adapter_root.is_some() {
        bail!("--adapter-root needs --adapter-provider dnd (the per-request adapter hook)");
    }
    let (model, name, shape_path, act) = load_model(&args).await?;
    let models = model.inner().list_models().map_err(anyhow::Error::msg)?;
    let model_id = models
        .first()
        .context("the engine serves no model")?
        .clone();
    let provider = match args.adapter_provider {
        Some(ProviderKind::Dnd) => {
            let device = model
                .inner()
                .config(None)
                .map_err(anyhow::Error::msg)?
                .device;
            let p = build_provider(&args, &name, &shape_path, device, act)?;
            set_adapter_provider(&model_id, Some(p.clone()));
            Some(p)
        }
        None => None,
    };
    let runtime = match &args.dnd.adapter_root {
        Some(root) => {
            let shape = BaseModelShape::from_path(&shape_path)?;
            Some(RuntimeLoading::new(root, shape).context("--adapter-root")?)
        }
        None => None,
    };
    let app = router(ServerState::with_runtime_loading(
        model, name, provider, runtime,
    ));
    let listener = tokio::net::TcpListener::bind((args.serve_ip.as_str(), args.port))
        .await
        .with_context(|| format!("binding {}:{}", args.serve_ip, args.port))?;
    // Tests and scripts read this line to find the port.
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
