//! Direct convolution for f32 on AVX-512 or AVX2 + FMA: no patch matrix, no packing of the
//! activations.
//!
//! im2col + gemm writes a patch matrix `k*k` times the size of the input and the gemm then packs
//! it again; for the narrow layers of a small model (32-256 channels, 3-33 px maps) those two
//! passes cost a third of the convolution. Here the input is copied once into a zero-padded
//! buffer and the micro-kernel reads its values straight from it, broadcasting each to a row of
//! output channels: a tile of `MT` output positions x `NV` vectors of output channels lives in
//! registers while the kernel walks all `Cin * k * k` taps, each tap one vector load of packed
//! weights per vector and one broadcast per position. Positions are addressed one by one, so
//! strides, padding and tiles that cross rows or images cost nothing extra.
//!
//! The tile is chosen from the CPU's instruction set at run time (32 zmm registers: 6 positions
//! x 4 vectors of 16; 16 ymm registers: 6 x 2 vectors of 8), and the weight gradient's position
//! blocks from its L2 size ([`crate::cpu`]), so no constant is tuned to one machine.

// Off x86-64 nothing here is selected (`suitable` is false) and the kernels are compiled out.
#![cfg_attr(
    not(target_arch = "x86_64"),
    allow(dead_code, unused, unreachable_code)
)]

use crate::conv::Geom;
use crate::cpu::Isa;
use crate::par::SendPtr;
use rayon::prelude::*;

/// `$call` with its last const parameter set to the kernel size where a specialised micro-kernel
/// exists (3x3, the 7x7 stem), else 0 (the offset-table loop).
macro_rules! kernel_size {
    ($k:expr, $m:ident::$f:ident::<$mt:literal, $nv:literal>($($a:expr),*)) => {
        match $k {
            3 => $m::$f::<$mt, $nv, 3>($($a),*),
            7 => $m::$f::<$mt, $nv, 7>($($a),*),
            _ => $m::$f::<$mt, $nv, 0>($($a),*),
        }
    };
}

/// Whether the direct kernel handles this convolution (and the CPU has AVX-512 or AVX2 + FMA):
/// square kernels larger than 1x1 with at most 2,304 taps per output (256 channels at 3x3), over
/// at least 128 output positions, and weights of at most [`MAX_WEIGHTS`] taps x output channels
/// (rounded up to the ISA's channel blocks): every block of output channels walks all taps of
/// its positions again, and beyond 256 -> 256 at 3x3 im2col + gemm wins. The bound is in
/// channels, not blocks, so both ISAs take the same layers. Measured against im2col + gemm on
/// the layers of the small model and of ResNet-50 at 257 and 641 px: on AVX-512 (64-channel
/// blocks) 1.1-1.5x faster in that range (the 7x7 stems and stride-2 layers gain most), slower
/// beyond it (512 channels: 127 vs 146 GFLOP/s; 2,048: 48 vs 72); on AVX2 (16-channel blocks,
/// Zen 3, with the 3x3 micro-kernel) 1.3-1.7x faster up to 128 channels and, at 256 -> 256, up
/// to 1.6x forward and 1.45x backward on 5x5-21x21 maps (ResNet-50's stage 3, the heads' P4-P6,
/// the small model's stage 4), level at 9x9 batch 2; slower at 512 -> 512 (9.4 vs 11.2 ms at
/// 2x512x9x9) and for 2,048 inputs.
pub(crate) fn suitable(g: &Geom) -> bool {
    isa().is_some_and(|isa| suits(g, isa))
}

/// Whether the direct kernel's bf16 form ([`forward_bf16`]) takes this convolution: as
/// [`suitable`], with weights up to a 2048 -> 512 3x3 layer and from 32 output positions. Its
/// weights are bf16 pairs, half the bytes per tap, and a 512 -> 512 block (590 KB) streams
/// from L2 fast enough: 1x512x21x21 512 -> 512 took 5.0-6.7 ms of CPU forward against 13-14
/// ms in f32 (which took im2col there); with few positions the alternative is the f32 route,
/// twice the cost per product: ResNet-50's 2048 -> 256 P6 convolution (121 positions at 641
/// px) 7.7 ms against 15.5, 256 -> 256 at 11x11 0.5 against 1.0 (Zen 5).
pub(crate) fn suitable_bf16(g: &Geom) -> bool {
    bf16_suits(g, 32)
}

/// Whether [`backward_weight_bf16`] takes this convolution: as [`suitable_bf16`], from 128
/// output positions (its sums run over positions: with fewer it lost to the f32 route, 2x512x5x5
/// 512 -> 512 2.2 ms of CPU against 1.8, the 2048 -> 256 P6 convolution at 257 px 7.5 ms of
/// backward against 5.9, Zen 5).
pub(crate) fn suitable_bf16_weight_grad(g: &Geom) -> bool {
    bf16_suits(g, 128)
}

/// The bf16 form's layers from `min_positions` output positions.
fn bf16_suits(g: &Geom, min_positions: usize) -> bool {
    isa().is_some()
        && crate::bf16::available()
        && suits_up_to(
            g,
            Isa::Avx512,
            MAX_TAPS_BF16,
            MAX_WEIGHTS_BF16,
            min_positions,
        )
}

/// Taps a channel and taps x output channels of the largest weights [`suitable`] hands to the
/// direct kernel in f32: a 256 -> 256 3x3 layer.
const MAX_TAPS: usize = 2304;
const MAX_WEIGHTS: usize = MAX_TAPS * 256;
/// The same for [`suitable_bf16`]: a 2048 -> 512 3x3 layer.
const MAX_TAPS_BF16: usize = 2048 * 9;
const MAX_WEIGHTS_BF16: usize = MAX_TAPS_BF16 * 512;

/// [`suitable`] for instruction set `isa`.
fn suits(g: &Geom, isa: Isa) -> bool {
    suits_up_to(g, isa, MAX_TAPS, MAX_WEIGHTS, 128)
}

/// [`suits`] with at most `max_taps` taps an output channel and `max_weights` weights (output
/// channels rounded up to whole blocks), at least `min_positions` outputs a channel.
fn suits_up_to(
    g: &Geom,
    isa: Isa,
    max_taps: usize,
    max_weights: usize,
    min_positions: usize,
) -> bool {
    let blocks = Blocks::new(isa, g.cout);
    g.cout > 0
        && g.kh == g.kw
        && g.kh > 1
        && g.p.dilation == 1
        && (16..=max_taps).contains(&g.k())
        && g.k() * blocks.count() * blocks.cb <= max_weights
        && g.b * g.ohw() >= min_positions
}

/// The instruction set the direct kernels run with here, if any: the widest the CPU has, unless
/// `RETINANET_NO_DIRECT_CONV` turns them off (for comparisons) or `RETINANET_ISA=avx2` caps them.
pub(crate) fn isa() -> Option<Isa> {
    use std::sync::OnceLock;
    static ISA: OnceLock<Option<Isa>> = OnceLock::new();
    *ISA.get_or_init(|| {
        if std::env::var_os("RETINANET_NO_DIRECT_CONV").is_some() {
            return None;
        }
        crate::cpu::vector_isa()
    })
}

/// The instruction sets worth trying here: [`isa`] and the narrower ones the CPU also has (an
/// AVX-512 CPU runs the AVX2 kernels too).
fn candidates() -> &'static [Isa] {
    use std::sync::OnceLock;
    static C: OnceLock<Vec<Isa>> = OnceLock::new();
    C.get_or_init(|| {
        let Some(top) = isa() else { return Vec::new() };
        let all = crate::cpu::vector_isas();
        all.into_iter().skip_while(|&i| i != top).collect()
    })
}

/// What a measured choice is cached for.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Op {
    Forward,
    WeightGrad,
    /// The weight gradient in bf16 products (AVX-512 only).
    WeightGradBf16,
}

type Key = (Op, [usize; 8]);

/// How one kernel call runs: the instruction set, and for the weight gradient the positions per
/// block ([`position_blocks`]; 0 for the forward pass).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Plan {
    isa: Isa,
    pblock: usize,
}

fn choices() -> &'static std::sync::Mutex<std::collections::HashMap<Key, Plan>> {
    use std::sync::{Mutex, OnceLock};
    static M: OnceLock<Mutex<std::collections::HashMap<Key, Plan>>> = OnceLock::new();
    M.get_or_init(Default::default)
}

/// The plans worth trying for `op` here, the preferred first: every instruction set of
/// [`candidates`], and for the weight gradient each of its [`position_blocks`] (worked out once
/// per process).
fn plans(op: Op) -> &'static [Plan] {
    use std::sync::OnceLock;
    static FORWARD: OnceLock<Vec<Plan>> = OnceLock::new();
    static WEIGHT_GRAD: OnceLock<Vec<Plan>> = OnceLock::new();
    static WEIGHT_GRAD_BF16: OnceLock<Vec<Plan>> = OnceLock::new();
    let cell = match op {
        Op::Forward => &FORWARD,
        Op::WeightGrad => &WEIGHT_GRAD,
        Op::WeightGradBf16 => &WEIGHT_GRAD_BF16,
    };
    cell.get_or_init(|| plans_uncached(op))
}

fn plans_uncached(op: Op) -> Vec<Plan> {
    let mut v = Vec::new();
    let blocks = |isa: Isa| position_blocks(isa.lanes() * isa.max_vectors());
    for &isa in candidates() {
        match op {
            Op::Forward => v.push(Plan { isa, pblock: 0 }),
            Op::WeightGrad => v.extend(blocks(isa).into_iter().map(|pblock| Plan { isa, pblock })),
            // bf16 products exist in AVX-512 only, whatever `RETINANET_ISA` caps.
            Op::WeightGradBf16 => {}
        }
    }
    if op == Op::WeightGradBf16 {
        let isa = Isa::Avx512;
        v.extend(blocks(isa).into_iter().map(|pblock| Plan { isa, pblock }));
    }
    if std::env::var("RETINANET_TUNE").is_ok_and(|v| v == "0") {
        v.truncate(1);
    }
    v
}

/// `run` with the plan that is fastest for this `op` on this shape: where there are several
/// (AVX-512 and AVX2; weight-gradient position blocks sized for L1 or for L2), the first call
/// of each layer shape times every one on the real operands and the choice is kept for the
/// process. Which is faster depends on the machine, not only on its instruction set (one or
/// two 512-bit FMA ports, clock offsets for 512-bit code, Zen 4's 256-bit halves, how well its
/// prefetchers stream a block from L2), so it is measured rather than assumed. Every plan sums
/// each output in the same order with the same fused multiply-adds, so the choice never
/// changes a bit of the result (`isas_agree_bit_for_bit`, `position_blocks_agree_bit_for_bit`).
fn tuned<R>(op: Op, g: &Geom, run: impl Fn(Plan) -> R) -> R {
    let key = (
        op,
        [g.b, g.cin, g.h, g.w, g.cout, g.kh, g.p.stride, g.p.padding],
    );
    fastest(choices(), key, plans(op), run)
}

