//! Fused CPU kernels for the elementwise work of the training step ([`super::backward`]).
//!
//! candle runs every elementwise op as its own single-threaded pass into a fresh allocation;
//! the MLP and norm gradients chain about a dozen of them over `(tokens, width)` tensors, which
//! cost as much as the matrix products of a small model. Each kernel here is one pass, split by
//! rows over the rayon pool. Inputs are `f32` matrices on the CPU whose rows are contiguous (a
//! column block of a wider matrix, such as a `narrow` of the fused gate/up product, is read in
//! place).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use dnd_core::error::Result;

/// A row-major view of a 2-D `f32` operand: its data, first element, row stride, shape.
struct Rows<'a> {
    data: &'a [f32],
    start: usize,
    stride: usize,
    rows: usize,
    cols: usize,
}

impl<'a> Rows<'a> {
    fn of(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<Self> {
        let CpuStorage::F32(data) = s else {
            candle_core::bail!("{op}: f32 only")
        };
        let (rows, cols) = l.shape().dims2()?;
        let st = l.stride();
        if cols > 1 && st[1] != 1 {
            candle_core::bail!("{op}: rows must be contiguous, strides {st:?}")
        }
        Ok(Self {
            data,
            start: l.start_offset(),
            stride: st[0],
            rows,
            cols,
        })
    }

    fn row(&self, r: usize) -> &'a [f32] {
        let at = self.start + r * self.stride;
        &self.data[at..at + self.cols]
    }
}

/// `rows × width` outputs, each row filled by `f(row, out)` on the rayon pool.
fn map_rows(rows: usize, width: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let mut out = vec![0f32; rows * width];
    out.par_chunks_mut(width.max(1))
        .enumerate()
        .for_each(|(r, o)| f(r, o));
    out
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `silu(g) · u`.
struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, u) = (Rows::of(s1, l1, "swiglu")?, Rows::of(s2, l2, "swiglu")?);
        let (n, w) = (g.rows, g.cols);
        let out = map_rows(n, w, |r, o| {
            for ((o, &g), &u) in o.iter_mut().zip(g.row(r)).zip(u.row(r)) {
                *o = g * sigmoid(g) * u;
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, w))))
    }
}

/// `[dg | du]` `(N, 2w)` of `silu(g) · u` given its gradient: `du = dact · silu(g)`,
/// `dg = dact · u · σ(g) (1 + g (1 − σ(g)))`, side by side as the fused gate/up product
/// expects them.
struct SwiGluBackward;

impl CustomOp3 for SwiGluBackward {
    fn name(&self) -> &'static str {
        "swiglu-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = "swiglu-backward";
        let (d, g, u) = (
            Rows::of(s1, l1, op)?,
            Rows::of(s2, l2, op)?,
            Rows::of(s3, l3, op)?,
        );
        let (n, w) = (g.rows, g.cols);
        let out = map_rows(n, 2 * w, |r, o| {
            let (dg, du) = o.split_at_mut(w);
            let (dr, gr, ur) = (d.row(r), g.row(r), u.row(r));
            for i in 0..w {
                let (d, g, u) = (dr[i], gr[i], ur[i]);
                let s = sigmoid(g);
                du[i] = d * g * s;
                dg[i] = d * u * s * (1.0 + g * (1.0 - s));
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, 2 * w))))
    }
}

/// `1 / √(mean(x²) + eps)` per row, `(N, 1)`.
struct InvRms(f64);

impl CustomOp1 for InvRms {
    fn name(&self) -> &'static str {
        "inv-rms"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = Rows::of(s, l, "inv-rms")?;
        let eps = self.0 as f32;
        let out: Vec<f32> = (0..x.rows)
            .into_par_iter()
            .map(|r| inv_rms(x.row(r), eps))
            .collect();
        Ok((CpuStorage::F32(out), Shape::from((x.rows, 1))))
    }
}

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    1.0 / (ms + eps).sqrt()
}

/// `x · w / rms(x)`.
struct RmsNorm(f64);

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = Rows::of(s1, l1, "rms-norm")?;
        let w = weight(s2, l2, x.cols, "rms-norm")?;
        let eps = self.0 as f32;
        let out = map_rows(x.rows, x.cols, |r, o| {
            let row = x.row(r);
            let inv = inv_rms(row, eps);
            for ((o, &v), &w) in o.iter_mut().zip(row).zip(w) {
                *o = v * inv * w;
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((x.rows, x.cols))))
    }
}

/// Gradient of [`RmsNorm`]'s input: `r g − x r³ mean(g x)` with `g = dy · w`, `r = 1/rms(x)`.
struct RmsNormBackward(f64);

