//! Task examples as training sequences: prompt tokens, then answer tokens and end-of-sequence,
//! with the loss on the answer part only.

use std::path::Path;

use serde::Deserialize;
use tokenizers::Tokenizer;

use dnd_core::error::{read_to_string, DndError, Result};

/// One example of a task file (`data/dnd/*.json`).
#[derive(Debug, Clone, Deserialize)]
pub struct Example {
    /// The question.
    pub prompt: String,
    /// The expected answer (`[A]`, `[True]`...).
    pub response: String,
    /// The task's instruction, if any.
    #[serde(default)]
    pub system: Option<String>,
}

/// Reads a task file: a JSON array of `{prompt, response[, system]}`.
pub fn read_examples(path: impl AsRef<Path>) -> Result<Vec<Example>> {
    let path = path.as_ref();
    let v: Vec<Example> = serde_json::from_str(&read_to_string(path)?)
        .map_err(|e| DndError::json(path.display(), e))?;
    if v.is_empty() {
        return Err(DndError::InvalidInput(format!(
            "{}: no examples",
            path.display()
        )));
    }
    Ok(v)
}

/// The text the model sees before its answer, in the ChatML chat format (system turn when the
/// example has one, user turn, open assistant turn). Training and evaluation share it, and it is
/// what the server's chat template renders for the same messages on SmolLM2 and Qwen2 models,
/// so adapters are trained on the text they are served with. The answer is followed by the
/// end-of-sequence token, which for these instruct models is `<|im_end|>`.
pub fn prompt_text(ex: &Example) -> String {
    let mut text = String::new();
    if let Some(s) = ex.system.as_deref().filter(|s| !s.trim().is_empty()) {
        text.push_str(&format!("<|im_start|>system\n{s}<|im_end|>\n"));
    }
    text.push_str(&format!(
        "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
        ex.prompt
    ));
    text
}

/// A tokenized example: the loss covers `ids[answer_from..]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    /// Prompt, answer and end-of-sequence token ids.
    pub ids: Vec<u32>,
    /// Index of the first answer token.
    pub answer_from: usize,
}

impl Sequence {
    /// `(p, token)` for every position `p` that predicts an answer token (`token`, at
    /// `p + 1`): what the answer loss averages over.
    pub fn answer_targets(&self) -> impl Iterator<Item = (usize, u32)> + '_ {
        (self.answer_from.saturating_sub(1)..self.ids.len().saturating_sub(1))
            .map(|p| (p, self.ids[p + 1]))
    }
}

/// Tokenizes an example, cutting the prompt's beginning when the whole exceeds `max_len`.
pub fn encode(tok: &Tokenizer, ex: &Example, max_len: usize, eos: u32) -> Result<Sequence> {
    let ids = |text: &str| -> Result<Vec<u32>> {
        Ok(tok
            .encode(text, false)
            .map_err(|e| DndError::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    };
    let mut prompt = ids(&prompt_text(ex))?;
    let mut answer = ids(&ex.response)?;
    answer.push(eos);
    if answer.len() >= max_len {
        return Err(DndError::InvalidInput(format!(
            "an answer of {} tokens does not fit a sequence length of {max_len}",
            answer.len()
        )));
    }
    let room = max_len - answer.len();
    if prompt.len() > room {
        prompt.drain(..prompt.len() - room);
    }
    let answer_from = prompt.len();
    prompt.extend(answer);
    Ok(Sequence {
        ids: prompt,
        answer_from,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_kept_whole_and_prompts_cut_from_the_front() {
        let path = dnd_core::test_util::golden_path("tiny-qwen2").join("tokenizer.json");
        let tok = Tokenizer::from_file(path).unwrap();
        let ex = Example {
            prompt: "Is it so?".into(),
            response: "[True]".into(),
            system: Some("Answer true or false.".into()),
        };
        let full = encode(&tok, &ex, 1000, 258).unwrap();
        let text = tok.decode(&full.ids[..full.answer_from], false).unwrap();
        // The ChatML rendering of the fixture's chat template, markers as single tokens.
        assert_eq!(
            text,
            "<|im_start|>system\nAnswer true or false.<|im_end|>\n\
             <|im_start|>user\nIs it so?<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(full.ids[0], 257);
        assert_eq!(full.ids.iter().filter(|&&i| i == 258).count(), 3);
        assert_eq!(
            tok.decode(&full.ids[full.answer_from..], true).unwrap(),
            "[True]"
        );
        assert_eq!(*full.ids.last().unwrap(), 258);
        let cut = encode(&tok, &ex, 20, 258).unwrap();
        assert_eq!(cut.ids.len(), 20);
        assert_eq!(cut.ids[cut.answer_from..], full.ids[full.answer_from..]);
        assert!(encode(&tok, &ex, 7, 258).is_err());
    }
}