/// The measured choice of [`tuned`] among `cands` (first preferred unless another is at least
/// 5% faster), cached in `cache` under `key`; returns the result of the run chosen.
fn fastest<K: Eq + std::hash::Hash, C: Copy, R>(
    cache: &std::sync::Mutex<std::collections::HashMap<K, C>>,
    key: K,
    cands: &[C],
    run: impl Fn(C) -> R,
) -> R {
    let lock = || cache.lock().unwrap_or_else(|e| e.into_inner());
    match cands {
        [] => unreachable!("the direct kernel is selected only where the CPU has one"),
        [only] => return run(*only),
        _ => {}
    }
    if let Some(&c) = lock().get(&key) {
        return run(c);
    }
    let mut best: Option<(C, f64, R)> = None;
    for &c in cands {
        let t = std::time::Instant::now();
        let r = run(c);
        let dt = t.elapsed().as_secs_f64();
        if best.as_ref().is_none_or(|&(_, bt, _)| dt < 0.95 * bt) {
            best = Some((c, dt, r));
        }
    }
    let (c, _, r) = best.expect("at least two candidates");
    lock().insert(key, c);
    r
}

/// What the measured choices took so far (`"layer shapes measured faster with avx512 12,
/// avx2 3; weight-gradient position blocks for L1 in 4 of 9 shapes"`), or `None` where nothing
/// was measured (one plan only, or tuning off).
pub(crate) fn tuning_summary() -> Option<String> {
    let m = choices().lock().unwrap_or_else(|e| e.into_inner());
    if m.is_empty() {
        return None;
    }
    let mut parts = Vec::new();
    if candidates().len() > 1 {
        let n = |i: Isa| {
            m.iter()
                .filter(|((op, _), c)| *op != Op::WeightGradBf16 && c.isa == i)
                .count()
        };
        parts.push(format!(
            "layer shapes measured faster with avx512 {}, avx2 {}",
            n(Isa::Avx512),
            n(Isa::Avx2)
        ));
    }
    let wg = m.values().filter(|c| c.pblock > 0).count();
    if wg > 0 {
        let l1 = m
            .values()
            .filter(|c| c.pblock > 0 && c.pblock == l1_block(c.isa))
            .count();
        parts.push(format!(
            "weight-gradient position blocks for L1 in {l1} of {wg} shapes"
        ));
    }
    Some(parts.join("; "))
}

/// Channel blocks of one instruction set: `cb` output channels a block (the widest tile), each
/// block's lanes rounded up to whole vectors of `lanes`.
#[derive(Clone, Copy)]
struct Blocks {
    isa: Isa,
    cout: usize,
    cb: usize,
    lanes: usize,
}

impl Blocks {
    fn new(isa: Isa, cout: usize) -> Self {
        Blocks {
            isa,
            cout,
            cb: isa.lanes() * isa.max_vectors(),
            lanes: isa.lanes(),
        }
    }
    fn count(&self) -> usize {
        self.cout.div_ceil(self.cb)
    }
    /// Output channels of block `bi`.
    fn channels(&self, bi: usize) -> usize {
        self.cb.min(self.cout - bi * self.cb)
    }
    /// Lanes of block `bi`: `cb`, or the last block's channels rounded up to whole vectors (a
    /// 12-channel output streams 16 lanes of weights, not 64).
    fn width(&self, bi: usize) -> usize {
        self.channels(bi).next_multiple_of(self.lanes)
    }
    /// Length of a buffer of `rows` rows per channel block, each [`Blocks::width`] wide: block
    /// `bi` starts at `bi * rows * cb` (only the last block may be narrower).
    fn len(&self, rows: usize) -> usize {
        let n = self.count();
        (n - 1) * rows * self.cb + rows * self.width(n - 1)
    }
    /// A [`Blocks::len`] buffer of `images * per_image` rows cut into one part per channel
    /// block and image: `(block, image, rows)`, for tasks that fill it in parallel.
    fn image_parts<'a, T>(
        &self,
        buf: &'a mut [T],
        images: usize,
        per_image: usize,
    ) -> Vec<(usize, usize, &'a mut [T])> {
        let mut parts = Vec::with_capacity(self.count() * images);
        for (bi, blk) in buf.chunks_mut(images * per_image * self.cb).enumerate() {
            for (b, dst) in blk.chunks_mut(per_image * self.width(bi)).enumerate() {
                parts.push((bi, b, dst));
            }
        }
        parts
    }

    /// Block `bi` of a [`Blocks::len`] buffer.
    fn block<'a, T>(&self, buf: &'a [T], rows: usize, bi: usize) -> &'a [T] {
        &buf[bi * rows * self.cb..][..rows * self.width(bi)]
    }
    /// A [`Blocks::len`] buffer of `rows` rows holding output channel `co`'s values in lane
    /// `co` of each row (packed weights: `[block][row][lanes]`), zero lanes past Cout:
    /// `column(co, r0, out)` writes channel `co`'s values of rows `r0..r0 + out.len()`.
    ///
    /// In parallel over blocks of 64 rows (one channel block of 64 outputs is all of a layer's
    /// weights up to 64 channels): each task reads a run of every channel's weights into a
    /// channel-major tile in L1, then turns it into rows by [`transpose_into`]'s register
    /// transposes. (Per value, with the row split into channel pair and tap by a division, a
    /// 256 -> 256 3x3 layer took 1.2 ms to pack, as long as its convolution; storing the
    /// columns one value at a time, the packing was 4% of a ResNet-50 bf16 training step, whose
    /// weights change every step.)
    ///
    /// `buf` ([`Blocks::len`] long) is overwritten entirely, zero lanes included.
    fn pack_into<T: crate::reuse::Word>(
        &self,
        buf: &mut [T],
        rows: usize,
        column: impl Fn(usize, usize, &mut [T]) + Sync,
    ) {
        const ROWS: usize = 64;
        assert_eq!(buf.len(), self.len(rows));
        assert!(self.cb <= 64);
        let mut parts: Vec<(usize, usize, &mut [T])> = Vec::new();
        for (bi, blk) in buf.chunks_mut(rows * self.cb).enumerate() {
            let lw = self.width(bi);
            for (ri, dst) in blk.chunks_mut(ROWS * lw).enumerate() {
                parts.push((bi, ri * ROWS, dst));
            }
        }
        parts.into_par_iter().for_each(|(bi, r0, dst)| {
            let lw = self.width(bi);
            let n = dst.len() / lw;
            let nc = self.channels(bi);
            let mut cols = [T::default(); ROWS * 64];
            for c in 0..nc {
                column(bi * self.cb + c, r0, &mut cols[c * n..][..n]);
            }
            transpose_into(
                T::as_f32s(&cols[..nc * n]),
                n,
                nc,
                T::as_f32s_mut(dst),
                lw,
                self.isa,
            );
            for row in dst.chunks_exact_mut(lw) {
                row[nc..].fill(T::default());
            }
        });
    }

    /// `use_(packed)` with the weights `w` packed by [`Blocks::pack_into`] (`T`: f32, or u32
    /// for bf16 pairs), from the transform cache ([`crate::reuse`]) where these weights were
    /// packed the same way before: the head's convolutions on each pyramid level, inference on
    /// every image. `kind` names the packing (with the ISA's lanes and the shape in the tag).
    fn with_packed<T: crate::reuse::Word, R>(
        &self,
        kind: &'static str,
        dims: [usize; 3],
        w: &[f32],
        rows: usize,
        column: impl Fn(usize, usize, &mut [T]) + Sync,
        use_: impl FnOnce(&[T]) -> R,
    ) -> R {
        let tag = crate::reuse::Tag {
            kind,
            dims: [dims[0], dims[1], dims[2], self.cb],
        };
        let len = self.len(rows);
        crate::reuse::Cache::with_derived(
            crate::reuse::global(),
            tag,
            w,
            len,
            |d| self.pack_into(T::from_f32s(d), rows, column),
            |d| use_(T::from_f32s_ref(d)),
        )
    }
}

/// Offset in a padded plane of row length `wp` of each tap of a `k x k` kernel.
fn tap_offsets(k: usize, wp: usize) -> Vec<usize> {
    (0..k * k).map(|t| (t / k) * wp + t % k).collect()
}

/// `y = conv(x, w) (+ bias) (+ res)`, then ReLU if asked; `x` `[B, Cin, H, W]`, `w`
/// `[Cout, Cin, k, k]`, `y` and `res` `[B, Cout, OH, OW]`. Call only when [`suitable`].
pub(crate) fn forward(
    g: &Geom,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    res: Option<&[f32]>,
    relu: bool,
) -> Vec<f32> {
    tuned(Op::Forward, g, |p| {
        forward_with(p.isa, g, x, w, false, bias, res, relu, false)
    })
}

/// [`forward`] with the weights rotated and swapped as they are packed (see
/// [`forward_bf16_flipped`]): the transposed convolution of an input gradient.
pub(crate) fn forward_flipped(g: &Geom, x: &[f32], w: &[f32]) -> Vec<f32> {
    tuned(Op::Forward, g, |p| {
        forward_with(p.isa, g, x, w, true, None, None, false, false)
    })
}

/// [`forward`] with the kernels of `isa` (which the CPU must have); `generic` keeps to the
/// offset-table micro-kernel and the scalar epilogue (for the test that the specialised ones
/// give the same bits).
#[allow(clippy::too_many_arguments)]
fn forward_with(
    isa: Isa,
    g: &Geom,
    x: &[f32],
    w: &[f32],
    flipped: bool,
    bias: Option<&[f32]>,
    res: Option<&[f32]>,
    relu: bool,
    generic: bool,
) -> Vec<f32> {
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("the direct kernel is selected only on x86-64");
    let k = g.kh;
    let (wp, plane) = padded_dims(g);
    let xp = pad_input(g, x);
    let xp: &[f32] = &xp;
    // Weights packed per block of output channels: `[block][cin][tap][lanes]` (block `bi` at
    // `bi * kk * cb`), zero lanes past Cout.
    let taps = k * k;
    let kk = g.cin * taps;
    let bl = Blocks::new(isa, g.cout);
    let column = |co: usize, r0: usize, out: &mut [f32]| {
        if flipped {
            // `w` is `[Cin][Cout][k][k]`: row `ci * taps + t` is tap `taps - 1 - t` of
            // `w[ci][co]`; the rows walked in order (no division per value).
            let (mut ci, mut t) = (r0 / taps, r0 % taps);
            for o in out.iter_mut() {
                *o = w[(ci * g.cout + co) * taps + taps - 1 - t];
                t += 1;
                if t == taps {
                    (ci, t) = (ci + 1, 0);
                }
            }
        } else {
            out.copy_from_slice(&w[co * kk + r0..][..out.len()]);
        }
    };
    let dims = [g.cout, g.cin, k];
    let kind = if flipped {
        "direct f32 weights, rotated and swapped"
    } else {
        "direct f32 weights"
    };
    bl.with_packed(kind, dims, w, kk, column, |wpk| {
        let toff = tap_offsets(k, wp);
        let epi = Epilogue {
            bias,
            res,
            relu,
            vector_store: !generic,
        };
        by_chunks(g, bl, g.cin, epi, |bi, o| {
            let ctx = Ctx {
                xp,
                w: bl.block(wpk, kk, bi),
                cin: g.cin,
                plane,
                wp,
                toff: &toff,
            };
            // SAFETY: the CPU has `isa` (`isa()` or the caller checked); every position of
            // `o.base` reads its window inside `xp` (Geom's output size keeps windows in the padded
            // input), and the chunk writes only its own positions of `y`.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                let ks = if generic { 0 } else { k };
                match (isa, o.nco.div_ceil(isa.lanes())) {
                    (Isa::Avx512, 4) => kernel_size!(ks, avx512::run::<6, 4>(&ctx, o)),
                    (Isa::Avx512, 3) => kernel_size!(ks, avx512::run::<6, 3>(&ctx, o)),
                    (Isa::Avx512, 2) => kernel_size!(ks, avx512::run::<8, 2>(&ctx, o)),
                    (Isa::Avx512, _) => kernel_size!(ks, avx512::run::<12, 1>(&ctx, o)),
                    (Isa::Avx2, 2) => kernel_size!(ks, avx2::run::<6, 2>(&ctx, o)),
                    (Isa::Avx2, _) => kernel_size!(ks, avx2::run::<12, 1>(&ctx, o)),
                }
            }
        })
    })
}

