//! Drag-and-Drop LLMs (DnD): a hypernetwork that turns a handful of unlabeled prompts of a task
//! into LoRA weights in one forward pass. This crate is the part that needs no mistral.rs:
//!
//! - [`encoder`]: the frozen Sentence-BERT that turns prompts into the condition tensor.
//! - [`generator`]: the hyper-convolutional decoder, its checkpoint format and the
//!   [`Generator`] API (`load`, then `generate(&prompts)`).
//! - [`adapters`]: the LoRA adapter type, PEFT I/O and the parameter tokens.
//! - [`convert`]: importing the authors' released PyTorch checkpoints.
//! - [`policy`]: which prompts of a request condition its adapter.
//! - [`cache`]: content keys and the bounded single-flight adapter LRU.
//! - [`prompts`]: prompt files and seeded sampling.
//! - [`matmul`]: the strided f32 matrix product of the CPU fast paths.
//!
//! Training lives in `dnd-training`, the engine hook and the server in `mistralrs-dnd`.

#![warn(missing_docs)]

pub mod adapters;
pub mod cache;
pub mod convert;
pub mod encoder;
pub mod error;
pub mod fastmath;
pub mod generator;
pub mod matmul;
pub mod policy;
pub mod prompts;
#[cfg(any(test, feature = "test-util"))]
pub mod test_util;

pub use adapters::LoraAdapter;
pub use error::{DndError, Result};
pub use generator::{Generator, LoadOptions};
