//! Integration with mistral.rs (feature `engine`).
//!
//! The patched mistralrs-core (see `patches/`) applies a per-sequence LoRA adapter to every
//! q/k/v/o/gate/up/down projection of Qwen2 and Llama models (safetensors and GGUF) and asks a
//! registered `AdapterProvider` for each request's adapter. This module turns our adapters into
//! the engine's [`SequenceLora`].

pub mod sequence_lora;

pub use mistralrs_core::adapter_provider::{
    set_adapter_provider, AdapterError, AdapterProvider, AdapterRequest, LoraModule, SequenceLora,
    ANY_MODEL,
};
pub use sequence_lora::{engine_module, to_sequence_lora};
