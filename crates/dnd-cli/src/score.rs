//! `dnd score`: replies obtained elsewhere, scored by `eval`'s rules.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use dnd_training::{data, eval};

use crate::common::print_and_write;

/// Score replies obtained elsewhere (e.g. from the server) by `eval`'s rules: the same
/// table and JSON summary.
#[derive(clap::Args)]
pub struct Args {
    /// Task file (JSON list of {prompt, response[, system]}).
    #[arg(long)]
    task: PathBuf,
    /// JSON object {"examples": [indices into the task file], "replies": {LABEL: [one
    /// reply per listed example]}}.
    #[arg(long)]
    replies: PathBuf,
    /// Markdown table output.
    #[arg(long)]
    out_md: Option<PathBuf>,
    /// JSON summary output (as `eval --out-json`).
    #[arg(long)]
    out_json: Option<PathBuf>,
}

impl From<&Args> for eval::EvalOutputs {
    fn from(a: &Args) -> Self {
        eval::EvalOutputs {
            markdown: a.out_md.clone(),
            summary: a.out_json.clone(),
            ..Default::default()
        }
    }
}

/// The `--replies` file.
#[derive(serde::Deserialize)]
struct Replies {
    examples: Vec<usize>,
    replies: BTreeMap<String, Vec<String>>,
}

/// Scores each label's replies against the listed examples of the task file.
pub fn run(args: Args) -> Result<()> {
    let (task, replies) = (&args.task, &args.replies);
    let all = data::read_examples(task)?;
    let text = std::fs::read_to_string(replies)
        .with_context(|| format!("reading {}", replies.display()))?;
    let r: Replies = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: expected {{\"examples\": [..], \"replies\": {{..}}}}",
            replies.display()
        )
    })?;
    let examples = r
        .examples
        .iter()
        .map(|&i| {
            all.get(i).cloned().with_context(|| {
                format!(
                    "example {i} is beyond the {} of {}",
                    all.len(),
                    task.display()
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if r.replies.is_empty() {
        bail!("{}: no replies", replies.display());
    }
    let rows = r
        .replies
        .into_iter()
        .map(|(label, v)| eval::score(&examples, v, &label))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    print_and_write(task, &rows, &examples, &eval::EvalOutputs::from(&args))
}
