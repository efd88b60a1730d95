//! Our [`LoraAdapter`] as the engine's per-sequence adapter type.

use candle_core::{DType, Device};
use mistralrs_core::adapter_provider::{LoraModule, SequenceLora};

use crate::adapters::lora::check_finite_tensor;
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
        // The scale is folded in before the cast and the result checked after it: weights
        // that are finite in f32 can overflow f16 (whose largest value is 65504).
        let a = pair.a.to_device(device)?.to_dtype(dtype)?;
        let b = (pair.b.to_device(device)? * adapter.scale())?.to_dtype(dtype)?;
        for (m, w) in [("A", &a), ("B", &b)] {
            check_finite_tensor(w, || {
                format!(
                    "layer {} {} lora_{m} in {dtype:?}",
                    target.layer,
                    target.module.name()
                )
            })?;
        }
        lora.insert(target.layer, engine_module(target.module), &a, &b, 1.0)?;
    }
    Ok(lora)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use candle_core::Tensor;

    use super::*;
    use crate::adapters::{LoraPair, LoraTarget};
    use crate::error::DndError;

    /// One Q pair of rank 2 whose update is `b_value * scale` per element of B.
    fn adapter(b_value: f64, alpha: f64) -> LoraAdapter {
        let a = Tensor::ones((2, 4), DType::F32, &Device::Cpu).unwrap();
        let b = (Tensor::ones((4, 2), DType::F32, &Device::Cpu).unwrap() * b_value).unwrap();
        let target = LoraTarget {
            layer: 0,
            module: Module::Q,
        };
        LoraAdapter::new(2, alpha, BTreeMap::from([(target, LoraPair { a, b })])).unwrap()
    }

    #[test]
    fn weights_that_overflow_the_model_dtype_are_refused() {
        // 1e5 is finite in f32 and bf16 but past f16's 65504, whether it is stored in B or
        // reached by folding the scale into it.
        for a in [adapter(1e5, 2.0), adapter(10.0, 2e4)] {
            assert!(to_sequence_lora(&a, "x", &Device::Cpu, DType::F32).is_ok());
            assert!(to_sequence_lora(&a, "x", &Device::Cpu, DType::BF16).is_ok());
            match to_sequence_lora(&a, "x", &Device::Cpu, DType::F16) {
                Err(DndError::NonFinite(m)) => assert!(m.contains("lora_B"), "{m}"),
                other => panic!("expected NonFinite, got {:?}", other.map(|_| ())),
            }
        }
        assert!(to_sequence_lora(&adapter(1e4, 2.0), "x", &Device::Cpu, DType::F16).is_ok());
    }
}