impl CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "rms-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = "rms-norm-backward";
        let (x, dy) = (Rows::of(s1, l1, op)?, Rows::of(s3, l3, op)?);
        let w = weight(s2, l2, x.cols, op)?;
        let eps = self.0 as f32;
        let h = x.cols;
        let out = map_rows(x.rows, h, |r, o| {
            let (xr, dr) = (x.row(r), dy.row(r));
            let inv = inv_rms(xr, eps);
            let gx: f32 = (0..h).map(|i| dr[i] * w[i] * xr[i]).sum::<f32>() / h as f32;
            let c = gx * inv * inv * inv;
            for i in 0..h {
                o[i] = inv * dr[i] * w[i] - xr[i] * c;
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((x.rows, h))))
    }
}

fn weight<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    len: usize,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(w) = s else {
        candle_core::bail!("{op}: f32 weights only")
    };
    if !l.is_contiguous() || l.shape().elem_count() != len {
        candle_core::bail!("{op}: a contiguous weight of {len}, got {:?}", l.shape())
    }
    Ok(&w[l.start_offset()..l.start_offset() + len])
}

/// A row-major `f32` output that matrix products are accumulated into in place, so that a
/// projection, its bias, its LoRA terms and a residual take one allocation and no extra
/// passes (candle would allocate and add each term on its own).
pub struct Accumulator {
    data: Vec<f32>,
    rows: usize,
    cols: usize,
}

/// Strides and data of a 2-D `f32` CPU tensor (any strides: transposed views included).
fn with_matrix<R>(
    t: &Tensor,
    f: impl FnOnce(&[f32], usize, usize, isize, isize) -> R,
) -> Result<R> {
    let (rows, cols) = t.dims2()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        return Err(candle_core::Error::Msg("an f32 CPU tensor".into()).into());
    };
    let st = layout.stride();
    Ok(f(
        &data[layout.start_offset()..],
        rows,
        cols,
        st[0] as isize,
        st[1] as isize,
    ))
}

impl Accumulator {
    /// `init` copied (a residual the products are added to).
    pub fn from(init: &Tensor) -> Result<Self> {
        let (rows, cols) = init.dims2()?;
        let data = init.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        Ok(Self { data, rows, cols })
    }

    /// `lhs @ rhs`, the first term.
    pub fn product(lhs: &Tensor, rhs: &Tensor) -> Result<Self> {
        let (rows, cols) = (lhs.dim(0)?, rhs.dim(1)?);
        let mut acc = Self {
            data: vec![0f32; rows * cols],
            rows,
            cols,
        };
        acc.gemm(0, lhs, rhs, false)?;
        Ok(acc)
    }

    /// Adds `lhs @ rhs` into columns `col..col + rhs.cols`.
    pub fn add_product(&mut self, col: usize, lhs: &Tensor, rhs: &Tensor) -> Result<()> {
        self.gemm(col, lhs, rhs, true)
    }

    fn gemm(&mut self, col: usize, lhs: &Tensor, rhs: &Tensor, read: bool) -> Result<()> {
        let (m, k) = lhs.dims2()?;
        let (k2, n) = rhs.dims2()?;
        if m != self.rows || k != k2 || col + n > self.cols {
            return Err(candle_core::Error::Msg(format!(
                "accumulate {:?} @ {:?} into columns {col}.. of ({}, {})",
                lhs.dims(),
                rhs.dims(),
                self.rows,
                self.cols
            ))
            .into());
        }
        // Small products (LoRA's rank-wide ones) are not worth waking the thread pool.
        let par = if m * n * k >= 1 << 18 {
            dnd_core::generator::conv::gemm_parallelism()
        } else {
            gemm::Parallelism::None
        };
        let cols = self.cols as isize;
        let dst = self.data[col..].as_mut_ptr();
        with_matrix(lhs, |l, _, _, lrs, lcs| {
            with_matrix(rhs, |r, _, _, rrs, rcs| {
                // SAFETY: the shapes are checked above, every stride comes from the tensors'
                // own layouts, and the destination rows of `cols` elements hold `col + n`.
                unsafe {
                    dnd_core::matmul::gemm_f32(
                        m,
                        n,
                        k,
                        dst,
                        cols as usize,
                        read,
                        dnd_core::matmul::Operand::new(l.as_ptr(), lrs, lcs),
                        dnd_core::matmul::Operand::new(r.as_ptr(), rrs, rcs),
                        1.0,
                        par,
                    )
                }
            })
        })??;
        Ok(())
    }

