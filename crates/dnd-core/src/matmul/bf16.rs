//! Matrix products computed in bf16 by the CPU's AVX512-BF16 dot-product instruction
//! (`vdpbf16ps`): both operands are rounded to bf16 (nearest even) while they are packed, each
//! instruction multiplies 16 pairs of bf16 and adds them to 16 f32 sums, and the products
//! themselves are exact in f32, so the result equals an f32 product of the rounded operands up
//! to the order of summation. Per instruction that is twice the multiply-adds of an f32 FMA.
//!
//! Layout: `rhs` is packed in blocks of `KCP` k-pairs into panels of `NR` columns, each k-pair
//! of a column one 32-bit word (the two bf16 the instruction pairs); `lhs` in panels of `MR`
//! rows, each row's k-pairs contiguous, a pair broadcast to all lanes. A micro-tile of MR x NR
//! sums stays in 16 registers for a whole block.

use std::cell::RefCell;
use std::sync::OnceLock;

use rayon::prelude::*;

use super::Operand;
use crate::generator::conv::SyncPtr;

/// Rows of a micro-tile.
const MR: usize = 8;
/// Columns of a micro-tile: two vectors of 16 f32.
const NR: usize = 32;
/// k-pairs per block: one panel of `rhs` (KCP x NR words, 24 KiB) stays in the L1 cache.
const KCP: usize = 192;
/// Rows of `lhs` packed at once (MC x KCP words, 144 KiB, for the L2 cache).
const MC: usize = 192;

/// Whether this CPU has the instructions (AVX512-BF16, and AVX512-BW for the packing).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// `x` rounded to bf16, nearest even (as `vcvtne2ps2bf16` rounds, except that the instruction
/// flushes denormals, which `vdpbf16ps` would treat as zero anyway); NaN stays NaN.
pub fn to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x40;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// `x` rounded to the nearest bf16, as an f32.
pub fn round_to_bf16(x: f32) -> f32 {
    f32::from_bits((to_bf16_bits(x) as u32) << 16)
}

/// The word of a k-pair: the element at k in the low half, the one at k + 1 in the high half.
fn pair(lo: f32, hi: f32) -> u32 {
    (to_bf16_bits(lo) as u32) | ((to_bf16_bits(hi) as u32) << 16)
}

thread_local! {
    static PACKED: RefCell<(Vec<u32>, Vec<u32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// `dst = scale · lhs @ rhs`, or `dst += scale · lhs @ rhs` when `accumulate`, with the
/// operands rounded to bf16 and the sums kept in f32; the same contract as
/// [`super::gemm_f32`], except that any `par` other than `None` uses the whole rayon pool.
/// Falls back to the f32 product where [`available`] is false.
///
/// # Safety
/// As [`super::gemm_f32`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_bf16(
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
    gemm_bf16_with(
        m,
        n,
        k,
        dst,
        dst_row_stride,
        accumulate,
        Input::Strided(lhs),
        Input::Strided(rhs),
        scale,
        par,
    )
}

/// Which operand of a product a [`Packed`] matrix is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The left operand, `(m, k)`.
    Lhs,
    /// The right operand, `(k, n)`.
    Rhs,
}

/// A matrix rounded to bf16 and packed into the product's panel layout once, for an operand
/// that stays the same over many products (a weight): [`gemm_bf16_with`] then reads it as it
/// is instead of packing it per call. Holds half the bytes of the f32 matrix (plus the padding
/// of its last panel).
pub struct Packed {
    /// The k-blocks one after another, each as the product packs it per call.
    words: Vec<u32>,
    side: Side,
    /// m for a left operand, n for a right one.
    len: usize,
    k: usize,
}

impl Packed {
    /// Packs a left operand `(m, k)`; `None` where the CPU lacks the instructions.
    ///
    /// # Safety
    /// Every element `(i, j)`, `i < m`, `j < k`, that `a`'s steps address lies in its
    /// allocation.
    pub unsafe fn lhs(a: Operand, m: usize, k: usize) -> Option<Self> {
        Self::pack(Side::Lhs, a, m, k)
    }

