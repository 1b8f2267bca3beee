//! Direct convolution for f32 on AVX-512: no patch matrix, no packing of the activations.
//!
//! im2col + gemm writes a patch matrix `k*k` times the size of the input and the gemm then packs
//! it again; for the narrow layers of a small model (32-256 channels, 3-33 px maps) those two
//! passes cost a third of the convolution. Here the input is copied once into a zero-padded
//! buffer and the micro-kernel reads its values straight from it, broadcasting each to a row of
//! output channels: a tile of `MT` output positions x `16 * NV` output channels lives in
//! registers while the kernel walks all `Cin * k * k` taps, each tap one vector load of packed
//! weights per 16 channels and one broadcast per position. Positions are addressed one by one,
//! so strides, padding and tiles that cross rows or images cost nothing extra.

// Off x86-64 nothing here is selected (`suitable` is false) and the kernels are compiled out.
#![cfg_attr(
    not(target_arch = "x86_64"),
    allow(dead_code, unused, unreachable_code)
)]

use crate::conv::Geom;
use rayon::prelude::*;

/// Whether the direct kernel handles this convolution (and the CPU has AVX-512): square kernels
/// larger than 1x1 with at most 2,304 taps per output (256 channels at 3x3), over at least 128
/// output positions. Measured against im2col + gemm on the layers of the small model and of
/// ResNet-50 at 257 px: 1.1-1.5x faster in that range (the 7x7 stems and stride-2 layers gain
/// most), slower beyond it, where each output tile streams too many packed weights per use
/// (512 channels: 127 vs 146 GFLOP/s; 2,048: 48 vs 72) or too few tiles share the work.
pub(crate) fn suitable(g: &Geom) -> bool {
    available()
        && g.cout > 0
        && g.kh == g.kw
        && g.kh > 1
        && g.p.dilation == 1
        && (16..=2304).contains(&g.k())
        && g.b * g.ohw() >= 128
}

#[cfg(target_arch = "x86_64")]
fn available() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::env::var_os("RETINANET_NO_DIRECT_CONV").is_none()
            && std::arch::is_x86_feature_detected!("avx512f")
    })
}

#[cfg(not(target_arch = "x86_64"))]
fn available() -> bool {
    false
}

/// Output channels per block: four 16-lane vectors.
const CO_BLOCK: usize = 64;

/// `y = conv(x, w) (+ bias)`, then ReLU if asked; `x` `[B, Cin, H, W]`, `w` `[Cout, Cin, k, k]`,
/// `y` `[B, Cout, OH, OW]`. Call only when [`suitable`].
pub(crate) fn forward(
    g: &Geom,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
) -> Vec<f32> {
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("the direct kernel is selected only on x86-64 with AVX-512");
    let k = g.kh;
    let (wp, plane) = padded_dims(g);
    let xp = pad_input(g, x);
    let xp: &[f32] = &xp;
    // Weights packed per block of output channels: `[block][cin][tap][lanes]` (block `bi` at
    // `bi * kk * 64`), zero lanes past Cout.
    let taps = k * k;
    let kk = g.cin * taps;
    let blocks = g.cout.div_ceil(CO_BLOCK);
    let mut wpk = vec![0f32; blocked_len(g.cout, kk)];
    wpk.par_chunks_mut(kk * CO_BLOCK)
        .enumerate()
        .for_each(|(bi, dst)| {
            let lw = lanes(g.cout, bi);
            for c in 0..CO_BLOCK.min(g.cout - bi * CO_BLOCK) {
                let co = bi * CO_BLOCK + c;
                for (i, &v) in w[co * kk..(co + 1) * kk].iter().enumerate() {
                    dst[i * lw + c] = v;
                }
            }
        });
    let toff: Vec<usize> = (0..taps).map(|t| (t / k) * wp + t % k).collect();

    let ohw = g.ohw();
    let total = g.b * ohw;
    // Chunks of positions, a few per thread; each chunk does all channel blocks.
    let chunk = total
        .div_ceil(crate::par::threads() * 4)
        .next_multiple_of(24)
        .max(24);
    // Every output is written below: each chunk writes all channels of its positions.
    filled_later(g.b * g.cout * ohw, |y| {
        let out = SendPtr(y.as_mut_ptr().cast::<f32>());
        let job = |ci: usize| {
            let lo = ci * chunk;
            let hi = (lo + chunk).min(total);
            // Offset in `xp` of each position's window origin, and of its output channel 0 in `y`.
            let base = window_bases(g, lo..hi);
            let dst: Vec<usize> = (lo..hi)
                .map(|pos| (pos / ohw) * g.cout * ohw + pos % ohw)
                .collect();
            for bi in 0..blocks {
                let co0 = bi * CO_BLOCK;
                let nco = CO_BLOCK.min(g.cout - co0);
                let wb = block(&wpk, g.cout, kk, bi);
                let ctx = Ctx {
                    xp,
                    w: wb,
                    cin: g.cin,
                    plane,
                    toff: &toff,
                };
                // SAFETY: `available()` checked AVX-512F; every position of `base` reads its window
                // inside `xp` (Geom's output size keeps windows in the padded input), and the chunk
                // writes only its own positions of `y`.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    match nco.div_ceil(16) {
                        4 => run::<6, 4>(&ctx, &base, &dst, co0, nco, ohw, bias, relu, out),
                        3 => run::<6, 3>(&ctx, &base, &dst, co0, nco, ohw, bias, relu, out),
                        2 => run::<8, 2>(&ctx, &base, &dst, co0, nco, ohw, bias, relu, out),
                        _ => run::<12, 1>(&ctx, &base, &dst, co0, nco, ohw, bias, relu, out),
                    }
                }
            }
        };
        crate::par::for_each_index(total.div_ceil(chunk), job);
    })
}