    /// Adds `row` (`cols` values) to every row.
    pub fn add_row(&mut self, row: &Tensor) -> Result<()> {
        let v = row.to_vec1::<f32>()?;
        for r in self.data.chunks_mut(self.cols) {
            for (x, b) in r.iter_mut().zip(&v) {
                *x += b;
            }
        }
        Ok(())
    }

    /// The result.
    pub fn into_tensor(self) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.data,
            (self.rows, self.cols),
            &candle_core::Device::Cpu,
        )?)
    }
}

/// `silu(g) · u` for `(N, w)` operands.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    Ok(g.apply_op2_no_bwd(u, &SwiGlu)?)
}

/// `[dg | du]` `(N, 2w)` from the gradient of [`swiglu`]'s output.
pub fn swiglu_backward(dact: &Tensor, g: &Tensor, u: &Tensor) -> Result<Tensor> {
    Ok(dact.apply_op3_no_bwd(g, u, &SwiGluBackward)?)
}

/// `1 / rms(x)` per row, `(N, 1)`.
pub fn inv_rms_rows(x: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(x.apply_op1_no_bwd(&InvRms(eps))?)
}

/// RMSNorm of the rows of `x` `(N, h)` with weight `w` `(h)`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(x.apply_op2_no_bwd(w, &RmsNorm(eps))?)
}

/// The gradient of [`rms_norm`]'s input, given the gradient `dy` of its output.
pub fn rms_norm_backward(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(x.apply_op3_no_bwd(w, dy, &RmsNormBackward(eps))?)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, D};

    use super::*;

    use dnd_core::test_util::max_abs_diff as close;

    /// Each kernel against the same arithmetic in candle's ops; inputs include a column block
    /// of a wider matrix (read in place).
    #[test]
    fn kernels_match_plain_ops() {
        let dev = Device::Cpu;
        let wide = Tensor::randn(0f32, 1.0, (7, 10), &dev).unwrap();
        let g = wide.narrow(1, 0, 5).unwrap();
        let u = wide.narrow(1, 5, 5).unwrap();
        let d = Tensor::randn(0f32, 1.0, (7, 5), &dev).unwrap();
        let silu = candle_nn::ops::silu(&g).unwrap();
        assert!(close(&swiglu(&g, &u).unwrap(), &(&silu * &u).unwrap()) < 1e-6);
        let sg = candle_nn::ops::sigmoid(&g).unwrap();
        let dg = (&d * &u).unwrap()
            * (&sg * ((&g * sg.affine(-1.0, 1.0).unwrap()).unwrap() + 1.0).unwrap()).unwrap();
        let du = (&d * &silu).unwrap();
        let both = swiglu_backward(&d, &g, &u).unwrap();
        assert!(close(&both.narrow(1, 0, 5).unwrap(), &dg.unwrap()) < 1e-5);
        assert!(close(&both.narrow(1, 5, 5).unwrap(), &du) < 1e-6);

        let x = Tensor::randn(0f32, 2.0, (6, 8), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.1, 8, &dev).unwrap();
        let eps = 1e-5;
        let inv = ((x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + eps).unwrap())
            .sqrt()
            .unwrap()
            .recip()
            .unwrap();
        assert!(close(&inv_rms_rows(&x, eps).unwrap(), &inv) < 1e-5);
        let want = x.broadcast_mul(&inv).unwrap().broadcast_mul(&w).unwrap();
        assert!(close(&rms_norm(&x, &w, eps).unwrap(), &want) < 1e-5);
        // The backward by finite differences of sum(dy · rms_norm(x)).
        let dy = Tensor::randn(0f32, 1.0, (6, 8), &dev).unwrap();
        let dx: Vec<Vec<f32>> = rms_norm_backward(&x, &w, &dy, eps)
            .unwrap()
            .to_vec2()
            .unwrap();
        let f = |x: &Tensor| -> f64 {
            (rms_norm(x, &w, eps).unwrap() * &dy)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_dtype(candle_core::DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let xv: Vec<Vec<f32>> = x.to_vec2().unwrap();
        for (r, c) in [(0, 0), (3, 5), (5, 7)] {
            let h = 1e-2f32;
            let bump = |s: f32| {
                let mut v = xv.clone();
                v[r][c] += s;
                Tensor::new(v, &dev).unwrap()
            };
            let fd = (f(&bump(h)) - f(&bump(-h))) / (2.0 * h as f64);
            assert!(
                (fd - dx[r][c] as f64).abs() < 2e-2 * fd.abs().max(1.0),
                "d/dx[{r}][{c}]: {} vs finite difference {fd}",
                dx[r][c]
            );
        }
    }
}
