//! `dnd`: make, convert, inspect and run DnD generators from the command line.
//!
//! One module ("room") per subcommand, each with its `Args` (whose doc comment is the
//! subcommand's help) and its `run`; [`common`] holds what several rooms share.

mod anchors;
mod cast;
mod collect;
mod common;
mod convert;
mod distance;
mod eval;
mod generate;
mod init;
mod inspect;
mod mean;
mod preset;
mod score;
mod similarity;
mod split;
mod tasks;
mod train;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "dnd",
    version,
    about = "Drag-and-Drop LLMs: prompts to LoRA adapters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// No doc comments on the variants: clap would put them in place of the rooms' `Args` docs.
#[derive(Subcommand)]
enum Command {
    Init(init::Args),
    Convert(convert::Args),
    Preset(preset::Args),
    Inspect(inspect::Args),
    Collect(collect::Args),
    Train(train::Args),
    Eval(eval::Args),
    Score(score::Args),
    Split(split::Args),
    Tasks(tasks::Args),
    Anchors(anchors::Args),
    Cast(cast::Args),
    Mean(mean::Args),
    Distance(distance::Args),
    Similarity(similarity::Args),
    Generate(generate::Args),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Init(a) => init::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Preset(a) => preset::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Collect(a) => collect::run(a),
        Command::Train(a) => train::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Score(a) => score::run(a),
        Command::Split(a) => split::run(a),
        Command::Tasks(a) => tasks::run(a),
        Command::Anchors(a) => anchors::run(a),
        Command::Cast(a) => cast::run(a),
        Command::Mean(a) => mean::run(a),
        Command::Distance(a) => distance::run(a),
        Command::Similarity(a) => similarity::run(a),
        Command::Generate(a) => generate::run(a),
    }
}