    /// Packs a right operand `(k, n)`; `None` where the CPU lacks the instructions.
    ///
    /// # Safety
    /// Every element `(i, j)`, `i < k`, `j < n`, that `b`'s steps address lies in its
    /// allocation.
    pub unsafe fn rhs(b: Operand, k: usize, n: usize) -> Option<Self> {
        Self::pack(Side::Rhs, b, n, k)
    }

    unsafe fn pack(side: Side, op: Operand, len: usize, k: usize) -> Option<Self> {
        let mut p = Self {
            words: Vec::new(),
            side,
            len: 0,
            k: 0,
        };
        p.repack(side, op, len, k, true).then_some(p)
    }

    /// An empty right operand for [`Self::repack_rhs`] to fill.
    pub fn empty_rhs() -> Self {
        Self {
            words: Vec::new(),
            side: Side::Rhs,
            len: 0,
            k: 0,
        }
    }

    /// Packs `b` `(k, n)` into this right operand, reusing its memory (for a right operand
    /// that several products share, packed anew for each batch of them); `false`, leaving it
    /// as it was, where the CPU lacks the instructions.
    ///
    /// # Safety
    /// As [`Self::rhs`].
    pub unsafe fn repack_rhs(&mut self, b: Operand, k: usize, n: usize) -> bool {
        self.repack(Side::Rhs, b, n, k, false)
    }

