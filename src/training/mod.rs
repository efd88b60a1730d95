//! Training on candle's autograd (CPU).
//!
//! - [`model::CausalLm`]: the training forward of Qwen2 / Llama models; its logits match the
//!   inference model's (checked against the transformers fixtures of the golden tiny models).
//! - [`lora::TrainableLora`], [`data`], [`collect()`]: LoRA fine-tuning on a task file with the
//!   loss on the answer tokens, keeping a PEFT checkpoint of each of the last K steps.
//! - [`generator::train`]: generator training from those checkpoints and their tasks' prompts.
//! - [`eval`]: accuracy on a test split, greedy, the bracketed choice parsed from the reply.

pub mod collect;
pub mod data;
pub mod eval;
pub mod generator;
pub mod lora;
pub mod model;
pub mod plot;

pub use collect::{collect, CollectOptions};
pub use generator::{train, TaskSet, TrainOptions, TrainReport};
pub use lora::TrainableLora;
pub use model::{CausalLm, LmConfig};
