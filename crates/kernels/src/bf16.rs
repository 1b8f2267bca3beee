//! bf16 products on CPUs with AVX512-BF16: the `precision = "bf16"` setting on the CPU.
//!
//! Tensors stay f32 (master weights, activations, batch-norm statistics, loss, optimiser): what
//! changes is how the convolutions multiply. With bf16 products on, a convolution product that
//! takes them rounds both operands to bf16 (round to nearest even) while packing them and sums
//! the products in f32 with `vdpbf16ps`, which does twice the multiply-adds of an f32 FMA per
//! instruction. That is what PyTorch's `torch.autocast("cpu", dtype=torch.bfloat16)` does to a
//! convolution's inputs, without casting the tensors themselves. Which products take them is
//! chosen for speed ([`crate::conv2d_bf16_products`]): all three of 1x1 layers (this module's
//! gemm), the forward pass and stride-1 input gradient of the direct kernel's layers (its bf16
//! form, channel pairs), and the weight gradient of every layer the direct kernel takes,
//! Winograd's included (position pairs); Winograd's forward pass and input gradient and the
//! im2col layers stay f32, which is faster (and, for Winograd, more accurate) there.
//!
//! Like the CPU's own instructions, bf16 conversion here treats subnormal f32 inputs as zero.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

static ON: AtomicBool = AtomicBool::new(false);

thread_local! {
    static LOCAL: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Turns bf16 convolution products on or off for the whole process (all threads without a
/// [`with_bf16_products`] scope). Refuses to turn them on where the CPU lacks AVX512-BF16.
pub fn set_bf16_products(on: bool) -> Result<(), String> {
    if on && !available() {
        return Err(unavailable());
    }
    ON.store(on, Ordering::Relaxed);
    Ok(())
}

/// Runs `f` with bf16 products on or off for the convolutions started on this thread, whatever
/// the process setting (tests, or one model in bf16 beside another in f32). Refuses `on` where
/// the CPU lacks AVX512-BF16.
pub fn with_bf16_products<R>(on: bool, f: impl FnOnce() -> R) -> Result<R, String> {
    if on && !available() {
        return Err(unavailable());
    }
    let old = LOCAL.with(|l| l.replace(Some(on)));
    // Restored on unwind too, so a panicking test does not leak its setting.
    struct Restore(Option<bool>);
    impl Drop for Restore {
        fn drop(&mut self) {
            LOCAL.with(|l| l.set(self.0));
        }
    }
    let _restore = Restore(old);
    Ok(f())
}

/// Whether convolutions started on this thread multiply in bf16.
pub fn bf16_products() -> bool {
    LOCAL
        .with(Cell::get)
        .unwrap_or_else(|| ON.load(Ordering::Relaxed))
}

/// Whether this CPU can run the bf16 kernels (AVX512-F, -BW, -VL and -BF16); detected once
/// (the kernels check it per row of their conversions).
pub fn available() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

fn unavailable() -> String {
    let cpu = crate::cpu::model_name().unwrap_or_else(|| "this CPU".to_string());
    format!(
        "bf16 products on the CPU need bf16 dot products in hardware (AVX512-BF16: AMD Zen 4, \
         Intel Cooper Lake, Sapphire Rapids and later), which {cpu} does not have"
    )
}

/// `x` rounded to bf16 (nearest, ties to even), as the bits of the bf16; subnormals become zero
/// of the same sign and NaNs stay (quiet) NaNs, as `vcvtne2ps2bf16` does.
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if b & 0x7f80_0000 == 0 {
        return ((b >> 16) & 0x8000) as u16;
    }
    if b & 0x7fff_ffff > 0x7f80_0000 {
        return ((b >> 16) | 0x40) as u16;
    }
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 value of bf16 bits `h`.
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// `x` rounded to the nearest bf16, as f32 (what the products see of an operand).
pub fn round(x: f32) -> f32 {
    from_bf16(to_bf16(x))
}

/// Rows of the register tile (broadcast operand).
const MR: usize = 6;
/// Columns of the register tile: 4 vectors of 16 f32.
const NR: usize = 64;

/// An operand given by its strides: element `(r, c)` is `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
struct Operand<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl Operand<'_> {
    fn at(&self, r: usize, c: usize) -> f32 {
        self.data[r * self.rs + c * self.cs]
    }
}

/// Cache blocking, from the CPU's caches: the packed B panel (`kc x 64` bf16) in half of L1, the
/// packed A block and B block of a task in three quarters of L2.
#[derive(Clone, Copy, Debug)]
struct Blocking {
    kc: usize,
    nc: usize,
    mc: usize,
}

fn blocking() -> Blocking {
    let kc = (crate::cpu::l1d_bytes() / 2 / (NR * 2)).clamp(64, 512) & !1;
    let nc = 4 * NR;
    let room = (crate::cpu::l2_bytes() * 3 / 4).saturating_sub(kc * nc * 2);
    let mc = (room / (kc * 2) / MR * MR).clamp(MR, 1536);
    Blocking { kc, nc, mc }
}

/// A pointer to the output that tasks writing disjoint tiles share.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: every task writes its own tile of the output; no two tiles overlap.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// `dst (m x n, row-major, row stride ldd) (+)= a · b` with bf16-rounded operands and f32 sums
/// (the f32 `gemm` of [`crate::conv`] with bf16 products). Requires [`available`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    ldd: usize,
    accumulate: bool,
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
    threads: usize,
) {
    let pa = PackedA::new(m, k, a, (a_rs, a_cs), threads);
    gemm_packed(&pa, n, dst, ldd, accumulate, b, (b_rs, b_cs), threads);
}