/// What the forward kernels do to a sum before storing it: bias, residual, ReLU, and whether
/// the instruction set's vector epilogue may write the tiles it handles.
#[derive(Clone, Copy)]
struct Epilogue<'a> {
    bias: Option<&'a [f32]>,
    res: Option<&'a [f32]>,
    relu: bool,
    vector_store: bool,
}

/// The output of a forward pass, computed in chunks of positions (a few per thread, a multiple
/// of every tile height), each chunk all channel blocks of `bl` in turn: `kernel(bi, out)` for
/// block `bi` of the chunk's positions, whose window origins `out.base` are offsets in a padded
/// input of `planes` planes per image. (Capping the chunks so that their input rows stay in L2
/// made no difference on 161x161 maps: the prefetchers stream them.)
fn by_chunks(
    g: &Geom,
    bl: Blocks,
    planes: usize,
    epi: Epilogue,
    kernel: impl Fn(usize, &Out) + Sync,
) -> Vec<f32> {
    let ohw = g.ohw();
    let total = g.b * ohw;
    let chunk = total
        .div_ceil(crate::par::threads() * 4)
        .next_multiple_of(24)
        .max(24);
    // Every output is written below: each chunk writes all channels of its positions.
    crate::par::filled_later(g.b * g.cout * ohw, |y| {
        let out = SendPtr(y.as_mut_ptr().cast::<f32>());
        let job = |ci: usize| {
            let lo = ci * chunk;
            let hi = (lo + chunk).min(total);
            // Offset in the padded input of each position's window origin, and of its output
            // channel 0 in `y`.
            let base = window_bases_planes(g, planes, lo..hi);
            let dst: Vec<usize> = (lo..hi)
                .map(|pos| (pos / ohw) * g.cout * ohw + pos % ohw)
                .collect();
            for bi in 0..bl.count() {
                let o = Out {
                    base: &base,
                    dst: &dst,
                    co0: bi * bl.cb,
                    nco: bl.channels(bi),
                    ohw,
                    epi,
                    y: out,
                };
                kernel(bi, &o);
            }
        };
        crate::par::for_each_index(total.div_ceil(chunk), job);
    })
}

/// The forward pass in bf16 products (the CPU must have AVX512-BF16: `crate::bf16::available()`):
/// input and weights rounded to bf16 (nearest even) as they are laid out, products summed in
/// f32 by `vdpbf16ps`, bias, residual and ReLU in f32. The input is padded as pairs of
/// channels (`[B][Cin/2][H'][W']` words, channel `2p` in the low half, a zero channel after an
/// odd last one) and the weights packed `[block][Cin/2][tap][lanes]` in the same pairs, so one
/// 32-bit broadcast of a position's pair meets 16 output channels' pairs per instruction: the
/// f32 kernel's tiles, twice the multiply-adds per instruction.
pub(crate) fn forward_bf16(
    g: &Geom,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    res: Option<&[f32]>,
    relu: bool,
) -> Vec<f32> {
    let epi = Epilogue {
        bias,
        res,
        relu,
        vector_store: true,
    };
    forward_bf16_from(g, x, w, false, epi)
}

/// [`forward_bf16`] with the weights `w'[co][ci][t] = w[ci][co][taps - 1 - t]` (`w` is
/// `[Cin][Cout][k][k]`): the transposed convolution of an input gradient
/// ([`crate::conv::transposed`]) straight from the layer's own weights, rotated and swapped as
/// they are packed instead of in a copy first (a 512 -> 512 3x3 layer's copy took as long as
/// its packing).
pub(crate) fn forward_bf16_flipped(g: &Geom, x: &[f32], w: &[f32]) -> Vec<f32> {
    let epi = Epilogue {
        bias: None,
        res: None,
        relu: false,
        vector_store: true,
    };
    forward_bf16_from(g, x, w, true, epi)
}

/// The bf16 forward pass with its output epilogue `epi` (`vector_store` false: the scalar
/// epilogue everywhere, for the test that both give the same bits).
fn forward_bf16_from(g: &Geom, x: &[f32], w: &[f32], flipped: bool, epi: Epilogue) -> Vec<f32> {
    assert!(
        crate::bf16::available(),
        "bf16 products without AVX512-BF16"
    );
    assert_eq!(x.len(), g.b * g.cin * g.h * g.w);
    assert_eq!(w.len(), g.cout * g.cin * g.kh * g.kw);
    let k = g.kh;
    let taps = k * k;
    let (wp, plane) = padded_dims(g);
    let cp = g.cin.div_ceil(2);
    let xp = pad_pairs(g, x);
    let xp: &[u32] = &xp;
    let kk = cp * taps;
    let bl = Blocks::new(Isa::Avx512, g.cout);
    // Row `i` of a block is channel pair `i / taps` at tap `i % taps`; a zero channel pairs
    // with an odd last one. A run of rows is one segment per channel pair, whose two channels'
    // taps are contiguous: converted and paired 16 at a time.
    let column = |co: usize, r0: usize, out: &mut [u32]| {
        let (mut r, mut done) = (r0, 0);
        while done < out.len() {
            let (p, t) = (r / taps, r % taps);
            let seg = (taps - t).min(out.len() - done);
            let dst = u32_uninit(&mut out[done..done + seg]);
            let has_hi = 2 * p + 1 < g.cin;
            if flipped {
                // Channel `c`'s taps of output `co` run backwards from `w[c][co]`'s last one:
                // reversed 16 at a time into registers' worth of scratch, then paired.
                let tap = |c: usize, i: usize| w[(c * g.cout + co) * taps + taps - 1 - i];
                for (j, d) in dst.chunks_mut(16).enumerate() {
                    let t0 = t + 16 * j;
                    let lo: [f32; 16] =
                        std::array::from_fn(|i| if i < d.len() { tap(2 * p, t0 + i) } else { 0.0 });
                    let hi: [f32; 16] = std::array::from_fn(|i| {
                        if has_hi && i < d.len() {
                            tap(2 * p + 1, t0 + i)
                        } else {
                            0.0
                        }
                    });
                    pair_words(&lo, has_hi.then_some(&hi[..]), d);
                }
            } else {
                let wc = &w[co * g.cin * taps..][..g.cin * taps];
                let lo = &wc[2 * p * taps + t..][..seg];
                let hi = has_hi.then(|| &wc[(2 * p + 1) * taps + t..][..seg]);
                pair_words(lo, hi, dst);
            }
            (r, done) = (r + seg, done + seg);
        }
    };
    let dims = [g.cout, g.cin, k];
    let kind = if flipped {
        "direct bf16 weight pairs, rotated and swapped"
    } else {
        "direct bf16 weight pairs"
    };
    bl.with_packed(kind, dims, w, kk, column, |wpk| {
        let toff = tap_offsets(k, wp);
        by_chunks(g, bl, cp, epi, |bi, o| {
            let ctx = PairCtx {
                xp,
                w: bl.block(wpk, kk, bi),
                pairs: cp,
                plane,
                wp,
                toff: &toff,
            };
            // SAFETY: the CPU has AVX-512F, -BW and -BF16 (asserted); every position of `o.base`
            // reads its window inside `xp`, and the chunk writes only its own positions of `y`.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                match o.nco.div_ceil(16) {
                    4 => kernel_size!(k, avx512_bf16::run::<6, 4>(&ctx, o)),
                    3 => kernel_size!(k, avx512_bf16::run::<6, 3>(&ctx, o)),
                    2 => kernel_size!(k, avx512_bf16::run::<8, 2>(&ctx, o)),
                    _ => kernel_size!(k, avx512_bf16::run::<12, 1>(&ctx, o)),
                }
            }
        })
    })
}

/// `x` zero-padded as bf16 channel pairs (see [`forward_bf16`]): `[B][Cin/2][H'][W']` words.
fn pad_pairs(g: &Geom, x: &[f32]) -> Vec<u32> {
    let (cp, hw) = (g.cin.div_ceil(2), g.h * g.w);
    padded_planes(g, g.b * cp, 0u32, |i, r, dst| {
        let (b, p) = (i / cp, i % cp);
        let row = |c: usize| &x[(b * g.cin + c) * hw + r * g.w..][..g.w];
        let hi = (2 * p + 1 < g.cin).then(|| row(2 * p + 1));
        pair_words(row(2 * p), hi, dst);
    })
}

/// `dst[i] = pair(lo[i], hi[i])` (`hi` zero where `None`) for every `i < dst.len()`; the CPU
/// must have AVX512-BF16.
fn pair_words(lo: &[f32], hi: Option<&[f32]>, dst: &mut [std::mem::MaybeUninit<u32>]) {
    let n = dst.len();
    assert!(lo.len() >= n && hi.is_none_or(|h| h.len() >= n));
    assert!(crate::bf16::available());
    // SAFETY: the CPU has AVX-512F, -BW and -BF16 (asserted); the lengths are asserted.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        avx512_bf16::pair_words(
            lo.as_ptr(),
            hi.map(<[f32]>::as_ptr),
            n,
            dst.as_mut_ptr().cast(),
        )
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("bf16 products run on x86-64 only");
}

/// `s` as not-yet-written words, for [`pair_words`].
fn u32_uninit(s: &mut [u32]) -> &mut [std::mem::MaybeUninit<u32>] {
    // SAFETY: `MaybeUninit<u32>` has the layout of `u32`, and only initialised words are written
    // through it.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast(), s.len()) }
}

/// [`Ctx`] of the bf16 kernel: the input and weights as channel pairs.
struct PairCtx<'a> {
    xp: &'a [u32],
    /// Packed weights of one channel block: `[pair][tap][width]`.
    w: &'a [u32],
    pairs: usize,
    plane: usize,
    wp: usize,
    toff: &'a [usize],
}

/// The bf16 forward micro-kernel: the f32 kernel's tiles (`MT` positions x `NV` vectors of 16
/// output channels), each step one channel pair of one tap.
#[cfg(target_arch = "x86_64")]
mod avx512_bf16 {
    use super::{Out, PairCtx, WCtx};
    use std::arch::x86_64::*;