    /// Packs `op` as a `side` operand of `len` rows (left) or columns (right) and depth `k`
    /// into this one, reusing its memory, on the rayon pool when `parallel`; `false`, leaving
    /// it as it was, where the CPU lacks the instructions.
    #[allow(unused_variables)]
    unsafe fn repack(
        &mut self,
        side: Side,
        op: Operand,
        len: usize,
        k: usize,
        parallel: bool,
    ) -> bool {
        if !available() {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        {
            x86::pack_whole_into(side, op, len, k, &mut self.words, parallel);
            (self.side, self.len, self.k) = (side, len, k);
            true
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Which operand it is.
    pub fn side(&self) -> Side {
        self.side
    }

    /// Its shape as the product sees it: `(m, k)` or `(k, n)`.
    pub fn shape(&self) -> (usize, usize) {
        match self.side {
            Side::Lhs => (self.len, self.k),
            Side::Rhs => (self.k, self.len),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.words.len() * 4
    }
}

/// An operand of [`gemm_bf16_with`]: a matrix in memory (rounded and packed by the call), or
/// one [`Packed`] beforehand.
#[derive(Clone, Copy)]
pub enum Input<'a> {
    /// Read through its steps.
    Strided(Operand),
    /// Packed once, of the side and shape the call names.
    Packed(&'a Packed),
}

/// [`gemm_bf16`] with either operand possibly [`Packed`] beforehand.
///
/// # Safety
/// As [`super::gemm_f32`] for the strided operands. A packed operand must be of its side and
/// of the call's shape (checked: a mismatch panics).
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_bf16_with(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_row_stride: usize,
    accumulate: bool,
    lhs: Input<'_>,
    rhs: Input<'_>,
    scale: f32,
    par: gemm::Parallelism,
) {
    for (input, side, shape) in [(lhs, Side::Lhs, (m, k)), (rhs, Side::Rhs, (k, n))] {
        if let Input::Packed(p) = input {
            assert!(
                p.side == side && p.shape() == shape,
                "packed {:?} operand of shape {:?} used as the {side:?} of a {m}x{n}x{k} product",
                p.side,
                p.shape()
            );
        }
    }
    #[cfg(target_arch = "x86_64")]
    if available() {
        let run = |bufs: &mut (Vec<u32>, Vec<u32>)| {
            x86::gemm(
                m,
                n,
                k,
                dst,
                dst_row_stride,
                accumulate,
                lhs,
                rhs,
                scale,
                // Below a few million multiply-adds, handing work to other threads costs more
                // than it saves.
                !matches!(par, gemm::Parallelism::None) && m * n * k >= 1 << 21,
                bufs,
            )
        };
        PACKED.with(|cell| match cell.try_borrow_mut() {
            Ok(mut bufs) => run(&mut bufs),
            Err(_) => run(&mut (Vec::new(), Vec::new())),
        });
        return;
    }
    // Without the instructions no operand can have been packed.
    let (Input::Strided(lhs), Input::Strided(rhs)) = (lhs, rhs) else {
        unreachable!("a Packed operand exists only where the instructions do")
    };
    super::gemm_f32(
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
    )
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// See [`super::gemm_bf16`]; the caller checked [`available`].
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm(
        m: usize,
        n: usize,
        k: usize,
        dst: *mut f32,
        ldd: usize,
        accumulate: bool,
        lhs: Input<'_>,
        rhs: Input<'_>,
        scale: f32,
        parallel: bool,
        bufs: &mut (Vec<u32>, Vec<u32>),
    ) {
        if m == 0 || n == 0 {
            return;
        }
        let pairs = k.div_ceil(2);
        if pairs == 0 {
            if !accumulate {
                for i in 0..m {
                    std::ptr::write_bytes(dst.add(i * ldd), 0, n);
                }
            }
            return;
        }
        let n_panels = n.div_ceil(NR);
        let (apack, bpack) = bufs;
        let most = KCP.min(pairs);
        let b_len = n_panels * most * NR;
        let a_len = MC.min(m).div_ceil(MR) * MR * most;
        if matches!(rhs, Input::Strided(_)) && bpack.len() < b_len {
            bpack.resize(b_len, 0);
        }
        if matches!(lhs, Input::Strided(_)) && apack.len() < a_len {
            apack.resize(a_len, 0);
        }
        let m_pad = m.div_ceil(MR) * MR;
        let out = SyncPtr(dst);
        for p0 in (0..pairs).step_by(KCP) {
            let kcp = KCP.min(pairs - p0);
            // A packed operand holds its k-blocks one after another, each laid out as the
            // per-call packing lays it out.
            let bp: &[u32] = match rhs {
                Input::Packed(p) => &p.words[n_panels * NR * p0..][..n_panels * NR * kcp],
                Input::Strided(b) => {
                    let dst = &mut bpack[..n_panels * kcp * NR];
                    pack_rhs(b, k, n, 2 * p0, kcp, dst, parallel);
                    dst
                }
            };
            for i0 in (0..m).step_by(MC) {
                let mc = MC.min(m - i0);
                let m_panels = mc.div_ceil(MR);
                let ap: &[u32] = match lhs {
                    Input::Packed(p) => &p.words[m_pad * p0 + i0 * kcp..][..m_panels * MR * kcp],
                    Input::Strided(a) => {
                        let dst = &mut apack[..m_panels * MR * kcp];
                        pack_lhs(a, k, i0, mc, 2 * p0, kcp, dst, parallel);
                        dst
                    }
                };
                let load = accumulate || p0 > 0;
                let tile = |ip: usize, jp: usize| {
                    let rows = MR.min(mc - ip * MR);
                    let cols = NR.min(n - jp * NR);
                    // SAFETY: tile (ip, jp) writes rows i0 + ip*MR .. + rows, columns jp*NR ..
                    // + cols of dst; no two tiles share an element.
                    kernel(
                        kcp,
                        ap.as_ptr().add(ip * MR * kcp),
                        bp.as_ptr().add(jp * kcp * NR),
                        out.at((i0 + ip * MR) * ldd + jp * NR),
                        ldd,
                        rows,
                        cols,
                        scale,
                        load,
                    )
                };
                // Split the work along the axis with more panels; each job keeps one panel of
                // the other operand in cache while it walks its own.
                if !parallel || m_panels * n_panels < 2 {
                    for jp in 0..n_panels {
                        for ip in 0..m_panels {
                            tile(ip, jp);
                        }
                    }
                } else if n_panels >= m_panels {
                    (0..n_panels)
                        .into_par_iter()
                        .for_each(|jp| (0..m_panels).for_each(|ip| tile(ip, jp)));
                } else {
                    (0..m_panels)
                        .into_par_iter()
                        .for_each(|ip| (0..n_panels).for_each(|jp| tile(ip, jp)));
                }
            }
        }
    }

    /// A whole operand as [`super::Packed`] keeps it, into `words` (resized; every word
    /// written): its k-blocks one after another, each as [`gemm()`] packs it per call (all rows
    /// of a left operand, all columns of a right one), on the rayon pool when `parallel`.
    pub(super) unsafe fn pack_whole_into(
        side: Side,
        op: Operand,
        len: usize,
        k: usize,
        words: &mut Vec<u32>,
        parallel: bool,
    ) {
        let pairs = k.div_ceil(2);
        let width = match side {
            Side::Lhs => len.div_ceil(MR) * MR,
            Side::Rhs => len.div_ceil(NR) * NR,
        };
        words.resize(width * pairs, 0);
        for p0 in (0..pairs).step_by(KCP) {
            let kcp = KCP.min(pairs - p0);
            let block = &mut words[width * p0..][..width * kcp];
            match side {
                Side::Lhs => pack_lhs(op, k, 0, len, 2 * p0, kcp, block, parallel),
                Side::Rhs => pack_rhs(op, k, len, 2 * p0, kcp, block, parallel),
            }
        }
    }

    /// Rows `i0..i0+mc` of `lhs`, k-pairs from `k0` (even), packed as panels of MR rows, word
    /// `(i, p)` at `i * kcp + p`; rows past `mc` and k past `k` are zeros.
    #[allow(clippy::too_many_arguments)]
    unsafe fn pack_lhs(
        a: Operand,
        k: usize,
        i0: usize,
        mc: usize,
        k0: usize,
        kcp: usize,
        out: &mut [u32],
        parallel: bool,
    ) {
        let panel_job = |ip: usize, panel: &mut [u32]| {
            // The whole operand (Sync), not its pointer field alone.
            let a: Operand = a;
            for r in 0..MR {
                let row = ip * MR + r;
                let dst = &mut panel[r * kcp..(r + 1) * kcp];
                if row >= mc {
                    dst.fill(0);
                    continue;
                }
                let base = a.ptr.offset((i0 + row) as isize * a.row_stride);
                let at = |kk: usize| {
                    if kk < k {
                        *base.offset(kk as isize * a.col_stride)
                    } else {
                        0.0
                    }
                };
                let mut p = 0;
                if a.col_stride == 1 {
                    // 16 pairs from 32 contiguous elements in one conversion.
                    while p + 16 <= kcp && k0 + 2 * p + 32 <= k {
                        convert32(base.add(k0 + 2 * p), dst.as_mut_ptr().add(p));
                        p += 16;
                    }
                }
                for (p, word) in dst.iter_mut().enumerate().skip(p) {
                    let kk = k0 + 2 * p;
                    *word = pair(at(kk), at(kk + 1));
                }
            }
        };
        each_panel(
            &mut out[..mc.div_ceil(MR) * MR * kcp],
            MR * kcp,
            parallel,
            panel_job,
        );
    }

    /// Runs `job(i, panel)` on each `size`-word panel of `out`, on the rayon pool when
    /// `parallel`.
    fn each_panel(
        out: &mut [u32],
        size: usize,
        parallel: bool,
        job: impl Fn(usize, &mut [u32]) + Sync + Send,
    ) {
        if parallel {
            out.par_chunks_mut(size)
                .enumerate()
                .for_each(|(i, panel)| job(i, panel));
        } else {
            out.chunks_mut(size)
                .enumerate()
                .for_each(|(i, panel)| job(i, panel));
        }
    }

    /// k-pairs `k0/2 .. k0/2 + kcp` of all `n` columns of `rhs`, as panels of NR columns, word
    /// `(p, c)` of panel j at `j * kcp * NR + p * NR + c`; columns past `n` and k past `k` are
    /// zeros.
    unsafe fn pack_rhs(
        b: Operand,
        k: usize,
        n: usize,
        k0: usize,
        kcp: usize,
        out: &mut [u32],
        parallel: bool,
    ) {
        let panel_job = |jp: usize, panel: &mut [u32]| {
            // The whole operand (Sync), not its pointer field alone.
            let b: Operand = b;
            let at = |kk: usize, j: usize| {
                if kk < k && j < n {
                    *b.ptr
                        .offset(kk as isize * b.row_stride + j as isize * b.col_stride)
                } else {
                    0.0
                }
            };
            let j0 = jp * NR;
            let full = j0 + NR <= n;
            if b.col_stride == 1 && full {
                // Rows k and k + 1 of 16 columns, interleaved into 16 words.
                for p in 0..kcp {
                    let kk = k0 + 2 * p;
                    if kk + 1 < k {
                        for h in 0..2 {
                            interleave16(
                                b.ptr.offset(kk as isize * b.row_stride).add(j0 + 16 * h),
                                b.ptr
                                    .offset((kk + 1) as isize * b.row_stride)
                                    .add(j0 + 16 * h),
                                panel.as_mut_ptr().add(p * NR + 16 * h),
                            );
                        }
                    } else {
                        for c in 0..NR {
                            panel[p * NR + c] = pair(at(kk, j0 + c), at(kk + 1, j0 + c));
                        }
                    }
                }
                return;
            }
            if b.row_stride == 1 && full {
                // Each column's k run is contiguous: 16 pairs per conversion.
                let mut words = [0u32; 16];
                for c in 0..NR {
                    let col = b.ptr.offset((j0 + c) as isize * b.col_stride);
                    let mut p = 0;
                    while p + 16 <= kcp && k0 + 2 * p + 32 <= k {
                        convert32(col.add(k0 + 2 * p), words.as_mut_ptr());
                        for (q, &w) in words.iter().enumerate() {
                            panel[(p + q) * NR + c] = w;
                        }
                        p += 16;
                    }
                    for p in p..kcp {
                        let kk = k0 + 2 * p;
                        panel[p * NR + c] = pair(at(kk, j0 + c), at(kk + 1, j0 + c));
                    }
                }
                return;
            }
            for p in 0..kcp {
                let kk = k0 + 2 * p;
                for c in 0..NR {
                    panel[p * NR + c] = pair(at(kk, j0 + c), at(kk + 1, j0 + c));
                }
            }
        };
        each_panel(out, kcp * NR, parallel, panel_job);
    }

    /// 32 contiguous f32 to 16 words of consecutive pairs.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn convert32(src: *const f32, dst: *mut u32) {
        let lo = _mm512_loadu_ps(src);
        let hi = _mm512_loadu_ps(src.add(16));
        // The second operand fills the low half: the 32 bf16 in their original order.
        let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(dst as *mut _, v);
    }

    /// Words `(even[c], odd[c])` for 16 columns c.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn interleave16(even: *const f32, odd: *const f32, dst: *mut u32) {
        let lo = _mm512_loadu_ps(even);
        let hi = _mm512_loadu_ps(odd);
        // [even 0..16, odd 0..16] as bf16, then element c and 16 + c side by side.
        let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        let idx = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20,
            4, 19, 3, 18, 2, 17, 1, 16, 0,
        );
        _mm512_storeu_si512(dst as *mut _, _mm512_permutexvar_epi16(idx, v));
    }

    /// One MR x NR tile over `kcp` k-pairs: `c = scale · a @ b`, plus the old `c` when `load`;
    /// only the first `rows` x `cols` elements of `c` are touched.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn kernel(
        kcp: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        scale: f32,
        load: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for p in 0..kcp {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR) as *const _));
            let b1: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16) as *const _));
            for (i, sums) in acc.iter_mut().enumerate() {
                let ai: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*a.add(i * kcp + p) as i32));
                sums[0] = _mm512_dpbf16_ps(sums[0], ai, b0);
                sums[1] = _mm512_dpbf16_ps(sums[1], ai, b1);
            }
        }
        let s = _mm512_set1_ps(scale);
        for (i, sums) in acc.iter().enumerate().take(rows) {
            for (h, &sum) in sums.iter().enumerate() {
                let left = cols.saturating_sub(16 * h).min(16);
                if left == 0 {
                    break;
                }
                let mask: __mmask16 = if left == 16 {
                    0xffff
                } else {
                    (1u16 << left) - 1
                };
                let ptr = c.add(i * ldc + 16 * h);
                let mut v = _mm512_mul_ps(sum, s);
                if load {
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, ptr));
                }
                _mm512_mask_storeu_ps(ptr, mask, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic f32 in [-1, 1) from an index (no RNG crate needed here).
    fn value(seed: u64, i: usize) -> f32 {
        let mut z = seed.wrapping_add((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1).
        assert_eq!(round_to_bf16(1.0 + 1.0 / 256.0), 1.0);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: even is 1 + 2^-6.
        assert_eq!(round_to_bf16(1.0 + 3.0 / 256.0), 1.0 + 1.0 / 64.0);
        assert_eq!(round_to_bf16(1.0 + 1.0 / 200.0), 1.0 + 1.0 / 128.0);
        assert_eq!(round_to_bf16(-3.0), -3.0);
        assert!(round_to_bf16(f32::NAN).is_nan());
    }

    /// Runs one product of `m x k` and `k x n` operands laid out as asked, against the sum in
    /// f64 of the bf16-rounded operands (or of the f32 ones where the CPU lacks the
    /// instructions and the product falls back to f32).
    fn check(m: usize, n: usize, k: usize, lhs_t: bool, rhs_t: bool, accumulate: bool, par: bool) {
        let a: Vec<f32> = (0..m * k).map(|i| value(1, i)).collect();
        let b: Vec<f32> = (0..k * n).map(|i| value(2, i)).collect();
        // Stored row-major as (m, k) / (k, n), or as the transposes (k, m) / (n, k).
        let lhs = if lhs_t {
            Operand::transposed(a.as_ptr(), m)
        } else {
            Operand::rows(a.as_ptr(), k)
        };
        let rhs = if rhs_t {
            Operand::transposed(b.as_ptr(), k)
        } else {
            Operand::rows(b.as_ptr(), n)
        };
        let get = |o: &Operand, i: usize, j: usize| unsafe {
            *o.ptr
                .offset(i as isize * o.row_stride + j as isize * o.col_stride)
        };
        let r = |x: f32| if available() { round_to_bf16(x) } else { x } as f64;
        let ld = n + 3;
        let old: Vec<f32> = (0..m * ld).map(|i| value(3, i)).collect();
        let mut dst = old.clone();
        let scale = 0.75;
        let p = if par {
            gemm::Parallelism::Rayon(2)
        } else {
            gemm::Parallelism::None
        };
        unsafe {
            gemm_bf16(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                ld,
                accumulate,
                lhs,
                rhs,
                scale,
                p,
            )
        };
        for i in 0..m {
            for j in 0..ld {
                let got = dst[i * ld + j];
                if j >= n {
                    assert_eq!(
                        got,
                        old[i * ld + j],
                        "({i}, {j}) outside the product changed"
                    );
                    continue;
                }
                let (mut sum, mut mag) = (0f64, 0f64);
                for kk in 0..k {
                    let t = r(get(&lhs, i, kk)) * r(get(&rhs, kk, j));
                    sum += t;
                    mag += t.abs();
                }
                let want = scale as f64 * sum
                    + if accumulate {
                        old[i * ld + j] as f64
                    } else {
                        0.0
                    };
                let tol = 1e-6 * (mag + 1.0) * 4.0;
                assert!(
                    (got as f64 - want).abs() <= tol,
                    "{m}x{n}x{k} lhs_t={lhs_t} rhs_t={rhs_t} acc={accumulate}: ({i}, {j}) {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn products_match_the_rounded_operands_sum() {
        eprintln!("AVX512-BF16 available: {}", available());
        // Edges of every block: one element, odd k (a half pair), micro-tile remainders, more
        // than one k block (KCP pairs = 384 k) and more than one row block (MC = 192).
        for &(m, n, k) in &[
            (1, 1, 1),
            (3, 5, 7),
            (8, 32, 64),
            (9, 33, 65),
            (13, 70, 401),
            (200, 40, 30),
            (17, 96, 800),
            // Large enough for threads: more row panels than column panels, and the reverse.
            (200, 300, 64),
            (40, 800, 80),
        ] {
            for &(lt, rt) in &[(false, false), (true, false), (false, true), (true, true)] {
                check(m, n, k, lt, rt, false, false);
            }
            check(m, n, k, false, false, true, true);
            check(m, n, k, true, true, true, true);
        }
    }

    #[test]
    fn packed_operands_give_the_per_call_product_bit_for_bit() {
        if !available() {
            let a = [1f32];
            assert!(unsafe { Packed::lhs(Operand::rows(a.as_ptr(), 1), 1, 1) }.is_none());
            return;
        }
        // Several k blocks (k > 384), several row blocks (m > 192), ragged panels; operands
        // stored plainly and transposed.
        for &(m, n, k, transposed) in &[
            (3, 5, 7, false),
            (201, 45, 801, false),
            (201, 45, 801, true),
            (64, 300, 100, true),
        ] {
            let a: Vec<f32> = (0..m * k).map(|i| value(4, i)).collect();
            let b: Vec<f32> = (0..k * n).map(|i| value(5, i)).collect();
            let (lhs, rhs) = if transposed {
                (
                    Operand::transposed(a.as_ptr(), m),
                    Operand::transposed(b.as_ptr(), k),
                )
            } else {
                (Operand::rows(a.as_ptr(), k), Operand::rows(b.as_ptr(), n))
            };
            let (pl, pr) = unsafe { (Packed::lhs(lhs, m, k), Packed::rhs(rhs, k, n)) };
            let (pl, pr) = (pl.unwrap(), pr.unwrap());
            assert_eq!((pl.shape(), pr.shape()), ((m, k), (k, n)));
            for par in [gemm::Parallelism::None, gemm::Parallelism::Rayon(2)] {
                let run = |l: Input, r: Input| {
                    let mut dst: Vec<f32> = (0..m * n).map(|i| value(6, i)).collect();
                    unsafe { gemm_bf16_with(m, n, k, dst.as_mut_ptr(), n, true, l, r, 0.5, par) };
                    dst
                };
                let want = run(Input::Strided(lhs), Input::Strided(rhs));
                for (l, r) in [
                    (Input::Packed(&pl), Input::Strided(rhs)),
                    (Input::Strided(lhs), Input::Packed(&pr)),
                    (Input::Packed(&pl), Input::Packed(&pr)),
                ] {
                    let got = run(l, r);
                    assert!(
                        got.iter()
                            .zip(&want)
                            .all(|(g, w)| g.to_bits() == w.to_bits()),
                        "{m}x{n}x{k} transposed={transposed}"
                    );
                }
            }
        }
    }

    #[test]
    fn packed_operands_of_the_wrong_side_or_shape_are_refused() {
        let a = vec![0.5f32; 64 * 64];
        let Some(p) = (unsafe { Packed::lhs(Operand::rows(a.as_ptr(), 64), 64, 64) }) else {
            return; // nothing can be packed without the instructions
        };
        let run = |m: usize, lhs: Input, rhs: Input| {
            std::panic::catch_unwind(|| {
                let mut dst = vec![0f32; 64 * 64];
                unsafe {
                    gemm_bf16_with(
                        m,
                        64,
                        64,
                        dst.as_mut_ptr(),
                        64,
                        false,
                        lhs,
                        rhs,
                        1.0,
                        gemm::Parallelism::None,
                    )
                };
            })
        };
        let strided = Input::Strided(Operand::rows(a.as_ptr(), 64));
        assert!(run(64, Input::Packed(&p), strided).is_ok());
        let err = |r: std::thread::Result<()>| {
            let e = r.unwrap_err();
            e.downcast_ref::<String>().cloned().unwrap_or_default()
        };
        assert!(err(run(64, strided, Input::Packed(&p))).contains("used as the Rhs"));
        assert!(err(run(32, Input::Packed(&p), strided)).contains("of a 32x64x64 product"));
    }

    #[test]
    fn small_integers_are_exact() {
        // Integers below 256 are bf16 values and every partial sum here is an exact f32.
        let (m, n, k) = (5, 40, 37);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 - 3.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32).collect();
        let mut dst = vec![0f32; m * n];
        unsafe {
            gemm_bf16(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                n,
                false,
                Operand::rows(a.as_ptr(), k),
                Operand::rows(b.as_ptr(), n),
                1.0,
                gemm::Parallelism::None,
            )
        };
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|kk| a[i * k + kk] * b[kk * n + j]).sum();
                assert_eq!(dst[i * n + j], want, "({i}, {j})");
            }
        }
    }
}