/// The left operand of products, rounded and packed once: for several products with the same
/// one (a convolution's weights over the images of a batch), and shared by the tasks of each.
pub(crate) struct PackedA {
    m: usize,
    k: usize,
    kc: usize,
    data: Vec<u32>,
}

impl PackedA {
    /// Packs `a` (`m x k`, element `(r, c)` at `a[r * rs + c * cs]`). Requires [`available`].
    pub(crate) fn new(
        m: usize,
        k: usize,
        a: &[f32],
        (rs, cs): (usize, usize),
        threads: usize,
    ) -> Self {
        assert!(available(), "bf16 gemm on a CPU without AVX512-BF16");
        let kc = blocking().kc;
        if m == 0 || k == 0 {
            return Self {
                m,
                k,
                kc,
                data: Vec::new(),
            };
        }
        assert!(a.len() > (m - 1) * rs + (k - 1) * cs);
        let a = Operand { data: a, rs, cs };
        Self {
            m,
            k,
            kc,
            data: pack_a(a, m, k, kc, threads),
        }
    }
}

/// [`gemm`] with its left operand packed beforehand.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_packed(
    pa: &PackedA,
    n: usize,
    dst: &mut [f32],
    ldd: usize,
    accumulate: bool,
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
    threads: usize,
) {
    let (m, k) = (pa.m, pa.k);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * ldd..r * ldd + n].fill(0.0);
            }
        }
        return;
    }
    assert!(dst.len() >= (m - 1) * ldd + n);
    assert!(b.len() > (k - 1) * b_rs + (n - 1) * b_cs);
    let b = Operand {
        data: b,
        rs: b_rs,
        cs: b_cs,
    };
    let bl = Blocking {
        kc: pa.kc,
        ..blocking()
    };
    let ap = &pa.data;
    let n_tiles = n.div_ceil(bl.nc);
    // Enough tasks to keep every thread busy: split the rows further where the columns are few.
    let want = if threads > 1 { 3 * threads } else { 1 };
    let m_split = want.div_ceil(n_tiles).max(1);
    let mc = bl.mc.min(m.div_ceil(m_split).div_ceil(MR) * MR).max(MR);
    let m_tiles = m.div_ceil(mc);
    let out = Out(dst.as_mut_ptr());
    let task = |t: usize| {
        let (ti, tj) = (t / n_tiles, t % n_tiles);
        let rows = ti * mc..((ti + 1) * mc).min(m);
        let cols = tj * bl.nc..((tj + 1) * bl.nc).min(n);
        // SAFETY: availability asserted above; the tile lies inside `dst` (asserted bounds) and
        // no other task writes it.
        unsafe { tile(ap, b, m, k, out, ldd, accumulate, rows, cols, bl.kc) };
    };
    let tasks = m_tiles * n_tiles;
    if threads > 1 && tasks > 1 {
        use rayon::prelude::*;
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

/// Words of one k block of packed A: every row panel, `kc / 2` pairs of [`MR`] rows.
fn a_block_words(m: usize, kc: usize) -> usize {
    m.div_ceil(MR) * MR * kc / 2
}

/// One task: the output tile `rows x cols`, over all of `k` in blocks of `kc`.
///
/// # Safety
/// AVX512-BF16 must be available; the tile must lie inside the output behind `out`, written by
/// no other thread meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    ap: &[u32],
    b: Operand,
    m: usize,
    k: usize,
    out: Out,
    ldd: usize,
    accumulate: bool,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    kc: usize,
) {
    let (mt, nt) = (rows.len(), cols.len());
    let (mp, np) = (mt.div_ceil(MR), nt.div_ceil(NR));
    let mut bp = vec![0u32; np * NR * kc / 2];
    let mut edge = [0f32; MR * NR];
    for (kb_i, k0) in (0..k).step_by(kc).enumerate() {
        let kb = kc.min(k - k0);
        let kp = kb.div_ceil(2);
        // This block's panels of A: panel `rows.start / MR` on, `MR * kp` words each.
        let ab = &ap[kb_i * a_block_words(m, kc)..];
        pack_b(b, cols.clone(), k0, kb, &mut bp);
        let load = accumulate || k0 > 0;
        for j in 0..np {
            let nw = NR.min(nt - j * NR);
            let bpj = bp[j * NR * kp..].as_ptr();
            for i in 0..mp {
                let mh = MR.min(mt - i * MR);
                let api = ab[(rows.start / MR + i) * MR * kp..].as_ptr();
                let c = unsafe { out.0.add((rows.start + i * MR) * ldd + cols.start + j * NR) };
                if mh == MR && nw == NR {
                    unsafe { kernel(kp, api, bpj, c, ldd, load) };
                } else {
                    // A partial tile runs on a full one in `edge` and copies its part back.
                    for r in 0..mh {
                        for q in 0..nw {
                            edge[r * NR + q] = if load {
                                unsafe { *c.add(r * ldd + q) }
                            } else {
                                0.0
                            };
                        }
                    }
                    unsafe { kernel(kp, api, bpj, edge.as_mut_ptr(), NR, true) };
                    for r in 0..mh {
                        for q in 0..nw {
                            unsafe { *c.add(r * ldd + q) = edge[r * NR + q] };
                        }
                    }
                }
            }
        }
    }
}