    /// See the f32 kernel's `run`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn run<const MT: usize, const NV: usize, const K: usize>(
        ctx: &PairCtx,
        o: &Out,
    ) {
        let mut tile = [[0f32; 64]; MT];
        for (bases, dsts) in o.base.chunks(MT).zip(o.dst.chunks(MT)) {
            let mut b = [bases[0]; MT];
            b[..bases.len()].copy_from_slice(bases);
            // SAFETY: as in `forward_bf16`; the epilogue writes this chunk's positions only.
            unsafe {
                micro::<MT, NV, K>(ctx, &b, &mut tile);
                if !(o.epi.vector_store && super::avx2_epilogue::run_rows(o, &tile, dsts)) {
                    super::avx512::epilogue(o, &tile, dsts);
                }
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    unsafe fn micro<const MT: usize, const NV: usize, const K: usize>(
        ctx: &PairCtx,
        base: &[usize; MT],
        tile: &mut [[f32; 64]; MT],
    ) {
        // SAFETY: as the caller's contract.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); NV]; MT];
            let xp = ctx.xp.as_ptr();
            let mut wptr = ctx.w.as_ptr();
            macro_rules! tap {
                ($xt:expr) => {{
                    let wv: [__m512bh; NV] = std::array::from_fn(|v| {
                        std::mem::transmute(_mm512_loadu_si512(wptr.add(16 * v).cast()))
                    });
                    let xt = $xt;
                    for j in 0..MT {
                        let xv: __m512bh =
                            std::mem::transmute(_mm512_set1_epi32(*xt.add(base[j]) as i32));
                        for v in 0..NV {
                            acc[j][v] = _mm512_dpbf16_ps(acc[j][v], xv, wv[v]);
                        }
                    }
                    wptr = wptr.add(16 * NV);
                }};
            }
            for c in 0..ctx.pairs {
                let xc = xp.add(c * ctx.plane);
                if K > 0 {
                    for r in 0..K {
                        let xr = xc.add(r * ctx.wp);
                        for col in 0..K {
                            tap!(xr.add(col));
                        }
                    }
                } else {
                    for &t in ctx.toff {
                        tap!(xc.add(t));
                    }
                }
            }
            for (row, a) in tile.iter_mut().zip(&acc) {
                for (v, &av) in a.iter().enumerate() {
                    _mm512_storeu_ps(row.as_mut_ptr().add(16 * v), av);
                }
            }
        }
    }
    /// bf16 lane 2j of a pair vector is lane j of `vcvtne2ps2bf16`'s result (from `lo`), lane
    /// 2j + 1 is lane 16 + j (from `hi`).
    const PAIR_ORDER: [i16; 32] = {
        let mut o = [0i16; 32];
        let mut k = 0;
        while k < 32 {
            o[k] = (if k % 2 == 0 { k / 2 } else { 16 + k / 2 }) as i16;
            k += 1;
        }
        o
    };

    /// `dst[i] = pair(lo[i], hi[i])` (`hi` zero where null) for `i < n`, 16 at a time: both
    /// halves converted by one `vcvtne2ps2bf16` and interleaved by one `vpermw`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn pair_words(
        lo: *const f32,
        hi: Option<*const f32>,
        n: usize,
        dst: *mut u32,
    ) {
        // SAFETY: the caller's contract: `n` values readable at `lo` (and `hi`), writable at
        // `dst`; the masked loads and stores touch nothing past them.
        unsafe {
            let order = _mm512_loadu_si512(PAIR_ORDER.as_ptr().cast());
            for i in (0..n).step_by(16) {
                let m: __mmask16 = if n - i >= 16 { !0 } else { (1 << (n - i)) - 1 };
                let l = _mm512_maskz_loadu_ps(m, lo.add(i));
                let h = match hi {
                    Some(hi) => _mm512_maskz_loadu_ps(m, hi.add(i)),
                    None => _mm512_setzero_ps(),
                };
                let both = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(h, l));
                let w = _mm512_permutexvar_epi16(order, both);
                _mm512_mask_storeu_epi32(dst.add(i).cast(), m, w);
            }
        }
    }

    /// `dst[i]` = bf16 bits of `src[i]` for `i < n`, 16 at a time (the masked 256-bit store
    /// is AVX-512VL, which every CPU with AVX512-BF16 has).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn to_bf16_row(src: *const f32, n: usize, dst: *mut u16) {
        // SAFETY: as in `pair_words`.
        unsafe {
            for i in (0..n).step_by(16) {
                let m: __mmask16 = if n - i >= 16 { !0 } else { (1 << (n - i)) - 1 };
                let h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src.add(i)));
                let h = std::mem::transmute::<__m256bh, __m256i>(h);
                _mm256_mask_storeu_epi16(dst.add(i).cast(), m, h);
            }
        }
    }

    /// The weight gradient's tiles (see the f32 kernel's `wrun`) over pairs of positions.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn wrun<const MT: usize, const NV: usize>(ctx: &WCtx<u32>) {
        // SAFETY: as the caller's contract.
        unsafe { super::avx512::wtiles::<u32, MT, NV>(ctx, wmicro::<MT, NV>) }
    }

    /// `acc[j][v] += Σ_{pair in range} dy[pair][16v..16(v+1)] · xq[base[pair] + off[j]]`, each
    /// term the two positions of a pair.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn wmicro<const MT: usize, const NV: usize>(
        ctx: &WCtx<u32>,
        off: &[usize; MT],
        range: std::ops::Range<usize>,
        acc: &mut [[__m512; NV]; MT],
    ) {
        // SAFETY: as the caller's contract.
        unsafe {
            let mut a = *acc;
            let xp = ctx.xp.as_ptr();
            let width = ctx.dyt.len() / ctx.base.len();
            for pos in range {
                let d = ctx.dyt.as_ptr().add(pos * width);
                let dv: [__m512bh; NV] = std::array::from_fn(|v| {
                    std::mem::transmute(_mm512_loadu_si512(d.add(16 * v).cast()))
                });
                let xb = xp.add(*ctx.base.get_unchecked(pos));
                for j in 0..MT {
                    let xv: __m512bh =
                        std::mem::transmute(_mm512_set1_epi32(*xb.add(off[j]) as i32));
                    for v in 0..NV {
                        a[j][v] = _mm512_dpbf16_ps(a[j][v], dv[v], xv);
                    }
                }
            }
            *acc = a;
        }
    }
}

/// `dst[m * lw + c] = src[c * n + m]` for channels `c < nc` and positions `m < n` (`lw >= nc`;
/// other lanes of `dst` are left as they are): blocks of 8 x 8 through AVX2 registers (which
/// both instruction sets of the direct kernels imply; call only where the CPU has `_isa`), the
/// edges one value at a time.
fn transpose_into(src: &[f32], n: usize, nc: usize, dst: &mut [f32], lw: usize, _isa: Isa) {
    assert!(lw >= nc && src.len() >= nc * n && dst.len() >= n * lw);
    // Off x86-64 (where nothing selects the direct kernels) every value takes the scalar path.
    let (n8, nc8) = if cfg!(target_arch = "x86_64") {
        (n / 8 * 8, nc / 8 * 8)
    } else {
        (0, 0)
    };
    // SAFETY: the CPU has `_isa`, hence AVX2; the lengths are asserted.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        avx2_transpose::blocks(src, n, n8, nc8, dst, lw)
    };
    transpose_scalar(src, n, dst, lw, 0..n8, nc8..nc);
    transpose_scalar(src, n, dst, lw, n8..n, 0..nc);
}

/// [`transpose_into`] over positions `ms` and channels `cs`, 16 positions at a time: their rows
/// of `dst` (at most 4 KiB) stay in L1 while every channel is scattered into them.
fn transpose_scalar(
    src: &[f32],
    n: usize,
    dst: &mut [f32],
    lw: usize,
    ms: std::ops::Range<usize>,
    cs: std::ops::Range<usize>,
) {
    for m0 in ms.clone().step_by(16) {
        let m1 = (m0 + 16).min(ms.end);
        for c in cs.clone() {
            for (m, &v) in (m0..m1).zip(&src[c * n + m0..c * n + m1]) {
                dst[m * lw + c] = v;
            }
        }
    }
}

/// Row length and plane size of the zero-padded input.
fn padded_dims(g: &Geom) -> (usize, usize) {
    let pad = g.p.padding;
    (g.w + 2 * pad, (g.h + 2 * pad) * (g.w + 2 * pad))
}

/// The input with `padding` zeros around every plane (the input itself without padding).
fn pad_input<'a>(g: &Geom, x: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
    use std::mem::MaybeUninit;
    if g.p.padding == 0 {
        return x.into();
    }
    let hw = g.h * g.w;
    let v = padded_planes(g, g.b * g.cin, 0f32, |i, r, dst| {
        for (o, &v) in dst.iter_mut().zip(&x[i * hw + r * g.w..][..g.w]) {
            *o = MaybeUninit::new(v);
        }
    });
    v.into()
}

/// `planes` planes of `H' x W'` (the padded input's dims) with `zero` in the margins of
/// `padding` and `row(plane, r, dst)` writing the `W` values of input row `r`: every element
/// written once, in parallel over the planes.
fn padded_planes<T: Copy + Send + Sync>(
    g: &Geom,
    planes: usize,
    zero: T,
    row: impl Fn(usize, usize, &mut [std::mem::MaybeUninit<T>]) + Sync,
) -> Vec<T> {
    use std::mem::MaybeUninit;
    let pad = g.p.padding;
    let (wp, plane) = padded_dims(g);
    let zero = MaybeUninit::new(zero);
    crate::par::filled_later(planes * plane, |v| {
        v.par_chunks_mut(plane).enumerate().for_each(|(i, dst)| {
            // Top rows, each row's margins and values, bottom rows.
            dst[..pad * wp].fill(zero);
            for r in 0..g.h {
                let d = &mut dst[(r + pad) * wp..][..wp];
                d[..pad].fill(zero);
                row(i, r, &mut d[pad..pad + g.w]);
                d[pad + g.w..].fill(zero);
            }
            dst[(g.h + pad) * wp..].fill(zero);
        })
    })
}

/// Offset in the padded input of each output position's window origin, over the whole batch.
fn window_bases(g: &Geom, positions: std::ops::Range<usize>) -> Vec<usize> {
    window_bases_planes(g, g.cin, positions)
}

/// [`window_bases`] for a padded input of `planes` planes per image (channel pairs for bf16).
fn window_bases_planes(g: &Geom, planes: usize, positions: std::ops::Range<usize>) -> Vec<usize> {
    let (wp, plane) = padded_dims(g);
    let (ohw, s) = (g.ohw(), g.p.stride);
    positions
        .map(|pos| {
            let (b, m) = (pos / ohw, pos % ohw);
            b * planes * plane + (m / g.ow) * s * wp + (m % g.ow) * s
        })
        .collect()
}

/// Weight gradient `dW[co][ci][ty][tx] = Σ_pos dy[co][pos] · x_padded[ci][window(pos) + (ty, tx)]`
/// for a [`suitable`] convolution, `[Cout, Cin, k, k]`.
///
/// The same register tile as the forward pass with the roles turned: vectors of output channels
/// (from `dy` transposed to `[pos][cb]` per channel block) times `MT` taps broadcast from the
/// input, summed over positions. Threads take disjoint sets of taps, and walk the positions in
/// blocks whose transposed `dy` stays in L2.
pub(crate) fn backward_weight(g: &Geom, x: &[f32], dy: &[f32]) -> Vec<f32> {
    tuned(Op::WeightGrad, g, |p| {
        backward_weight_with(p.isa, p.pblock, g, x, dy)
    })
}

/// [`backward_weight`] with the kernels of `isa` (which the CPU must have), positions in blocks
/// of `pblock`.
fn backward_weight_with(isa: Isa, pblock: usize, g: &Geom, x: &[f32], dy: &[f32]) -> Vec<f32> {
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("the direct kernel is selected only on x86-64");
    let xp = pad_input(g, x);
    let xp: &[f32] = &xp;
    let ohw = g.ohw();
    let total = g.b * ohw;
    let bl = Blocks::new(isa, g.cout);
    // dy as [block][pos][lanes] (block `bi` at `bi * total * cb`), zero lanes past Cout; one
    // task per (block, image).
    let mut dyt = crate::par::zeroed::<f32>(bl.len(total));
    let parts = bl.image_parts(&mut dyt, g.b, ohw);
    parts.into_par_iter().for_each(|(bi, b, dst)| {
        let nc = bl.channels(bi);
        let src = &dy[(b * g.cout + bi * bl.cb) * ohw..][..nc * ohw];
        transpose_into(src, ohw, nc, dst, bl.width(bi), isa);
    });
    let base = window_bases(g, 0..total);
    by_tap_groups(g, bl, xp, &base, &dyt, pblock, |ctx| {
        // SAFETY: the CPU has `isa`; every window read lies inside `xp`, and this task writes
        // only its own taps of `dw`.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            match (isa, ctx.nco.div_ceil(isa.lanes())) {
                (Isa::Avx512, 4) => avx512::wrun::<6, 4>(ctx),
                (Isa::Avx512, 3) => avx512::wrun::<6, 3>(ctx),
                (Isa::Avx512, 2) => avx512::wrun::<8, 2>(ctx),
                (Isa::Avx512, _) => avx512::wrun::<12, 1>(ctx),
                (Isa::Avx2, 2) => avx2::wrun::<6, 2>(ctx),
                (Isa::Avx2, _) => avx2::wrun::<12, 1>(ctx),
            }
        }
    })
}

