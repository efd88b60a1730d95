//! `exp` and `tanh` for f32 in straight-line arithmetic the compiler vectorises.
//!
//! libm's `expf` and `tanhf` are scalar calls: the softmax of BERT's attention (hundreds of
//! thousands of exponentials per layer) and the decoder's tanh spent more time in them than in
//! the products around them. These agree with libm to within a few ulp (tests below).

/// `e^x`. Inputs below -87 give `e^-87` (about 1.6e-38) instead of a denormal or zero, inputs
/// above 88 give `e^88`; NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n * LN2_HI is exact for the n that occur.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    // x = n ln2 + r, |r| <= ln2 / 2.
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    // e^r by its Taylor series to r^7 / 7! (truncation below 2e-9 on the interval).
    let p = [
        1.0 / 5040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ]
    .iter()
    .fold(0.0f32, |acc, &c| acc.mul_add(r, c));
    // 2^n from its exponent bits (n is in -126..=127 after the clamp).
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

/// `tanh(x)`: `1 - 2 / (e^2x + 1)`, and an odd Taylor polynomial near zero where that form
/// loses digits.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let far = 1.0 - 2.0 / (exp(2.0 * x) + 1.0);
    let x2 = x * x;
    // Taylor to x^11, within 1e-10 relative for |x| < 1/4.
    let near = x
        * (-1382.0f32 / 155_925.0)
            .mul_add(x2, 62.0 / 2835.0)
            .mul_add(x2, -17.0 / 315.0)
            .mul_add(x2, 2.0 / 15.0)
            .mul_add(x2, -1.0 / 3.0)
            .mul_add(x2, 1.0);
    if x.abs() < 0.25 {
        near
    } else {
        far
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relative error in units of f32's epsilon.
    fn ulps(got: f32, want: f32) -> f32 {
        ((got as f64 - want as f64).abs()
            / (want.abs() as f64).max(f32::MIN_POSITIVE as f64)
            / f32::EPSILON as f64) as f32
    }

    #[test]
    fn exp_agrees_with_libm() {
        let mut worst = 0f32;
        for i in -870_000..=880_000 {
            let x = i as f32 * 1e-4;
            worst = worst.max(ulps(exp(x), (x as f64).exp() as f32));
        }
        assert!(worst < 4.0, "{worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) > 0.0 && exp(-1000.0) < 2e-38);
        assert!(exp(1000.0).is_finite());
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn tanh_agrees_with_libm() {
        let mut worst = 0f32;
        for i in -200_000..=200_000 {
            let x = i as f32 * 1e-4;
            worst = worst.max(ulps(tanh(x), (x as f64).tanh() as f32));
        }
        assert!(worst < 8.0, "{worst} ulp");
        assert_eq!(tanh(0.0), 0.0);
        assert_eq!(tanh(50.0), 1.0);
        assert_eq!(tanh(-50.0), -1.0);
        assert!(tanh(1e-30) > 0.0);
    }
}
