//! "Same"-padded stride-1 2-D convolution for the CPU, as k*k accumulated matrix products.
//!
//! candle's CPU `conv2d` builds im2col tiles and reaches a fraction of the matrix-product
//! speed on the decoder's shapes (hundreds of channels, k up to 9). Here the input is padded
//! once and flattened per channel; then for each kernel tap (dy, dx) the shifted input for *all*
//! output pixels is one strided window of that buffer (rows of width W+2p, the 2p extra columns
//! per row are computed and dropped). Each tap is one GEMM `(Co x Ci) @ (Ci x H(W+2p))`
//! accumulated in place, with the weights read straight from their `(Co, Ci, k, k)` layout: no
//! im2col copy at all. Wide 3x3 convolutions go through Winograd's F(2x2, 3x3) instead
//! (`winograd.rs`, 2.25x fewer multiply-adds), large kernels through tiled FFTs (`fftconv.rs`).
//! Other devices and dtypes use candle's kernel.

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

use crate::matmul::Precision;

/// A pointer shared by parallel jobs that write disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr<T>(pub(crate) *mut T);
// SAFETY: every use writes elements no other job writes (documented at each use).
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// The element at `i` (a method, so closures capture the whole `Sync` wrapper).
    ///
    /// # Safety
    /// `i` is in bounds of the allocation and no other job accesses that element.
    pub(crate) unsafe fn at(self, i: usize) -> *mut T {
        self.0.add(i)
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's scratch buffer, kept between calls (its contents are whatever the
/// last user left; its length only grows): a fresh buffer of several MB per call costs more in
/// page faults than the kernels that fill it. A call from inside `f` gets an empty buffer of
/// its own.
pub(crate) fn with_scratch<R>(f: impl FnOnce(&mut Vec<f32>) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => f(&mut buf),
        Err(_) => f(&mut Vec::new()),
    })
}

/// Runs `f` on the elements of a contiguous CPU tensor of element type `T`, borrowed (no copy).
fn with_cpu_slice<T: candle_core::WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> R,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(s) => {
            let (start, end) = layout
                .contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("expected a contiguous tensor".into()))?;
            Ok(f(&s.as_slice::<T>()?[start..end]))
        }
        _ => candle_core::bail!("expected a CPU tensor"),
    }
}

/// Runs `f` on the elements of a contiguous f32 CPU tensor, borrowed (no copy).
pub(crate) fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    with_cpu_slice(t, f)
}

/// Elements of widened kernel a thread keeps between calls (64 MiB).
const WIDENED_KEPT: usize = 16 << 20;

thread_local! {
    static WIDENED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on a contiguous bf16 CPU tensor's elements widened to f32, in a buffer kept per
/// thread (only its length grows; a call from inside `f` gets a fresh one).
fn with_cpu_bf16_widened<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    with_cpu_slice(t, |src: &[half::bf16]| {
        let widen = |buf: &mut Vec<f32>| {
            buf.clear();
            buf.extend(src.iter().map(|v| v.to_f32()));
            let out = f(buf);
            // Keep small kernels' room (page faults cost more than they do); give large ones
            // back (the authors' largest kernel widens to 2.85 GB).
            if buf.capacity() > WIDENED_KEPT {
                *buf = Vec::new();
            }
            out
        };
        WIDENED.with(|cell| match cell.try_borrow_mut() {
            Ok(mut buf) => widen(&mut buf),
            Err(_) => widen(&mut Vec::new()),
        })
    })
}

/// `x` in row-major order: a strided 4-D f32 CPU tensor (the decoder's transposed stage
/// inputs) is gathered plane by plane on the rayon pool, where candle's copy runs on one
/// thread; anything else as [`Tensor::contiguous`].
pub(crate) fn contiguous(x: &Tensor) -> Result<Tensor> {
    if x.is_contiguous() || !x.device().is_cpu() || x.dtype() != DType::F32 || x.rank() != 4 {
        return x.contiguous();
    }
    let (d0, d1, d2, d3) = x.dims4()?;
    if x.elem_count() == 0 {
        return x.contiguous();
    }
    let out = with_cpu_strided_f32(x, |src, st| {
        let mut out = vec![0f32; d0 * d1 * d2 * d3];
        out.par_chunks_mut(d2 * d3)
            .enumerate()
            .for_each(|(plane, dst)| {
                let base = (plane / d1) * st[0] + (plane % d1) * st[1];
                for (i2, row) in dst.chunks_exact_mut(d3).enumerate() {
                    let start = base + i2 * st[2];
                    if st[3] == 1 {
                        row.copy_from_slice(&src[start..start + d3]);
                    } else {
                        for (i3, v) in row.iter_mut().enumerate() {
                            *v = src[start + i3 * st[3]];
                        }
                    }
                }
            });
        out
    })?;
    Tensor::from_vec(out, (d0, d1, d2, d3), x.device())
}

