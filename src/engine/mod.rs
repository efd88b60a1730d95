//! Integration with mistral.rs (feature `engine`).
//!
//! The patched mistralrs-core (see `patches/`) applies a per-sequence LoRA adapter to every
//! q/k/v/o/gate/up/down projection of the decoder families the README lists (Qwen2, Llama,
//! Qwen3, Mistral, Gemma, Gemma 2, Gemma 3, SmolLM3, Phi-3; GGUF Llama, Qwen2, Qwen3, Phi-3;
//! Phi-2 and Starcoder2, which have no gate, from safetensors and GGUF) and asks a registered `AdapterProvider` for each request's adapter. This module turns our adapters into
//! the engine's [`SequenceLora`], and [`load`] loads a GGUF model in a chosen dtype.

pub mod load;
pub mod sequence_lora;

pub use mistralrs_core::adapter_provider::{
    set_adapter_provider, AdapterError, AdapterProvider, AdapterRequest, LoraModule, SequenceLora,
    ANY_MODEL,
};
pub use sequence_lora::{engine_module, to_sequence_lora};