/// Lanes of channel block `bi`: 64, or the last block's channels rounded up to whole vectors
/// (a 12-channel output streams 16 lanes of weights, not 64).
fn lanes(cout: usize, bi: usize) -> usize {
    (cout - bi * CO_BLOCK).min(CO_BLOCK).next_multiple_of(16)
}

/// Length of a buffer of `rows` rows per channel block, each `lanes` wide: block `bi` starts at
/// `bi * rows * 64` (only the last block may be narrower).
fn blocked_len(cout: usize, rows: usize) -> usize {
    let blocks = cout.div_ceil(CO_BLOCK);
    (blocks - 1) * rows * CO_BLOCK + rows * lanes(cout, blocks - 1)
}

/// Block `bi` of a [`blocked_len`] buffer.
fn block(buf: &[f32], cout: usize, rows: usize, bi: usize) -> &[f32] {
    &buf[bi * rows * CO_BLOCK..][..rows * lanes(cout, bi)]
}

/// A vector of `n` floats that the caller writes completely before reading: it skips the
/// zero-fill (a memset of every output and buffer here).
fn filled_later(n: usize, fill: impl FnOnce(&mut [std::mem::MaybeUninit<f32>])) -> Vec<f32> {
    let mut v: Vec<std::mem::MaybeUninit<f32>> = Vec::with_capacity(n);
    // SAFETY: MaybeUninit needs no initialisation.
    unsafe { v.set_len(n) };
    fill(&mut v);
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: `fill` wrote every element (the callers' contract); MaybeUninit<f32> and f32 share
    // their layout.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<f32>(), n, v.capacity()) }
}

/// Row length and plane size of the zero-padded input.
fn padded_dims(g: &Geom) -> (usize, usize) {
    let pad = g.p.padding;
    (g.w + 2 * pad, (g.h + 2 * pad) * (g.w + 2 * pad))
}

/// The input with `padding` zeros around every plane (the input itself without padding).
fn pad_input<'a>(g: &Geom, x: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
    use std::mem::MaybeUninit;
    let pad = g.p.padding;
    if pad == 0 {
        return x.into();
    }
    let (wp, plane) = padded_dims(g);
    let zero = MaybeUninit::new(0f32);
    let v = filled_later(g.b * g.cin * plane, |v| {
        v.par_chunks_mut(plane)
            .zip(x.par_chunks(g.h * g.w))
            .for_each(|(dst, src)| {
                // Every element once: top rows, each row's margins and values, bottom rows.
                dst[..pad * wp].fill(zero);
                for (r, row) in src.chunks_exact(g.w).enumerate() {
                    let d = &mut dst[(r + pad) * wp..][..wp];
                    d[..pad].fill(zero);
                    for (o, &i) in d[pad..pad + g.w].iter_mut().zip(row) {
                        *o = MaybeUninit::new(i);
                    }
                    d[pad + g.w..].fill(zero);
                }
                dst[(g.h + pad) * wp..].fill(zero);
            })
    });
    v.into()
}

