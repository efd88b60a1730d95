//! Helpers for the unit tests.

use candle_core::{DType, Tensor};

/// Max |a - b| over all elements, in f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap();
    d.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Max |a - b| relative to max |b|.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    max_abs_diff(a, b) / max_abs_diff(b, &b.zeros_like().unwrap())
}
