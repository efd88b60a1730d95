//! The conversation turns of an engine request, for the prompt policy.

use either::Either;
use mistralrs_core::RequestMessage;

use crate::policy::Turn;

/// The (role, text) turns of a request: chat messages with their text parts joined by
/// newlines; a completion prompt as one user turn; nothing for token or other requests.
pub fn turns_of(messages: &RequestMessage) -> Vec<Turn> {
    let chat = match messages {
        RequestMessage::Chat { messages, .. } | RequestMessage::MultimodalChat { messages, .. } => {
            messages
        }
        RequestMessage::Completion { text, .. } => return vec![Turn::new("user", text.clone())],
        _ => return Vec::new(),
    };
    chat.iter()
        .filter_map(|m| {
            let role = match m.get("role")? {
                Either::Left(r) => r.clone(),
                Either::Right(_) => return None,
            };
            let text = match m.get("content") {
                Some(Either::Left(t)) => t.clone(),
                Some(Either::Right(parts)) => parts
                    .iter()
                    .filter(|p| p.get("type").and_then(|t| t.as_str()) == Some("text"))
                    .filter_map(|p| p.get("text").and_then(|t| t.as_str()))
                    .collect::<Vec<_>>()
                    .join("\n"),
                None => String::new(),
            };
            Some(Turn::new(role, text))
        })
        .collect()
}