/// Runs `f` on a 4-D f32 CPU tensor's storage from its first element, and its strides: any
/// layout (a transposed view), borrowed.
pub(crate) fn with_cpu_strided_f32<R>(
    t: &Tensor,
    f: impl FnOnce(&[f32], [usize; 4]) -> R,
) -> Result<R> {
    let st: [usize; 4] = t
        .stride()
        .try_into()
        .map_err(|_| candle_core::Error::Msg(format!("expected 4-D, got {:?}", t.dims())))?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("expected a CPU tensor")
    };
    Ok(f(&cpu.as_slice::<f32>()?[layout.start_offset()..], st))
}

/// `(B, Ci, H, W, Co, k)` of an input `(B, Ci, H, W)` and kernel `(Co, Ci, k, k)`, odd k; an
/// error naming both shapes otherwise.
fn same_conv_dims(x: &Tensor, w: &Tensor) -> Result<(usize, usize, usize, usize, usize, usize)> {
    let (b, ci, h, wd) = x.dims4()?;
    let (co, ci_w, kh, kw) = w.dims4()?;
    if ci_w != ci || kh != kw || kh % 2 == 0 {
        candle_core::bail!(
            "conv2d_same: input {:?} and kernel {:?} do not fit (odd square kernel expected)",
            x.dims(),
            w.dims()
        );
    }
    Ok((b, ci, h, wd, co, kh))
}

/// `x (B, Ci, H, W)` convolved with `w (Co, Ci, k, k)`, odd k, padding k/2, no bias.
pub fn conv2d_same(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    conv2d_same_in(x, w, Precision::F32)
}

/// [`conv2d_same`] with the CPU fast paths' products in `precision`. With bf16 products the
/// kernel may be bf16 (an f32 input still): it is widened into a buffer kept per thread rather
/// than a new tensor per call (the authors' configuration has 4.4 GB of them in f32).
pub fn conv2d_same_in(x: &Tensor, w: &Tensor, precision: Precision) -> Result<Tensor> {
    let k = w.dim(3)?;
    // The fast kernels work on raw slices, outside autograd: training (any operand tracked
    // for gradients) takes the differentiable form below on the CPU.
    let tracked = x.track_op() || w.track_op();
    // The fast paths read a bf16 kernel as it is; the others want both operands alike.
    let w_alike;
    let w = if w.dtype() != x.dtype() && (tracked || !x.device().is_cpu()) {
        w_alike = w.to_dtype(x.dtype())?;
        &w_alike
    } else {
        w
    };
    if tracked && x.device().is_cpu() {
        return conv2d_same_differentiable(x, w);
    }
    let bf16_kernel = w.dtype() == DType::BF16 && precision == Precision::Bf16;
    if tracked
        || !x.device().is_cpu()
        || x.dtype() != DType::F32
        || !(w.dtype() == DType::F32 || bf16_kernel)
    {
        return x.contiguous()?.conv2d(w, k / 2, 1, 1, 1);
    }
    let (b, ci, h, wd, co, k) = same_conv_dims(x, w)?;
    let (xc, wc) = (contiguous(x)?, w.contiguous()?);
    let fft = super::fftconv::worth_it(b, ci, co, h, wd, k);
    let winograd = super::winograd::worth_it(ci, co, k);
    let run = |xs: &[f32], taps: super::fftconv::Taps<'_>| match taps {
        // The FFT path widens a bf16 kernel a chunk of output channels at a time.
        _ if fft => super::fftconv::conv2d_same_fft(xs, b, ci, h, wd, taps, co, k, precision),
        super::fftconv::Taps::F32(ws) if winograd => super::winograd::conv2d_same_winograd_with(
            xs,
            b,
            ci,
            h,
            wd,
            co,
            super::winograd::Kernels::Raw(ws, precision),
        ),
        super::fftconv::Taps::F32(ws) => conv2d_same_taps(xs, b, ci, h, wd, ws, co, k, precision),
        super::fftconv::Taps::Bf16(_) => unreachable!("bf16 taps are widened below"),
    };
    let out = with_cpu_f32(&xc, |xs| {
        if fft && bf16_kernel {
            with_cpu_slice(&wc, |ws: &[half::bf16]| {
                run(xs, super::fftconv::Taps::Bf16(ws))
            })
        } else if bf16_kernel {
            with_cpu_bf16_widened(&wc, |ws| run(xs, super::fftconv::Taps::F32(ws)))
        } else {
            with_cpu_f32(&wc, |ws| run(xs, super::fftconv::Taps::F32(ws)))
        }
    })??;
    Tensor::from_vec(out, (b, co, h, wd), x.device())
}

