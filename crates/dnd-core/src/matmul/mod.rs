//! The strided matrix products that the CPU fast paths (convolutions, BERT, the training
//! kernels) call: f32 over the `gemm` crate's kernels (its 19 positional arguments in one
//! place), and bf16 over the CPU's AVX512-BF16 dot products where it has them ([`bf16`]).

pub mod bf16;

/// The arithmetic of a product: operands and sums in f32, or operands rounded to bf16 and
/// multiplied by the CPU's bf16 dot products (sums still in f32), where [`bf16::available`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 operands and sums.
    #[default]
    F32,
    /// bf16 operands, f32 sums; f32 where the CPU lacks AVX512-BF16.
    Bf16,
}

/// A matrix operand in memory: its first element, and the element steps to the next row and to
/// the next column (a transpose is the same memory with the two steps swapped).
#[derive(Debug, Clone, Copy)]
pub struct Operand {
    /// The element (0, 0).
    pub ptr: *const f32,
    /// Elements from (i, j) to (i + 1, j).
    pub row_stride: isize,
    /// Elements from (i, j) to (i, j + 1).
    pub col_stride: isize,
}

// SAFETY: an operand is a read-only view; the products that share it between threads only
// read through it, under the callers' contract that nothing writes it meanwhile.
unsafe impl Send for Operand {}
unsafe impl Sync for Operand {}

impl Operand {
    /// An operand with explicit steps.
    pub fn new(ptr: *const f32, row_stride: isize, col_stride: isize) -> Self {
        Self {
            ptr,
            row_stride,
            col_stride,
        }
    }

    /// A row-major matrix whose rows start `row_stride` elements apart.
    pub fn rows(ptr: *const f32, row_stride: usize) -> Self {
        Self::new(ptr, row_stride as isize, 1)
    }

    /// The transpose of a row-major matrix whose rows start `row_stride` elements apart:
    /// element (i, j) is the stored (j, i).
    pub fn transposed(ptr: *const f32, row_stride: usize) -> Self {
        Self::new(ptr, 1, row_stride as isize)
    }
}

/// `dst = scale · lhs @ rhs`, or `dst += scale · lhs @ rhs` when `accumulate`, for `lhs`
/// (m x k), `rhs` (k x n) and a row-major `dst` (m x n) whose rows start `dst_row_stride`
/// elements apart.
///
/// # Safety
/// Every element the shapes and steps address lies inside its allocation, and `dst` overlaps
/// neither operand (nor, under `par`, another call writing at the same time).
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_row_stride: usize,
    accumulate: bool,
    lhs: Operand,
    rhs: Operand,
    scale: f32,
    par: gemm::Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_row_stride as isize,
        accumulate,
        lhs.ptr,
        lhs.col_stride,
        lhs.row_stride,
        rhs.ptr,
        rhs.col_stride,
        rhs.row_stride,
        1.0,
        scale,
        false,
        false,
        false,
        par,
    )
}

/// [`gemm_f32`] or [`bf16::gemm_bf16`], as `precision` says.
///
/// # Safety
/// As [`gemm_f32`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_in(
    precision: Precision,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_row_stride: usize,
    accumulate: bool,
    lhs: Operand,
    rhs: Operand,
    scale: f32,
    par: gemm::Parallelism,
) {
    match precision {
        Precision::F32 => gemm_f32(
            m,
            n,
            k,
            dst,
            dst_row_stride,
            accumulate,
            lhs,
            rhs,
            scale,
            par,
        ),
        Precision::Bf16 => bf16::gemm_bf16(
            m,
            n,
            k,
            dst,
            dst_row_stride,
            accumulate,
            lhs,
            rhs,
            scale,
            par,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_of_rows_and_transposes_match_the_definition() {
        // lhs 2x3 row-major, rhs given as the transpose of a stored 2x3 (so 3x2).
        let a = [1f32, 2., 3., 4., 5., 6.];
        let b = [7f32, 8., 9., 10., 11., 12.];
        // a @ bᵀ: [[1*7+2*8+3*9, 1*10+2*11+3*12], [4*7+5*8+6*9, 4*10+5*11+6*12]]
        let want = [50f32, 68., 122., 167.];
        // Rows 3 apart in a wider destination: the spare column must stay untouched.
        let mut dst = [0f32, 0., -1., 0., 0., -1.];
        unsafe {
            gemm_f32(
                2,
                2,
                3,
                dst.as_mut_ptr(),
                3,
                false,
                Operand::rows(a.as_ptr(), 3),
                Operand::transposed(b.as_ptr(), 3),
                1.0,
                gemm::Parallelism::None,
            );
        }
        assert_eq!([dst[0], dst[1], dst[3], dst[4]], want);
        assert_eq!((dst[2], dst[5]), (-1.0, -1.0));
        // Accumulating a scaled second product.
        unsafe {
            gemm_f32(
                2,
                2,
                3,
                dst.as_mut_ptr(),
                3,
                true,
                Operand::rows(a.as_ptr(), 3),
                Operand::transposed(b.as_ptr(), 3),
                0.5,
                gemm::Parallelism::None,
            );
        }
        assert_eq!([dst[0], dst[1], dst[3], dst[4]], want.map(|v| 1.5 * v));
    }
}
