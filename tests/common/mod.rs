//! Helpers shared by the server-side integration tests: the core's test helpers (golden
//! fixtures, tolerance checks, the encoder's folder) and requests to the engine.
#![allow(dead_code, unused_imports)]

pub use dnd_core::test_util::*;

/// Requests to the mistral.rs engine (feature `engine`).
#[cfg(feature = "engine")]
pub mod engine {
    use mistralrs_core::{NormalRequest, Request, RequestMessage, Response, SamplingParams};
    use tokio::sync::mpsc::Receiver;

    /// A greedy request continuing token ids `ids` by up to `max_len` tokens, and its receiver.
    pub fn token_request(
        ids: Vec<u32>,
        id: usize,
        max_len: usize,
    ) -> (NormalRequest, Receiver<Response>) {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let mut sampling = SamplingParams::deterministic();
        // deterministic() clears max_len; set it after.
        sampling.max_len = Some(max_len);
        let req = NormalRequest::new_simple(
            RequestMessage::CompletionTokens(ids),
            sampling,
            tx,
            id,
            None,
            None,
        );
        (req, rx)
    }

    /// Hands `req` to the model's engine.
    pub async fn send(model: &mistralrs::Model, req: NormalRequest) {
        model
            .inner()
            .get_sender(None)
            .unwrap()
            .send(Request::Normal(Box::new(req)))
            .await
            .unwrap();
    }
}