/// A kernel readied once for weights that stay the same between calls (a loaded generator's):
/// [`conv2d_same_prepared`] then skips what [`conv2d_same_in`] redoes on every call. Only the
/// wide 3x3 kernels that go through Winograd's transform have anything to ready (their
/// transform, and in bf16 their packing; the bf16 kernel is then never widened to f32);
/// [`PreparedKernel::new`] returns `None` for the others.
#[derive(Debug)]
pub struct PreparedKernel {
    winograd: super::winograd::WinogradKernels,
    k: usize,
    precision: Precision,
    /// The kernel tensor it was made from.
    source: candle_core::TensorId,
}

impl PreparedKernel {
    /// Readies `w` (`(Co, Ci, k, k)`, f32 or bf16, on the CPU) for products in `precision`;
    /// `None` where that buys nothing (another device, or a kernel that is not Winograd's).
    pub fn new(w: &Tensor, precision: Precision) -> Result<Option<Self>> {
        let (co, ci, kh, kw) = w.dims4()?;
        if !w.device().is_cpu() || kh != kw || !super::winograd::worth_it(ci, co, kh) {
            return Ok(None);
        }
        // Without the bf16 instructions the readied form would be f32, several times the bf16
        // weights that were chosen to save memory.
        if precision == Precision::Bf16 && !crate::matmul::bf16::available() {
            return Ok(None);
        }
        let ws = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(Some(Self {
            winograd: super::winograd::WinogradKernels::new(&ws, co, ci, precision),
            k: kh,
            precision,
            source: w.id(),
        }))
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.winograd.bytes()
    }

    /// Whether it stands for `w` multiplied in `precision`: made from that very tensor (whose
    /// values the caller keeps unchanged), for that precision.
    fn fits(&self, w: &Tensor, precision: Precision) -> bool {
        let (co, ci) = self.winograd.channels();
        w.id() == self.source && precision == self.precision && w.dims() == [co, ci, self.k, self.k]
    }
}