/// Offset in the padded input of each output position's window origin, over the whole batch.
fn window_bases(g: &Geom, positions: std::ops::Range<usize>) -> Vec<usize> {
    let (wp, plane) = padded_dims(g);
    let (ohw, s) = (g.ohw(), g.p.stride);
    positions
        .map(|pos| {
            let (b, m) = (pos / ohw, pos % ohw);
            b * g.cin * plane + (m / g.ow) * s * wp + (m % g.ow) * s
        })
        .collect()
}

/// Weight gradient `dW[co][ci][ty][tx] = Σ_pos dy[co][pos] · x_padded[ci][window(pos) + (ty, tx)]`
/// for a [`suitable`] convolution, `[Cout, Cin, k, k]`.
///
/// The same register tile as the forward pass with the roles turned: 16-lane vectors of output
/// channels (from `dy` transposed to `[pos][64]` per channel block) times `MT` taps broadcast
/// from the input, summed over positions. Threads take disjoint sets of taps, and walk the
/// positions in blocks whose transposed `dy` stays in cache.
pub(crate) fn backward_weight(g: &Geom, x: &[f32], dy: &[f32]) -> Vec<f32> {
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("the direct kernel is selected only on x86-64 with AVX-512");
    let k = g.kh;
    let (wp, plane) = padded_dims(g);
    let xp = pad_input(g, x);
    let xp: &[f32] = &xp;
    let ohw = g.ohw();
    let total = g.b * ohw;
    let blocks = g.cout.div_ceil(CO_BLOCK);
    // dy as [block][pos][lanes] (block `bi` at `bi * total * 64`), zero lanes past Cout.
    let mut dyt = vec![0f32; blocked_len(g.cout, total)];
    for (bi, blk) in dyt.chunks_mut(total * CO_BLOCK).enumerate() {
        let lw = lanes(g.cout, bi);
        blk.par_chunks_mut(ohw * lw)
            .enumerate()
            .for_each(|(b, dst)| {
                // 16 positions at a time: their rows of `dst` (4 KiB) stay in L1 while every
                // channel is scattered into them.
                for m0 in (0..ohw).step_by(16) {
                    let m1 = (m0 + 16).min(ohw);
                    for c in 0..CO_BLOCK.min(g.cout - bi * CO_BLOCK) {
                        let src = &dy[(b * g.cout + bi * CO_BLOCK + c) * ohw..][m0..m1];
                        for (m, &v) in (m0..m1).zip(src) {
                            dst[m * lw + c] = v;
                        }
                    }
                }
            });
    }
    let base = window_bases(g, 0..total);
    let taps = k * k;
    let kk = g.cin * taps;
    // Offset of each (ci, tap) from a window origin.
    let koff: Vec<usize> = (0..kk)
        .map(|i| (i / taps) * plane + (i % taps / k) * wp + i % k)
        .collect();
    let mut dw = vec![0f32; g.cout * kk];
    // Tasks: (channel block, group of taps); each owns its entries of dw.
    let group = 48;
    let groups = kk.div_ceil(group);
    let out = SendPtr(dw.as_mut_ptr());
    // Positions per block: 64 channels x 1,024 positions = 256 KiB of dy, kept in L2.
    let pblock = 1024;
    let job = |t: usize| {
        let (bi, gi) = (t / groups, t % groups);
        let co0 = bi * CO_BLOCK;
        let nco = CO_BLOCK.min(g.cout - co0);
        let offs = &koff[gi * group..((gi + 1) * group).min(kk)];
        let dyb = block(&dyt, g.cout, total, bi);
        let ctx = WCtx {
            xp,
            base: &base,
            dyt: dyb,
        };
        // SAFETY: AVX-512F is available (`suitable`); every window read lies inside `xp`, and
        // this task writes only its own taps of `dw`.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            match nco.div_ceil(16) {
                4 => wrun::<6, 4>(&ctx, offs, gi * group, co0, nco, kk, pblock, out),
                3 => wrun::<6, 3>(&ctx, offs, gi * group, co0, nco, kk, pblock, out),
                2 => wrun::<8, 2>(&ctx, offs, gi * group, co0, nco, kk, pblock, out),
                _ => wrun::<12, 1>(&ctx, offs, gi * group, co0, nco, kk, pblock, out),
            }
        }
    };
    crate::par::for_each_index(blocks * groups, job);
    dw
}

