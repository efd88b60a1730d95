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

/// Checks a "same" convolution `(x, w) -> y` against candle's `conv2d` on each
/// `(b, ci, co, h, w, k)` case, to `tol` relative error.
pub fn check_conv_same(
    cases: &[(usize, usize, usize, usize, usize, usize)],
    tol: f32,
    conv: impl Fn(&Tensor, &Tensor) -> Tensor,
) {
    let dev = candle_core::Device::Cpu;
    for &(b, ci, co, h, w, k) in cases {
        let x = Tensor::randn(0f32, 1.0, (b, ci, h, w), &dev).unwrap();
        let wt = Tensor::randn(0f32, 1.0, (co, ci, k, k), &dev).unwrap();
        let want = x.conv2d(&wt, k / 2, 1, 1, 1).unwrap();
        let err = rel_err(&conv(&x, &wt), &want);
        assert!(err < tol, "b{b} ci{ci} co{co} {h}x{w} k{k}: {err}");
    }
}
