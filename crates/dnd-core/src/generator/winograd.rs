//! "Same" 3x3 convolution by Winograd's minimal filtering F(2x2, 3x3), for the decoder's
//! wide-channel stages.
//!
//! A direct 3x3 convolution costs 9 multiply-adds per (input channel, output channel, pixel).
//! Winograd's F(2x2, 3x3) computes each 2x2 block of outputs from a 4x4 input patch with 16
//! element-wise products instead of 36, so the channel-mixing work drops 2.25x:
//!
//! 1. every kernel `g` (3x3) becomes `G g Gᵀ` (4x4), every input patch `d` (4x4, overlapping by
//!    two) becomes `Bᵀ d B`;
//! 2. for each of the 16 transformed positions, output = kernels (Co x Ci) @ patches (Ci x
//!    tiles): 16 GEMMs;
//! 3. every output tile is `Aᵀ m A` (2x2), cropped at the right and bottom edges.
//!
//! The transforms only add and halve, so the result stays within f32 rounding of the direct
//! sum. Batch elements are done one at a time to bound the transformed buffers' memory.

use rayon::prelude::*;

use super::conv::SyncPtr;

/// Transformed positions per tile (4x4).
const POS: usize = 16;

/// Whether F(2x2, 3x3) is worth its transforms for this channel count: narrow convolutions
/// are dominated by the transforms and by GEMMs too thin to run at full speed.
pub fn worth_it(ci: usize, co: usize, k: usize) -> bool {
    k == 3 && ci >= 48 && co >= 48
}

/// The kernels of output channels `o0..o0+n` (`wts` is `(co, ci, 3, 3)`) transformed into `u`
/// as 16 matrices `(n, ci)`, position-major: `G g Gᵀ` with `G = [[1, 0, 0], [½, ½, ½], [½, -½,
/// ½], [0, 0, 1]]`, computed for all input channels of one output channel at once (slices, so
/// the loops vectorise).
fn transform_kernels(wts: &[f32], ci: usize, o0: usize, n: usize, u: &mut [f32]) {
    let plane = n * ci;
    let dst = SyncPtr(u.as_mut_ptr());
    (0..n).into_par_iter().for_each(|j| {
        let o = o0 + j;
        // taps[k][i] = g_(o,i)[k]: the nine taps as rows over the input channels.
        let mut taps = vec![0f32; 9 * ci];
        for (i, g) in wts[o * ci * 9..(o + 1) * ci * 9]
            .chunks_exact(9)
            .enumerate()
        {
            for (k, &v) in g.iter().enumerate() {
                taps[k * ci + i] = v;
            }
        }
        let tap = |k: usize| &taps[k * ci..(k + 1) * ci];
        // G g (4x3, rows over i), then (G g) Gᵀ row by row.
        let mut gg = vec![0f32; 12 * ci];
        for c in 0..3 {
            let (g0, g1, g2) = (tap(c), tap(3 + c), tap(6 + c));
            for i in 0..ci {
                let s = 0.5 * (g0[i] + g2[i]);
                gg[c * ci + i] = g0[i];
                gg[(3 + c) * ci + i] = s + 0.5 * g1[i];
                gg[(6 + c) * ci + i] = s - 0.5 * g1[i];
                gg[(9 + c) * ci + i] = g2[i];
            }
        }
        for r in 0..4 {
            let row = |c: usize| &gg[(r * 3 + c) * ci..(r * 3 + c + 1) * ci];
            let (g0, g1, g2) = (row(0), row(1), row(2));
            // SAFETY: the four slices are rows j of u[r*4 .. r*4+4] (each (n, ci)); each job
            // writes only its own row j.
            let out = |c: usize| unsafe {
                std::slice::from_raw_parts_mut(dst.at((r * 4 + c) * plane + j * ci), ci)
            };
            let (u0, u1, u2, u3) = (out(0), out(1), out(2), out(3));
            for i in 0..ci {
                let s = 0.5 * (g0[i] + g2[i]);
                u0[i] = g0[i];
                u1[i] = s + 0.5 * g1[i];
                u2[i] = s - 0.5 * g1[i];
                u3[i] = g2[i];
            }
        }
    });
}

/// Tiles handled per pass, and output channels per product: bound the transformed inputs,
/// kernels and outputs held at once (16 x channels x tiles) to a few MB.
const TILE_CHUNK: usize = 512;
const CO_CHUNK: usize = 256;