struct WCtx<'a> {
    xp: &'a [f32],
    /// Window origin of every position.
    base: &'a [usize],
    /// `dy` of one channel block, `[pos][16 * NV]`.
    dyt: &'a [f32],
}

/// Weight-gradient tiles of `MT` taps (`offs`, starting at tap index `k0`) for one channel block,
/// summed over all positions in blocks of `pblock`, written to `dw[co][k0 + j]`.
#[allow(clippy::too_many_arguments)]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn wrun<const MT: usize, const NV: usize>(
    ctx: &WCtx,
    offs: &[usize],
    k0: usize,
    co0: usize,
    nco: usize,
    kk: usize,
    pblock: usize,
    out: SendPtr,
) {
    use std::arch::x86_64::*;
    let total = ctx.base.len();
    let tiles = offs.len().div_ceil(MT);
    let mut acc = vec![[[_mm512_setzero_ps(); NV]; MT]; tiles];
    for p0 in (0..total).step_by(pblock) {
        let p1 = (p0 + pblock).min(total);
        for (ti, a) in acc.iter_mut().enumerate() {
            let o = &offs[ti * MT..((ti + 1) * MT).min(offs.len())];
            let mut off = [o[0]; MT];
            off[..o.len()].copy_from_slice(o);
            // SAFETY: as in `backward_weight`.
            unsafe { wmicro::<MT, NV>(ctx, &off, p0..p1, a) };
        }
    }
    let mut tile = [[0f32; 64]; MT];
    for (ti, a) in acc.iter().enumerate() {
        for (row, av) in tile.iter_mut().zip(a) {
            for (v, &x) in av.iter().enumerate() {
                unsafe { _mm512_storeu_ps(row.as_mut_ptr().add(16 * v), x) };
            }
        }
        let n = MT.min(offs.len() - ti * MT);
        for c in 0..nco {
            for (j, row) in tile.iter().enumerate().take(n) {
                // SAFETY: in bounds; this task owns taps k0.. of its channel block.
                unsafe { *out.0.add((co0 + c) * kk + k0 + ti * MT + j) = row[c] };
            }
        }
    }
}

/// `acc[j][v] += Σ_{pos in range} dy[pos][16v..16v+16] · x[base[pos] + off[j]]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn wmicro<const MT: usize, const NV: usize>(
    ctx: &WCtx,
    off: &[usize; MT],
    range: std::ops::Range<usize>,
    acc: &mut [[std::arch::x86_64::__m512; NV]; MT],
) {
    use std::arch::x86_64::*;
    let mut a = *acc;
    let xp = ctx.xp.as_ptr();
    for pos in range {
        let d = unsafe { ctx.dyt.as_ptr().add(pos * 16 * NV) };
        let mut dv = [_mm512_setzero_ps(); NV];
        for (v, r) in dv.iter_mut().enumerate() {
            *r = unsafe { _mm512_loadu_ps(d.add(16 * v)) };
        }
        let xb = unsafe { xp.add(*ctx.base.get_unchecked(pos)) };
        for j in 0..MT {
            let xv = _mm512_set1_ps(unsafe { *xb.add(off[j]) });
            for v in 0..NV {
                a[j][v] = _mm512_fmadd_ps(dv[v], xv, a[j][v]);
            }
        }
    }
    *acc = a;
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: chunks write disjoint positions of the output.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

struct Ctx<'a> {
    xp: &'a [f32],
    /// Packed weights of one channel block: `[cin][tap][16 * NV]`.
    w: &'a [f32],
    cin: usize,
    plane: usize,
    toff: &'a [usize],
}

