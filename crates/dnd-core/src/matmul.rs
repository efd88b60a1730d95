//! The strided f32 matrix product that the CPU fast paths (convolutions, BERT, the training
//! kernels) call, over the `gemm` crate's kernels: its 19 positional arguments in one place.

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