/// The weight gradient `[Cout, Cin, k, k]`, computed in tasks of one channel block of `bl` and
/// one group of taps, each owning its entries of `dw`: `kernel(ctx)` with the task's [`WCtx`]
/// over the padded input `xp`, window origins `base` (one per position, or position pair) and
/// `dyt` laid out per channel block as `[base.len()][lanes]`.
fn by_tap_groups<T: Sync>(
    g: &Geom,
    bl: Blocks,
    xp: &[T],
    base: &[usize],
    dyt: &[T],
    pblock: usize,
    kernel: impl Fn(&WCtx<T>) + Sync,
) -> Vec<f32> {
    let k = g.kh;
    let (wp, plane) = padded_dims(g);
    let taps = k * k;
    let kk = g.k();
    // Offset of each (ci, tap) from a window origin.
    let koff: Vec<usize> = (0..kk)
        .map(|i| (i / taps) * plane + (i % taps / k) * wp + i % k)
        .collect();
    let mut dw = vec![0f32; g.cout * kk];
    // 48 is a multiple of every tile's tap count.
    let group = 48;
    let groups = kk.div_ceil(group);
    let out = SendPtr(dw.as_mut_ptr());
    crate::par::for_each_index(bl.count() * groups, |t| {
        let (bi, gi) = (t / groups, t % groups);
        let k0 = gi * group;
        kernel(&WCtx {
            xp,
            base,
            dyt: bl.block(dyt, base.len(), bi),
            offs: &koff[k0..(k0 + group).min(kk)],
            k0,
            co0: bi * bl.cb,
            nco: bl.channels(bi),
            kk,
            pblock,
            dw: out,
        });
    });
    dw
}

/// [`backward_weight`] in bf16 products (the CPU must have AVX512-BF16): `dy` and the input
/// rounded to bf16 (nearest even), products summed in f32 by `vdpbf16ps` over pairs of
/// neighbouring positions of an output row. `dy` is laid out per channel block as
/// `[pair][lanes]` words (the row's first position in the low half, a zero after an odd last
/// one) and the padded input as words pairing each element with the one `stride` to its right,
/// so one 32-bit broadcast of a tap meets 16 output channels' pairs per instruction: the f32
/// kernel's tiles, twice the multiply-adds per instruction, half the steps.
pub(crate) fn backward_weight_bf16(g: &Geom, x: &[f32], dy: &[f32]) -> Vec<f32> {
    assert!(
        crate::bf16::available(),
        "bf16 products without AVX512-BF16"
    );
    assert_eq!(x.len(), g.b * g.cin * g.h * g.w);
    assert_eq!(dy.len(), g.b * g.cout * g.ohw());
    tuned(Op::WeightGradBf16, g, |p| {
        backward_weight_bf16_with(p.pblock, g, x, dy)
    })
}

fn backward_weight_bf16_with(pblock: usize, g: &Geom, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let (s, ow, ohw) = (g.p.stride, g.ow, g.ohw());
    let (wp, plane) = padded_dims(g);
    let xq = position_pairs(g, x);
    let xq: &[u32] = &xq;
    let hq = ow.div_ceil(2);
    let per_image = g.oh * hq;
    let total = g.b * per_image;
    let bl = Blocks::new(Isa::Avx512, g.cout);
    // dy as [block][pair][lanes] words, zero lanes past Cout; one task per (block, image): its
    // channels' rows in bf16 (an odd row padded with a zero), which as words are the pairs
    // `[c][pair]`, then transposed.
    let mut dyq = crate::par::zeroed::<u32>(bl.len(total));
    let parts = bl.image_parts(&mut dyq, g.b, per_image);
    parts.into_par_iter().for_each(|(bi, b, dst)| {
        let nc = bl.channels(bi);
        let src = &dy[(b * g.cout + bi * bl.cb) * ohw..][..nc * ohw];
        let mut words = vec![0u32; nc * per_image];
        // SAFETY: a u32 buffer seen as twice as many u16 (alignment 4 >= 2); on x86-64 (little
        // endian) bf16 `2q` is the low half of word `q`, as `vdpbf16ps` pairs them.
        let half = unsafe {
            std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u16>(), 2 * words.len())
        };
        for (row, d) in src.chunks_exact(ow).zip(half.chunks_exact_mut(2 * hq)) {
            to_bf16_row(row, &mut d[..ow]);
        }
        // SAFETY: f32 and u32 have one size and alignment; the transpose moves bits unchanged.
        let (wf, df) = unsafe {
            (
                std::slice::from_raw_parts(words.as_ptr().cast::<f32>(), words.len()),
                std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<f32>(), dst.len()),
            )
        };
        transpose_into(wf, per_image, nc, df, bl.width(bi), Isa::Avx512);
    });
    // Window origin of each pair's first position.
    let base: Vec<usize> = (0..total)
        .map(|q| {
            let (b, r) = (q / per_image, q % per_image);
            b * g.cin * plane + (r / hq) * s * wp + 2 * (r % hq) * s
        })
        .collect();
    by_tap_groups(g, bl, xq, &base, &dyq, pblock, |ctx| {
        // SAFETY: the CPU has AVX-512F, -BW and -BF16 (asserted); every window read lies inside
        // `xq` (same layout as the padded input), and this task writes only its own taps of `dw`.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            match ctx.nco.div_ceil(16) {
                4 => avx512_bf16::wrun::<6, 4>(ctx),
                3 => avx512_bf16::wrun::<6, 3>(ctx),
                2 => avx512_bf16::wrun::<8, 2>(ctx),
                _ => avx512_bf16::wrun::<12, 1>(ctx),
            }
        }
    })
}

/// The padded input as words pairing each element with the one `stride` to its right in its
/// row, zero past the row's end (only a missing second position of a pair, whose dy is zero,
/// reads those): `[B][Cin][H'][W']` words, each element written once.
fn position_pairs(g: &Geom, x: &[f32]) -> Vec<u32> {
    use std::mem::MaybeUninit;
    let (pad, s, hw) = (g.p.padding, g.p.stride, g.h * g.w);
    let (wp, plane) = padded_dims(g);
    crate::par::filled_later(g.b * g.cin * plane, |v| {
        v.par_chunks_mut(plane).enumerate().for_each(|(i, dst)| {
            // One padded row, with zeros past its end for the partners of its last elements.
            let mut row = vec![0f32; wp + s];
            for (r, d) in dst.chunks_exact_mut(wp).enumerate() {
                if r < pad || r >= pad + g.h {
                    d.fill(MaybeUninit::new(0));
                    continue;
                }
                row[pad..pad + g.w].copy_from_slice(&x[i * hw + (r - pad) * g.w..][..g.w]);
                pair_words(&row[..wp], Some(&row[s..]), d);
            }
        })
    })
}

/// `dst[i]` = bf16 bits of `src[i]`, for every `i < dst.len()`; the CPU must have AVX512-BF16.
fn to_bf16_row(src: &[f32], dst: &mut [u16]) {
    let n = dst.len();
    assert!(src.len() >= n && crate::bf16::available());
    // SAFETY: the CPU has AVX-512F, -BW and -BF16 (asserted); the lengths are asserted.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        avx512_bf16::to_bf16_row(src.as_ptr(), n, dst.as_mut_ptr())
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("bf16 products run on x86-64 only");
}

/// Positions per block of the weight gradient, the candidates of its measured choice: the
/// block's transposed `dy` (`cb` channels a position, re-read by every tile of taps) in half of
/// this CPU's L1d ([`l1_block`]), or in a quarter of its L2, leaving room for the input windows
/// (1,024 positions of 64 channels on a 1 MiB L2). On Zen 3 (AVX2, 32 KiB L1d, 512 KiB L2) the
/// L1 blocks made the 7x7 stem's weight gradient ~1.4x faster and left the 3x3 layers level.
fn position_blocks(cb: usize) -> Vec<usize> {
    let l1 = (crate::cpu::l1d_bytes() / 2 / (cb * 4)).clamp(64, 8192);
    let l2 = (crate::cpu::l2_bytes() / 4 / (cb * 4)).clamp(256, 8192);
    if l1 == l2 { vec![l2] } else { vec![l1, l2] }
}

/// The L1-sized position block of `isa`'s widest channel block.
fn l1_block(isa: Isa) -> usize {
    position_blocks(isa.lanes() * isa.max_vectors())[0]
}

/// One task of the weight gradient; `T` is f32, or u32 for pairs of bf16 (positions).
struct WCtx<'a, T> {
    xp: &'a [T],
    /// Window origin of every position (pair).
    base: &'a [usize],
    /// `dy` of one channel block, `[pos][width]`.
    dyt: &'a [T],
    /// Offsets of this task's taps from a window origin; the first is tap `k0`.
    offs: &'a [usize],
    k0: usize,
    co0: usize,
    nco: usize,
    /// Taps per output channel (`Cin * k * k`).
    kk: usize,
    pblock: usize,
    dw: SendPtr<f32>,
}

struct Ctx<'a> {
    xp: &'a [f32],
    /// Packed weights of one channel block: `[cin][tap][width]`.
    w: &'a [f32],
    cin: usize,
    plane: usize,
    /// Row length of the padded input.
    wp: usize,
    toff: &'a [usize],
}

/// Where one channel block of a chunk of positions goes: window origins `base`, output offsets
/// `dst` (of channel 0), channels `co0..co0 + nco` with bias, residual (at the same offsets as
/// the output) and ReLU.
struct Out<'a> {
    base: &'a [usize],
    dst: &'a [usize],
    co0: usize,
    nco: usize,
    ohw: usize,
    epi: Epilogue<'a>,
    y: SendPtr<f32>,
}