/// Tiles of `MT` positions over `base` for one block of output channels, written with bias and
/// ReLU at `dst[j] + co * ohw` of `out`.
#[allow(clippy::too_many_arguments)]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn run<const MT: usize, const NV: usize>(
    ctx: &Ctx,
    base: &[usize],
    dst: &[usize],
    co0: usize,
    nco: usize,
    ohw: usize,
    bias: Option<&[f32]>,
    relu: bool,
    out: SendPtr,
) {
    let mut tile = [[0f32; 64]; MT];
    for (bases, dsts) in base.chunks(MT).zip(dst.chunks(MT)) {
        let mut b = [bases[0]; MT];
        b[..bases.len()].copy_from_slice(bases);
        // SAFETY: as in `forward`.
        unsafe { micro::<MT, NV>(ctx, &b, &mut tile) };
        for c in 0..nco {
            let co = co0 + c;
            let bv = bias.map_or(0.0, |bb| bb[co]);
            for (row, &d) in tile.iter().zip(dsts) {
                let v = row[c] + bv;
                let v = if relu && v < 0.0 { 0.0 } else { v };
                // SAFETY: in bounds, and this position belongs to this chunk alone.
                unsafe { *out.0.add(d + co * ohw) = v };
            }
        }
    }
}

/// The register tile: `acc[j][v]` = output channels `16v..16v+16` of position `j`, summed over
/// every input channel and tap.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn micro<const MT: usize, const NV: usize>(
    ctx: &Ctx,
    base: &[usize; MT],
    tile: &mut [[f32; 64]; MT],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); NV]; MT];
    let xp = ctx.xp.as_ptr();
    let mut wptr = ctx.w.as_ptr();
    for c in 0..ctx.cin {
        let xc = unsafe { xp.add(c * ctx.plane) };
        for &t in ctx.toff {
            let mut wv = [_mm512_setzero_ps(); NV];
            for (v, r) in wv.iter_mut().enumerate() {
                *r = unsafe { _mm512_loadu_ps(wptr.add(16 * v)) };
            }
            let xt = unsafe { xc.add(t) };
            for j in 0..MT {
                let xv = _mm512_set1_ps(unsafe { *xt.add(base[j]) });
                for v in 0..NV {
                    acc[j][v] = _mm512_fmadd_ps(wv[v], xv, acc[j][v]);
                }
            }
            wptr = unsafe { wptr.add(16 * NV) };
        }
    }
    for (row, a) in tile.iter_mut().zip(&acc) {
        for (v, &av) in a.iter().enumerate() {
            unsafe { _mm512_storeu_ps(row.as_mut_ptr().add(16 * v), av) };
        }
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

    /// The direct kernels (forward with bias and ReLU, weight gradient) against im2col + gemm,
    /// whatever `suitable` says:
    /// every tile width (1-4 vectors, several blocks), strides 1-3, tiles that cross rows and
    /// images, positions that do not fill the last tile.
    #[test]
    fn matches_im2col() {
        if !available() {
            // Without AVX-512 the kernel must never be chosen.
            let g = Geom::new(&[2, 64, 17, 17], &[64, 64, 3, 3], ConvParams::new(1, 1)).unwrap();
            assert!(!suitable(&g));
            eprintln!("no AVX-512 here: checked that the direct kernel is not selected");
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
        ];
        for (i, &(b, cin, h, w, cout, k, s, p)) in cases.iter().enumerate() {
            let g = Geom::new(&[b, cin, h, w], &[cout, cin, k, k], ConvParams::new(s, p)).unwrap();
            let x = values(b * cin * h * w, 3 * i as u64 + 1);
            let wt = values(cout * cin * k * k, 3 * i as u64 + 2);
            let bias = values(cout, 3 * i as u64 + 3);
            // The weight gradient, against gemm over the patch matrices.
            let dy = values(b * cout * g.ohw(), 3 * i as u64 + 4);
            let got = backward_weight(&g, &x, &dy);
            let want = crate::conv::backward_weight_im2col(&g, &x, &dy);
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (j, (a, e)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - e).abs() <= 1e-5 * scale,
                    "case {i}: weight gradient {j} is {a}, im2col gives {e}"
                );
            }
            for relu in [false, true] {
                let got = forward(&g, &x, &wt, Some(&bias), relu);
                let want = crate::conv::forward_im2col(&g, &x, &wt, Some(&bias), relu);
                assert_eq!(got.len(), want.len());
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (j, (a, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - e).abs() <= 1e-5 * scale,
                        "case {i} relu {relu}: element {j} is {a}, im2col gives {e}"
                    );
                }
            }
        }
    }
}
