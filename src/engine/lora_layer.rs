//! Per-sequence LoRA on top of any mistral.rs projection.
//!
//! A [`LoraRouter`] holds, for the forward pass in progress, one optional adapter per batch
//! row. Every wrapped projection ([`PerSequenceLora`]) computes the base output once for the
//! whole batch, then adds `scale * (x A^T) B^T` to the rows whose sequence has an adapter for
//! its (layer, module). Consecutive rows that share an adapter are done in one product; a batch
//! without adapters costs nothing beyond the base projection.

use std::borrow::Cow;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, RwLock};

use candle_core::{DType, Device, Result, Tensor};
use mistralrs_quant::{
    DistributedKind, IsqType, QuantMethod, QuantMethodConfig, QuantizeOntoGuard, QuantizedSerde,
};

use crate::adapters::{LoraAdapter, Module};

/// The adapters of the batch rows of the forward pass in progress.
#[derive(Debug, Default)]
pub struct LoraRouter {
    rows: RwLock<Arc<Vec<Option<Arc<LoraAdapter>>>>>,
}

impl LoraRouter {
    /// A router with no adapters set.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Sets the adapter of each batch row (by position) for the next forward pass.
    pub fn set_batch(&self, rows: Vec<Option<Arc<LoraAdapter>>>) {
        *self.rows.write().expect("router lock") = Arc::new(rows);
    }

    /// Forgets the batch: projections run as the base model.
    pub fn clear(&self) {
        self.set_batch(Vec::new());
    }

    fn current(&self) -> Arc<Vec<Option<Arc<LoraAdapter>>>> {
        self.rows.read().expect("router lock").clone()
    }
}

/// A base projection plus the LoRA update of each row's own adapter.
#[derive(Debug)]
pub struct PerSequenceLora {
    inner: Arc<dyn QuantMethod>,
    layer: usize,
    module: Module,
    router: Arc<LoraRouter>,
}

impl PerSequenceLora {
    /// Wraps projection `module` of decoder layer `layer`.
    pub fn wrap(
        inner: Arc<dyn QuantMethod>,
        layer: usize,
        module: Module,
        router: Arc<LoraRouter>,
    ) -> Arc<dyn QuantMethod> {
        Arc::new(Self {
            inner,
            layer,
            module,
            router,
        })
    }

    fn rewrap(&self, inner: Arc<dyn QuantMethod>) -> Arc<dyn QuantMethod> {
        Self::wrap(inner, self.layer, self.module, self.router.clone())
    }

    /// The LoRA update for rows `[start, start + len)` of `x`, all using `adapter`.
    fn delta(
        &self,
        x: &Tensor,
        adapter: &LoraAdapter,
        start: usize,
        len: usize,
    ) -> Result<Option<Tensor>> {
        let Some(pair) = adapter.get(self.layer, self.module) else {
            return Ok(None);
        };
        let xs = x.narrow(0, start, len)?;
        let a = pair.a.to_dtype(x.dtype())?;
        let b = pair.b.to_dtype(x.dtype())?;
        let low = xs.broadcast_matmul(&a.t()?)?;
        Ok(Some((low.broadcast_matmul(&b.t()?)? * adapter.scale())?))
    }
}

impl QuantizedSerde for PerSequenceLora {
    fn name(&self) -> &'static str {
        "per-sequence-lora"
    }
    fn isq_serde_supported(&self) -> bool {
        self.inner.isq_serde_supported()
    }
    // Serialising writes the base layer only: adapters are not part of the model.
    fn serialize(&self) -> Result<Cow<'_, [u8]>> {
        self.inner.serialize()
    }
    fn serialize_with_bias(&self, bias: Option<Tensor>) -> Result<Cow<'_, [u8]>> {
        self.inner.serialize_with_bias(bias)
    }
}

impl QuantMethod for PerSequenceLora {
    fn new(_method: QuantMethodConfig) -> Result<Self> {
        candle_core::bail!("PerSequenceLora wraps an existing layer: use PerSequenceLora::wrap")
    }

    fn dequantize_w(&self) -> Result<Tensor> {
        self.inner.dequantize_w()
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.inner.forward(x)?;
        let rows = self.router.current();
        if rows.iter().all(Option::is_none) {
            return Ok(y);
        }
        let batch = x.dim(0)?;
        if rows.len() != batch {
            candle_core::bail!(
                "per-sequence LoRA: {} adapters routed for a batch of {batch}",
                rows.len()
            );
        }
        // Runs of consecutive rows sharing one adapter (or none).
        let mut pieces = Vec::new();
        let mut start = 0;
        while start < batch {
            let mut end = start + 1;
            while end < batch && same(&rows[start], &rows[end]) {
                end += 1;
            }
            let base = y.narrow(0, start, end - start)?;
            let piece = match &rows[start] {
                Some(adapter) => match self.delta(x, adapter, start, end - start)? {
                    Some(d) => (base + d.to_dtype(y.dtype())?)?,
                    None => base,
                },
                None => base,
            };
            pieces.push(piece);
            start = end;
        }
        Tensor::cat(&pieces, 0)
    }

    fn gather_forward(&self, a: &Tensor, indices: &Tensor) -> Result<Tensor> {
        self.inner.gather_forward(a, indices)
    }

    fn quantized_act_type(&self) -> Option<DType> {
        self.inner.quantized_act_type()
    }

    fn dtype_and_device(&self) -> (DType, Device) {
        self.inner.dtype_and_device()
    }

    fn add_delta_w(&self, delta: &Tensor) -> Result<Arc<dyn QuantMethod>> {
        Ok(self.rewrap(self.inner.add_delta_w(delta)?))
    }

    fn apply_isq(
        self: Arc<Self>,
        dtype: Option<IsqType>,
        device: Device,
        n_quantized: &AtomicUsize,
        imatrix_weight: Option<Vec<f32>>,
        guard: QuantizeOntoGuard,
    ) -> Result<Arc<dyn QuantMethod>> {
        let inner =
            self.inner
                .clone()
                .apply_isq(dtype, device, n_quantized, imatrix_weight, guard)?;
        Ok(self.rewrap(inner))
    }

    fn unquant_weight_bias(&self) -> Option<(Tensor, Option<Tensor>)> {
        self.inner.unquant_weight_bias()
    }

    fn begin_track_stats(&mut self) -> Result<()> {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.begin_track_stats(),
            None => {
                candle_core::bail!("per-sequence LoRA: base layer is shared, cannot track stats")
            }
        }
    }

    fn end_track_stats(&self) -> Result<Tensor> {
        self.inner.end_track_stats()
    }

    fn is_distributed(&self) -> Option<DistributedKind> {
        self.inner.is_distributed()
    }
}

fn same(a: &Option<Arc<LoraAdapter>>, b: &Option<Arc<LoraAdapter>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(x), Some(y)) => Arc::ptr_eq(x, y),
        _ => false,
    }
}