/// The micro-kernels of one instruction set: `$v` the vector type of `$lanes` f32 lanes, `$cb`
/// the widest block; the same code for AVX-512 and AVX2, compiled with each one's features.
macro_rules! direct_kernels {
    ($isa:ident, $feat:literal, $v:ty, $lanes:literal, $cb:literal,
     $zero:ident, $load:ident, $store:ident, $set1:ident, $fmadd:ident, $vepi:path) => {
        #[cfg(target_arch = "x86_64")]
        mod $isa {
            use super::{Ctx, Out, WCtx};
            use std::arch::x86_64::*;

            const L: usize = $lanes;

            /// Tiles of `MT` positions over `o.base` for one block of output channels, written
            /// with bias and ReLU at `o.dst[j] + co * ohw` of `o.y`.
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn run<const MT: usize, const NV: usize, const K: usize>(
                ctx: &Ctx,
                o: &Out,
            ) {
                let mut tile = [[0f32; $cb]; MT];
                for (bases, dsts) in o.base.chunks(MT).zip(o.dst.chunks(MT)) {
                    let mut b = [bases[0]; MT];
                    b[..bases.len()].copy_from_slice(bases);
                    // SAFETY: as in `forward`.
                    unsafe { micro::<MT, NV, K>(ctx, &b, &mut tile) };
                    // SAFETY: in bounds, and these positions belong to this chunk alone; the
                    // vector epilogue returns false (writing nothing) where it does not apply.
                    if !(o.epi.vector_store && unsafe { $vepi(o, &tile, dsts) }) {
                        unsafe { epilogue(o, &tile, dsts) };
                    }
                }
            }

            /// Writes one tile with bias, residual and ReLU. Positions of one image are
            /// consecutive in `y`, so where the tile's are (the last `dst` `n - 1` past the
            /// first) each channel's values go to one run of addresses.
            #[inline]
            pub(super) unsafe fn epilogue<const MT: usize>(
                o: &Out,
                tile: &[[f32; $cb]; MT],
                dsts: &[usize],
            ) {
                let n = dsts.len();
                let run = dsts[n - 1] == dsts[0] + n - 1;
                // `(acc + bias) + residual` (`+ 0.0` without one), then the ReLU.
                let value = |acc: f32, bv: f32, r: f32| {
                    let v = acc + bv + r;
                    if o.epi.relu && v < 0.0 { 0.0 } else { v }
                };
                for c in 0..o.nco {
                    let co = o.co0 + c;
                    let bv = o.epi.bias.map_or(0.0, |bb| bb[co]);
                    if run {
                        let at = dsts[0] + co * o.ohw;
                        let y = unsafe { o.y.0.add(at) };
                        match o.epi.res {
                            Some(r) => {
                                let r = &r[at..at + n];
                                for (j, (row, &r)) in tile.iter().zip(r).enumerate() {
                                    unsafe { *y.add(j) = value(row[c], bv, r) };
                                }
                            }
                            None => {
                                for (j, row) in tile.iter().take(n).enumerate() {
                                    unsafe { *y.add(j) = value(row[c], bv, 0.0) };
                                }
                            }
                        }
                        continue;
                    }
                    for (row, &d) in tile.iter().zip(dsts) {
                        let r = o.epi.res.map_or(0.0, |r| r[d + co * o.ohw]);
                        unsafe { *o.y.0.add(d + co * o.ohw) = value(row[c], bv, r) };
                    }
                }
            }

            /// The register tile: `acc[j][v]` = output channels `L*v..L*(v+1)` of position `j`,
            /// summed over every input channel and tap. With the kernel size `K` known at
            /// compile time (3, 7) the taps go row by row with the column as a constant
            /// displacement, no offset table; `K = 0` reads `ctx.toff`. Same order either way.
            #[target_feature(enable = $feat)]
            #[inline]
            unsafe fn micro<const MT: usize, const NV: usize, const K: usize>(
                ctx: &Ctx,
                base: &[usize; MT],
                tile: &mut [[f32; $cb]; MT],
            ) {
                let mut acc = [[$zero(); NV]; MT];
                let xp = ctx.xp.as_ptr();
                let mut wptr = ctx.w.as_ptr();
                // One tap: the weights at `wptr` times the input at `xt + base[j]`.
                macro_rules! tap {
                    ($xt:expr) => {{
                        let mut wv = [$zero(); NV];
                        for (v, r) in wv.iter_mut().enumerate() {
                            *r = unsafe { $load(wptr.add(L * v)) };
                        }
                        let xt = $xt;
                        for j in 0..MT {
                            let xv = $set1(unsafe { *xt.add(base[j]) });
                            for v in 0..NV {
                                acc[j][v] = $fmadd(wv[v], xv, acc[j][v]);
                            }
                        }
                        wptr = unsafe { wptr.add(L * NV) };
                    }};
                }
                for c in 0..ctx.cin {
                    let xc = unsafe { xp.add(c * ctx.plane) };
                    if K > 0 {
                        for r in 0..K {
                            let xr = unsafe { xc.add(r * ctx.wp) };
                            for col in 0..K {
                                tap!(unsafe { xr.add(col) });
                            }
                        }
                    } else {
                        for &t in ctx.toff {
                            tap!(unsafe { xc.add(t) });
                        }
                    }
                }
                for (row, a) in tile.iter_mut().zip(&acc) {
                    for (v, &av) in a.iter().enumerate() {
                        unsafe { $store(row.as_mut_ptr().add(L * v), av) };
                    }
                }
            }

            /// Weight-gradient tiles of `MT` taps (`ctx.offs`, from tap `ctx.k0`) for one channel
            /// block, summed over all positions in blocks of `ctx.pblock`, written to
            /// `dw[co][k0 + j]`.
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn wrun<const MT: usize, const NV: usize>(ctx: &WCtx<f32>) {
                // SAFETY: as the caller's contract.
                unsafe { wtiles::<f32, MT, NV>(ctx, wmicro::<MT, NV>) }
            }

            /// [`wrun`] with the sum over a range of positions (pairs) done by `micro`.
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn wtiles<T, const MT: usize, const NV: usize>(
                ctx: &WCtx<T>,
                micro: unsafe fn(
                    &WCtx<T>,
                    &[usize; MT],
                    std::ops::Range<usize>,
                    &mut [[$v; NV]; MT],
                ),
            ) {
                let total = ctx.base.len();
                let offs = ctx.offs;
                let tiles = offs.len().div_ceil(MT);
                let mut acc: Vec<[[$v; NV]; MT]> = vec![[[$zero(); NV]; MT]; tiles];
                for p0 in (0..total).step_by(ctx.pblock) {
                    let p1 = (p0 + ctx.pblock).min(total);
                    for (ti, a) in acc.iter_mut().enumerate() {
                        let o = &offs[ti * MT..((ti + 1) * MT).min(offs.len())];
                        let mut off = [o[0]; MT];
                        off[..o.len()].copy_from_slice(o);
                        // SAFETY: as in `backward_weight`.
                        unsafe { micro(ctx, &off, p0..p1, a) };
                    }
                }
                let mut tile = [[0f32; $cb]; MT];
                for (ti, a) in acc.iter().enumerate() {
                    for (row, av) in tile.iter_mut().zip(a) {
                        for (v, &x) in av.iter().enumerate() {
                            unsafe { $store(row.as_mut_ptr().add(L * v), x) };
                        }
                    }
                    let n = MT.min(offs.len() - ti * MT);
                    for c in 0..ctx.nco {
                        for (j, row) in tile.iter().enumerate().take(n) {
                            let i = (ctx.co0 + c) * ctx.kk + ctx.k0 + ti * MT + j;
                            // SAFETY: in bounds; this task owns taps k0.. of its channel block.
                            unsafe { *ctx.dw.0.add(i) = row[c] };
                        }
                    }
                }
            }

            /// `acc[j][v] += Σ_{pos in range} dy[pos][L*v..L*(v+1)] · x[base[pos] + off[j]]`.
            #[target_feature(enable = $feat)]
            #[inline]
            unsafe fn wmicro<const MT: usize, const NV: usize>(
                ctx: &WCtx<f32>,
                off: &[usize; MT],
                range: std::ops::Range<usize>,
                acc: &mut [[$v; NV]; MT],
            ) {
                let mut a = *acc;
                let xp = ctx.xp.as_ptr();
                let width = ctx.dyt.len() / ctx.base.len();
                for pos in range {
                    let d = unsafe { ctx.dyt.as_ptr().add(pos * width) };
                    let mut dv = [$zero(); NV];
                    for (v, r) in dv.iter_mut().enumerate() {
                        *r = unsafe { $load(d.add(L * v)) };
                    }
                    let xb = unsafe { xp.add(*ctx.base.get_unchecked(pos)) };
                    for j in 0..MT {
                        let xv = $set1(unsafe { *xb.add(off[j]) });
                        for v in 0..NV {
                            a[j][v] = $fmadd(dv[v], xv, a[j][v]);
                        }
                    }
                }
                *acc = a;
            }
        }
    };
}

direct_kernels!(
    avx512,
    "avx512f",
    __m512,
    16,
    64,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_set1_ps,
    _mm512_fmadd_ps,
    super::avx2_epilogue::run_rows
);
direct_kernels!(
    avx2,
    "avx2,fma",
    __m256,
    8,
    16,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_set1_ps,
    _mm256_fmadd_ps,
    super::avx2_epilogue::run_rows
);

/// 8 x 8 transposes in AVX2 registers.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2_transpose {
    use std::arch::x86_64::*;

    /// Row `i` of the result is column `i` of `r` (pure data movement: the same bits).
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(crate) fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(s0, s4),
            _mm256_permute2f128_ps::<0x20>(s1, s5),
            _mm256_permute2f128_ps::<0x20>(s2, s6),
            _mm256_permute2f128_ps::<0x20>(s3, s7),
            _mm256_permute2f128_ps::<0x31>(s0, s4),
            _mm256_permute2f128_ps::<0x31>(s1, s5),
            _mm256_permute2f128_ps::<0x31>(s2, s6),
            _mm256_permute2f128_ps::<0x31>(s3, s7),
        ]
    }

    /// `dst[m * lw + c] = src[c * n + m]` for `m < n8`, `c < nc8` (both multiples of 8).
    ///
    /// # Safety
    /// The CPU has AVX2; `src` holds `nc8` rows of `n >= n8` floats and `dst` `n8` rows of
    /// `lw >= nc8`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn blocks(
        src: &[f32],
        n: usize,
        n8: usize,
        nc8: usize,
        dst: &mut [f32],
        lw: usize,
    ) {
        debug_assert!(src.len() >= nc8 * n && dst.len() >= n8 * lw && lw >= nc8 && n >= n8);
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        for m0 in (0..n8).step_by(8) {
            for c0 in (0..nc8).step_by(8) {
                let mut r = [_mm256_setzero_ps(); 8];
                for (j, v) in r.iter_mut().enumerate() {
                    // SAFETY: row c0 + j < nc8 and m0 + 8 <= n8 <= n: inside `src`.
                    *v = unsafe { _mm256_loadu_ps(s.add((c0 + j) * n + m0)) };
                }
                for (i, v) in transpose8(r).into_iter().enumerate() {
                    // SAFETY: row m0 + i < n8, lanes c0..c0 + 8 <= nc8 <= lw: inside `dst`.
                    unsafe { _mm256_storeu_ps(d.add((m0 + i) * lw + c0), v) };
                }
            }
        }
    }
}

/// The AVX2 forward tile of 6 positions x 16 channels written with vectors: two 8x8 transposes
/// (rows 6 and 7 zero) turn it into one vector of the 6 positions per channel, which gets the
/// bias, the residual and the ReLU and goes out in two stores (4 + 2 lanes), where the scalar
/// epilogue did 96 scalar stores, each with its own loads and branches (9% of the small
/// model's inference samples). Same operations in the same order per value: `(acc + bias) +
/// residual` (`+ 0.0` without one), then `max(0, v)`, which keeps NaN and -0.0 as the scalar
/// `if v < 0 { 0 } else { v }` does.
#[cfg(target_arch = "x86_64")]
mod avx2_epilogue {
    use super::Out;
    use std::arch::x86_64::*;

