//! Winograd F(2x2, 3x3) for stride-1, dilation-1 3x3 convolutions.
//!
//! Each 2x2 output tile comes from a 4x4 input tile: with `V = Bᵀ d B` (input tile),
//! `U = G g Gᵀ` (kernel) and `Y = Aᵀ (U ⊙ V) A`, the products over input channels become 16
//! independent matrix products `M[ξ] = U[ξ] · V[ξ]` (`[Cout, Cin] x [Cin, tiles]`), 16 multiplies
//! per tile and channel pair where im2col + gemm needs 36. The transform matrices hold only 0,
//! ±1 and ±½, so the results stay within float rounding of the direct sum.
//!
//! Layouts: `U` is `[16][Cout][Cin]`; tiles of the whole batch are processed in blocks of
//! [`TILE_BLOCK`], with `V` as `[16][Cin][tiles]` and `M` as `[16][Cout][tiles]`, so each of the 16
//! products reads and writes contiguous matrices that are still in cache.

use crate::conv::{Geom, gemm};
use crate::par::SendPtr;
use candle_core::WithDType;
use rayon::prelude::*;

/// Whether Winograd applies and pays off for this convolution: at least one full block of tiles
/// (on small maps the kernel transform and small products cost more than they save: 2x512x9x9
/// runs 2x slower than im2col + gemm) and [`MIN_CHANNELS`] channels in and out.
pub(crate) fn suitable(g: &Geom) -> bool {
    let (th, tw) = tiles(g);
    g.b * th * tw >= TILE_BLOCK
        && g.kh == 3
        && g.kw == 3
        && g.p.stride == 1
        && g.p.dilation == 1
        && g.p.padding <= 2
        && g.cin >= MIN_CHANNELS
        && g.cout >= MIN_CHANNELS
}

/// Narrower convolutions run faster through im2col + gemm: the 16 products have too small an
/// inner dimension (measured: 16x64x17x17 64->64 takes 1.7x as long with Winograd, 16x128x9x9
/// 1.2x; 2x256x33x33 256->256 is 10% faster, 1x256x81x81 15%).
pub(crate) const MIN_CHANNELS: usize = 256;

/// `U = G g Gᵀ` for every `(co, ci)`, as `[Cout][16][Cin]`. `flip_transpose` uses the kernel
/// `g'[ci][co] = rot180(g[co][ci])` instead (the input-gradient convolution), with the roles of
/// `cin`/`cout` already swapped by the caller.
fn kernel_transform<T: WithDType>(
    w: &[T],
    cout: usize,
    cin: usize,
    flip_transpose: bool,
) -> Vec<T> {
    let mut u = vec![T::zero(); cout * 16 * cin];
    let half = T::from_f64(0.5);
    let plane = cout * cin;
    let up = SendPtr(u.as_mut_ptr());
    (0..cout).into_par_iter().for_each(|co| {
        let up = &up;
        for ci in 0..cin {
            let mut g = [T::zero(); 9];
            for (i, v) in g.iter_mut().enumerate() {
                *v = if flip_transpose {
                    // `w` is the original `[cin, cout, 3, 3]` (its output channels are our
                    // inputs): tap `i` of the rotated kernel is tap `8 - i` of the original.
                    w[(ci * cout + co) * 9 + (8 - i)]
                } else {
                    w[(co * cin + ci) * 9 + i]
                };
            }
            // t = G g: 4x3.
            let mut t = [T::zero(); 12];
            for c in 0..3 {
                let (g0, g1, g2) = (g[c], g[3 + c], g[6 + c]);
                t[c] = g0;
                t[3 + c] = (g0 + g1 + g2) * half;
                t[6 + c] = (g0 - g1 + g2) * half;
                t[9 + c] = g2;
            }
            // U = t Gᵀ: 4x4.
            for r in 0..4 {
                let (a0, a1, a2) = (t[r * 3], t[r * 3 + 1], t[r * 3 + 2]);
                let row = [a0, (a0 + a1 + a2) * half, (a0 - a1 + a2) * half, a2];
                for (c, &v) in row.iter().enumerate() {
                    // SAFETY: index < 16 * plane = u.len(); each (co, ci) pair is written by
                    // exactly one task.
                    unsafe { *up.0.add((r * 4 + c) * plane + co * cin + ci) = v };
                }
            }
        }
    });
    u
}

/// Tile grid of one image: `(tiles_h, tiles_w)`.
fn tiles(g: &Geom) -> (usize, usize) {
    (g.oh.div_ceil(2), g.ow.div_ceil(2))
}

/// Tiles per block: one block's `V` and `M` (`16 x channels x TILE_BLOCK` each) stay in cache
/// from the transform through the 16 products to the inverse transform.
const TILE_BLOCK: usize = 256;

