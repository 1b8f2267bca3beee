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
    let (k, pad, s) = (g.kh, g.p.padding, g.p.stride);
    let (hp, wp) = (g.h + 2 * pad, g.w + 2 * pad);
    let plane = hp * wp;
    // The zero-padded input (the input itself without padding).
    let padded;
    let xp: &[f32] = if pad == 0 {
        x
    } else {
        let mut v = vec![0f32; g.b * g.cin * plane];
        v.par_chunks_mut(plane)
            .zip(x.par_chunks(g.h * g.w))
            .for_each(|(dst, src)| {
                for (r, row) in src.chunks_exact(g.w).enumerate() {
                    dst[(r + pad) * wp + pad..][..g.w].copy_from_slice(row);
                }
            });
        padded = v;
        &padded
    };
    // Weights packed per block of 64 output channels: `[block][cin][tap][64]`, zero lanes past
    // Cout.
    let taps = k * k;
    let kk = g.cin * taps;
    let blocks = g.cout.div_ceil(CO_BLOCK);
    let mut wpk = vec![0f32; blocks * kk * CO_BLOCK];
    wpk.par_chunks_mut(kk * CO_BLOCK)
        .enumerate()
        .for_each(|(bi, dst)| {
            for c in 0..CO_BLOCK.min(g.cout - bi * CO_BLOCK) {
                let co = bi * CO_BLOCK + c;
                for (i, &v) in w[co * kk..(co + 1) * kk].iter().enumerate() {
                    dst[i * CO_BLOCK + c] = v;
                }
            }
        });
    let toff: Vec<usize> = (0..taps).map(|t| (t / k) * wp + t % k).collect();

    let ohw = g.ohw();
    let total = g.b * ohw;
    let mut y = vec![0f32; g.b * g.cout * ohw];
    // Chunks of positions, a few per thread; each chunk does all channel blocks.
    let chunk = total
        .div_ceil(crate::par::threads() * 4)
        .next_multiple_of(24)
        .max(24);
    let out = SendPtr(y.as_mut_ptr());
    let job = |ci: usize| {
        let lo = ci * chunk;
        let hi = (lo + chunk).min(total);
        // Offset in `xp` of each position's window origin, and of its output channel 0 in `y`.
        let (base, dst): (Vec<usize>, Vec<usize>) = (lo..hi)
            .map(|pos| {
                let (b, m) = (pos / ohw, pos % ohw);
                let (oy, ox) = (m / g.ow, m % g.ow);
                (
                    b * g.cin * plane + oy * s * wp + ox * s,
                    b * g.cout * ohw + m,
                )
            })
            .unzip();
        for bi in 0..blocks {
            let co0 = bi * CO_BLOCK;
            let nco = CO_BLOCK.min(g.cout - co0);
            let wb = &wpk[bi * kk * CO_BLOCK..][..kk * CO_BLOCK];
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
    let chunks = total.div_ceil(chunk);
    if crate::par::is_sequential() {
        (0..chunks).for_each(job);
    } else {
        (0..chunks).into_par_iter().for_each(job);
    }
    y
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: chunks write disjoint positions of the output.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

struct Ctx<'a> {
    xp: &'a [f32],
    /// Packed weights of one channel block: `[cin][tap][64]`.
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

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn run<const MT: usize, const NV: usize>(
    _: &Ctx,
    _: &[usize],
    _: &[usize],
    _: usize,
    _: usize,
    _: usize,
    _: Option<&[f32]>,
    _: bool,
    _: SendPtr,
) {
    unreachable!("the direct kernel is selected only on x86-64 with AVX-512")
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
            wptr = unsafe { wptr.add(CO_BLOCK) };
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

    /// The direct kernel against im2col + gemm, whatever `suitable` says, with bias and ReLU:
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
