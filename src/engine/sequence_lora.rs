//! Our [`LoraAdapter`] as the engine's per-sequence adapter type.

use candle_core::{DType, Device};
use mistralrs_core::adapter_provider::{LoraModule, SequenceLora};

use crate::adapters::{LoraAdapter, Module};
use crate::error::Result;

/// The engine's name for one of our projection modules.
pub fn engine_module(module: Module) -> LoraModule {
    match module {
        Module::Q => LoraModule::Q,
        Module::K => LoraModule::K,
        Module::V => LoraModule::V,
        Module::O => LoraModule::O,
        Module::Gate => LoraModule::Gate,
        Module::Up => LoraModule::Up,
        Module::Down => LoraModule::Down,
    }
}

/// Copies `adapter` onto `device` in `dtype` (the model's activation type) as a
/// [`SequenceLora`] named `name`, with the LoRA scale α/r folded into B.
pub fn to_sequence_lora(
    adapter: &LoraAdapter,
    name: impl Into<String>,
    device: &Device,
    dtype: DType,
) -> Result<SequenceLora> {
    let mut lora = SequenceLora::new(name);
    for (target, pair) in adapter.pairs() {
        let a = pair.a.to_device(device)?.to_dtype(dtype)?;
        let b = pair.b.to_device(device)?.to_dtype(dtype)?;
        lora.insert(
            target.layer,
            engine_module(target.module),
            &a,
            &b,
            adapter.scale(),
        )?;
    }
    Ok(lora)
}