/// Tiles per block for `nt` tiles on `threads` threads: at most [`TILE_BLOCK`], in a number of
/// equal blocks that is a multiple of the thread count. Blocks of exactly 256 left a thread idle
/// for a quarter to a third of the layer on 2 cores (41x41 maps: blocks of 256 and 185 tiles;
/// 2x33x33: three blocks); 221 and 221, or four of 145, keep both busy.
fn block_tiles(nt: usize, threads: usize) -> usize {
    let n = nt.div_ceil(TILE_BLOCK).next_multiple_of(threads.max(1));
    nt.div_ceil(n).max(1)
}

/// The convolution of `x` (`[B, Cin, H, W]`) with a 3x3 kernel given as `U` (already
/// transformed, `[16][Cout][Cin]`), plus bias and ReLU. Blocks of tiles run in parallel, each
/// transform -> 16 single-threaded gemms -> inverse transform.
fn run<T: WithDType>(g: &Geom, x: &[T], u: &[T], bias: Option<&[T]>, relu: bool) -> Vec<T> {
    let (th, tw) = tiles(g);
    let tpi = th * tw;
    let nt = g.b * tpi;
    let (cin, cout, oh, ow) = (g.cin, g.cout, g.oh, g.ow);
    let mut y = crate::par::zeroed::<T>(g.b * cout * oh * ow);
    let yp = SendPtr(y.as_mut_ptr());
    let block = block_tiles(nt, crate::par::threads());
    let n_blocks = nt.div_ceil(block);
    (0..n_blocks).into_par_iter().for_each(|blk| {
        let yp = &yp;
        let t0 = blk * block;
        let tb = block.min(nt - t0);
        crate::par::with_scratch(16 * (cin + cout) * tb, |buf: &mut [T]| {
            let (v, m) = buf.split_at_mut(16 * cin * tb);
            input_block(g, x, t0, tb, v);
            for xi in 0..16 {
                gemm(
                    cout,
                    tb,
                    cin,
                    &mut m[xi * cout * tb..(xi + 1) * cout * tb],
                    tb,
                    false,
                    &u[xi * cout * cin..(xi + 1) * cout * cin],
                    (cin, 1),
                    &v[xi * cin * tb..(xi + 1) * cin * tb],
                    (tb, 1),
                    1,
                    false,
                );
            }
            // Y = Aᵀ M A per tile, written into [B, Cout, OH, OW].
            for co in 0..cout {
                let b0 = bias.map_or(T::zero(), |b| b[co]);
                for j in 0..tb {
                    let t = t0 + j;
                    let (bi, r) = (t / tpi, t % tpi);
                    let (ty, tx) = (r / tw, r % tw);
                    let mut mm = [T::zero(); 16];
                    for (xi, val) in mm.iter_mut().enumerate() {
                        *val = m[(xi * cout + co) * tb + j];
                    }
                    let mut q = [T::zero(); 8];
                    for c in 0..4 {
                        let (m0, m1, m2, m3) = (mm[c], mm[4 + c], mm[8 + c], mm[12 + c]);
                        q[c] = m0 + m1 + m2;
                        q[4 + c] = m1 - m2 - m3;
                    }
                    let base = (bi * cout + co) * oh * ow;
                    for rr in 0..2 {
                        let oy = 2 * ty + rr;
                        if oy >= oh {
                            break;
                        }
                        let (a0, a1, a2, a3) =
                            (q[rr * 4], q[rr * 4 + 1], q[rr * 4 + 2], q[rr * 4 + 3]);
                        let vals = [a0 + a1 + a2 + b0, a1 - a2 - a3 + b0];
                        for (c, &val) in vals.iter().enumerate() {
                            let ox = 2 * tx + c;
                            if ox < ow {
                                let val = if relu && val < T::zero() {
                                    T::zero()
                                } else {
                                    val
                                };
                                // SAFETY: (bi, co, oy, ox) is inside y, and each output
                                // element belongs to exactly one tile, hence one block.
                                unsafe { *yp.0.add(base + oy * ow + ox) = val };
                            }
                        }
                    }
                }
            }
        });
    });
    y
}