/// A kernel `(co, ci, 3, 3)` transformed once, for weights that do not change between calls
/// (a loaded generator's): the 16 matrices `(co, ci)` of `G g Gᵀ`, in f32 or, for bf16
/// products where the CPU has them, rounded and packed as the product reads its left operand
/// (per chunk of output channels, as the calls multiply them). A call with it skips the kernel
/// transform and, in bf16, the kernels' packing.
pub struct WinogradKernels {
    co: usize,
    ci: usize,
    form: KernelForm,
}

enum KernelForm {
    /// `u[pos]` `(co, ci)`, position-major.
    F32(Vec<f32>),
    /// `[chunk of CO_CHUNK output channels][pos]`.
    Bf16(Vec<Vec<crate::matmul::bf16::Packed>>),
}

impl WinogradKernels {
    /// Transforms `wts` (`(co, ci, 3, 3)`, row-major) for products in `precision`.
    pub fn new(wts: &[f32], co: usize, ci: usize, precision: crate::matmul::Precision) -> Self {
        let mut u = vec![0f32; POS * co * ci];
        transform_kernels(wts, ci, 0, co, &mut u);
        let packed = match precision {
            crate::matmul::Precision::Bf16 => (0..co)
                .step_by(CO_CHUNK)
                .map(|o0| {
                    let n = CO_CHUNK.min(co - o0);
                    (0..POS)
                        .map(|pos| {
                            let rows = u[(pos * co + o0) * ci..].as_ptr();
                            // SAFETY: rows o0..o0+n of u[pos], a row-major (co, ci) block.
                            unsafe {
                                crate::matmul::bf16::Packed::lhs(
                                    crate::matmul::Operand::rows(rows, ci),
                                    n,
                                    ci,
                                )
                            }
                        })
                        .collect::<Option<Vec<_>>>()
                })
                .collect::<Option<Vec<_>>>(),
            crate::matmul::Precision::F32 => None,
        };
        let form = match packed {
            Some(p) => KernelForm::Bf16(p),
            // f32 products, or bf16 ones where the CPU computes them in f32 anyway.
            None => KernelForm::F32(u),
        };
        Self { co, ci, form }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match &self.form {
            KernelForm::F32(u) => u.len() * 4,
            KernelForm::Bf16(p) => p.iter().flatten().map(|p| p.bytes()).sum(),
        }
    }

    /// `(co, ci)`.
    pub fn channels(&self) -> (usize, usize) {
        (self.co, self.ci)
    }
}

impl std::fmt::Debug for WinogradKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let form = match self.form {
            KernelForm::F32(_) => "f32",
            KernelForm::Bf16(_) => "bf16 packed",
        };
        write!(f, "WinogradKernels({}x{}x3x3, {form})", self.co, self.ci)
    }
}

