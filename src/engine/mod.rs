//! Integration with mistral.rs (feature `engine`).
//!
//! [`lora_layer`] holds the per-sequence LoRA projection: a `QuantMethod` that wraps any base
//! projection (unquantized, GGUF, ISQ...) and adds each batch row's own adapter at forward time,
//! leaving the base weights untouched. Hooking it into the engine's models and scheduler is the
//! mistral.rs patch's job (issue 3, `patches/`).

pub mod lora_layer;
