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

use crate::reuse::Word;
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
    let pa = PackedA::new(m, k, a, (a_rs, a_cs), threads, false);
    gemm_packed(&pa, n, dst, ldd, accumulate, b, (b_rs, b_cs), threads);
}

/// The left operand of products, rounded and packed once: for several products with the same
/// one (a convolution's weights over the images of a batch), and shared by the tasks of each.
pub(crate) struct PackedA {
    m: usize,
    k: usize,
    kc: usize,
    /// The words as f32 bits (the form the transform cache holds).
    data: crate::reuse::Derived,
}

impl PackedA {
    /// Packs `a` (`m x k`, element `(r, c)` at `a[r * rs + c * cs]`). Requires [`available`].
    /// `keep`: `a` are weights that do not change between calls (inference), so the packing is
    /// kept in the transform cache ([`crate::reuse`]) and found again.
    pub(crate) fn new(
        m: usize,
        k: usize,
        a: &[f32],
        (rs, cs): (usize, usize),
        threads: usize,
        keep: bool,
    ) -> Self {
        assert!(available(), "bf16 gemm on a CPU without AVX512-BF16");
        let kc = blocking().kc;
        let len = if m == 0 || k == 0 {
            0
        } else {
            assert!(a.len() > (m - 1) * rs + (k - 1) * cs);
            a_block_words(m, kc) * k.div_ceil(kc)
        };
        let op = Operand { data: a, rs, cs };
        let derive = |d: &mut [f32]| {
            if len > 0 {
                pack_a(op, m, k, kc, threads, u32::from_f32s(d));
            }
        };
        let tag = crate::reuse::Tag {
            kind: "bf16 gemm weights",
            dims: [m, k, rs, cs],
        };
        let data = if keep && len > 0 {
            crate::reuse::Cache::derived(crate::reuse::global(), tag, a, len, true, derive)
        } else {
            crate::reuse::Derived::new(len, derive)
        };
        Self { m, k, kc, data }
    }