#[cfg(test)]
thread_local! {
    /// Convolutions this thread ran with a readied kernel (tests check the path is taken).
    pub(crate) static PREPARED_RUNS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// [`conv2d_same_in`] with `w` readied beforehand as `prepared` (made from `w`'s current
/// values: the caller keeps them unchanged). Without one, or where it does not apply (a
/// tracked operand, another device or dtype, another shape or precision), the same as
/// [`conv2d_same_in`].
pub fn conv2d_same_prepared(
    x: &Tensor,
    w: &Tensor,
    prepared: Option<&PreparedKernel>,
    precision: Precision,
) -> Result<Tensor> {
    let Some(p) = prepared.filter(|p| p.fits(w, precision)) else {
        return conv2d_same_in(x, w, precision);
    };
    if x.track_op() || w.track_op() || !x.device().is_cpu() || x.dtype() != DType::F32 {
        return conv2d_same_in(x, w, precision);
    }
    let (b, ci, h, wd, co, _) = same_conv_dims(x, w)?;
    #[cfg(test)]
    PREPARED_RUNS.with(|n| n.set(n.get() + 1));
    let xc = contiguous(x)?;
    let out = with_cpu_f32(&xc, |xs| {
        super::winograd::conv2d_same_winograd_with(
            xs,
            b,
            ci,
            h,
            wd,
            co,
            super::winograd::Kernels::Prepared(&p.winograd),
        )
    })?;
    Tensor::from_vec(out, (b, co, h, wd), x.device())
}

/// [`conv2d_same`] from tensor operations whose gradients are matrix products: the padded
/// input's k*k shifted windows stacked along the channels (im2col), then one batched product
/// with the kernel as a `(Co, k*k*Ci)` matrix. Candle's own convolution differentiates its
/// input through a CPU transposed convolution that computes one dot product per output pixel
/// and channel, about a quarter of a generator SFT step; this form's backward is GEMMs and
/// copies.
fn conv2d_same_differentiable(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (b, ci, h, wd, co, k) = same_conv_dims(x, w)?;
    let p = k / 2;
    let padded = x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?;
    // Windows in (tap, channel) order, matching the kernel laid out as (Co, k, k, Ci).
    let mut windows = Vec::with_capacity(k * k);
    for dy in 0..k {
        for dx in 0..k {
            windows.push(padded.narrow(2, dy, h)?.narrow(3, dx, wd)?);
        }
    }
    let cols = Tensor::cat(&windows, 1)?.reshape((b, k * k * ci, h * wd))?;
    let kernel = w.permute((0, 2, 3, 1))?.reshape((co, k * k * ci))?;
    kernel.broadcast_matmul(&cols)?.reshape((b, co, h, wd))
}

/// The GEMM thread setting for one large product: every thread candle uses.
pub fn gemm_parallelism() -> gemm::Parallelism {
    let threads = candle_core::utils::get_num_threads();
    if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// `x (b, ci, h, w)` and `wts (co, ci, k, k)` row-major: k*k accumulated GEMMs over the once
/// padded input; returns `(b, co, h, w)`.
#[allow(clippy::too_many_arguments)]
fn conv2d_same_taps(
    src: &[f32],
    b: usize,
    ci: usize,
    h: usize,
    wd: usize,
    wts: &[f32],
    co: usize,
    k: usize,
    precision: Precision,
) -> Vec<f32> {
    let p = k / 2;
    let (hp, wp) = (h + 2 * p, wd + 2 * p);
    let plane = hp * wp;
    // One spare row: the last taps' windows run up to 2p elements past the padded plane.
    let per_batch = ci * plane;
    let mut padded = vec![0f32; b * per_batch + wp];
    for bc in 0..b * ci {
        let dst = &mut padded[bc * plane..(bc + 1) * plane];
        for y in 0..h {
            let s = &src[(bc * h + y) * wd..(bc * h + y + 1) * wd];
            dst[(y + p) * wp + p..(y + p) * wp + p + wd].copy_from_slice(s);
        }
    }

    let n = h * wp; // output pixels on the padded-width grid
    let mut out = vec![0f32; b * co * n];
    let par = gemm_parallelism();
    let kk = k * k;
    for bi in 0..b {
        let dst = out[bi * co * n..].as_mut_ptr();
        for dy in 0..k {
            for dx in 0..k {
                let tap = dy * k + dx;
                let rhs_off = bi * per_batch + dy * wp + dx;
                // SAFETY: dst is (co x n) row-major inside `out`; lhs element (o, i) of this tap
                // is wts[o*ci*kk + i*kk + tap]; rhs element (i, j) is padded[rhs_off + i*plane + j]
                // with j < n = h*wp, and rhs_off + (ci-1)*plane + n - 1 stays below
                // b*per_batch + wp, the buffer's length.
                unsafe {
                    crate::matmul::gemm_in(
                        precision,
                        co,
                        n,
                        ci,
                        dst,
                        n,
                        tap > 0,
                        crate::matmul::Operand::new(
                            wts.as_ptr().add(tap),
                            (ci * kk) as isize,
                            kk as isize,
                        ),
                        crate::matmul::Operand::rows(padded.as_ptr().add(rhs_off), plane),
                        1.0,
                        par,
                    );
                }
            }
        }
    }
    // Keep the first `wd` columns of each padded-width output row.
    if p == 0 {
        return out;
    }
    let mut cropped = Vec::with_capacity(b * co * h * wd);
    for row in out.chunks(wp) {
        cropped.extend_from_slice(&row[..wd]);
    }
    cropped
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{check_conv_same, max_abs_diff};
    use candle_core::Device;

    #[test]
    fn matches_candle_conv2d() {
        // The k = 9 case (two images) is dispatched to the FFT path, the others to the GEMM taps.
        let cases = [
            (2, 3, 4, 5, 7, 3),
            (1, 5, 2, 4, 3, 5),
            (1, 2, 3, 6, 6, 1),
            (2, 16, 12, 20, 30, 9),
        ];
        assert!(super::super::fftconv::worth_it(2, 16, 12, 20, 30, 9));
        check_conv_same(&cases, 1e-5, |x, w| conv2d_same(x, w).unwrap());
    }

    #[test]
    fn differentiable_form_matches_candle_with_its_gradients() {
        use candle_core::Var;
        let dev = Device::Cpu;
        for &(b, ci, co, h, wd, k) in &[(2, 3, 4, 5, 7, 3), (1, 5, 2, 4, 3, 5), (1, 2, 3, 6, 6, 1)]
        {
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, ci, h, wd), &dev).unwrap()).unwrap();
            let w =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (co, ci, k, k), &dev).unwrap()).unwrap();
            // A weighted sum of the outputs, so that every output's gradient differs.
            let weights = Tensor::randn(0f32, 1.0, (b, co, h, wd), &dev).unwrap();
            let ours = conv2d_same(x.as_tensor(), w.as_tensor()).unwrap();
            let theirs = x.as_tensor().conv2d(w.as_tensor(), k / 2, 1, 1, 1).unwrap();
            assert!(max_abs_diff(&ours, &theirs) < 1e-4);
            let grads = |y: &Tensor| {
                let g = (y * &weights)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                (
                    g.get(x.as_tensor()).unwrap().clone(),
                    g.get(w.as_tensor()).unwrap().clone(),
                )
            };
            let ((gx, gw), (hx, hw)) = (grads(&ours), grads(&theirs));
            assert!(max_abs_diff(&gx, &hx) < 1e-4, "input gradient, k {k}");
            assert!(max_abs_diff(&gw, &hw) < 1e-4, "kernel gradient, k {k}");
            assert!(max_abs_diff(&gx, &gx.zeros_like().unwrap()) > 0.1);
        }
    }

    #[test]
    fn bf16_products_follow_f32_on_every_path() {
        // The GEMM taps (narrow), Winograd (48+ channels) and the FFT path (k = 9), each with
        // the kernel given in f32 and in bf16. Rounding both operands to bf16 (8 significant
        // bits) leaves sums of random-signed products within about 1e-2 of f32.
        let dev = Device::Cpu;
        assert!(super::super::fftconv::worth_it(1, 16, 16, 20, 60, 9));
        for &(ci, co, h, w, k) in &[(5, 4, 6, 7, 3), (64, 56, 6, 9, 3), (16, 16, 20, 60, 9)] {
            let x = Tensor::randn(0f32, 1.0, (1, ci, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1.0, (co, ci, k, k), &dev).unwrap();
            let want = x.conv2d(&wt, k / 2, 1, 1, 1).unwrap();
            let half = wt.to_dtype(DType::BF16).unwrap();
            for kernel in [&wt, &half] {
                let got = conv2d_same_in(&x, kernel, Precision::Bf16).unwrap();
                let err = crate::test_util::rel_err(&got, &want);
                assert!(err < 2e-2, "ci{ci} co{co} k{k} {:?}: {err}", kernel.dtype());
                if crate::matmul::bf16::available() {
                    // The products really ran in bf16.
                    assert!(err > 1e-5, "ci{ci} co{co} k{k}: {err}");
                }
            }
        }
    }

    #[test]
    fn strided_input_is_read_correctly() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 6, 4, 3), &dev)
            .unwrap()
            .transpose(1, 3)
            .unwrap();
        let wt = Tensor::randn(0f32, 1.0, (2, 3, 3, 3), &dev).unwrap();
        let want = x.contiguous().unwrap().conv2d(&wt, 1, 1, 1, 1).unwrap();
        let got = conv2d_same(&x, &wt).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-4);
    }

    #[test]
    fn the_parallel_gather_copies_as_candle_does() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 5, 4, 3), &dev).unwrap();
        let views = [
            x.transpose(1, 3).unwrap(),
            x.transpose(1, 2).unwrap(),
            x.transpose(1, 3).unwrap().transpose(1, 2).unwrap(),
            // A view that starts inside its storage, rows still contiguous.
            x.narrow(1, 1, 3).unwrap().narrow(3, 1, 2).unwrap(),
            x.narrow(0, 1, 1).unwrap().transpose(2, 3).unwrap(),
        ];
        for v in views {
            assert!(!v.is_contiguous() || v.layout().start_offset() > 0);
            let got = contiguous(&v).unwrap();
            assert!(got.is_contiguous());
            assert_eq!(got.dims(), v.dims());
            let (a, b) = (
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                v.contiguous()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            );
            assert_eq!(a, b, "{:?} strides {:?}", v.dims(), v.stride());
        }
    }
}