    /// Writes the tile if it is full (6 or 8 positions, consecutive in `y`: one image) and its
    /// block whole vectors of 8 lanes (AVX2's 16, AVX-512's 64 and the bf16 kernel's), eight
    /// channels at a time through an 8 x 8 register transpose; returns false, writing nothing,
    /// otherwise. The same sums, additions and ReLU as the scalar epilogue, so the same bits
    /// (`max(0, v)` keeps a NaN and -0.0 as `v < 0 ? 0 : v` does).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn run_rows<const MT: usize, const CB: usize>(
        o: &Out,
        tile: &[[f32; CB]; MT],
        dsts: &[usize],
    ) -> bool {
        let n = dsts.len();
        if !(MT == 6 || MT == 8)
            || !CB.is_multiple_of(8)
            || n != MT
            || dsts[n - 1] != dsts[0] + n - 1
        {
            return false;
        }
        let zero = _mm256_setzero_ps();
        for group in 0..CB / 8 {
            if 8 * group >= o.nco {
                break;
            }
            // Rows: positions 0..MT of channels 8*group..8*group+8 (zero past MT).
            let mut r = [zero; 8];
            for (j, row) in r.iter_mut().enumerate().take(MT) {
                // SAFETY: `tile` has MT rows of CB floats, and 8 * group + 8 <= CB.
                *row = unsafe { _mm256_loadu_ps(tile[j].as_ptr().cast::<f32>().add(8 * group)) };
            }
            // Channel c of this group: positions 0..MT in lanes 0..MT.
            let cols = super::avx2_transpose::transpose8(r);
            for (c8, &col) in cols.iter().enumerate() {
                let c = 8 * group + c8;
                if c >= o.nco {
                    break;
                }
                let co = o.co0 + c;
                let at = dsts[0] + co * o.ohw;
                let bv = _mm256_set1_ps(o.epi.bias.map_or(0.0, |b| b[co]));
                let rv = match o.epi.res {
                    Some(r) => {
                        let r = &r[at..at + MT];
                        // SAFETY: `r` holds MT floats: 8, or 4 at 0 and 2 at 4.
                        unsafe {
                            if MT == 8 {
                                _mm256_loadu_ps(r.as_ptr())
                            } else {
                                let lo = _mm_loadu_ps(r.as_ptr());
                                let hi =
                                    _mm_castpd_ps(_mm_load_sd(r.as_ptr().add(4).cast::<f64>()));
                                _mm256_set_m128(hi, lo)
                            }
                        }
                    }
                    None => zero,
                };
                let mut v = _mm256_add_ps(_mm256_add_ps(col, bv), rv);
                if o.epi.relu {
                    v = _mm256_max_ps(zero, v);
                }
                // SAFETY: positions `at..at + MT` of this channel belong to this chunk alone
                // (masked stores are microcoded on AMD: a 4-lane and a 2-lane store instead).
                unsafe {
                    let y = o.y.0.add(at);
                    if MT == 8 {
                        _mm256_storeu_ps(y, v);
                    } else {
                        _mm_storeu_ps(y, _mm256_castps256_ps128(v));
                        _mm_store_sd(
                            y.add(4).cast::<f64>(),
                            _mm_castps_pd(_mm256_extractf128_ps::<1>(v)),
                        );
                    }
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ConvParams;

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// The vector pairing equals the scalar [`crate::bf16::pair`] word for word (rounding ties
    /// to even, subnormals, NaN, infinities), for every length up to 3 vectors and without a
    /// second half, and writes nothing past `n`.
    #[test]
    fn pair_words_match_the_scalar_pairs() {
        if !crate::bf16::available() {
            return;
        }
        let mut lo = values(48, 31);
        let hi = values(48, 32);
        lo[..6].copy_from_slice(&[
            f32::from_bits(0x3f80_8000), // a tie, rounds to even (down)
            f32::from_bits(0x3f81_8000), // a tie, rounds up
            1e-40,
            f32::NAN,
            f32::INFINITY,
            -0.0,
        ]);
        for n in 0..=48 {
            for with_hi in [true, false] {
                let mut dst = [std::mem::MaybeUninit::new(7u32); 48];
                pair_words(&lo, with_hi.then_some(&hi[..]), &mut dst[..n]);
                for (i, d) in dst.iter().enumerate() {
                    // SAFETY: every word was initialised above.
                    let got = unsafe { d.assume_init() };
                    let want = if i >= n {
                        7
                    } else {
                        crate::bf16::pair(lo[i], if with_hi { hi[i] } else { 0.0 })
                    };
                    assert_eq!(got, want, "n {n} word {i} hi {with_hi}");
                }
            }
        }
    }

    /// The input gradient's rotated weights packed straight from the layer's weights give the
    /// bits of packing `flip_transpose`'s copy, in f32 and in bf16: odd channel pairs, 3x3 and
    /// 5x5, partial output blocks.
    #[test]
    fn rotated_packing_matches_the_rotated_copy() {
        let mut ran = [0, 0];
        for &(b, cin, h, w, cout, k) in &[
            (2, 24, 11, 9, 40, 3),
            (1, 7, 13, 12, 70, 5),
            (1, 33, 9, 9, 20, 3),
        ] {
            let p = crate::ConvParams::new(1, k / 2);
            let g = Geom::new(&[b, cin, h, w], &[cout, cin, k, k], p).unwrap();
            let gt = crate::conv::transposed(&g).unwrap();
            let wt = values(cout * cin * k * k, 5);
            let dy = values(b * cout * g.ohw(), 6);
            let rot = crate::conv::flip_transpose(&g, &wt);
            let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
            if suitable(&gt) {
                let want = bits(forward(&gt, &dy, &rot, None, None, false));
                assert_eq!(bits(forward_flipped(&gt, &dy, &wt)), want, "f32 {g:?}");
                ran[0] += 1;
            }
            if crate::bf16::available() && suitable_bf16(&gt) {
                let want = bits(forward_bf16(&gt, &dy, &rot, None, None, false));
                assert_eq!(
                    bits(forward_bf16_flipped(&gt, &dy, &wt)),
                    want,
                    "bf16 {g:?}"
                );
                ran[1] += 1;
            }
        }
        if isa().is_some() {
            assert_eq!(ran[0], 2);
        }
        if isa().is_some() && crate::bf16::available() {
            assert_eq!(ran[1], 3);
        }
    }

    /// The weight gradient's transpose of `dy` (8 x 8 register blocks and scalar edges) puts
    /// every value where the plain loop does and leaves the padding lanes alone, at sizes that
    /// are and are not multiples of 8.
    #[test]
    fn transpose_into_matches_the_plain_loop() {
        for n in [1, 5, 8, 13, 16, 25, 64, 67] {
            for nc in [1usize, 3, 8, 12, 16] {
                for lw in [nc, nc.next_multiple_of(8), nc + 5] {
                    let src = values(nc * n, (n * 31 + nc) as u64);
                    let mut want = vec![-7.0f32; n * lw];
                    for c in 0..nc {
                        for m in 0..n {
                            want[m * lw + c] = src[c * n + m];
                        }
                    }
                    let same = |got: &[f32]| {
                        got.iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits())
                    };
                    let mut got = vec![-7.0f32; n * lw];
                    transpose_scalar(&src, n, &mut got, lw, 0..n, 0..nc);
                    assert!(same(&got), "scalar: n {n} nc {nc} lw {lw}");
                    for isa in crate::cpu::vector_isas() {
                        let mut got = vec![-7.0f32; n * lw];
                        transpose_into(&src, n, nc, &mut got, lw, isa);
                        assert!(same(&got), "{isa:?}: n {n} nc {nc} lw {lw}");
                    }
                }
            }
        }
    }

    /// Both instruction sets hand the same layers to the direct kernel: the weight bound counts
    /// channels, not blocks (16 wide on AVX2, 64 on AVX-512).
    #[test]
    fn both_isas_select_the_same_layers() {
        // (b, cin, h, w, cout, k, stride, padding, selected)
        let cases = [
            (2, 256, 17, 17, 256, 3, 1, 1, true),
            (16, 256, 5, 5, 256, 3, 1, 1, true),
            (16, 128, 9, 9, 256, 3, 2, 1, true),
            (2, 256, 33, 33, 60, 3, 1, 1, true),
            (2, 256, 33, 33, 257, 3, 1, 1, false),
            (2, 512, 9, 9, 512, 3, 1, 1, false),
            (2, 2048, 9, 9, 256, 3, 2, 1, false),
            (2, 3, 257, 257, 64, 7, 2, 3, true),
            (2, 64, 33, 33, 64, 1, 1, 0, false),
            (2, 256, 5, 5, 256, 3, 1, 1, false),
        ];
        for (b, cin, h, w, cout, k, s, p, want) in cases {
            let g = Geom::new(&[b, cin, h, w], &[cout, cin, k, k], ConvParams::new(s, p)).unwrap();
            for isa in [Isa::Avx2, Isa::Avx512] {
                assert_eq!(suits(&g, isa), want, "{isa:?} {g:?}");
            }
        }
    }

    /// The direct kernels (forward with bias and ReLU, weight gradient) of every instruction set
    /// this CPU has, against im2col + gemm, whatever `suitable` says: every tile width (1-4
    /// vectors, several blocks), strides 1-3, tiles that cross rows and images, positions that
    /// do not fill the last tile.
    /// Packed weights come from the cache only for the same weights: repeated calls give the
    /// same bits, a weight changed in place (not one the fingerprint samples) the new result,
    /// in f32 on every ISA and in bf16.
    #[test]
    fn packed_weights_are_reused_only_for_the_same_weights() {
        let g = Geom::new(&[2, 24, 10, 9], &[40, 24, 3, 3], ConvParams::new(1, 1)).unwrap();
        let x = values(2 * 24 * 90, 31);
        let mut wt = values(40 * 24 * 9, 32);
        let reference = |wt: &[f32]| crate::conv::forward_im2col(&g, &x, wt, None, false);
        let rel = |a: &[f32], r: &[f32]| {
            let scale = r.iter().fold(0f32, |m, v| m.max(v.abs()));
            a.iter().zip(r).fold(0f32, |m, (a, r)| m.max((a - r).abs())) / scale
        };
        for round in 0..2 {
            // 8,640 weights: the fingerprint samples every 135th; change weight 1 of channel 0.
            if round == 1 {
                wt[1] += 0.75;
            }
            let want = reference(&wt);
            for &isa in &crate::cpu::vector_isas() {
                let f = || forward_with(isa, &g, &x, &wt, false, None, None, false, false);
                let a = f();
                assert_eq!(a, f(), "{isa:?} round {round}: repeated call");
                assert!(rel(&a, &want) < 1e-5, "{isa:?} round {round}");
            }
            if crate::bf16::available() {
                let f = || forward_bf16(&g, &x, &wt, None, None, false);
                let a = f();
                assert_eq!(a, f(), "bf16 round {round}: repeated call");
                assert!(rel(&a, &want) < 1e-2, "bf16 round {round}");
                if round == 1 {
                    // Channel 0 moved by 0.75 x its inputs: far beyond bf16 rounding.
                    let old = {
                        let mut w0 = wt.clone();
                        w0[1] -= 0.75;
                        reference(&w0)
                    };
                    assert!(
                        rel(&a[..90], &old[..90]) > 0.05,
                        "bf16 kept the old weights"
                    );
                }
            }
        }
    }

    #[test]
    fn matches_im2col() {
        let isas = crate::cpu::vector_isas();
        if isas.is_empty() {
            // Without a vector unit the kernel must never be chosen.
            let g = Geom::new(&[2, 64, 17, 17], &[64, 64, 3, 3], ConvParams::new(1, 1)).unwrap();
            assert!(!suitable(&g));
            eprintln!("no AVX2 + FMA here: checked that the direct kernel is not selected");
            return;
        }
        // (b, cin, h, w, cout, k, stride, padding)
        let cases = [
            (1, 3, 9, 7, 5, 3, 1, 1),
            (2, 7, 11, 10, 16, 3, 2, 1),
            (3, 5, 8, 13, 33, 3, 1, 0),
            (2, 9, 12, 9, 48, 5, 2, 2),
            (1, 16, 7, 7, 64, 3, 1, 1),
            (2, 6, 15, 11, 130, 7, 3, 3),
            (5, 4, 3, 3, 20, 3, 1, 1),
            (2, 3, 10, 10, 9, 3, 1, 1),
            (1, 5, 9, 9, 24, 3, 1, 1),
        ];
        for &isa in &isas {
            for (i, &(b, cin, h, w, cout, k, s, p)) in cases.iter().enumerate() {
                let g =
                    Geom::new(&[b, cin, h, w], &[cout, cin, k, k], ConvParams::new(s, p)).unwrap();
                let x = values(b * cin * h * w, 3 * i as u64 + 1);
                let wt = values(cout * cin * k * k, 3 * i as u64 + 2);
                let bias = values(cout, 3 * i as u64 + 3);
                // The weight gradient, against gemm over the patch matrices.
                let dy = values(b * cout * g.ohw(), 3 * i as u64 + 4);
                let got = backward_weight_with(isa, l1_block(isa), &g, &x, &dy);
                let want = crate::conv::backward_weight_im2col(&g, &x, &dy);
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (j, (a, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - e).abs() <= 1e-5 * scale,
                        "{isa:?} case {i}: weight gradient {j} is {a}, im2col gives {e}"
                    );
                }
                let res = values(b * cout * g.ohw(), 3 * i as u64 + 5);
                for (relu, r) in [(false, None), (true, None), (true, Some(&res[..]))] {
                    let got = forward_with(isa, &g, &x, &wt, false, Some(&bias), r, relu, false);
                    let want = match r {
                        None => crate::conv::forward_im2col(&g, &x, &wt, Some(&bias), relu),
                        Some(r) => crate::conv::forward_im2col(&g, &x, &wt, Some(&bias), false)
                            .iter()
                            .zip(r)
                            .map(|(v, r)| (v + r).max(0.0))
                            .collect(),
                    };
                    assert_eq!(got.len(), want.len());
                    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                    for (j, (a, e)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (a - e).abs() <= 1e-5 * scale,
                            "{isa:?} case {i} relu {relu} residual {}: element {j} is {a}, im2col gives {e}",
                            r.is_some()
                        );
                    }
                }
            }
        }
    }

    /// Every pair of instruction sets this CPU has gives the same bits (forward with bias,
    /// residual and ReLU, weight gradient), so the measured choice cannot change a result.
    #[test]
    fn isas_agree_bit_for_bit() {
        let isas = crate::cpu::vector_isas();
        if isas.len() < 2 {
            eprintln!("one instruction set here ({isas:?}): no pair to compare");
            return;
        }
        for (i, &(b, cin, h, w, cout, k, s, p)) in
            [(2, 9, 13, 11, 70, 3, 1, 1), (3, 5, 17, 9, 20, 5, 2, 2)]
                .iter()
                .enumerate()
        {
            let g = Geom::new(&[b, cin, h, w], &[cout, cin, k, k], ConvParams::new(s, p)).unwrap();
            let x = values(b * cin * h * w, 11 + i as u64);
            let wt = values(cout * cin * k * k, 12 + i as u64);
            let bias = values(cout, 13);
            let res = values(b * cout * g.ohw(), 14);
            let dy = values(b * cout * g.ohw(), 15);
            let f = |isa| {
                forward_with(
                    isa,
                    &g,
                    &x,
                    &wt,
                    false,
                    Some(&bias),
                    Some(&res),
                    true,
                    false,
                )
            };
            let bw = |isa| backward_weight_with(isa, 256, &g, &x, &dy);
            for pair in isas.windows(2) {
                assert_eq!(f(pair[0]), f(pair[1]), "case {i}: forward {pair:?}");
                assert_eq!(
                    bw(pair[0]),
                    bw(pair[1]),
                    "case {i}: weight gradient {pair:?}"
                );
            }
        }
    }

    /// The micro-kernels specialised for 3x3 and 7x7 and the vector epilogue give the bits of
    /// the offset-table loop and the scalar epilogue: with and without bias, residual and ReLU,
    /// at strides 1 and 2, partial channel blocks, tiles across images, NaN and -0.0 inputs.
    #[test]
    fn specialised_kernels_agree_bit_for_bit() {
        for &isa in &crate::cpu::vector_isas() {
            for (i, &(b, cin, h, w, cout, k, s, p)) in [
                (2, 9, 13, 11, 24, 3, 1, 1),
                (2, 5, 16, 15, 40, 3, 2, 1),
                (2, 3, 23, 21, 20, 7, 2, 3),
                (3, 4, 5, 7, 16, 3, 1, 1),
                // A whole 64-channel block and a partial one (AVX-512: 6- and 12-row tiles).
                (2, 6, 12, 14, 70, 3, 1, 1),
            ]
            .iter()
            .enumerate()
            {
                let g =
                    Geom::new(&[b, cin, h, w], &[cout, cin, k, k], ConvParams::new(s, p)).unwrap();
                same_bits_over_epilogues(
                    &g,
                    21 + i as u64,
                    &format!("case {i} {isa:?}"),
                    |x, wt, bias, res, relu, generic| {
                        forward_with(isa, &g, x, wt, false, bias, res, relu, generic)
                    },
                );
            }
        }
    }

    /// The bf16 kernel's vector epilogue gives the scalar one's bits: tiles of 6 and 8 rows
    /// (outputs of 40-64 and 17-32 channels), bias, residual and ReLU, NaN and -0.0.
    #[test]
    fn bf16_vector_epilogue_agrees_bit_for_bit() {
        if !crate::bf16::available() {
            return;
        }
        for (i, &(b, cin, h, w, cout)) in
            [(2, 9, 13, 11, 64), (1, 6, 10, 17, 40), (2, 5, 9, 12, 24)]
                .iter()
                .enumerate()
        {
            let g = Geom::new(&[b, cin, h, w], &[cout, cin, 3, 3], ConvParams::new(1, 1)).unwrap();
            same_bits_over_epilogues(
                &g,
                41 + i as u64,
                &format!("bf16 case {i}"),
                |x, wt, bias, res, relu, scalar| {
                    let epi = Epilogue {
                        bias,
                        res,
                        relu,
                        vector_store: !scalar,
                    };
                    forward_bf16_from(&g, x, wt, false, epi)
                },
            );
        }
    }

    /// `run(x, w, bias, residual, relu, alt)` gives the same bits with `alt` false and true,
    /// with and without bias, residual and ReLU, on inputs holding a NaN and -0.0.
    #[allow(clippy::type_complexity)]
    fn same_bits_over_epilogues(
        g: &Geom,
        seed: u64,
        case: &str,
        run: impl Fn(&[f32], &[f32], Option<&[f32]>, Option<&[f32]>, bool, bool) -> Vec<f32>,
    ) {
        let mut x = values(g.b * g.cin * g.h * g.w, seed);
        x[5] = f32::NAN;
        x[17] = -0.0;
        let wt = values(g.cout * g.k(), seed + 1);
        let bias = values(g.cout, 23);
        let mut res = values(g.b * g.cout * g.ohw(), 24);
        res[3] = -0.0;
        for (with_bias, with_res, relu) in [
            (true, true, true),
            (false, false, false),
            (true, false, true),
            (false, true, false),
        ] {
            let f = |alt| {
                let (b, r) = (with_bias.then_some(&bias[..]), with_res.then_some(&res[..]));
                run(&x, &wt, b, r, relu, alt)
            };
            let (a, c) = (f(false), f(true));
            assert!(
                a.iter().zip(&c).all(|(a, c)| a.to_bits() == c.to_bits()),
                "{case} bias {with_bias} res {with_res} relu {relu}: the specialised kernels or \
                 the vector epilogue differ from the generic ones"
            );
        }
    }

    /// The measured choice: the faster candidate wins (the first unless another is at least 5%
    /// faster), is kept per key, and later calls run only it.
    #[test]
    fn fastest_measures_once_and_keeps_the_choice() {
        use std::sync::Mutex;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let cache = Mutex::new(std::collections::HashMap::new());
        let calls = [AtomicUsize::new(0), AtomicUsize::new(0)];
        // Candidate 0 sleeps 30 ms, candidate 1 2 ms: 1 wins and is the only one run after.
        let run = |c: usize| {
            calls[c].fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(if c == 0 {
                30
            } else {
                2
            }));
            c * 10
        };
        assert_eq!(fastest(&cache, "a", &[0, 1], run), 10);
        assert_eq!(fastest(&cache, "a", &[0, 1], run), 10);
        assert_eq!(fastest(&cache, "a", &[0, 1], run), 10);
        assert_eq!(calls[0].load(Ordering::SeqCst), 1);
        assert_eq!(calls[1].load(Ordering::SeqCst), 3);
        // Another key is measured afresh; a single candidate is never timed or cached.
        assert_eq!(fastest(&cache, "b", &[1, 0], run), 10);
        assert_eq!(fastest(&cache, "c", &[0], run), 0);
        assert!(!cache.lock().unwrap().contains_key("c"));
        assert_eq!(cache.lock().unwrap().len(), 2);
    }

    /// The weight gradient's position blocks follow the L2 size and stay in range.
    #[test]
    fn position_blocks_fit_the_caches() {
        for cb in [16, 64] {
            let p = position_blocks(cb);
            assert!(!p.is_empty() && p.len() <= 2);
            assert!(p.iter().all(|b| (64..=8192).contains(b)));
            // The first within half the L1d (or the smallest allowed), the last within L2.
            assert!(p[0] * cb * 4 <= (crate::cpu::l1d_bytes() / 2).max(64 * cb * 4));
            let last = *p.last().unwrap();
            assert!(last * cb * 4 <= crate::cpu::l2_bytes().max(256 * cb * 4 * 4));
        }
    }

    /// Every position block sums each weight gradient in the same order: the same bits.
    #[test]
    fn position_blocks_agree_bit_for_bit() {
        let Some(isa) = crate::cpu::vector_isa() else {
            eprintln!("no AVX2 + FMA here: nothing to compare");
            return;
        };
        // (b, cin, h, w, cout, k, stride, padding): a 7x7 stem and a 3x3 layer with several
        // blocks of positions in any block size tried (2 x 33 x 33 = 2,178 positions).
        for (b, cin, h, w, cout, k, s, pad) in
            [(2, 3, 65, 65, 20, 7, 2, 3), (2, 16, 33, 33, 24, 3, 1, 1)]
        {
            let g =
                Geom::new(&[b, cin, h, w], &[cout, cin, k, k], ConvParams::new(s, pad)).unwrap();
            let x = values(b * cin * h * w, 1);
            let dy = values(b * cout * g.ohw(), 2);
            let want = backward_weight_with(isa, 8192, &g, &x, &dy);
            for pb in [64, 100, 256, 1000] {
                let got = backward_weight_with(isa, pb, &g, &x, &dy);
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "position block {pb} differs from 8192"
                );
            }
            // The bf16 weight gradient's blocks of position pairs, likewise.
            if crate::bf16::available() {
                let want = backward_weight_bf16_with(8192, &g, &x, &dy);
                for pb in [64, 100, 256, 1000] {
                    let got = backward_weight_bf16_with(pb, &g, &x, &dy);
                    assert!(
                        got.iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "bf16: position block {pb} differs from 8192"
                    );
                }
            }
        }
    }
}
