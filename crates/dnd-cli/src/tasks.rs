//! `dnd tasks`: the seeded skill tasks.

use std::path::PathBuf;

use anyhow::Result;
use dnd_training::tasks::{write_tasks, Suite};

/// Write the seeded skill tasks (format, classification, extraction, arithmetic): for each,
/// NAME_train.json and NAME_test.json (an unseen system-prompt paraphrase), and tasks.json.
#[derive(clap::Args)]
pub struct Args {
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Training examples per task.
    #[arg(long, default_value_t = 500)]
    train: usize,
    /// Test examples per task (prompts never in training).
    #[arg(long, default_value_t = 200)]
    test: usize,
    /// Seed of every draw.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write only the first N tasks (earlier generators were trained on the first 20 or 24);
    /// their data are the same as in a full run.
    #[arg(long)]
    count: Option<usize>,
    /// Which tasks: `skills` (four families of distinct tasks), `params` (templates
    /// instantiated with many parameter values their instructions state: add_K, times_K,
    /// word_K, wrap_NAME, label_A_B) or `compose` (one field of a purchase record in one answer
    /// form, every pairing: city_upper, item_quote, ...).
    #[arg(long, value_enum, default_value = "skills")]
    suite: SuiteArg,
    /// Train each skill task under eight system-prompt wordings instead of two (its two and
    /// six more): training example i gets wording i mod 8; prompts, answers and the test split
    /// are unchanged. tasks.json lists the six as `more_systems`.
    #[arg(long)]
    more_wordings: bool,
}

/// `--suite`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum SuiteArg {
    Skills,
    Params,
    Compose,
}

/// Writes the task files and says how many.
pub fn run(args: Args) -> Result<()> {
    let suite = match args.suite {
        SuiteArg::Skills => Suite::Skills,
        SuiteArg::Params => Suite::Params,
        SuiteArg::Compose => Suite::Compose,
    };
    let entries = write_tasks(
        &args.out,
        suite,
        args.train,
        args.test,
        args.seed,
        args.count,
        args.more_wordings,
    )?;
    eprintln!(
        "{} tasks ({} train / {} test examples each) in {}",
        entries.len(),
        args.train,
        args.test,
        args.out.display()
    );
    Ok(())
}