/// `V = Bᵀ d B` for tiles `t0..t0 + tb` (of the whole batch) and every input channel, into
/// `v` laid out `[16][Cin][tb]`.
fn input_block<T: WithDType>(g: &Geom, x: &[T], t0: usize, tb: usize, v: &mut [T]) {
    let (th, tw) = tiles(g);
    let tpi = th * tw;
    let (h, w, p) = (g.h as isize, g.w as isize, g.p.padding as isize);
    let cin = g.cin;
    for ci in 0..cin {
        // Walk the tiles with running (image, row, column) counters: no divisions per tile.
        let (mut bi, mut ty, mut tx) = (t0 / tpi, (t0 % tpi) / tw, t0 % tw);
        for j in 0..tb {
            if j > 0 {
                tx += 1;
                if tx == tw {
                    tx = 0;
                    ty += 1;
                    if ty == th {
                        ty = 0;
                        bi += 1;
                    }
                }
            }
            let plane = &x[(bi * cin + ci) * g.h * g.w..][..g.h * g.w];
            let (y0, x0) = ((2 * ty) as isize - p, (2 * tx) as isize - p);
            let mut d = [T::zero(); 16];
            if y0 >= 0 && y0 + 4 <= h && x0 >= 0 && x0 + 4 <= w {
                let base = y0 as usize * g.w + x0 as usize;
                for rr in 0..4 {
                    d[rr * 4..rr * 4 + 4].copy_from_slice(&plane[base + rr * g.w..][..4]);
                }
            } else {
                for rr in 0..4 {
                    let yy = y0 + rr as isize;
                    if yy < 0 || yy >= h {
                        continue;
                    }
                    for c in 0..4 {
                        let xx = x0 + c as isize;
                        if xx >= 0 && xx < w {
                            d[rr * 4 + c] = plane[yy as usize * g.w + xx as usize];
                        }
                    }
                }
            }
            // Rows: Bᵀ d, then columns: (Bᵀ d) B.
            let mut q = [T::zero(); 16];
            for c in 0..4 {
                let (d0, d1, d2, d3) = (d[c], d[4 + c], d[8 + c], d[12 + c]);
                q[c] = d0 - d2;
                q[4 + c] = d1 + d2;
                q[8 + c] = d2 - d1;
                q[12 + c] = d1 - d3;
            }
            for rr in 0..4 {
                let (a0, a1, a2, a3) = (q[rr * 4], q[rr * 4 + 1], q[rr * 4 + 2], q[rr * 4 + 3]);
                let o = (rr * 4 * cin + ci) * tb + j;
                v[o] = a0 - a2;
                v[o + cin * tb] = a1 + a2;
                v[o + 2 * cin * tb] = a2 - a1;
                v[o + 3 * cin * tb] = a1 - a3;
            }
        }
    }
}

/// Forward pass of a [`suitable`] convolution.
pub(crate) fn forward<T: WithDType>(
    g: &Geom,
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    relu: bool,
) -> Vec<T> {
    let u = kernel_transform(w, g.cout, g.cin, false);
    run(g, x, &u, bias, relu)
}

/// Input gradient of a [`suitable`] convolution: the stride-1 convolution of `dy` with the
/// rotated, transposed kernel and padding `2 - p`.
pub(crate) fn backward_input<T: WithDType>(g: &Geom, dy: &[T], w: &[T]) -> Vec<T> {
    let gt = crate::conv::transposed(g).expect("a suitable convolution has a transposed form");
    let u = kernel_transform(w, gt.cout, gt.cin, true);
    run(&gt, dy, &u, None, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_share_out_evenly() {
        for nt in [1, 7, 185, 256, 441, 578, 1681, 10_000] {
            for threads in [1, 2, 3, 16] {
                let b = block_tiles(nt, threads);
                let n = nt.div_ceil(b);
                assert!(
                    b <= TILE_BLOCK && b * n >= nt,
                    "{nt} tiles, {threads} threads: {b}"
                );
                // Whole rounds of blocks, none much smaller than the others.
                if nt >= TILE_BLOCK * threads {
                    assert!(
                        n % threads == 0 || n * b - nt < b,
                        "{nt}/{threads}: {n} x {b}"
                    );
                }
            }
        }
        assert_eq!(block_tiles(441, 2), 221);
        assert_eq!(block_tiles(578, 2), 145);
    }
    use crate::ConvParams;
    use crate::conv::{backward_input_im2col, forward_im2col};

    /// Winograd against the im2col path it replaces, on geometries that take it (the paddings
    /// 0, 1, 2, partial last tiles and a partial block).
    #[test]
    fn matches_im2col_forward_and_input_gradient() {
        let c = MIN_CHANNELS;
        for (padding, h, w) in [(0, 25, 23), (1, 23, 22), (2, 21, 19)] {
            let g = Geom::new(&[2, c, h, w], &[c, c, 3, 3], ConvParams::new(1, padding)).unwrap();
            assert!(suitable(&g), "{g:?}");
            let det = |n: usize, s: f32| -> Vec<f32> {
                (0..n)
                    .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * s)
                    .collect()
            };
            let x = det(2 * c * h * w, 1.0);
            let wt = det(c * c * 9, 0.05);
            let b = det(c, 1.0);
            let dy = det(2 * c * g.oh * g.ow, 1.0);
            let close = |what: &str, a: &[f32], r: &[f32]| {
                let scale = r.iter().fold(0f32, |m, v| m.max(v.abs()));
                let err = a.iter().zip(r).fold(0f32, |m, (a, r)| m.max((a - r).abs()));
                assert!(
                    err <= 1e-5 * scale,
                    "{what}, padding {padding}: {err} vs {scale}"
                );
            };
            for relu in [false, true] {
                close(
                    "forward",
                    &forward(&g, &x, &wt, Some(&b), relu),
                    &forward_im2col(&g, &x, &wt, Some(&b), relu),
                );
            }
            close(
                "input gradient",
                &backward_input(&g, &dy, &wt),
                &backward_input_im2col(&g, &dy, &wt),
            );
        }
    }
}
