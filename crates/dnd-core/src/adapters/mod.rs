//! LoRA adapters: the in-memory type, the PEFT folder format, base-model shapes and the DnD
//! parameter tokens that the generator predicts.

pub mod lora;
pub mod peft;
pub mod shapes;
pub mod tokens;

pub use lora::{LoraAdapter, LoraPair, LoraTarget};
pub use shapes::{BaseModelShape, Module};
pub use tokens::{LoraSpec, TokenLayout};
