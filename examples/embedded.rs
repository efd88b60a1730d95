//! The DnD provider inside a plain Rust program that embeds mistral.rs: two chat requests with
//! different system prompts, each answered with the adapter generated from its system prompt.
//!
//!   scripts/fetch-assets.sh encoder smollm2
//!   cargo run --features engine --example embedded -- [GENERATOR.safetensors]
//!
//! Without an argument it uses the shipped skills generator,
//! `generators/smollm2-135m-skills.safetensors` (the main job's default).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use candle_core::{DType, Device};
use mistralrs::{GgufModelBuilder, RequestBuilder, TextMessageRole};
use mistralrs_dnd::adapters::BaseModelShape;
use mistralrs_dnd::cache::CacheLimits;
use mistralrs_dnd::engine::set_adapter_provider;
use mistralrs_dnd::policy::{PromptPolicy, PromptSource};
use mistralrs_dnd::provider::{DndProvider, ProviderOptions};

const MODEL_DIR: &str = ".assets/smollm2";
const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

#[tokio::main]
async fn main() -> Result<()> {
    let generator = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "generators/smollm2-135m-skills.safetensors".into());

    // 1. The engine, as any mistral.rs application builds it.
    let model = GgufModelBuilder::new(MODEL_DIR, vec![MODEL_FILE])
        .with_force_cpu()
        .build()
        .await?;

    // 2. The provider: generator + encoder, prompt policy and cache bounds.
    let shape = BaseModelShape::from_path(format!("{MODEL_DIR}/{MODEL_FILE}"))?;
    let provider = DndProvider::load(
        &generator,
        ".assets/all-MiniLM-L6-v2",
        Some(&shape),
        ProviderOptions {
            policy: PromptPolicy {
                source: PromptSource::System,
                max_prompts: 0,
                max_chars: 4000,
            },
            limits: CacheLimits {
                max_entries: 8,
                max_bytes: 64 << 20,
                wait_timeout: Duration::from_secs(30),
            },
            device: Device::Cpu,
            dtype: DType::F32,
            base_model_id: MODEL_FILE.into(),
            abstain_distance: None,
            reuse_distance: None,
            host_cache_bytes: None,
            generator_dtype: candle_core::DType::F32,
            generation: Default::default(),
        },
    )?;

    // 3. Registered for the model: from now on every request gets its own adapter.
    let model_id = model.inner().list_models().map_err(anyhow::Error::msg)?[0].clone();
    set_adapter_provider(&model_id, Some(provider.clone() as Arc<_>));

    for system in [
        "You answer science multiple-choice questions with the letter of the right option.",
        "You answer yes/no questions about a passage with yes or no.",
    ] {
        let request = RequestBuilder::new()
            .add_message(TextMessageRole::System, system)
            .add_message(TextMessageRole::User, "Is the sun a star?")
            .set_deterministic_sampler()
            .set_sampler_max_len(24);
        let reply = model.send_chat_request(request).await?;
        let key = provider.key_for(&[system.to_string()]);
        println!(
            "system: {system}\nadapter: {key}\nanswer: {}\n",
            reply.choices[0].message.content.as_deref().unwrap_or("")
        );
    }
    println!("{} adapters cached", provider.cache().len());
    Ok(())
}