    fn words(&self) -> &[u32] {
        u32::from_f32s_ref(self.data.get())
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
    let ap = pa.words();
    let n_tiles = n.div_ceil(bl.nc);
    // Enough tasks to keep every thread busy: split the rows further where the columns are few.
    let want = if threads > 1 { 3 * threads } else { 1 };
    let m_split = want.div_ceil(n_tiles).max(1);
    let mc = bl.mc.min(m.div_ceil(m_split).div_ceil(MR) * MR).max(MR);
    let m_tiles = m.div_ceil(mc);
    // Where the rows are split into several tiles (few columns: a 1x1 convolution on a small
    // map), B is packed once for all of them instead of once per row tile; otherwise each task
    // packs its own columns just before using them, while they are in cache.
    let shared = (m_tiles > 1).then(|| SharedB::pack(b, n, k, bl.kc, threads));
    let out = Out(dst.as_mut_ptr());
    let task = |t: usize| {
        let (ti, tj) = (t / n_tiles, t % n_tiles);
        let rows = ti * mc..((ti + 1) * mc).min(m);
        let cols = tj * bl.nc..((tj + 1) * bl.nc).min(n);
        let src = match &shared {
            Some(sb) => BSource::Shared(sb),
            None => BSource::Pack(b),
        };
        // SAFETY: availability asserted above; the tile lies inside `dst` (asserted bounds) and
        // no other task writes it.
        unsafe { tile(ap, src, m, k, out, ldd, accumulate, rows, cols, bl.kc) };
    };
    let tasks = m_tiles * n_tiles;
    if threads > 1 && tasks > 1 {
        use rayon::prelude::*;
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

/// All of B packed as [`pack_b`] packs a task's columns: per k block of `kc`, every panel of
/// [`NR`] columns (`NR * kc / 2` words apart within a block).
struct SharedB {
    data: Vec<u32>,
    panels: usize,
    kc: usize,
}

impl SharedB {
    fn pack(b: Operand, n: usize, k: usize, kc: usize, threads: usize) -> Self {
        let panels = n.div_ceil(NR);
        let block = panels * NR * kc / 2;
        let mut data = vec![0u32; block * k.div_ceil(kc)];
        // One job per panel of each k block.
        let mut jobs = Vec::new();
        for (bi, blk) in data.chunks_mut(block).enumerate() {
            let (k0, kb) = (bi * kc, kc.min(k - bi * kc));
            for (j, panel) in blk.chunks_mut(NR * kb.div_ceil(2)).take(panels).enumerate() {
                jobs.push((k0, kb, j * NR, panel));
            }
        }
        let run = |(k0, kb, c0, panel): (usize, usize, usize, &mut [u32])| {
            pack_b(b, c0..(c0 + NR).min(n), k0, kb, panel)
        };
        if threads > 1 && jobs.len() > 1 {
            use rayon::prelude::*;
            jobs.into_par_iter().for_each(run);
        } else {
            jobs.into_iter().for_each(run);
        }
        Self { data, panels, kc }
    }

    /// Panels of k block `kb_i` from panel `j0` on.
    fn block(&self, kb_i: usize, j0: usize, kp: usize) -> &[u32] {
        &self.data[kb_i * self.panels * NR * self.kc / 2 + j0 * NR * kp..]
    }
}

/// Where a task's packed B comes from.
#[derive(Clone, Copy)]
enum BSource<'a> {
    /// Packed by the task, per k block.
    Pack(Operand<'a>),
    /// Packed once for every task.
    Shared(&'a SharedB),
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
    b: BSource,
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
    let mut own = match b {
        BSource::Pack(_) => vec![0u32; np * NR * kc / 2],
        BSource::Shared(_) => Vec::new(),
    };
    let mut edge = [0f32; MR * NR];
    for (kb_i, k0) in (0..k).step_by(kc).enumerate() {
        let kb = kc.min(k - k0);
        let kp = kb.div_ceil(2);
        // This block's panels of A: panel `rows.start / MR` on, `MR * kp` words each.
        let ab = &ap[kb_i * a_block_words(m, kc)..];
        let bp: &[u32] = match b {
            BSource::Pack(b) => {
                pack_b(b, cols.clone(), k0, kb, &mut own);
                &own
            }
            BSource::Shared(sb) => sb.block(kb_i, cols.start / NR, kp),
        };
        let load = accumulate || k0 > 0;
        for j in 0..np {
            let nw = NR.min(nt - j * NR);
            // The vectors of 16 columns the panel's columns take, the last one masked.
            let (nv, mask) = (nw.div_ceil(16), lane_mask(nw));
            let bpj = bp[j * NR * kp..].as_ptr();
            for i in 0..mp {
                let mh = MR.min(mt - i * MR);
                let api = ab[(rows.start / MR + i) * MR * kp..].as_ptr();
                let c = unsafe { out.0.add((rows.start + i * MR) * ldd + cols.start + j * NR) };
                if mh == MR {
                    unsafe { kernel_any(nv, kp, api, bpj, c, ldd, load, mask) };
                } else {
                    // A tile short of rows runs on a full one in `edge` and copies its part back.
                    for r in 0..mh {
                        for q in 0..nw {
                            edge[r * NR + q] = if load {
                                unsafe { *c.add(r * ldd + q) }
                            } else {
                                0.0
                            };
                        }
                    }
                    unsafe { kernel_any(nv, kp, api, bpj, edge.as_mut_ptr(), NR, true, mask) };
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

/// The lanes of the last of the vectors that `width` columns take (all 16 when it is full).
fn lane_mask(width: usize) -> u16 {
    match width % 16 {
        0 => u16::MAX,
        r => (1u16 << r) - 1,
    }
}

/// [`kernel`] over the first `nv` (1 to 4) vectors of the panel's 64 columns.
///
/// # Safety
/// As [`kernel`]; `c`'s rows need only the columns the vectors and `mask` cover.
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_any(
    nv: usize,
    kp: usize,
    ap: *const u32,
    bp: *const u32,
    c: *mut f32,
    ldc: usize,
    load: bool,
    mask: u16,
) {
    unsafe {
        match nv {
            1 => kernel::<1>(kp, ap, bp, c, ldc, load, mask),
            2 => kernel::<2>(kp, ap, bp, c, ldc, load, mask),
            3 => kernel::<3>(kp, ap, bp, c, ldc, load, mask),
            4 => kernel::<4>(kp, ap, bp, c, ldc, load, mask),
            _ => unreachable!("a panel has 1 to 4 vectors"),
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
fn pack_a(a: Operand, m: usize, k: usize, kc: usize, threads: usize, ap: &mut [u32]) {
    let words = a_block_words(m, kc);
    assert_eq!(ap.len(), words * k.div_ceil(kc));
    let block = |(bi, dst): (usize, &mut [u32])| {
        let k0 = bi * kc;
        let kb = kc.min(k - k0);
        let kp = kb.div_ceil(2);
        // The rows past `m` are zeros (the buffer may hold anything: a recycled cache entry);
        // every other word is written below.
        if !m.is_multiple_of(MR) {
            dst[m / MR * MR * kp..][..MR * kp].fill(0);
        }
        if a.rs == 1 && a.cs != 1 {
            // A transposed (a convolution's weights in the input gradient): the rows of one k
            // are contiguous, so each k pair's words for all rows are converted 64 at a time
            // into a line and dealt out to the panels [`MR`] at a time.
            let mut line = vec![0u32; m.div_ceil(NR) * NR];
            let mut panels: Vec<&mut [u32]> =
                dst.chunks_mut(MR * kp).take(m.div_ceil(MR)).collect();
            for p in 0..kp {
                let ka = k0 + 2 * p;
                let has_hi = 2 * p + 1 < kb;
                for (c, l) in line.chunks_mut(NR).enumerate() {
                    let (r0, w) = (c * NR, NR.min(m - c * NR));
                    let lo = &a.data[ka * a.cs + r0..][..w];
                    let hi = has_hi.then(|| &a.data[(ka + 1) * a.cs + r0..][..w]);
                    // SAFETY: `PackedA::new` asserted AVX512-BF16 and -BW.
                    unsafe { pack_rows(lo, hi, l) };
                }
                for (i, panel) in panels.iter_mut().enumerate() {
                    let rows = MR.min(m - i * MR);
                    panel[p * MR..][..rows].copy_from_slice(&line[i * MR..][..rows]);
                }
            }
            return;
        }
        for (i, panel) in dst.chunks_mut(MR * kp).take(m.div_ceil(MR)).enumerate() {
            let rows = MR.min(m - i * MR);
            let mut done = 0;
            if a.cs == 1 {
                // Pairs contiguous in the rows: 16 pairs of the panel's rows at a time, converted
                // and interleaved in registers.
                // SAFETY: `PackedA::new` asserted AVX512-BF16 and -BW.
                done = unsafe { panel_pairs(a.data, i * MR * a.rs + k0, a.rs, rows, kb, panel) };
            }
            for r in 0..rows {
                let row = i * MR + r;
                for p in done..kp {
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
            if b.cs == 1 {
                // Rows contiguous: 16 columns at a time with vector conversions (masked loads
                // past the last column).
                let r0 = &b.data[ka * b.rs + c0..][..width];
                let r1 = has_hi.then(|| &b.data[(ka + 1) * b.rs + c0..][..width]);
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

/// `panel[p * MR + r] = pair(row_r[2p], row_r[2p + 1])` for the `rows` rows `row_r =
/// src[start + r * rs..][..kb]` (zeros for the rows from `rows` to [`MR`]), for the pairs in
/// whole groups of 16: each row's group in one conversion, the [`MR`] x 16 words turned into
/// pair-major order by masked permutes; returns how many pairs it wrote.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn panel_pairs(
    src: &[f32],
    start: usize,
    rs: usize,
    rows: usize,
    kb: usize,
    panel: &mut [u32],
) -> usize {
    use std::arch::x86_64::*;
    let groups = kb / 32;
    assert!(rows <= MR && panel.len() >= groups * 16 * MR);
    assert!(rows == 0 || src.len() >= start + (rows - 1) * rs + kb);
    // Output vector `o` holds words 16o..16o+16 of a group, word j = pair j / MR of row j % MR:
    // lane u takes lane (16o + u) / MR of row (16o + u) % MR.
    let mut idx = [[0i32; 16]; MR];
    let mut masks = [[0u16; MR]; MR];
    for (o, (lanes, mask)) in idx.iter_mut().zip(&mut masks).enumerate() {
        for (u, lane) in lanes.iter_mut().enumerate() {
            let j = 16 * o + u;
            *lane = (j / MR) as i32;
            mask[j % MR] |= 1 << u;
        }
    }
    unsafe {
        let idxv: [__m512i; MR] =
            std::array::from_fn(|o| _mm512_loadu_si512(idx[o].as_ptr().cast()));
        for gi in 0..groups {
            let w: [__m512i; MR] = std::array::from_fn(|r| {
                if r < rows {
                    let p = src.as_ptr().add(start + r * rs + 32 * gi);
                    let h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(p.add(16)), _mm512_loadu_ps(p));
                    std::mem::transmute::<__m512bh, __m512i>(h)
                } else {
                    _mm512_setzero_si512()
                }
            });
            for o in 0..MR {
                let mut v = _mm512_setzero_si512();
                for r in 0..MR {
                    v = _mm512_mask_permutexvar_epi32(v, masks[o][r], idxv[o], w[r]);
                }
                _mm512_storeu_si512(panel.as_mut_ptr().add(gi * 16 * MR + 16 * o).cast(), v);
            }
        }
    }
    16 * groups
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn panel_pairs(_: &[f32], _: usize, _: usize, _: usize, _: usize, _: &mut [u32]) -> usize {
    unreachable!("bf16 products exist on x86-64 only")
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
unsafe fn pack_cols(_: &[&[f32]; 16], _: &mut [u32]) {
    unreachable!("bf16 products exist on x86-64 only")
}

/// `dst[q] = pair(r0[q], r1[q])` for the columns of `r0` (up to 64; `r1` as long, or zeros when
/// absent), zeros from there to 64.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_rows(r0: &[f32], r1: Option<&[f32]>, dst: &mut [u32]) {
    use std::arch::x86_64::*;
    // vpermw indices taking [r0 x16 | r1 x16] to r0[0], r1[0], r0[1], r1[1], ...
    let idx = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    let width = r0.len();
    assert!(width <= NR && dst.len() >= NR && r1.is_none_or(|r| r.len() == width));
    for v in 0..NR / 16 {
        let lanes = width.saturating_sub(16 * v).min(16);
        // Lanes past the columns are neither read (masked loads) nor left unset.
        let mask = ((1u32 << lanes) - 1) as u16;
        unsafe {
            let lo = _mm512_maskz_loadu_ps(mask, r0.as_ptr().wrapping_add(16 * v));
            let hi = match r1 {
                Some(r) => _mm512_maskz_loadu_ps(mask, r.as_ptr().wrapping_add(16 * v)),
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
#[allow(clippy::too_many_arguments)]
unsafe fn kernel<const NV: usize>(
    _: usize,
    _: *const u32,
    _: *const u32,
    _: *mut f32,
    _: usize,
    _: bool,
    _: u16,
) {
    unreachable!("bf16 products exist on x86-64 only")
}

/// The register tile: `c (6 x 16·NV, row stride ldc) = (load ? c : 0) + A-panel · B-panel` over
/// `kp` k pairs, the last vector's columns limited to the lanes of `mask` (masked loads and
/// stores: narrow panels need no copy, and each output sums its products in the same order
/// whatever the panel's width).
///
/// # Safety
/// AVX512-BF16 must be available; `ap` holds `6 * kp` words, `bp` `64 * kp`, and `c` 6 rows of
/// the columns covered.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn kernel<const NV: usize>(
    kp: usize,
    ap: *const u32,
    bp: *const u32,
    c: *mut f32,
    ldc: usize,
    load: bool,
    mask: u16,
) {
    use std::arch::x86_64::*;
    let lanes = |v: usize| if v + 1 == NV { mask } else { u16::MAX };
    let mut acc = [_mm512_setzero_ps(); MR * 4];
    unsafe {
        if load {
            for r in 0..MR {
                for v in 0..NV {
                    acc[r * 4 + v] = _mm512_maskz_loadu_ps(lanes(v), c.add(r * ldc + 16 * v));
                }
            }
        }
        for p in 0..kp {
            let bq = bp.add(p * NR);
            let bv: [__m512bh; 4] = std::array::from_fn(|v| {
                if v < NV {
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                        bq.add(16 * v).cast(),
                    ))
                } else {
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_setzero_si512())
                }
            });
            for r in 0..MR {
                let a: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*ap.add(p * MR + r) as i32));
                for v in 0..NV {
                    acc[r * 4 + v] = _mm512_dpbf16_ps(acc[r * 4 + v], a, bv[v]);
                }
            }
        }
        for r in 0..MR {
            for v in 0..NV {
                _mm512_mask_storeu_ps(c.add(r * ldc + 16 * v), lanes(v), acc[r * 4 + v]);
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
            // Rows split into tiles sharing one packed B, panels of 1-3 vectors (81 = 64 + 17,
            // 289 = 4 * 64 + 33), a single odd k.
            (90, 81, 70),
            (200, 289, 96),
            (12, 33, 1),
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
                    let mut first: Option<Vec<f32>> = None;
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
                        // One thread (each task packs its columns) and two (row tiles sharing
                        // one packed B) sum in the same order: the same bits.
                        match &first {
                            None => first = Some(dst),
                            Some(f) => assert!(
                                f.iter().zip(&dst).all(|(x, y)| x.to_bits() == y.to_bits()),
                                "case {case} layout {layout} acc {accumulate}: threads differ"
                            ),
                        }
                    }
                }
            }
        }
    }

    /// Packed weights come from the transform cache only for the same weights and layout:
    /// repeated packings give the same bits, a weight changed in place (one the fingerprint
    /// does not sample) the new products, the transposed layout of the same floats its own.
    #[test]
    fn packed_weights_are_reused_only_for_the_same_weights() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        // Square, so that the transposed layout below packs as many words from the same floats.
        let (m, n, k) = (96, 81, 96);
        let mut a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0)).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-2.0..2.0)).collect();
        let ob = Operand {
            data: &b,
            rs: n,
            cs: 1,
        };
        let run = |a: &[f32], strides: (usize, usize), mm: usize, kk: usize| {
            let pa = PackedA::new(mm, kk, a, strides, 2, true);
            let mut dst = vec![0f32; mm * n];
            gemm_packed(&pa, n, &mut dst, n, false, &b[..kk * n], (n, 1), 2);
            dst
        };
        let check = |got: &[f32], a: &[f32], strides: (usize, usize), mm: usize, kk: usize| {
            let oa = Operand {
                data: a,
                rs: strides.0,
                cs: strides.1,
            };
            let ob = Operand {
                data: &b[..kk * n],
                ..ob
            };
            let want = reference(mm, n, kk, &[], n, false, oa, ob);
            let tol = 1e-6 * (kk as f64 * 4.0 + 1.0);
            got.iter()
                .zip(&want)
                .all(|(&g, &w)| (f64::from(g) - w).abs() <= tol)
        };
        let first = run(&a, (k, 1), m, k);
        assert!(check(&first, &a, (k, 1), m, k));
        let again = run(&a, (k, 1), m, k);
        assert!(
            first
                .iter()
                .zip(&again)
                .all(|(x, y)| x.to_bits() == y.to_bits())
        );
        // 9,216 weights: the fingerprint samples every 144th; change weight 1 (row 0).
        a[1] += 0.75;
        let changed = run(&a, (k, 1), m, k);
        assert!(check(&changed, &a, (k, 1), m, k), "kept the old weights");
        assert!(changed[..n].iter().zip(&first).any(|(x, y)| x != y));
        // The same floats read as the transposed matrix: another packing of equal length, not
        // the entry above.
        let t = run(&a, (1, m), k, m);
        assert!(check(&t, &a, (1, m), k, m), "transposed layout");
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