/// Two bf16 in one word, `lo` in the low half (the first of a pair, as `vdpbf16ps` reads it).
pub(crate) fn pair(lo: f32, hi: f32) -> u32 {
    u32::from(to_bf16(lo)) | (u32::from(to_bf16(hi)) << 16)
}

/// All of A (`m x k`) packed: per k block of `kc`, panels of [`MR`] rows holding, per k pair,
/// the pair of each row; rows past `m` and the odd k's partner are zeros. In parallel over the
/// k blocks when `threads > 1`.
fn pack_a(a: Operand, m: usize, k: usize, kc: usize, threads: usize) -> Vec<u32> {
    let words = a_block_words(m, kc);
    let mut ap = vec![0u32; words * k.div_ceil(kc)];
    let block = |(bi, dst): (usize, &mut [u32])| {
        let k0 = bi * kc;
        let kb = kc.min(k - k0);
        let kp = kb.div_ceil(2);
        for (i, panel) in dst.chunks_mut(MR * kp).take(m.div_ceil(MR)).enumerate() {
            for r in 0..MR.min(m - i * MR) {
                let row = i * MR + r;
                let mut p = 0;
                if a.cs == 1 {
                    // Pairs contiguous in the row: 16 at a time with vector conversions.
                    while 2 * p + 32 <= kb {
                        let src = &a.data[row * a.rs + k0 + 2 * p..][..32];
                        let mut w = [0u32; 16];
                        // SAFETY: `gemm` asserted AVX512-BF16 and -BW.
                        unsafe { convert_pairs(src, &mut w) };
                        for (q, &v) in w.iter().enumerate() {
                            panel[(p + q) * MR + r] = v;
                        }
                        p += 16;
                    }
                }
                for p in p..kp {
                    let hi = if 2 * p + 1 < kb {
                        a.at(row, k0 + 2 * p + 1)
                    } else {
                        0.0
                    };
                    panel[p * MR + r] = pair(a.at(row, k0 + 2 * p), hi);
                }
            }
        }
    };
    if threads > 1 && k > kc {
        use rayon::prelude::*;
        ap.par_chunks_mut(words).enumerate().for_each(block);
    } else {
        ap.chunks_mut(words).enumerate().for_each(block);
    }
    ap
}

