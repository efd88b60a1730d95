//! Training on candle's autograd (CPU): a differentiable base model for LoRA fine-tuning.
//!
//! [`model::CausalLm`] is the training forward of Qwen2 / Llama models; its logits match the
//! inference model's (checked against the transformers fixtures of the golden tiny models).

pub mod model;

pub use model::{CausalLm, LmConfig};
