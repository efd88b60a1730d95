//! Drag-and-Drop LLMs (DnD) for mistral.rs: a hypernetwork that turns a handful of unlabeled
//! prompts of a task into LoRA weights in one forward pass.
//!
//! - [`encoder`]: the frozen Sentence-BERT that turns prompts into the condition tensor.
//! - [`generator`]: the hyper-convolutional decoder, its checkpoint format and the
//!   [`Generator`](generator::Generator) API (`load`, then `generate(&prompts)`).
//! - [`adapters`]: the LoRA adapter type, PEFT I/O and the parameter tokens.
//! - [`convert`]: importing the authors' released PyTorch checkpoints.

#![warn(missing_docs)]

pub mod adapters;
pub mod cache;
pub mod convert;
pub mod error;

pub use error::{DndError, Result};
pub mod encoder;
#[cfg(feature = "engine")]
pub mod engine;
pub mod generator;
pub mod policy;
pub mod prompts;
#[cfg(feature = "engine")]
pub mod provider;
#[cfg(feature = "server")]
pub mod server;
#[cfg(test)]
mod test_util;
pub mod training;

pub use adapters::LoraAdapter;
pub use generator::{Generator, LoadOptions};
