//! The generator as a library: prompts in, a PEFT adapter folder out.
//!
//! ```text
//! scripts/fetch-assets.sh
//! cargo run --manifest-path crates/Cargo.toml --release --bin dnd -- init --preset smollm2-135m-small --out /tmp/gen.safetensors
//! cargo run --manifest-path crates/Cargo.toml --release --example generate_adapter -- /tmp/gen.safetensors /tmp/adapter
//! ```

use dnd_core::{Generator, LoadOptions};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let checkpoint = args
        .next()
        .expect("usage: generate_adapter CHECKPOINT OUT_DIR");
    let out = args
        .next()
        .expect("usage: generate_adapter CHECKPOINT OUT_DIR");
    let generator = Generator::load(
        &checkpoint,
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../.assets/all-MiniLM-L6-v2"
        ),
        &LoadOptions::default(),
    )?;
    // A few unlabeled prompts of one task; fewer than the generator's N are cycled.
    let prompts = [
        "Which gas do green plants take in from the air?\nA: oxygen\nB: carbon dioxide\nC: helium\nD: neon",
        "What happens to water cooled below 0 degrees Celsius?\nA: it boils\nB: it freezes\nC: it melts\nD: it glows",
    ];
    let (adapter, timings) = generator.generate_timed(&prompts)?;
    adapter.check_finite()?;
    adapter.save_peft(&out, generator.config().base_model_name.as_deref())?;
    println!(
        "rank {} adapter with {} LoRA pairs ({:.1} MB) in {:.3}s encode + {:.3}s decode -> {out}",
        adapter.rank(),
        adapter.pairs().len(),
        adapter.size_in_bytes() as f64 / 1e6,
        timings.encode.as_secs_f64(),
        timings.decode.as_secs_f64(),
    );
    Ok(())
}