/// The kernels of a call: as stored (transformed per call, in chunks of output channels), or
/// transformed once ([`WinogradKernels`]).
#[derive(Clone, Copy)]
pub enum Kernels<'a> {
    /// `(co, ci, 3, 3)` row-major, multiplied in the given precision.
    Raw(&'a [f32], crate::matmul::Precision),
    /// Transformed beforehand, in the precision they were made for.
    Prepared(&'a WinogradKernels),
}

/// `x (b, ci, h, w)` convolved with kernels `(co, ci, 3, 3)`, as stored or transformed
/// beforehand, padding 1; returns `(b, co, h, w)`.
pub fn conv2d_same_winograd_with(
    src: &[f32],
    b: usize,
    ci: usize,
    h: usize,
    wd: usize,
    co: usize,
    kernels: Kernels<'_>,
) -> Vec<f32> {
    if let Kernels::Prepared(k) = kernels {
        assert_eq!(k.channels(), (co, ci), "prepared kernels of another shape");
    }
    let (th, tw) = (h.div_ceil(2), wd.div_ceil(2));
    let mut out = vec![0f32; b * co * h * wd];
    // Whole tile rows per pass, at least one.
    let rows_per_pass = (TILE_CHUNK / tw).max(1);
    let co_c = CO_CHUNK.min(co);
    let most = rows_per_pass.min(th) * tw;
    let un = match kernels {
        Kernels::Raw(..) => POS * co_c * ci,
        Kernels::Prepared(_) => 0,
    };
    let (vn, mn) = (POS * ci * most, POS * co_c * most);
    // With bf16-packed kernels in several chunks of output channels, each pass's transformed
    // inputs are packed once for all the chunks' products instead of once per product.
    let pack_inputs = co > co_c
        && matches!(kernels, Kernels::Prepared(k) if matches!(k.form, KernelForm::Bf16(_)));
    let mut packed_inputs = Vec::new();
    if pack_inputs {
        packed_inputs = PACKED_INPUTS.with(|cell| cell.take());
        packed_inputs.resize_with(POS, crate::matmul::bf16::Packed::empty_rhs);
    }
    super::conv::with_scratch(|buf| {
        if buf.len() < un + vn + mn {
            buf.resize(un + vn + mn, 0.0);
        }
        let (u, rest) = buf.split_at_mut(un);
        let (v, m) = rest.split_at_mut(vn);
        for bi in 0..b {
            let planes = &src[bi * ci * h * wd..(bi + 1) * ci * h * wd];
            for ty0 in (0..th).step_by(rows_per_pass) {
                let nty = rows_per_pass.min(th - ty0);
                let tiles = nty * tw;
                transform_inputs(planes, ci, h, wd, ty0, nty, &mut v[..POS * ci * tiles]);
                if pack_inputs {
                    let v = &v[..];
                    packed_inputs
                        .par_iter_mut()
                        .enumerate()
                        .for_each(|(pos, p)| {
                            let rows =
                                crate::matmul::Operand::rows(v[pos * ci * tiles..].as_ptr(), tiles);
                            // SAFETY: v[pos] is a row-major (ci, tiles) block of v.
                            let packed = unsafe { p.repack_rhs(rows, ci, tiles) };
                            debug_assert!(packed, "bf16-packed kernels imply the instructions");
                        });
                }
                let packed_inputs = &packed_inputs;
                for o0 in (0..co).step_by(co_c) {
                    let n = co_c.min(co - o0);
                    if let Kernels::Raw(wts, _) = kernels {
                        transform_kernels(wts, ci, o0, n, &mut u[..POS * n * ci]);
                    }
                    let (up, vp, mp) = (
                        SyncPtr(u.as_mut_ptr()),
                        SyncPtr(v.as_mut_ptr()),
                        SyncPtr(m.as_mut_ptr()),
                    );
                    // m[pos] (n x tiles) = u[pos] (n x ci) @ v[pos] (ci x tiles).
                    // Whole products per thread: every product of one thread's share runs
                    // without hand-offs between threads (a fifth faster than splitting each
                    // product in f32, on 2 cores; twice as fast in bf16, whose products pack
                    // both operands per call). Past 16 threads each product gets a share.
                    let inner = match rayon::current_num_threads() / POS {
                        0 | 1 => gemm::Parallelism::None,
                        t => gemm::Parallelism::Rayon(t),
                    };
                    (0..POS).into_par_iter().for_each(|pos| {
                        // SAFETY: m[pos], u[pos] and v[pos] are row-major blocks of their
                        // buffers of the shapes above, all in bounds; each position writes
                        // its own m[pos]. Prepared f32 kernels are (co x ci) per position,
                        // read from row o0; packed ones (n x ci) per chunk and position.
                        unsafe {
                            let dst = mp.at(pos * n * tiles);
                            let rhs = crate::matmul::Operand::rows(vp.at(pos * ci * tiles), tiles);
                            let f32_form = |lhs, precision| {
                                crate::matmul::gemm_in(
                                    precision, n, tiles, ci, dst, tiles, false, lhs, rhs, 1.0,
                                    inner,
                                )
                            };
                            match kernels {
                                Kernels::Raw(_, precision) => f32_form(
                                    crate::matmul::Operand::rows(up.at(pos * n * ci), ci),
                                    precision,
                                ),
                                Kernels::Prepared(WinogradKernels {
                                    form: KernelForm::F32(uf),
                                    ..
                                }) => f32_form(
                                    crate::matmul::Operand::rows(
                                        uf[(pos * co + o0) * ci..].as_ptr(),
                                        ci,
                                    ),
                                    crate::matmul::Precision::F32,
                                ),
                                Kernels::Prepared(WinogradKernels {
                                    form: KernelForm::Bf16(packed),
                                    ..
                                }) => crate::matmul::bf16::gemm_bf16_with(
                                    n,
                                    tiles,
                                    ci,
                                    dst,
                                    tiles,
                                    false,
                                    crate::matmul::bf16::Input::Packed(&packed[o0 / CO_CHUNK][pos]),
                                    if pack_inputs {
                                        crate::matmul::bf16::Input::Packed(&packed_inputs[pos])
                                    } else {
                                        crate::matmul::bf16::Input::Strided(rhs)
                                    },
                                    1.0,
                                    inner,
                                ),
                            }
                        }
                    });
                    let planes_out = (bi * co + o0) * h * wd..(bi * co + o0 + n) * h * wd;
                    transform_outputs(
                        &m[..POS * n * tiles],
                        n,
                        h,
                        wd,
                        ty0,
                        nty,
                        &mut out[planes_out],
                    );
                }
            }
        }
    });
    if pack_inputs {
        PACKED_INPUTS.with(|cell| cell.replace(packed_inputs));
    }
    out
}

thread_local! {
    /// The 16 packed transformed inputs of [`conv2d_same_winograd_with`], kept per thread
    /// between calls (their memory, not their contents).
    static PACKED_INPUTS: std::cell::RefCell<Vec<crate::matmul::bf16::Packed>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Input patches of tile rows `ty0..ty0+nty` transformed, `v[pos][i][tile]`: `Bᵀ d B` with
/// `Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`. Each tile row's patches
/// are read as slices across the row (even and odd padded columns apart), so the arithmetic
/// runs over whole rows of tiles.
fn transform_inputs(
    planes: &[f32],
    ci: usize,
    h: usize,
    wd: usize,
    ty0: usize,
    nty: usize,
    v: &mut [f32],
) {
    let tw = wd.div_ceil(2);
    let tiles = nty * tw;
    let vp = SyncPtr(v.as_mut_ptr());
    (0..ci).into_par_iter().for_each(|i| {
        let plane = &planes[i * h * wd..(i + 1) * h * wd];
        // cols[r][c][tx]: padded row 2ty + r, padded column 2tx + c (zero outside the image).
        let mut cols = vec![0f32; 16 * tw];
        let mut t = vec![0f32; 16 * tw];
        for dty in 0..nty {
            let ty = ty0 + dty;
            cols.fill(0.0);
            for r in 0..4 {
                // Padded row 2ty + r is image row 2ty + r - 1.
                let Some(y) = (2 * ty + r).checked_sub(1).filter(|&y| y < h) else {
                    continue;
                };
                let row = &plane[y * wd..(y + 1) * wd];
                for (x, &val) in row.iter().enumerate() {
                    // Image column x is padded column x + 1 = 2tx + c for c in 0..4.
                    let pc = x + 1;
                    let (tx, c) = (pc / 2, pc % 2);
                    if tx < tw {
                        cols[(r * 4 + c) * tw + tx] = val;
                    }
                    if tx >= 1 {
                        cols[(r * 4 + c + 2) * tw + tx - 1] = val;
                    }
                }
            }
            let s = |k: usize| &cols[k * tw..(k + 1) * tw];
            // Bᵀ d along the patch's rows: t[r'][c] from d[0..4][c].
            for c in 0..4 {
                let (d0, d1, d2, d3) = (s(c), s(4 + c), s(8 + c), s(12 + c));
                for tx in 0..tw {
                    t[c * tw + tx] = d0[tx] - d2[tx];
                    t[(4 + c) * tw + tx] = d1[tx] + d2[tx];
                    t[(8 + c) * tw + tx] = d2[tx] - d1[tx];
                    t[(12 + c) * tw + tx] = d1[tx] - d3[tx];
                }
            }
            // (Bᵀ d) B along its columns, written to v[r'*4 + c'][i][dty*tw ..].
            for r in 0..4 {
                let q = |c: usize| &t[(r * 4 + c) * tw..(r * 4 + c + 1) * tw];
                let (d0, d1, d2, d3) = (q(0), q(1), q(2), q(3));
                // SAFETY: row i of v[r*4 + c] (each (ci, tiles)), columns dty*tw .. +tw; each
                // job writes only its own input channel i.
                let out = |c: usize| unsafe {
                    std::slice::from_raw_parts_mut(
                        vp.at(((r * 4 + c) * ci + i) * tiles + dty * tw),
                        tw,
                    )
                };
                let (v0, v1, v2, v3) = (out(0), out(1), out(2), out(3));
                for tx in 0..tw {
                    v0[tx] = d0[tx] - d2[tx];
                    v1[tx] = d1[tx] + d2[tx];
                    v2[tx] = d2[tx] - d1[tx];
                    v3[tx] = d1[tx] - d3[tx];
                }
            }
        }
    });
}

/// Output tiles of tile rows `ty0..ty0+nty`: `Aᵀ m A` with `Aᵀ = [[1, 1, 1, 0], [0, 1, -1,
/// -1]]`, written into `dst (co, h, w)` and cropped there.
fn transform_outputs(
    m: &[f32],
    co: usize,
    h: usize,
    wd: usize,
    ty0: usize,
    nty: usize,
    dst: &mut [f32],
) {
    let tw = wd.div_ceil(2);
    let tiles = nty * tw;
    dst.par_chunks_mut(h * wd)
        .enumerate()
        .for_each(|(o, plane)| {
            let mut t = vec![0f32; 8 * tw];
            let mut row = vec![0f32; 2 * tw];
            for dty in 0..nty {
                let at = |pos: usize| &m[(pos * co + o) * tiles + dty * tw..][..tw];
                // Aᵀ m along the rows: t[r][c] from m[0..4][c].
                for c in 0..4 {
                    let (m0, m1, m2, m3) = (at(c), at(4 + c), at(8 + c), at(12 + c));
                    for tx in 0..tw {
                        t[c * tw + tx] = m0[tx] + m1[tx] + m2[tx];
                        t[(4 + c) * tw + tx] = m1[tx] - m2[tx] - m3[tx];
                    }
                }
                for r in 0..2 {
                    let y = 2 * (ty0 + dty) + r;
                    if y >= h {
                        break;
                    }
                    let q = |c: usize| &t[(r * 4 + c) * tw..(r * 4 + c + 1) * tw];
                    let (q0, q1, q2, q3) = (q(0), q(1), q(2), q(3));
                    for tx in 0..tw {
                        row[2 * tx] = q0[tx] + q1[tx] + q2[tx];
                        row[2 * tx + 1] = q1[tx] - q2[tx] - q3[tx];
                    }
                    plane[y * wd..(y + 1) * wd].copy_from_slice(&row[..wd]);
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::check_conv_same;
    use candle_core::Tensor;

    fn run(x: &Tensor, w: &Tensor) -> Tensor {
        let (b, ci, h, wd) = x.dims4().unwrap();
        let co = w.dim(0).unwrap();
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let ws = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let out = conv2d_same_winograd_with(
            &xs,
            b,
            ci,
            h,
            wd,
            co,
            Kernels::Raw(&ws, crate::matmul::Precision::F32),
        );
        Tensor::from_vec(out, (b, co, h, wd), x.device()).unwrap()
    }

    #[test]
    fn matches_candle_conv2d_on_odd_and_even_sizes() {
        // Odd sides leave a cropped last tile row/column; 1-pixel sides a single partial tile;
        // 40x60 takes two passes of tile rows (and 2000 wide, one tile row a pass); 300 output
        // channels two products.
        let cases = [
            (2, 4, 300, 5, 6, 3),
            (2, 3, 2, 40, 60, 3),
            (1, 2, 3, 3, 2000, 3),
            (1, 3, 4, 5, 7, 3),
            (2, 5, 3, 4, 6, 3),
            (1, 2, 2, 1, 1, 3),
            (1, 7, 6, 1, 9, 3),
            (3, 16, 10, 10, 13, 3),
        ];
        check_conv_same(&cases, 1e-5, run);
    }

    #[test]
    fn prepared_kernels_match_candle_conv2d() {
        // 300 output channels at once (two tile passes at 40x60, one tile row a pass at 2000
        // wide); a single partial tile.
        let cases = [
            (2, 4, 300, 40, 60, 3),
            (1, 2, 3, 3, 2000, 3),
            (1, 2, 2, 1, 1, 3),
            (3, 16, 10, 10, 13, 3),
        ];
        let prepared = |precision| {
            move |x: &Tensor, w: &Tensor| {
                let (b, ci, h, wd) = x.dims4().unwrap();
                let co = w.dim(0).unwrap();
                let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let ws = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let k = WinogradKernels::new(&ws, co, ci, precision);
                assert_eq!(k.channels(), (co, ci));
                let packed =
                    precision == crate::matmul::Precision::Bf16 && crate::matmul::bf16::available();
                assert_eq!(format!("{k:?}").contains("bf16 packed"), packed);
                let out = conv2d_same_winograd_with(&xs, b, ci, h, wd, co, Kernels::Prepared(&k));
                Tensor::from_vec(out, (b, co, h, wd), x.device()).unwrap()
            }
        };
        check_conv_same(&cases, 1e-5, prepared(crate::matmul::Precision::F32));
        // bf16 operands: within bf16 rounding of the f32 convolution, on the cases whose sums
        // have enough terms for a relative bound (two terms may cancel to almost nothing).
        check_conv_same(&cases[..2], 2e-2, prepared(crate::matmul::Precision::Bf16));
        check_conv_same(&cases[3..], 2e-2, prepared(crate::matmul::Precision::Bf16));
    }
}
