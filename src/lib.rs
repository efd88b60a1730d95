//! Drag-and-Drop LLMs (DnD) for mistral.rs: a hypernetwork that turns a handful of unlabeled
//! prompts of a task into LoRA weights in one forward pass, served per request.
//!
//! This crate is the mistral.rs side; it re-exports the generator core (`dnd-core`, in
//! `crates/`, which builds without mistral.rs) so that embedders need one dependency:
//!
//! - [`encoder`], [`generator`], [`adapters`], [`convert`], [`policy`], [`cache`], [`prompts`]:
//!   from `dnd-core`.
//! - `engine` (feature `engine`): our adapters as the patched engine's per-sequence LoRA.
//! - `provider` (feature `engine`): the DnD adapter provider: policy, cache and generator.
//! - `server` (feature `server`): the OpenAI-compatible HTTP server.

#![warn(missing_docs)]

pub use dnd_core::{adapters, cache, convert, encoder, error, generator, policy, prompts};
pub use dnd_core::{DndError, Generator, LoadOptions, LoraAdapter, Result};

#[cfg(feature = "engine")]
pub mod engine;
#[cfg(feature = "engine")]
pub mod provider;
#[cfg(feature = "server")]
pub mod server;