/// Packs k `k0..k0+kb` x columns `cols` of B as panels of [`NR`] columns: per k pair, the pair
/// of each column; columns past the end and the odd k's partner are zeros.
fn pack_b(b: Operand, cols: std::ops::Range<usize>, k0: usize, kb: usize, bp: &mut [u32]) {
    let kp = kb.div_ceil(2);
    for (j, panel) in bp
        .chunks_mut(NR * kp)
        .take(cols.len().div_ceil(NR))
        .enumerate()
    {
        let c0 = cols.start + j * NR;
        let width = NR.min(cols.end - c0);
        let mut p0 = 0;
        if b.rs == 1 && width == NR {
            // Columns contiguous in k (a transposed operand): 16 columns x 16 pairs at a time,
            // converted and turned with register transposes.
            while 2 * p0 + 32 <= kb {
                for g in 0..NR / 16 {
                    let src = |q: usize| &b.data[(c0 + 16 * g + q) * b.cs + k0 + 2 * p0..][..32];
                    let rows: [&[f32]; 16] = std::array::from_fn(src);
                    // SAFETY: as above.
                    unsafe { pack_cols(&rows, &mut panel[p0 * NR + 16 * g..]) };
                }
                p0 += 16;
            }
        }
        for p in p0..kp {
            let ka = k0 + 2 * p;
            let has_hi = 2 * p + 1 < kb;
            let dst = &mut panel[p * NR..][..NR];
            if b.cs == 1 && width == NR {
                // Rows contiguous: 16 columns at a time with vector conversions.
                let r0 = &b.data[ka * b.rs + c0..][..NR];
                let r1 = has_hi.then(|| &b.data[(ka + 1) * b.rs + c0..][..NR]);
                // SAFETY: `gemm` asserted AVX512-BF16 and -BW.
                unsafe { pack_rows(r0, r1, dst) };
                continue;
            }
            for (q, d) in dst.iter_mut().enumerate() {
                *d = if q < width {
                    let hi = if has_hi { b.at(ka + 1, c0 + q) } else { 0.0 };
                    pair(b.at(ka, c0 + q), hi)
                } else {
                    0
                };
            }
        }
    }
}

/// `w[q] = pair(src[2q], src[2q + 1])` for 16 pairs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn convert_pairs(src: &[f32], w: &mut [u32; 16]) {
    use std::arch::x86_64::*;
    assert!(src.len() >= 32);
    unsafe {
        let lo = _mm512_loadu_ps(src.as_ptr());
        let hi = _mm512_loadu_ps(src.as_ptr().add(16));
        // Element order kept: bf16 i of the 32 is src[i], so word q holds src[2q], src[2q+1].
        let h = _mm512_cvtne2ps_pbh(hi, lo);
        _mm512_storeu_si512(
            w.as_mut_ptr().cast(),
            std::mem::transmute::<__m512bh, __m512i>(h),
        );
    }
}

