//! Which prompts of a request condition its adapter: the documented policy.
//!
//! 1. Explicit prompts (the server's `dnd.prompts` request field) win; they are validated
//!    strictly: at least one, at most `max_prompts`, none blank, none longer than
//!    `max_chars`.
//! 2. Otherwise the conversation decides, by [`PromptSource`]: the system prompt(s), the user
//!    turns (the most recent `max_prompts` of them), or `auto` (the system prompt if there is
//!    a non-blank one, else the user turns). Blank turns are skipped here; a turn longer than
//!    `max_chars` is an error rather than a silent truncation.
//! 3. When the policy finds no prompt (no system prompt under `system`), the request gets the
//!    base model.

use std::fmt;
use std::str::FromStr;

/// Where conditioning prompts come from when a request does not list them explicitly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptSource {
    /// The system prompt(s) only; requests without one get the base model.
    System,
    /// The user turns (few-shot example prompts of the task).
    User,
    /// The system prompt if there is one, otherwise the user turns.
    Auto,
}

impl FromStr for PromptSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "system" => Ok(Self::System),
            "user" => Ok(Self::User),
            "auto" => Ok(Self::Auto),
            other => Err(format!(
                "unknown prompt source {other:?} (system, user, auto)"
            )),
        }
    }
}

/// One conversation turn as the policy sees it.
#[derive(Debug, Clone)]
pub struct Turn {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The text content (text parts joined by newlines).
    pub text: String,
}

impl Turn {
    /// A turn.
    pub fn new(role: impl Into<String>, text: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            text: text.into(),
        }
    }
}

/// What the policy decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// No adapter: the base model.
    Base,
    /// Generate (or reuse) the adapter for these prompts.
    Prompts(Vec<String>),
}

/// A request whose prompts the policy refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyError {
    /// An explicit, empty prompt list.
    NoPrompts,
    /// An explicit prompt that is empty or only whitespace.
    BlankPrompt(usize),
    /// More explicit prompts than allowed.
    TooManyPrompts {
        /// Prompts given.
        given: usize,
        /// The limit.
        max: usize,
    },
    /// A prompt longer than allowed (characters).
    PromptTooLong {
        /// Which prompt.
        index: usize,
        /// Its length.
        chars: usize,
        /// The limit.
        max: usize,
    },
}

impl PolicyError {
    /// A stable machine-readable code for clients.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NoPrompts => "no_prompts",
            Self::BlankPrompt(_) => "blank_prompt",
            Self::TooManyPrompts { .. } => "too_many_prompts",
            Self::PromptTooLong { .. } => "prompt_too_long",
        }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoPrompts => f.write_str("dnd.prompts is empty: give at least one prompt"),
            Self::BlankPrompt(i) => write!(f, "dnd.prompts[{i}] is empty or only whitespace"),
            Self::TooManyPrompts { given, max } => {
                write!(f, "{given} prompts given; at most {max} are accepted")
            }
            Self::PromptTooLong { index, chars, max } => write!(
                f,
                "prompt {index} is {chars} characters long; at most {max} are accepted"
            ),
        }
    }
}

impl std::error::Error for PolicyError {}

/// The policy and its limits.
#[derive(Debug, Clone)]
pub struct PromptPolicy {
    /// Where implicit prompts come from.
    pub source: PromptSource,
    /// Most prompts per adapter (at most the generator's N).
    pub max_prompts: usize,
    /// Most characters per prompt.
    pub max_chars: usize,
}

impl PromptPolicy {
    /// Validates explicitly listed prompts.
    pub fn explicit(&self, prompts: &[String]) -> Result<Vec<String>, PolicyError> {
        if prompts.is_empty() {
            return Err(PolicyError::NoPrompts);
        }
        if prompts.len() > self.max_prompts {
            return Err(PolicyError::TooManyPrompts {
                given: prompts.len(),
                max: self.max_prompts,
            });
        }
        for (i, p) in prompts.iter().enumerate() {
            if p.trim().is_empty() {
                return Err(PolicyError::BlankPrompt(i));
            }
            self.check_length(i, p)?;
        }
        Ok(prompts.to_vec())
    }

