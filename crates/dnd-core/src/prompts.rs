//! Prompt sets from files: task files of the DnD experiments, JSON lists, or plain text.

use std::path::Path;

use rand::seq::index::sample;
use rand::SeedableRng;
use serde_json::Value;

use crate::error::{read_to_string, DndError, Result};

/// Reads prompts from a file.
///
/// - JSON array of objects with a `prompt` field (the task files in `data/dnd`), or of strings;
/// - otherwise plain text, one prompt per non-empty line.
pub fn read_prompts(path: impl AsRef<Path>) -> Result<Vec<String>> {
    let path = path.as_ref();
    let text = read_to_string(path)?;
    let prompts: Vec<String> = if let Some(v) = json_list(path, &text)? {
        v.into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(s),
                Value::Object(mut o) => match o.remove("prompt") {
                    Some(Value::String(s)) => Ok(s),
                    _ => Err(DndError::json(
                        path.display(),
                        format!("item {i} has no string `prompt` field"),
                    )),
                },
                _ => Err(DndError::json(
                    path.display(),
                    format!("item {i} is neither a string nor an object"),
                )),
            })
            .collect::<Result<_>>()?
    } else {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect()
    };
    if prompts.is_empty() {
        return Err(DndError::InvalidInput(format!(
            "{}: no prompts",
            path.display()
        )));
    }
    Ok(prompts)
}

/// The distinct non-blank `system` fields of a task file, in order of first appearance (none
/// for prompt lists and plain text): the instructions a task's requests carry.
pub fn read_systems(path: impl AsRef<Path>) -> Result<Vec<String>> {
    let path = path.as_ref();
    let Some(v) = json_list(path, &read_to_string(path)?)? else {
        return Ok(Vec::new());
    };
    let mut systems: Vec<String> = Vec::new();
    for item in v {
        if let Some(Value::String(s)) = item.get("system") {
            if !s.trim().is_empty() && !systems.contains(s) {
                systems.push(s.clone());
            }
        }
    }
    Ok(systems)
}

/// The items of a file's text when it is a JSON array (it starts with `[`), else `None`.
fn json_list(path: &Path, text: &str) -> Result<Option<Vec<Value>>> {
    let trimmed = text.trim_start();
    if !trimmed.starts_with('[') {
        return Ok(None);
    }
    serde_json::from_str(trimmed)
        .map(Some)
        .map_err(|e| DndError::json(path.display(), e))
}

/// Picks `n` prompts without replacement, reproducibly for a seed (all of them, in order, when
/// there are at most `n`).
pub fn sample_prompts(prompts: &[String], n: usize, seed: u64) -> Vec<String> {
    if prompts.len() <= n {
        return prompts.to_vec();
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut idx = sample(&mut rng, prompts.len(), n).into_vec();
    idx.sort_unstable();
    idx.into_iter().map(|i| prompts[i].clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_task_files_lists_and_lines() {
        let dir = std::env::temp_dir().join(format!("dnd-prompts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let task = dir.join("task.json");
        std::fs::write(
            &task,
            r#"[{"prompt":"q1\nA: x","response":"[A]","system":"S1"},{"prompt":"q2","system":" "},
               {"prompt":"q3","system":"S2"},{"prompt":"q4","system":"S1"}]"#,
        )
        .unwrap();
        assert_eq!(read_prompts(&task).unwrap(), ["q1\nA: x", "q2", "q3", "q4"]);
        assert_eq!(read_systems(&task).unwrap(), ["S1", "S2"]);
        let list = dir.join("list.json");
        std::fs::write(&list, r#"["a","b"]"#).unwrap();
        assert_eq!(read_prompts(&list).unwrap(), ["a", "b"]);
        assert!(read_systems(&list).unwrap().is_empty());
        let txt = dir.join("p.txt");
        std::fs::write(&txt, "one\n\n  two  \n").unwrap();
        assert_eq!(read_prompts(&txt).unwrap(), ["one", "two"]);
        let bad = dir.join("bad.json");
        std::fs::write(&bad, r#"[{"question":"x"}]"#).unwrap();
        assert!(read_prompts(&bad)
            .unwrap_err()
            .to_string()
            .contains("item 0"));
    }

    #[test]
    fn sampling_is_seeded_and_ordered() {
        let p: Vec<String> = (0..100).map(|i| i.to_string()).collect();
        let a = sample_prompts(&p, 10, 7);
        assert_eq!(a, sample_prompts(&p, 10, 7));
        assert_ne!(a, sample_prompts(&p, 10, 8));
        assert_eq!(a.len(), 10);
        let idx: Vec<usize> = a.iter().map(|s| s.parse().unwrap()).collect();
        assert!(idx.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(sample_prompts(&p[..3], 10, 0), &p[..3]);
    }
}