/// `dst[p * NR + q] = pair(rows[q][2p], rows[q][2p + 1])` for 16 columns `q` and 16 pairs `p`:
/// each column's pairs converted in one vector, then a 16x16 transpose of 32-bit words.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_cols(rows: &[&[f32]; 16], dst: &mut [u32]) {
    use std::arch::x86_64::*;
    assert!(dst.len() > 15 * NR + 15 && rows.iter().all(|r| r.len() >= 32));
    unsafe {
        let r: [__m512i; 16] = std::array::from_fn(|q| {
            let lo = _mm512_loadu_ps(rows[q].as_ptr());
            let hi = _mm512_loadu_ps(rows[q].as_ptr().add(16));
            std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo))
        });
        // Within each 128-bit lane: pairs of rows interleaved, then quads.
        let t: [__m512i; 16] = std::array::from_fn(|i| {
            let (a, b) = (r[i & !1], r[i | 1]);
            if i % 2 == 0 {
                _mm512_unpacklo_epi32(a, b)
            } else {
                _mm512_unpackhi_epi32(a, b)
            }
        });
        // u[4i + j]: lane L holds column 4L + j of rows 4i..4i+3.
        let u: [__m512i; 16] = std::array::from_fn(|x| {
            let (i, j) = (x / 4, x % 4);
            let (a, b) = (t[4 * i + j / 2], t[4 * i + 2 + j / 2]);
            if j % 2 == 0 {
                _mm512_unpacklo_epi64(a, b)
            } else {
                _mm512_unpackhi_epi64(a, b)
            }
        });
        // Then a 4x4 transpose of 128-bit lanes among u[j], u[4 + j], u[8 + j], u[12 + j].
        for j in 0..4 {
            let (x0, x1, x2, x3) = (u[j], u[4 + j], u[8 + j], u[12 + j]);
            let y0 = _mm512_shuffle_i32x4::<0b01_00_01_00>(x0, x1);
            let y1 = _mm512_shuffle_i32x4::<0b11_10_11_10>(x0, x1);
            let y2 = _mm512_shuffle_i32x4::<0b01_00_01_00>(x2, x3);
            let y3 = _mm512_shuffle_i32x4::<0b11_10_11_10>(x2, x3);
            let o = [
                _mm512_shuffle_i32x4::<0b10_00_10_00>(y0, y2),
                _mm512_shuffle_i32x4::<0b11_01_11_01>(y0, y2),
                _mm512_shuffle_i32x4::<0b10_00_10_00>(y1, y3),
                _mm512_shuffle_i32x4::<0b11_01_11_01>(y1, y3),
            ];
            for (l, v) in o.into_iter().enumerate() {
                // Pair 4L + j of the 16 columns.
                _mm512_storeu_si512(dst.as_mut_ptr().add((4 * l + j) * NR).cast(), v);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn convert_pairs(_: &[f32], _: &mut [u32; 16]) {
    unreachable!("bf16 products exist on x86-64 only")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn pack_cols(_: &[&[f32]; 16], _: &mut [u32]) {
    unreachable!("bf16 products exist on x86-64 only")
}

/// `dst[q] = pair(r0[q], r1[q])` for 64 columns, `r1` zeros when absent.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_rows(r0: &[f32], r1: Option<&[f32]>, dst: &mut [u32]) {
    use std::arch::x86_64::*;
    // vpermw indices taking [r0 x16 | r1 x16] to r0[0], r1[0], r0[1], r1[1], ...
    let idx = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    assert!(r0.len() >= NR && dst.len() >= NR && r1.is_none_or(|r| r.len() >= NR));
    for v in 0..NR / 16 {
        unsafe {
            let lo = _mm512_loadu_ps(r0.as_ptr().add(16 * v));
            let hi = match r1 {
                Some(r) => _mm512_loadu_ps(r.as_ptr().add(16 * v)),
                None => _mm512_setzero_ps(),
            };
            let h: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            let p = _mm512_permutexvar_epi16(idx, h);
            _mm512_storeu_si512(dst.as_mut_ptr().add(16 * v).cast(), p);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn pack_rows(_: &[f32], _: Option<&[f32]>, _: &mut [u32]) {
    unreachable!("bf16 products exist on x86-64 only")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel(_: usize, _: *const u32, _: *const u32, _: *mut f32, _: usize, _: bool) {
    unreachable!("bf16 products exist on x86-64 only")
}

/// The register tile: `c (6 x 64, row stride ldc) = (load ? c : 0) + A-panel · B-panel` over
/// `kp` k pairs.
///
/// # Safety
/// AVX512-BF16 must be available; `ap` holds `6 * kp` words, `bp` `64 * kp`, and `c` 6 rows of 64.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn kernel(kp: usize, ap: *const u32, bp: *const u32, c: *mut f32, ldc: usize, load: bool) {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); MR * 4];
    unsafe {
        if load {
            for r in 0..MR {
                for v in 0..4 {
                    acc[r * 4 + v] = _mm512_loadu_ps(c.add(r * ldc + 16 * v));
                }
            }
        }
        for p in 0..kp {
            let bq = bp.add(p * NR);
            let bv: [__m512bh; 4] = std::array::from_fn(|v| {
                std::mem::transmute(_mm512_loadu_si512(bq.add(16 * v).cast()))
            });
            for r in 0..MR {
                let a: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*ap.add(p * MR + r) as i32));
                for v in 0..4 {
                    acc[r * 4 + v] = _mm512_dpbf16_ps(acc[r * 4 + v], a, bv[v]);
                }
            }
        }
        for r in 0..MR {
            for v in 0..4 {
                _mm512_storeu_ps(c.add(r * ldc + 16 * v), acc[r * 4 + v]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn rounding_matches_half() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let special = [
            0.0f32,
            -0.0,
            1.0,
            -1.5,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            3.0e38,
        ];
        let ties = [
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            f32::from_bits(0x3f80_8001),
        ];
        let randoms: Vec<f32> = (0..100_000)
            .map(|_| f32::from_bits(rng.random::<u32>()))
            .filter(|x| x.is_normal())
            .collect();
        for &x in special.iter().chain(&ties).chain(&randoms) {
            assert_eq!(
                to_bf16(x),
                half::bf16::from_f32(x).to_bits(),
                "{x:e} ({:#x})",
                x.to_bits()
            );
        }
        // Ties go to even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7.
        assert_eq!(round(f32::from_bits(0x3f80_8000)), 1.0);
        assert_eq!(
            round(f32::from_bits(0x3f81_8000)),
            f32::from_bits(0x3f82_0000)
        );
        assert!(round(f32::NAN).is_nan());
        assert_eq!(to_bf16(1e-40), 0);
        assert_eq!(to_bf16(-1e-40), 0x8000);
    }

    /// `dst (+)= a · b` in f64 over bf16-rounded operands.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        m: usize,
        n: usize,
        k: usize,
        dst: &[f32],
        ldd: usize,
        accumulate: bool,
        a: Operand,
        b: Operand,
    ) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = if accumulate {
                    f64::from(dst[i * ldd + j])
                } else {
                    0.0
                };
                for q in 0..k {
                    s += f64::from(round(a.at(i, q))) * f64::from(round(b.at(q, j)));
                }
                out[i * n + j] = s;
            }
        }
        out
    }

    #[test]
    fn gemm_matches_rounded_products() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let shapes = [
            (1, 1, 1),
            (6, 64, 2),
            (7, 65, 3),
            (13, 130, 255),
            (40, 200, 520),
            (5, 300, 9),
            (70, 17, 1031),
        ];
        for (case, &(m, n, k)) in shapes.iter().enumerate() {
            for layout in 0..4 {
                let (a_rs, a_cs) = if layout & 1 == 0 { (k, 1) } else { (1, m) };
                let (b_rs, b_cs) = if layout & 2 == 0 { (n, 1) } else { (1, k) };
                let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0)).collect();
                let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-2.0..2.0)).collect();
                let ldd = n + 3;
                let init: Vec<f32> = (0..m * ldd).map(|_| rng.random_range(-1.0..1.0)).collect();
                for accumulate in [false, true] {
                    for threads in [1, 2] {
                        let mut dst = init.clone();
                        gemm(
                            m,
                            n,
                            k,
                            &mut dst,
                            ldd,
                            accumulate,
                            &a,
                            (a_rs, a_cs),
                            &b,
                            (b_rs, b_cs),
                            threads,
                        );
                        let oa = Operand {
                            data: &a,
                            rs: a_rs,
                            cs: a_cs,
                        };
                        let ob = Operand {
                            data: &b,
                            rs: b_rs,
                            cs: b_cs,
                        };
                        let want = reference(m, n, k, &init, ldd, accumulate, oa, ob);
                        for i in 0..m {
                            for j in 0..n {
                                let (got, w) = (f64::from(dst[i * ldd + j]), want[i * n + j]);
                                // f32 sums of k products of size <= 4: rounding only.
                                let tol = 1e-6 * (k as f64 * 4.0 + 1.0);
                                assert!(
                                    (got - w).abs() <= tol,
                                    "case {case} layout {layout} acc {accumulate} threads {threads} ({i},{j}): {got} vs {w}"
                                );
                            }
                            // The padding between rows is left alone.
                            for j in n..ldd {
                                assert_eq!(dst[i * ldd + j], init[i * ldd + j]);
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn products_setting_is_scoped_per_thread() {
        let before = bf16_products();
        if !available() {
            assert!(with_bf16_products(true, || ()).is_err());
            assert!(set_bf16_products(true).is_err());
            let e = set_bf16_products(true).unwrap_err();
            assert!(e.contains("AVX512-BF16"), "{e}");
            assert!(!bf16_products());
            return;
        }
        assert!(with_bf16_products(true, bf16_products).unwrap());
        assert!(!with_bf16_products(false, bf16_products).unwrap());
        // Another thread sees the process setting, not this thread's scope.
        let other =
            with_bf16_products(true, || std::thread::spawn(bf16_products).join().unwrap()).unwrap();
        assert_eq!(other, before);
        assert_eq!(bf16_products(), before);
    }
}
