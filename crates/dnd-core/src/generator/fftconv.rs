//! "Same" 2-D convolution through tiled FFTs, for the decoder's large kernels.
//!
//! A k x k convolution costs k^2 multiply-adds per input channel, output channel and pixel;
//! the authors' configuration uses k = 9 (81 taps). Cutting the padded input into overlapping
//! tiles of at most 32 x 32 and working per frequency bin costs about 4 real multiply-adds per
//! (channel pair, bin) instead, roughly 15x fewer for k = 9:
//!
//! 1. every input tile is transformed (real FFT along the width, complex FFT along the height);
//! 2. every kernel is transformed from its k x k taps, along the width and then the height
//!    (conjugated: PyTorch's convolution is a cross-correlation);
//! 3. per bin, output spectra = kernel spectra (Co x Ci) @ input spectra (Ci x tiles): one complex
//!    GEMM per bin;
//! 4. each output tile is transformed back and its `th x tw` valid corner kept (overlap-save).
//!
//! Output channels are processed in chunks so that the kernel spectra, which are larger than the
//! kernels, stay within a fixed memory budget.

use std::sync::Arc;

use rayon::prelude::*;
use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};
use rustfft::num_complex::Complex32 as C32;
use rustfft::{Fft, FftPlanner};

/// Largest FFT tile side.
const MAX_TILE: usize = 32;
/// Bytes of kernel spectra (and of output spectra) held at once.
const CHUNK_BYTES: usize = 64 << 20;
/// Cost of a per-bin product's multiply-add relative to one of the kernel-spectra product: the
/// per-bin products are only `2 * tiles` columns wide and run at under half the speed.
const PRODUCT_WEIGHT: f64 = 2.0;

/// Tiling of one spatial axis: FFT length, valid outputs per tile, tile count.
type Axis = (usize, usize, usize);

/// The tilings of an axis of `len` outputs under a `k`-tap kernel: one tile of the whole padded
/// axis where it fits (or where nothing else does), and tiles of every 5-smooth length from
/// `k + 1` up to [`MAX_TILE`] and shorter than that whole padded axis.
fn axis_choices(len: usize, k: usize) -> Vec<Axis> {
    let full = len + k - 1;
    let smooth = |mut n: usize| {
        for f in [2, 3, 5] {
            while n.is_multiple_of(f) {
                n /= f;
            }
        }
        n == 1
    };
    let mut out: Vec<Axis> = (k + 1..=MAX_TILE.min(full - 1))
        .filter(|&n| smooth(n))
        .map(|n| (n, n - k + 1, len.div_ceil(n - k + 1)))
        .collect();
    if full <= MAX_TILE || out.is_empty() {
        out.push((full, len, 1));
    }
    out
}

/// The tiling of both axes with the least estimated work, and that work in multiply-adds. The
/// kernel spectra are counted as `2 k^2` per bin and channel pair whatever the tile count, so a
/// layer of few tiles and many channel pairs (the authors' last ConvL: 10 x 130, 2048 x 4296) is
/// cheaper with smaller tiles (fewer bins) than with the largest. In f64: the authors' layers
/// reach 1e12.
fn tiling(b: usize, ci: usize, co: usize, h: usize, w: usize, k: usize) -> (Axis, Axis, f64) {
    let (pairs, k2) = ((ci * co) as f64, (k * k) as f64);
    let mut best: Option<(Axis, Axis, f64)> = None;
    for ah in axis_choices(h, k) {
        for aw in axis_choices(w, k) {
            let nb = (ah.0 * (aw.0 / 2 + 1)) as f64;
            let tiles = (b * ah.2 * aw.2) as f64;
            // Counted as one k^2-deep product per bin: KernelSpectra's separable products
            // do fewer multiply-adds but of depth k and 2k, far from peak; counting those
            // picked larger tiles that decoded the authors' configuration slower (12.9 s
            // against 11.0).
            let spectra = 2.0 * k2 * nb * pairs;
            let products = PRODUCT_WEIGHT * 4.0 * nb * tiles * pairs;
            // A transform of n points: about 5 n log2 n flops, per input and output channel.
            let log = ((ah.0 * aw.0) as f64).log2();
            let transforms = (ci + co) as f64 * tiles * nb * 5.0 * log;
            let cost = spectra + products + transforms;
            if best.is_none_or(|(_, _, c)| cost < c) {
                best = Some((ah, aw, cost));
            }
        }
    }
    best.expect("every axis has at least one tiling")
}