    /// Chooses the prompts of a conversation.
    pub fn from_turns(&self, turns: &[Turn]) -> Result<Condition, PolicyError> {
        let of_role = |role: &str| -> Vec<&str> {
            turns
                .iter()
                .filter(|t| t.role == role && !t.text.trim().is_empty())
                .map(|t| t.text.as_str())
                .collect()
        };
        let system = of_role("system");
        let chosen = match self.source {
            PromptSource::System => system,
            PromptSource::User => of_role("user"),
            PromptSource::Auto if !system.is_empty() => system,
            PromptSource::Auto => of_role("user"),
        };
        if chosen.is_empty() {
            return Ok(Condition::Base);
        }
        // The most recent turns describe the task at hand best.
        let start = chosen.len().saturating_sub(self.max_prompts);
        let chosen = &chosen[start..];
        for (i, p) in chosen.iter().enumerate() {
            self.check_length(start + i, p)?;
        }
        Ok(Condition::Prompts(
            chosen.iter().map(|s| s.to_string()).collect(),
        ))
    }

    fn check_length(&self, index: usize, p: &str) -> Result<(), PolicyError> {
        let chars = p.chars().count();
        if chars > self.max_chars {
            return Err(PolicyError::PromptTooLong {
                index,
                chars,
                max: self.max_chars,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(source: PromptSource) -> PromptPolicy {
        PromptPolicy {
            source,
            max_prompts: 3,
            max_chars: 20,
        }
    }

    fn chat() -> Vec<Turn> {
        vec![
            Turn::new("system", "Answer with A-D."),
            Turn::new("user", "q1"),
            Turn::new("assistant", "A"),
            Turn::new("user", "  "),
            Turn::new("user", "q2"),
        ]
    }

    fn prompts(c: Condition) -> Vec<String> {
        match c {
            Condition::Prompts(p) => p,
            Condition::Base => panic!("expected prompts"),
        }
    }

    #[test]
    fn sources_pick_their_turns() {
        let t = chat();
        assert_eq!(
            prompts(policy(PromptSource::System).from_turns(&t).unwrap()),
            ["Answer with A-D."]
        );
        assert_eq!(
            prompts(policy(PromptSource::User).from_turns(&t).unwrap()),
            ["q1", "q2"]
        );
        assert_eq!(
            prompts(policy(PromptSource::Auto).from_turns(&t).unwrap()),
            ["Answer with A-D."]
        );
        let no_system = &t[1..];
        assert_eq!(
            prompts(policy(PromptSource::Auto).from_turns(no_system).unwrap()),
            ["q1", "q2"]
        );
        assert_eq!(
            policy(PromptSource::System).from_turns(no_system).unwrap(),
            Condition::Base
        );
    }

    #[test]
    fn long_conversations_keep_the_latest_turns_and_long_turns_are_refused() {
        let turns: Vec<Turn> = (0..5).map(|i| Turn::new("user", format!("q{i}"))).collect();
        assert_eq!(
            prompts(policy(PromptSource::User).from_turns(&turns).unwrap()),
            ["q2", "q3", "q4"]
        );
        let long = [Turn::new("system", "x".repeat(21))];
        assert_eq!(
            policy(PromptSource::System).from_turns(&long).unwrap_err(),
            PolicyError::PromptTooLong {
                index: 0,
                chars: 21,
                max: 20
            }
        );
    }

    #[test]
    fn explicit_prompts_are_validated_strictly() {
        let p = policy(PromptSource::Auto);
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(p.explicit(&s(&["a", "b"])).unwrap(), ["a", "b"]);
        assert_eq!(p.explicit(&[]).unwrap_err().code(), "no_prompts");
        assert_eq!(
            p.explicit(&s(&["a", " \t"])).unwrap_err(),
            PolicyError::BlankPrompt(1)
        );
        assert_eq!(
            p.explicit(&s(&["a"; 4])).unwrap_err().code(),
            "too_many_prompts"
        );
        // Characters, not bytes: 20 two-byte characters are within the limit.
        assert!(p.explicit(&s(&[&"é".repeat(20)])).is_ok());
        assert_eq!(
            p.explicit(&s(&[&"é".repeat(21)])).unwrap_err().code(),
            "prompt_too_long"
        );
        assert!("sometimes".parse::<PromptSource>().is_err());
    }
}