/// Whether the FFT path is cheaper than `k^2` accumulated GEMMs for this shape.
pub fn worth_it(b: usize, ci: usize, co: usize, h: usize, w: usize, k: usize) -> bool {
    if !(5..=MAX_TILE / 2).contains(&k) {
        return false;
    }
    let direct = (b * h * w * k * k) as f64 * (ci * co) as f64;
    // The direct path's GEMMs run nearer peak than the FFT path's pieces: ask for a 1.5x saving.
    1.5 * tiling(b, ci, co, h, w, k).2 < direct
}

use super::conv::SyncPtr;

struct Plans {
    r2c: Arc<dyn RealToComplex<f32>>,
    c2r: Arc<dyn ComplexToReal<f32>>,
    fwd_h: Arc<dyn Fft<f32>>,
    inv_h: Arc<dyn Fft<f32>>,
}

/// A kernel's taps `(co, ci, k, k)` row-major, in f32 or bf16.
#[derive(Clone, Copy)]
pub enum Taps<'a> {
    /// f32 taps.
    F32(&'a [f32]),
    /// bf16 taps, widened to f32 one chunk of output channels at a time (a whole kernel of the
    /// authors' configuration widens to 2.85 GB).
    Bf16(&'a [half::bf16]),
}

/// Kernel pairs transformed per task: enough for the products to run near their peak, little
/// enough that a task's width-transformed rows stay in cache.
const SPECTRA_BLOCK: usize = 512;

/// The spectra of many `k x k` kernels at the bins of an `fh x fw` tile, computed separably:
/// first along the width (each kernel row's taps to `fw / 2 + 1` complex bins), then along the
/// height: for k = 9, 3.6x fewer multiply-adds than one `k^2`-deep product at fh = 18, 4x at 32
/// (`2 k^2 fh` against `2 k^2 + 4 k fh` per width bin). Both steps are
/// products whose long axis is the kernel pair, so they write whole rows of the planar layout
/// the per-bin products read. Conjugated (angles `+2 pi f d / n`): PyTorch's convolution is a
/// cross-correlation.
struct KernelSpectra {
    k: usize,
    fh: usize,
    fwc: usize,
    /// `(2 fwc x k)`: row `(fx, re|im)`, column `dx`: cos and sin of `2 pi fx dx / fw`.
    width: Vec<f32>,
    /// `(2 fh x 2 k)`: row `(fy, re|im)`, column `(re|im, dy)`: the complex multiplication by
    /// `exp(i 2 pi fy dy / fh)` as a real matrix.
    height: Vec<f32>,
}

impl KernelSpectra {
    fn new(k: usize, fh: usize, fw: usize) -> Self {
        let fwc = fw / 2 + 1;
        let angle =
            |f: usize, d: usize, n: usize| std::f64::consts::TAU * (f * d) as f64 / n as f64;
        let mut width = vec![0f32; 2 * fwc * k];
        for fx in 0..fwc {
            for dx in 0..k {
                let (s, c) = angle(fx, dx, fw).sin_cos();
                width[(2 * fx) * k + dx] = c as f32;
                width[(2 * fx + 1) * k + dx] = s as f32;
            }
        }
        let mut height = vec![0f32; 2 * fh * 2 * k];
        for fy in 0..fh {
            for dy in 0..k {
                let (s, c) = angle(fy, dy, fh).sin_cos();
                let (s, c) = (s as f32, c as f32);
                // re = c A_re - s A_im; im = s A_re + c A_im.
                height[(2 * fy) * 2 * k + dy] = c;
                height[(2 * fy) * 2 * k + k + dy] = -s;
                height[(2 * fy + 1) * 2 * k + dy] = s;
                height[(2 * fy + 1) * 2 * k + k + dy] = c;
            }
        }
        Self {
            k,
            fh,
            fwc,
            width,
            height,
        }
    }

    /// `taps (pairs, k, k)` row-major into `out`, planar `[bin = (fx, fy)][re|im][pair]`.
    fn compute(&self, taps: &[f32], pairs: usize, out: &mut [f32]) {
        let (k, fh, fwc) = (self.k, self.fh, self.fwc);
        debug_assert_eq!(taps.len(), pairs * k * k);
        debug_assert_eq!(out.len(), 2 * fh * fwc * pairs);
        let dst = SyncPtr(out.as_mut_ptr());
        // Smaller blocks where there are fewer than one per thread.
        let block = SPECTRA_BLOCK
            .min(pairs.div_ceil(rayon::current_num_threads()))
            .max(1);
        (0..pairs.div_ceil(block)).into_par_iter().for_each_init(
            || vec![0f32; 2 * fwc * k * block],
            |rows, blk| {
                let p0 = blk * block;
                let n = block.min(pairs - p0);
                // Width: for each kernel row dy, A[(fx, re|im)][dy][p] = width @ taps[p][dy][..]^T,
                // laid out [(fx, re|im)][dy][p] (row stride k n).
                for dy in 0..k {
                    // SAFETY: dst (2fwc x n) at rows[dy n..], row stride k n; lhs (2fwc x k)
                    // row-major; rhs (k x n) read from taps[(p0 + p) k^2 + dy k + dx].
                    unsafe {
                        dense_lhs_product(
                            (2 * fwc, n, k),
                            rows.as_mut_ptr().add(dy * n),
                            k * n,
                            &self.width,
                            taps.as_ptr().add(p0 * k * k + dy * k),
                            (k * k, 1),
                        )
                    };
                }
                // Height, per fx: K[(fx, fy)][re|im][p] = height @ A[fx][(re|im, dy)][p].
                for fx in 0..fwc {
                    // SAFETY: dst (2fh x n) at out[(2 fx fh) pairs + p0], row stride pairs (this
                    // task alone writes columns p0..p0+n); lhs (2fh x 2k) row-major; rhs
                    // (2k x n) row-major at rows[2 fx k n].
                    unsafe {
                        dense_lhs_product(
                            (2 * fh, n, 2 * k),
                            dst.at(2 * fx * fh * pairs + p0),
                            pairs,
                            &self.height,
                            rows.as_ptr().add(2 * fx * k * n),
                            (1, n),
                        )
                    };
                }
            },
        );
    }
}

/// `dst (m x n) = lhs (m x k, row-major) @ rhs (k x n)`, one thread; `dst` has contiguous
/// columns and row stride `dst_rs`, `rhs` the given (column, row) strides.
///
/// # Safety
/// `dst` and `rhs` must be valid for those shapes and strides, and `dst` not read or written
/// elsewhere meanwhile.
unsafe fn dense_lhs_product(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    lhs: &[f32],
    rhs: *const f32,
    (rhs_cs, rhs_rs): (usize, usize),
) {
    debug_assert_eq!(lhs.len(), m * k);
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        false,
        lhs.as_ptr(),
        1,
        k as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        0.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// `x (b, ci, h, w)` row-major, `wts (co, ci, k, k)`: returns `(b, co, h, w)`.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_same_fft(
    x: &[f32],
    b: usize,
    ci: usize,
    h: usize,
    w: usize,
    wts: Taps<'_>,
    co: usize,
    k: usize,
    precision: crate::matmul::Precision,
) -> Vec<f32> {
    let p = k / 2;
    let ((fh, th, nth), (fw, tw, ntw), _) = tiling(b, ci, co, h, w, k);
    let fwc = fw / 2 + 1;
    let nb = fh * fwc; // bins, laid out [fx][fy]
    let ntiles = b * nth * ntw;
    let tile_origin = |t: usize| {
        let bi = t / (nth * ntw);
        let r = t % (nth * ntw);
        (bi, (r / ntw) * th, (r % ntw) * tw)
    };
    let mut rp = RealFftPlanner::<f32>::new();
    let mut cp = FftPlanner::<f32>::new();
    let plans = Plans {
        r2c: rp.plan_fft_forward(fw),
        c2r: rp.plan_fft_inverse(fw),
        fwd_h: cp.plan_fft_forward(fh),
        inv_h: cp.plan_fft_inverse(fh),
    };

    // 1. Input spectra, planar: X[bin][ci][re|im][tile] (real f32).
    let mut xs = vec![0f32; nb * ci * 2 * ntiles];
    let xp = SyncPtr(xs.as_mut_ptr());
    (0..ci).into_par_iter().for_each(|c| {
        let mut local = vec![C32::default(); ntiles * nb]; // [tile][bin]
        let mut row = plans.r2c.make_input_vec();
        let mut row_out = plans.r2c.make_output_vec();
        let mut r2c_scratch = plans.r2c.make_scratch_vec();
        let mut h_scratch = vec![C32::default(); plans.fwd_h.get_inplace_scratch_len()];
        for t in 0..ntiles {
            let (bi, y0, x0) = tile_origin(t);
            let spec = &mut local[t * nb..(t + 1) * nb];
            let plane = &x[(bi * ci + c) * h * w..(bi * ci + c + 1) * h * w];
            for r in 0..fh {
                // Padded-input row y0 + r is input row y0 + r - p.
                let y = (y0 + r) as isize - p as isize;
                row.iter_mut().for_each(|v| *v = 0.0);
                if (0..h as isize).contains(&y) {
                    let src = &plane[y as usize * w..(y as usize + 1) * w];
                    for (col, v) in row.iter_mut().enumerate() {
                        let xx = (x0 + col) as isize - p as isize;
                        if (0..w as isize).contains(&xx) {
                            *v = src[xx as usize];
                        }
                    }
                }
                plans
                    .r2c
                    .process_with_scratch(&mut row, &mut row_out, &mut r2c_scratch)
                    .expect("buffer sizes come from the plan");
                for (fx, v) in row_out.iter().enumerate() {
                    spec[fx * fh + r] = *v;
                }
            }
            plans.fwd_h.process_with_scratch(spec, &mut h_scratch);
        }
        for bin in 0..nb {
            let base = (bin * ci + c) * 2 * ntiles;
            for t in 0..ntiles {
                let v = local[t * nb + bin];
                // SAFETY: this task alone writes X[bin][c][..].
                unsafe {
                    *xp.at(base + t) = v.re;
                    *xp.at(base + ntiles + t) = v.im;
                }
            }
        }
    });

    let kk = k * k;
    let spectra = KernelSpectra::new(k, fh, fw);

    let mut out = vec![0f32; b * co * h * w];
    let op = SyncPtr(out.as_mut_ptr());
    let per_co = nb * (2 * ci).max(4 * ntiles) * std::mem::size_of::<f32>();
    let chunk = (CHUNK_BYTES / per_co).clamp(1, co);
    let scale = 1.0 / (fh * fw) as f32;
    // Reused by every chunk: fresh multi-megabyte buffers cost page faults each time.
    let mut ks = vec![0f32; 2 * nb * chunk * ci];
    let mut widened = Vec::new();
    let mut ys = vec![0f32; nb * 4 * chunk * ntiles];
    for c0 in (0..co).step_by(chunk) {
        let cc = chunk.min(co - c0);
        let pairs = cc * ci;

        // 2. Kernel spectra, planar: K[bin][re|im][o][ci].
        let taps = c0 * ci * kk..(c0 + cc) * ci * kk;
        let wc: &[f32] = match wts {
            Taps::F32(w) => &w[taps],
            Taps::Bf16(w) => {
                widened.clear();
                widened.extend(w[taps].iter().map(|v| v.to_f32()));
                &widened
            }
        };
        spectra.compute(wc, pairs, &mut ks[..2 * nb * pairs]);

        // 3. Per bin, one real GEMM: [Kr; Ki] (2cc x ci) @ [Xr | Xi] (ci x 2 tiles) gives the
        //    four products KrXr, KrXi, KiXr, KiXi of the complex product.
        let ks = &ks[..2 * nb * pairs];
        let ys = &mut ys[..nb * 4 * cc * ntiles];
        ys.par_chunks_mut(4 * cc * ntiles)
            .enumerate()
            .for_each(|(bin, y)| {
                let kb = &ks[bin * 2 * pairs..(bin + 1) * 2 * pairs];
                let xb = &xs[bin * ci * 2 * ntiles..(bin + 1) * ci * 2 * ntiles];
                // SAFETY: row-major operands of exactly these sizes.
                unsafe {
                    crate::matmul::gemm_in(
                        precision,
                        2 * cc,
                        2 * ntiles,
                        ci,
                        y.as_mut_ptr(),
                        2 * ntiles,
                        false,
                        crate::matmul::Operand::rows(kb.as_ptr(), ci),
                        crate::matmul::Operand::rows(xb.as_ptr(), 2 * ntiles),
                        1.0,
                        gemm::Parallelism::None,
                    )
                };
            });

        // 4. Back to pixels, keeping each tile's valid corner.
        (0..cc).into_par_iter().for_each(|o| {
            // Y = (KrXr - KiXi) + i (KrXi + KiXr), gathered as [bin][tile].
            let mut local = vec![C32::default(); nb * ntiles];
            let nt2 = 2 * ntiles;
            for bin in 0..nb {
                let p = &ys[bin * 4 * cc * ntiles..(bin + 1) * 4 * cc * ntiles];
                let kr = &p[o * nt2..(o + 1) * nt2];
                let ki = &p[(cc + o) * nt2..(cc + o + 1) * nt2];
                for t in 0..ntiles {
                    local[bin * ntiles + t] =
                        C32::new(kr[t] - ki[ntiles + t], kr[ntiles + t] + ki[t]);
                }
            }
            let mut spec = vec![C32::default(); nb];
            let mut h_scratch = vec![C32::default(); plans.inv_h.get_inplace_scratch_len()];
            let mut row_in = plans.c2r.make_input_vec();
            let mut row_out = plans.c2r.make_output_vec();
            let mut c2r_scratch = plans.c2r.make_scratch_vec();
            for t in 0..ntiles {
                for bin in 0..nb {
                    spec[bin] = local[bin * ntiles + t];
                }
                plans.inv_h.process_with_scratch(&mut spec, &mut h_scratch);
                let (bi, y0, x0) = tile_origin(t);
                for fy in 0..th.min(h - y0) {
                    for (fx, v) in row_in.iter_mut().enumerate() {
                        *v = spec[fx * fh + fy];
                    }
                    // A real signal's DC (and even-length Nyquist) bins are real; drop the
                    // rounding residue as an inverse real FFT must.
                    row_in[0].im = 0.0;
                    if fw % 2 == 0 {
                        row_in[fwc - 1].im = 0.0;
                    }
                    plans
                        .c2r
                        .process_with_scratch(&mut row_in, &mut row_out, &mut c2r_scratch)
                        .expect("buffer sizes come from the plan");
                    let y = y0 + fy;
                    let base = ((bi * co + c0 + o) * h + y) * w + x0;
                    for (i, v) in row_out.iter().take(tw.min(w - x0)).enumerate() {
                        // SAFETY: output channel c0+o is written by this task alone.
                        unsafe { *op.at(base + i) = v * scale };
                    }
                }
            }
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::check_conv_same;
    use candle_core::Tensor;

    #[test]
    fn matches_candle_conv2d() {
        let cases = [
            (1, 3, 4, 10, 40, 9),
            (2, 5, 3, 37, 29, 5),
            (1, 4, 2, 6, 70, 7),
            (1, 2, 3, 33, 33, 9),
            // Enough channel pairs for narrower tiles than 32 (checked below); the second
            // with one tile of an odd, prime height.
            (1, 48, 40, 10, 100, 9),
            (1, 48, 40, 9, 100, 9),
        ];
        let (_, (fw, _, ntw), _) = tiling(1, 48, 40, 10, 100, 9);
        assert!(fw < 32 && ntw > 1, "{fw} wide, {ntw} tiles");
        assert_eq!(tiling(1, 48, 40, 9, 100, 9).0, (17, 9, 1));
        check_conv_same(&cases, 1e-5, |x, w| {
            let (b, ci, h, wd) = x.dims4().unwrap();
            let (co, _, k, _) = w.dims4().unwrap();
            let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let ws: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
            let y = conv2d_same_fft(
                &xs,
                b,
                ci,
                h,
                wd,
                Taps::F32(&ws),
                co,
                k,
                crate::matmul::Precision::F32,
            );
            Tensor::from_vec(y, (b, co, h, wd), x.device()).unwrap()
        });
    }

    #[test]
    fn kernel_spectra_match_a_direct_dft() {
        // More pairs than one block, a kernel row count unlike the tile sides.
        let (k, fh, fw, pairs) = (5, 12, 10, SPECTRA_BLOCK + 77);
        let taps: Vec<f32> = (0..pairs * k * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let fwc = fw / 2 + 1;
        let mut got = vec![0f32; 2 * fh * fwc * pairs];
        KernelSpectra::new(k, fh, fw).compute(&taps, pairs, &mut got);
        let mut worst = 0f64;
        for p in (0..pairs).step_by(37) {
            for fx in 0..fwc {
                for fy in 0..fh {
                    let (mut re, mut im) = (0f64, 0f64);
                    for dy in 0..k {
                        for dx in 0..k {
                            let a = std::f64::consts::TAU
                                * ((fx * dx) as f64 / fw as f64 + (fy * dy) as f64 / fh as f64);
                            let w = taps[p * k * k + dy * k + dx] as f64;
                            re += w * a.cos();
                            im += w * a.sin();
                        }
                    }
                    let bin = fx * fh + fy;
                    worst = worst
                        .max((got[2 * bin * pairs + p] as f64 - re).abs())
                        .max((got[(2 * bin + 1) * pairs + p] as f64 - im).abs());
                }
            }
        }
        assert!(worst < 1e-4, "largest error {worst}");
    }

    #[test]
    fn tilings_cover_their_axes() {
        for &(len, k) in &[
            (1, 5),
            (10, 9),
            (24, 9),
            (25, 9),
            (130, 9),
            (200, 9),
            (384, 5),
            (37, 7),
        ] {
            for (n, valid, count) in axis_choices(len, k) {
                assert!(n <= MAX_TILE, "{len} {k}: {n}");
                assert_eq!(
                    valid,
                    n - k + 1,
                    "{len} {k}: each tile keeps its valid outputs"
                );
                assert!(
                    valid * count >= len && valid * (count - 1) < len,
                    "{len} {k}"
                );
            }
        }
    }

    #[test]
    fn few_tiles_of_many_channel_pairs_take_smaller_tiles() {
        // The authors' last ConvL: the 32-wide tiling (6 tiles, 18 x 17 bins) spends most of
        // its work on kernel spectra; a narrower tile has fewer bins.
        let ((fh, _, _), (fw, _, ntw), _) = tiling(1, 2048, 4296, 10, 130, 9);
        assert_eq!(fh, 18, "one tile of the whole padded height");
        assert!(fw < 32 && ntw > 6, "{fw} wide, {ntw} tiles");
        // A large image of few channel pairs keeps large tiles.
        let ((fh, _, _), (fw, _, _), _) = tiling(1, 128, 128, 200, 300, 9);
        assert!(fh >= 24 && fw >= 24, "{fh} x {fw}");
    }

    #[test]
    fn only_large_kernels_take_the_fft_path() {
        assert!(!worth_it(1, 128, 128, 384, 128, 3));
        assert!(!worth_it(1, 1024, 2048, 10, 200, 1));
        assert!(worth_it(1, 128, 128, 384, 128, 9));
        // Large kernels on small images, or few channels, stay direct.
        assert!(!worth_it(1, 64, 64, 23, 23, 9));
        assert!(!worth_it(1, 4, 4, 3, 9, 9));
        assert!(worth_it(1, 1024, 2048, 10, 200, 9));
    }
}
