//! Winograd F(4x4, 3x3) for f32 stride-1, dilation-1 3x3 convolutions with many channels.
//!
//! Each 4x4 output tile comes from a 6x6 input tile: `V = Bᵀ d B`, `U = G g Gᵀ`,
//! `Y = Aᵀ (U ⊙ V) A`. The interpolation points are 0, ±1, ½, -2 and ∞, with `Bᵀ`'s rows scaled to
//! integers: in f32 its error is a third of the common choice's (0, ±1, ±2: 1e-5 of the output's
//! magnitude at 2,304 terms, 3e-6 here; the direct sum's is 6e-7). The products over input channels
//! become 36 independent matrix products, 36 multiplies per tile and channel pair where
//! F(2x2, 3x3) ([`crate::winograd`]) needs 64 for the same 16 outputs and im2col + gemm 144.
//!
//! Everything here runs on vectors of [`L`] channels: the input is first copied into 8-channel
//! blocks (`[B][Cin/8][H'][W'][8]`, zero-padded to whole tiles, so the transform has no border
//! cases), and the matrices of one block of tiles are channel-contiguous (`V[36][tiles][Cin]`,
//! `U[36][Cin][Cout]`, `M[36][tiles][Cout]`), so both transforms are plain 8-lane arithmetic.

use crate::conv::{Geom, gemm};
use crate::cpu::Isa;
use crate::par::SendPtr;
use rayon::prelude::*;

/// Channels per vector of the transforms (one AVX2 register; AVX-512 machines run the same code).
const L: usize = 8;

/// A vector of `L` channels.
type V = [f32; L];

/// Whether F(4x4, 3x3) applies and pays off: a 3x3 stride-1 convolution, and by measurement
/// (old path against this one per layer, alternating, Zen 3):
/// - 128+ input channels with the last tiles overhanging the map by at most half its area
///   (2x128x33x33: 1.2x faster, 1x256x25x25 1.3x, 1x256x81x81 2x, 2x256x17x17 (20x20 covered)
///   1.3x, 4x256x13x13 1.05x; 9x9 maps, 12x12 covered, are no faster); 64+ channels only where the
///   overhang is at most an eighth (64 -> 64 at 65x65 and 161x161: 1.3-1.5x faster, at 33x33,
///   19% overhang, 7% slower than the direct kernel);
/// - [`MIN_OUT`] output channels (the output transform per tile needs products to repay it);
/// - [`MIN_TILES`] tiles, and many more where `U` outgrows the caches (512 -> 512: at 144 tiles
///   no faster, at 162 1.26x): the kernel transform writes 36 x Cin x Cout floats per call.
pub(crate) fn suitable(g: &Geom) -> bool {
    let (th, tw) = tiles(g);
    let (area, out) = (16 * th * tw, g.oh * g.ow);
    let tiles = g.b * th * tw;
    let u_bytes = 36 * g.cin.next_multiple_of(L) * g.cout.next_multiple_of(NR) * 4;
    g.kh == 3
        && g.kw == 3
        && g.p.stride == 1
        && g.p.dilation == 1
        && g.p.padding <= 2
        && g.cout >= MIN_OUT
        && ((g.cin >= 128 && 2 * area <= 3 * out) || (g.cin >= 64 && 8 * area <= 9 * out))
        && tiles >= MIN_TILES
        && (u_bytes <= U_CACHED || tiles >= MANY_TILES)
}

/// Fewest output channels: the output transform per tile is not repaid by few products
/// (256 -> 180 at 81x81: 2.4x faster than the direct kernel; 256 -> 60 at 33x33 1.08x, 256 -> 12
/// 25% slower).
const MIN_OUT: usize = 48;

/// Fewest tiles (of the whole batch): 1x256x21x21 (36 tiles) is 1.4x faster, 1x256x13x13 (16) no
/// faster.
const MIN_TILES: usize = 32;

/// Largest transformed kernel `U` for [`MIN_TILES`]; beyond it [`MANY_TILES`].
const U_CACHED: usize = 16 << 20;

/// Tiles that repay a transformed kernel larger than [`U_CACHED`].
const MANY_TILES: usize = 160;

/// Tile grid of one image: `(tiles_h, tiles_w)`.
fn tiles(g: &Geom) -> (usize, usize) {
    (g.oh.div_ceil(4), g.ow.div_ceil(4))
}

/// `U = G g Gᵀ` for every `(ci, co)` into `u`, as `[36][coutp / NR][cinp][NR]` (panels of
/// [`NR`] output channels, each `cinp x NR` contiguous for the products; padded channels zero).
/// `flip_transpose` uses `g'[ci][co] = rot180(g[co][ci])` (the input gradient), with `cin`/`cout`
/// already swapped by the caller. One task per panel, so each writes 36 contiguous runs.
fn kernel_transform(
    w: &[f32],
    cout: usize,
    cin: usize,
    flip_transpose: bool,
    avx2: bool,
    u: &mut [f32],
) {
    let (cinp, coutp) = (cin.next_multiple_of(L), cout.next_multiple_of(NR));
    assert_eq!(u.len(), 36 * cinp * coutp);
    let up = SendPtr(u.as_mut_ptr());
    (0..coutp / NR).into_par_iter().for_each(|p| {
        kernel_panel(avx2, w, cout, cin, flip_transpose, p, &up, avx2);
    });
}

/// Panel `p` of every `U[ξ]` (all `cinp` rows, zeros past `cout` and for `ci >= cin`), 8 input
/// channels at a time: their 16 outputs' taps are first copied into `a` (contiguous runs of `w`:
/// 72 floats per output), then turned channel-major by 8x8 transposes, so the strided gather
/// from `w` (rows `9 * cin` floats apart) is one pass of whole runs.
#[inline(always)]
fn kernel_panel_body(
    w: &[f32],
    cout: usize,
    cin: usize,
    flip_transpose: bool,
    p: usize,
    u: &SendPtr<f32>,
    wide: bool,
) {
    const T: usize = 9 * L;
    let (cinp, coutp) = (cin.next_multiple_of(L), cout.next_multiple_of(NR));
    let plane = cinp * coutp;
    // a[r][ci_l * 9 + i]: tap i of the kernel from input cb * L + ci_l to output p * NR + r.
    let mut a = [[0f32; T]; NR];
    for cb in 0..cinp / L {
        // cb * L < cin: cinp rounds cin up to whole blocks.
        let n = L.min(cin - cb * L);
        for (r, row) in a.iter_mut().enumerate() {
            let co = p * NR + r;
            if co >= cout {
                row.fill(0.0);
                continue;
            }
            if flip_transpose {
                // `w` is the original `[cin, cout, 3, 3]`: tap `i` of the rotated kernel is
                // tap `8 - i` of the original.
                for ci_l in 0..n {
                    let src = &w[((cb * L + ci_l) * cout + co) * 9..][..9];
                    for (i, d) in row[ci_l * 9..][..9].iter_mut().enumerate() {
                        *d = src[8 - i];
                    }
                }
            } else {
                row[..9 * n].copy_from_slice(&w[(co * cin + cb * L) * 9..][..9 * n]);
            }
            row[9 * n..].fill(0.0);
        }
        for ob in 0..NR / L {
            // k[j][l] = a[ob * L + l][j]: the taps as vectors over 8 output channels.
            let mut k = [[0f32; L]; T];
            let rows = &a[ob * L..][..L];
            #[cfg(target_arch = "x86_64")]
            if wide {
                // SAFETY: AVX2 (`wide` is `use_avx2()`); 8 rows of T floats, T a multiple of 8.
                unsafe { transpose_rows(rows, &mut k) };
            }
            if !cfg!(target_arch = "x86_64") || !wide {
                for (l, row) in rows.iter().enumerate() {
                    for (kj, &v) in k.iter_mut().zip(row) {
                        kj[l] = v;
                    }
                }
            }
            let obg = p * NR / L + ob;
            for ci_l in 0..L {
                let ci = cb * L + ci_l;
                let ut = transform2d::<3, 6, KernelPass>(|r, c| k[ci_l * 9 + r * 3 + c]);
                for (r, row) in ut.iter().enumerate() {
                    for (c, val) in row.iter().enumerate() {
                        let o = (r * 6 + c) * plane + (p * cinp + ci) * NR + obg * L % NR;
                        // SAFETY: o + L <= 36 * plane; panel p of each U[ξ] belongs to this task.
                        unsafe { std::ptr::copy_nonoverlapping(val.as_ptr(), u.0.add(o), L) };
                    }
                }
            }
        }
    }
}

/// `k[j][l] = rows[l][j]` through 8x8 register transposes.
///
/// # Safety
/// AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn transpose_rows<const T: usize>(rows: &[[f32; T]], k: &mut [V; T]) {
    use std::arch::x86_64::*;
    assert!(rows.len() == L && T.is_multiple_of(L));
    for j0 in (0..T).step_by(L) {
        // SAFETY: row l holds T floats from 0, so 8 from j0 < T.
        let r: [__m256; L] =
            std::array::from_fn(|l| unsafe { _mm256_loadu_ps(rows[l][j0..].as_ptr()) });
        let t = crate::direct::avx2_transpose::transpose8(r);
        for (i, v) in t.into_iter().enumerate() {
            // SAFETY: k[j0 + i] holds 8 floats.
            unsafe { _mm256_storeu_ps(k[j0 + i].as_mut_ptr(), v) };
        }
    }
}

/// The input in 8-channel blocks, `[B][cinp/8][hp][wp][8]`, where row `r` and column `c` hold
/// `x[.., r - p, c - p]` (zero outside the image and in the padded channels): every tile's 6x6
/// window is inside, whatever the padding and the overhang of the last tiles.
fn pack_input(g: &Geom, x: &[f32], hp: usize, wp: usize, xb: &mut [f32], avx2: bool) {
    let blk = hp * wp * L;
    assert_eq!(xb.len(), g.b * g.cin.div_ceil(L) * blk);
    xb.par_chunks_mut(blk).enumerate().for_each(|(i, dst)| {
        pack_block(avx2, g, x, hp, wp, i, dst, avx2);
    });
}

/// Block `i` (image `i / blocks`, channels `(i % blocks) * L..`) of [`pack_input`].
#[inline(always)]
fn pack_block_body(
    g: &Geom,
    x: &[f32],
    hp: usize,
    wp: usize,
    i: usize,
    dst: &mut [f32],
    wide: bool,
) {
    let cb_n = g.cin.div_ceil(L);
    let (h, w, p) = (g.h, g.w, g.p.padding);
    let (b, cb) = (i / cb_n, i % cb_n);
    dst.fill(0.0);
    // Rows and columns past the window (overhang larger than the padding) are never read by a
    // tile: clip to the packed extent.
    let (rows, cols) = (h.min(hp - p), w.min(wp - p));
    let plane = |l: usize| &x[(b * g.cin + cb * L + l) * h * w..][..h * w];
    // Columns `..done` through register transposes where all L channels exist.
    let done = if cfg!(target_arch = "x86_64") && wide && cb * L + L <= g.cin {
        cols / 8 * 8
    } else {
        0
    };
    #[cfg(target_arch = "x86_64")]
    for r in 0..rows {
        for c0 in (0..done).step_by(8) {
            let src: [*const f32; 8] =
                std::array::from_fn(|l| plane(l)[r * w + c0..][..8].as_ptr());
            let o = &mut dst[((r + p) * wp + p + c0) * L..][..8 * L];
            // SAFETY: AVX2 (`done > 0` only when `wide`, which is `use_avx2()`); the eight rows
            // hold 8 floats from `c0` (c0 + 8 <= cols <= w) and `o` holds 64.
            unsafe { avx2_store::columns(src, o.as_mut_ptr()) };
        }
    }
    for l in 0..L {
        if cb * L + l >= g.cin {
            break;
        }
        let pl = plane(l);
        for r in 0..rows {
            let out = &mut dst[((r + p) * wp + p) * L..];
            for c in done..cols {
                out[c * L + l] = pl[r * w + c];
            }
        }
    }
}

/// `G` applied to three vectors (a column or a row of the 3x3 kernel). In f32: computing `U` in
/// f64 and rounding once measured no more accurate (the transforms of the input dominate).
#[inline(always)]
fn g6(k: &[V; 3]) -> [V; 6] {
    let [a, b, c] = k;
    // Reciprocals rather than divisions.
    [
        lanes(|l| 0.5 * a[l]),
        lanes(|l| (a[l] + b[l] + c[l]) * (1.0 / 6.0)),
        lanes(|l| -(a[l] - b[l] + c[l]) * (1.0 / 6.0)),
        lanes(|l| -(16.0 * a[l] + 8.0 * b[l] + 4.0 * c[l]) * (1.0 / 15.0)),
        lanes(|l| (a[l] - 2.0 * b[l] + 4.0 * c[l]) * (1.0 / 30.0)),
        lanes(|l| 0.5 * c[l]),
    ]
}

/// The vector whose lane `l` is `f(l)` (a plain loop: `array::from_fn` left calls to its
/// closure shims in the AVX2 builds).
#[inline(always)]
fn lanes(f: impl Fn(usize) -> f32) -> V {
    let mut v = [0f32; L];
    for (l, x) in v.iter_mut().enumerate() {
        *x = f(l);
    }
    v
}

/// Column transform `Bᵀ d` of six vectors.
#[inline(always)]
fn bt(d: &[V; 6]) -> [V; 6] {
    let [d0, d1, d2, d3, d4, d5] = d;
    [
        lanes(|l| 2.0 * (d0[l] - 2.0 * d2[l] + d4[l]) - 3.0 * (d1[l] - d3[l])),
        lanes(|l| 2.0 * (d4[l] - d1[l]) + d2[l] + 5.0 * d3[l]),
        lanes(|l| 2.0 * (d1[l] + d4[l]) - 5.0 * d2[l] + d3[l]),
        lanes(|l| 2.0 * (d3[l] - d1[l]) - d2[l] + d4[l]),
        lanes(|l| 2.0 * (d4[l] - d2[l]) + d1[l] - d3[l]),
        lanes(|l| 2.0 * (d1[l] - 2.0 * d3[l] + d5[l]) - 3.0 * (d2[l] - d4[l])),
    ]
}

/// Output transform `Aᵀ m` of six vectors.
#[inline(always)]
fn at(m: &[V; 6]) -> [V; 4] {
    let a = lanes(|l| m[1][l] + m[2][l]);
    let b = lanes(|l| m[1][l] - m[2][l]);
    let (m3, m4) = (&m[3], &m[4]);
    [
        lanes(|l| m[0][l] + a[l] + m3[l] + m4[l]),
        lanes(|l| b[l] + 0.5 * m3[l] - 2.0 * m4[l]),
        lanes(|l| a[l] + 0.25 * m3[l] + 4.0 * m4[l]),
        lanes(|l| b[l] + 0.125 * m3[l] - 8.0 * m4[l] + m[5][l]),
    ]
}

/// One pass of a 2-D transform: `N` vectors (a column or a row of a tile) to `R`.
///
/// A trait rather than a function argument: a function item passed as `impl Fn` runs through a
/// `Fn::call` shim that LLVM left out of line, compiled without AVX2 (SSE code, and `vzeroupper`
/// around every call), three times slower than the inlined transform.
trait Pass<const N: usize, const R: usize> {
    fn pass(v: &[V; N]) -> [V; R];
}

/// `G` (the kernel transform, 3 -> 6).
struct KernelPass;
/// `Bᵀ` (the input transform, 6 -> 6).
struct InputPass;
/// `Aᵀ` (the output transform, 6 -> 4).
struct OutputPass;

impl Pass<3, 6> for KernelPass {
    #[inline(always)]
    fn pass(v: &[V; 3]) -> [V; 6] {
        g6(v)
    }
}

impl Pass<6, 6> for InputPass {
    #[inline(always)]
    fn pass(v: &[V; 6]) -> [V; 6] {
        bt(v)
    }
}

impl Pass<6, 4> for OutputPass {
    #[inline(always)]
    fn pass(v: &[V; 6]) -> [V; 4] {
        at(v)
    }
}

/// `P` applied to the columns of the `N x N` tile `load(r, c)`, then to the rows of the result:
/// `F d Fᵀ`, `R x R` (the input and output transforms: 6 -> 6 and 6 -> 4; the kernel's: 3 -> 6).
#[inline(always)]
fn transform2d<const N: usize, const R: usize, P: Pass<N, R>>(
    load: impl Fn(usize, usize) -> V,
) -> [[V; R]; R] {
    // cols[c][r]: column c transformed.
    let mut cols = [[[0f32; L]; R]; N];
    for (c, col) in cols.iter_mut().enumerate() {
        let mut v = [[0f32; L]; N];
        for (r, vr) in v.iter_mut().enumerate() {
            *vr = load(r, c);
        }
        *col = P::pass(&v);
    }
    let mut out = [[[0f32; L]; R]; R];
    for (r, o) in out.iter_mut().enumerate() {
        let mut v = [[0f32; L]; N];
        for (c, vc) in v.iter_mut().enumerate() {
            *vc = cols[c][r];
        }
        *o = P::pass(&v);
    }
    out
}

#[inline(always)]
fn load(s: &[f32]) -> V {
    s[..L].try_into().unwrap()
}

/// Shapes of one convolution's tiles.
struct Plan<'a> {
    g: &'a Geom,
    th: usize,
    tw: usize,
    hp: usize,
    wp: usize,
    cinp: usize,
    coutp: usize,
}

/// `V = Bᵀ d B` of tiles `t0 + j` for `j` in `js`, every channel block, into `v`
/// (`[36][tg][cinp]`, the group's tiles `t0..t0 + tg`; these rows belong to the caller).
#[inline(always)]
fn input_tiles_body(
    pl: &Plan,
    xb: &[f32],
    t0: usize,
    tg: usize,
    js: std::ops::Range<usize>,
    v: &SendPtr<f32>,
) {
    let (cb_n, tpi, blk) = (pl.cinp / L, pl.th * pl.tw, pl.hp * pl.wp * L);
    for j in js {
        let t = t0 + j;
        let (bi, ty, tx) = (t / tpi, (t % tpi) / pl.tw, t % pl.tw);
        let base = (4 * ty * pl.wp + 4 * tx) * L;
        for cb in 0..cb_n {
            let src = &xb[(bi * cb_n + cb) * blk..][..blk];
            let vt =
                transform2d::<6, 6, InputPass>(|r, c| load(&src[base + (r * pl.wp + c) * L..]));
            // Stored as V[ξ = r * 6 + c][j][cb * L..].
            for (r, row) in vt.iter().enumerate() {
                for (c, val) in row.iter().enumerate() {
                    let o = ((r * 6 + c) * tg + j) * pl.cinp + cb * L;
                    // SAFETY: o + L <= 36 * tg * cinp; row j of each V[ξ] is this task's.
                    unsafe { std::ptr::copy_nonoverlapping(val.as_ptr(), v.0.add(o), L) };
                }
            }
        }
    }
}

/// `Y = Aᵀ M A` (+ bias, + residual, ReLU) of tiles `t0 + j`, `j` in `js`, from `m`
/// (`[36][tg][coutp]`) into `y` (`[B, Cout, OH, OW]`, shared: each output element belongs to one
/// tile).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn output_tiles_body(
    pl: &Plan,
    m: &[f32],
    t0: usize,
    tg: usize,
    js: std::ops::Range<usize>,
    bias: Option<&[f32]>,
    res: Option<&[f32]>,
    relu: bool,
    y: &SendPtr<f32>,
    wide: bool,
) {
    let g = pl.g;
    let (tpi, ohw) = (pl.th * pl.tw, g.oh * g.ow);
    for j in js {
        let t = t0 + j;
        let (bi, ty, tx) = (t / tpi, (t % tpi) / pl.tw, t % pl.tw);
        let (oy0, ox0) = (4 * ty, 4 * tx);
        let (nr, nc) = ((g.oh - oy0).min(4), (g.ow - ox0).min(4));
        for ob in 0..pl.coutp / L {
            let out = transform2d::<6, 4, OutputPass>(|r, c| {
                load(&m[((r * 6 + c) * tg + j) * pl.coutp + ob * L..])
            });
            let bv: V = match bias {
                Some(b) if ob * L + L <= g.cout => load(&b[ob * L..]),
                Some(b) => std::array::from_fn(|l| b.get(ob * L + l).copied().unwrap_or(0.0)),
                None => [0.0; L],
            };
            #[cfg(target_arch = "x86_64")]
            if wide && nr == 4 && nc == 4 && ob * L + L <= g.cout {
                let at = (bi * g.cout + ob * L) * ohw + oy0 * g.ow + ox0;
                // SAFETY: AVX2 (`wide` is passed as `use_avx2()`); the tile's L channels x 4 x 4
                // outputs are inside `y` and `res` (same shape, checked by `run`) and belong to
                // this tile alone.
                unsafe {
                    avx2_store::tile(
                        &out,
                        &bv,
                        res.map(<[f32]>::as_ptr),
                        relu,
                        y.0,
                        at,
                        ohw,
                        g.ow,
                    )
                };
                continue;
            }
            let _ = wide;
            for l in 0..L {
                let co = ob * L + l;
                if co >= g.cout {
                    break;
                }
                let plane = (bi * g.cout + co) * ohw;
                for (r, orow) in out.iter().enumerate().take(nr) {
                    let at = plane + (oy0 + r) * g.ow + ox0;
                    for (c, ov) in orow.iter().enumerate().take(nc) {
                        let mut s = ov[l] + bv[l];
                        if let Some(res) = res {
                            s += res[at + c];
                        }
                        if relu && s < 0.0 {
                            s = 0.0;
                        }
                        // SAFETY: (bi, co, oy0 + r, ox0 + c) is inside the output and belongs
                        // to this tile alone.
                        unsafe { *y.0.add(at + c) = s };
                    }
                }
            }
        }
    }
}

/// `$name(avx2, args..)` runs `$body(args..)`, compiled for AVX2 + FMA when `avx2` (the 8-lane
/// loops of the transforms become single instructions) and for the baseline otherwise.
macro_rules! avx2_or_plain {
    ($name:ident => $body:ident ($($a:ident : $t:ty),* $(,)?)) => {
        #[allow(clippy::too_many_arguments)]
        fn $name(avx2: bool, $($a: $t),*) {
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2,fma")]
                fn fast($($a: $t),*) {
                    $body($($a),*)
                }
                // SAFETY: callers pass `avx2` only as `use_avx2()`: the CPU has both.
                unsafe { fast($($a),*) };
                return;
            }
            let _ = avx2;
            $body($($a),*)
        }
    };
}

avx2_or_plain!(kernel_panel => kernel_panel_body(
    w: &[f32], cout: usize, cin: usize, flip_transpose: bool, p: usize, u: &SendPtr<f32>,
    wide: bool,
));
avx2_or_plain!(input_tiles => input_tiles_body(
    pl: &Plan, xb: &[f32], t0: usize, tg: usize, js: std::ops::Range<usize>, v: &SendPtr<f32>,
));
avx2_or_plain!(output_tiles => output_tiles_body(
    pl: &Plan, m: &[f32], t0: usize, tg: usize, js: std::ops::Range<usize>,
    bias: Option<&[f32]>, res: Option<&[f32]>, relu: bool, y: &SendPtr<f32>, wide: bool,
));
avx2_or_plain!(pack_block => pack_block_body(
    g: &Geom, x: &[f32], hp: usize, wp: usize, i: usize, dst: &mut [f32], wide: bool,
));

/// Full output tiles through 8x8 register transposes: channel vectors to rows of 4.
#[cfg(target_arch = "x86_64")]
mod avx2_store {
    use super::{L, V};
    use std::arch::x86_64::*;

    /// Writes `out[r][c][l] + bias[l]` (+ `res`, ReLU) at `y[at + l * ohw + r * ow + c]`: the
    /// same operations in the same order as the scalar path, so the same bits.
    ///
    /// # Safety
    /// AVX2; every written (and `res`-read) index inside the buffers.
    #[target_feature(enable = "avx2")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile(
        out: &[[V; 4]; 4],
        bias: &V,
        res: Option<*const f32>,
        relu: bool,
        y: *mut f32,
        at: usize,
        ohw: usize,
        ow: usize,
    ) {
        const { assert!(L == 8) };
        // SAFETY: as the function's contract.
        unsafe {
            let b = _mm256_loadu_ps(bias.as_ptr());
            let zero = _mm256_setzero_ps();
            for h in 0..2 {
                // Rows 2h and 2h + 1 of the tile: positions p = rr * 4 + c.
                let mut r = [zero; 8];
                for (p, v) in r.iter_mut().enumerate() {
                    *v = _mm256_add_ps(_mm256_loadu_ps(out[2 * h + p / 4][p % 4].as_ptr()), b);
                }
                let t = crate::direct::avx2_transpose::transpose8(r);
                for (l, &tl) in t.iter().enumerate() {
                    let o = at + l * ohw + 2 * h * ow;
                    let mut v = tl;
                    if let Some(res) = res {
                        let lo = _mm_loadu_ps(res.add(o));
                        let hi = _mm_loadu_ps(res.add(o + ow));
                        v = _mm256_add_ps(v, _mm256_set_m128(hi, lo));
                    }
                    if relu {
                        // max(0, v) keeps v where it is NaN or -0.0, as `v < 0` does.
                        v = _mm256_max_ps(zero, v);
                    }
                    _mm_storeu_ps(y.add(o), _mm256_castps256_ps128(v));
                    _mm_storeu_ps(y.add(o + ow), _mm256_extractf128_ps::<1>(v));
                }
            }
        }
    }

    /// `dst[j * L + l] = rows[l][j]` for `j < 8`: eight columns of eight channel rows.
    ///
    /// # Safety
    /// AVX2; `rows[l]` readable for 8 floats, `dst` writable for 64.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(super) unsafe fn columns(rows: [*const f32; 8], dst: *mut f32) {
        // SAFETY: as the function's contract.
        unsafe {
            let t = crate::direct::avx2_transpose::transpose8(rows.map(|r| _mm256_loadu_ps(r)));
            for (j, &v) in t.iter().enumerate() {
                _mm256_storeu_ps(dst.add(j * L), v);
            }
        }
    }
}

/// Output channels per panel of `U` (two AVX2 vectors).
const NR: usize = 16;

/// Rows (tiles) of the product's register tile: 6 x 2 accumulators + 2 panel vectors + 1
/// broadcast of the 16 ymm registers.
const MR: usize = 6;

/// Input channels per pass over a panel: `KC x NR` floats (16 KiB) stay in L1 while every tile
/// of the task streams past them.
const KC: usize = 256;

/// `m[r][..] = Σ_ci v[r][ci] · U[ci][..]` for `rows` tiles, `U` in panels (`[coutp / NR][cinp][NR]`),
/// `v` `[rows][cinp]`, `m` `[rows][coutp]`, on the micro-kernel of `isa` (`None`: the gemm crate).
fn products(
    isa: Option<Isa>,
    rows: usize,
    cinp: usize,
    coutp: usize,
    v: &[f32],
    u: &[f32],
    m: &mut [f32],
) {
    assert!(v.len() >= rows * cinp && m.len() >= rows * coutp && u.len() >= cinp * coutp);
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: the CPU has AVX-512F (`isa` comes from `cpu::vector_isa()`, which only names
        // what the CPU has); the asserts bound every access.
        Some(Isa::Avx512) => return unsafe { avx512_products::run(rows, cinp, coutp, v, u, m) },
        // SAFETY: as above, AVX2 and FMA.
        Some(Isa::Avx2) => return unsafe { avx2_products::run(rows, cinp, coutp, v, u, m) },
        None => {}
    }
    let _ = isa;
    for p in 0..coutp / NR {
        gemm(
            rows,
            NR,
            cinp,
            &mut m[p * NR..],
            coutp,
            false,
            v,
            (cinp, 1),
            &u[p * cinp * NR..(p + 1) * cinp * NR],
            (NR, 1),
            1,
            false,
        );
    }
}

/// The AVX-512 products: register tiles of up to 6 tiles x 4 panels (64 output channels, one
/// zmm per panel: 24 accumulators + 4 panel vectors + 1 broadcast of the 32 registers), twice
/// the AVX2 tile's width per instruction and 10 loads per 24 multiply-adds where it has 8 per 12.
/// The 4 panels' `kc` rows stay in half the L1 while every tile streams past them.
#[cfg(target_arch = "x86_64")]
mod avx512_products {
    use super::NR;
    use std::arch::x86_64::*;

    const MR: usize = 6;
    const NP: usize = 4;

    /// Input channels per pass: 4 panels of `kc x NR` floats in half the L1 data cache (96 on
    /// 48 KiB, 64 on 32 KiB), a multiple of 8, at least 32.
    fn kc() -> usize {
        ((crate::cpu::l1d_bytes() / 2) / (NP * NR * 4) / 8 * 8).max(32)
    }

    /// See [`super::products`].
    ///
    /// # Safety
    /// AVX-512F; the slices as asserted by the caller.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn run(
        rows: usize,
        cinp: usize,
        coutp: usize,
        v: &[f32],
        u: &[f32],
        m: &mut [f32],
    ) {
        let panels = coutp / NR;
        let kc_most = kc();
        // SAFETY: as the function's contract; every tile reads `r <= rows - r0` rows of `v` from
        // `r0`, `kc` channels from `k0`, and writes `np` panels of `m` from panel `p0`.
        unsafe {
            for p0 in (0..panels).step_by(NP) {
                let np = NP.min(panels - p0);
                for k0 in (0..cinp).step_by(kc_most) {
                    let kc = kc_most.min(cinp - k0);
                    let up = u.as_ptr().add((p0 * cinp + k0) * NR);
                    let mut r0 = 0;
                    while r0 < rows {
                        let vp = v.as_ptr().add(r0 * cinp + k0);
                        let mp = m.as_mut_ptr().add(r0 * coutp + p0 * NR);
                        let a = (kc, vp, cinp, up, cinp * NR, mp, coutp, k0 > 0);
                        macro_rules! panels {
                            ($r:literal) => {
                                match np {
                                    1 => tile::<$r, 1>(a),
                                    2 => tile::<$r, 2>(a),
                                    3 => tile::<$r, 3>(a),
                                    _ => tile::<$r, NP>(a),
                                }
                            };
                        }
                        match rows - r0 {
                            1 => panels!(1),
                            2 => panels!(2),
                            3 => panels!(3),
                            4 => panels!(4),
                            5 => panels!(5),
                            _ => panels!(6),
                        }
                        r0 += MR;
                    }
                }
            }
        }
    }

    /// `(kc, v, ldv, u, ldu, m, ldm, acc)`: `kc` channels of `R` rows of `v` (stride `ldv`),
    /// `P` panels of `u` (stride `ldu`), into `m` (stride `ldm`), added to it when `acc`.
    type Args = (
        usize,
        *const f32,
        usize,
        *const f32,
        usize,
        *mut f32,
        usize,
        bool,
    );

    /// `R` rows of `P` panels.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile<const R: usize, const P: usize>(a: Args) {
        let (kc, v, ldv, u, ldu, m, ldm, acc) = a;
        // SAFETY: as the function's contract.
        unsafe {
            let mut c = [[_mm512_setzero_ps(); P]; R];
            for i in 0..kc {
                let mut w = [_mm512_setzero_ps(); P];
                for (p, w) in w.iter_mut().enumerate() {
                    *w = _mm512_loadu_ps(u.add(p * ldu + i * NR));
                }
                for (r, c) in c.iter_mut().enumerate() {
                    let b = _mm512_set1_ps(*v.add(r * ldv + i));
                    for (c, w) in c.iter_mut().zip(&w) {
                        *c = _mm512_fmadd_ps(b, *w, *c);
                    }
                }
            }
            for (r, c) in c.iter().enumerate() {
                for (p, &c) in c.iter().enumerate() {
                    let o = m.add(r * ldm + p * NR);
                    let x = if acc {
                        _mm512_add_ps(c, _mm512_loadu_ps(o))
                    } else {
                        c
                    };
                    _mm512_storeu_ps(o, x);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2_products {
    use super::{KC, MR, NR};
    use std::arch::x86_64::*;

    /// See [`super::products`]; panel by panel, `KC` input channels at a time, `MR` tiles a
    /// register tile.
    ///
    /// # Safety
    /// AVX2 and FMA; the slices as asserted by the caller.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn run(
        rows: usize,
        cinp: usize,
        coutp: usize,
        v: &[f32],
        u: &[f32],
        m: &mut [f32],
    ) {
        // SAFETY: as the function's contract.
        unsafe {
            for p in 0..coutp / NR {
                for k0 in (0..cinp).step_by(KC) {
                    let kc = KC.min(cinp - k0);
                    let up = u.as_ptr().add((p * cinp + k0) * NR);
                    let mut r0 = 0;
                    while r0 < rows {
                        let vp = v.as_ptr().add(r0 * cinp + k0);
                        let mp = m.as_mut_ptr().add(r0 * coutp + p * NR);
                        let acc = k0 > 0;
                        match rows - r0 {
                            1 => tile::<1>(kc, vp, cinp, up, mp, coutp, acc),
                            2 => tile::<2>(kc, vp, cinp, up, mp, coutp, acc),
                            3 => tile::<3>(kc, vp, cinp, up, mp, coutp, acc),
                            4 => tile::<4>(kc, vp, cinp, up, mp, coutp, acc),
                            5 => tile::<5>(kc, vp, cinp, up, mp, coutp, acc),
                            _ => tile::<MR>(kc, vp, cinp, up, mp, coutp, acc),
                        }
                        r0 += MR;
                    }
                }
            }
        }
    }

    /// `R` rows of `NR` outputs over `kc` input channels, added to `m` when `acc`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile<const R: usize>(
        kc: usize,
        v: *const f32,
        ldv: usize,
        u: *const f32,
        m: *mut f32,
        ldm: usize,
        acc: bool,
    ) {
        // SAFETY: as the function's contract.
        unsafe {
            let mut c0 = [_mm256_setzero_ps(); R];
            let mut c1 = [_mm256_setzero_ps(); R];
            for i in 0..kc {
                let u0 = _mm256_loadu_ps(u.add(i * NR));
                let u1 = _mm256_loadu_ps(u.add(i * NR + 8));
                for r in 0..R {
                    let b = _mm256_broadcast_ss(&*v.add(r * ldv + i));
                    c0[r] = _mm256_fmadd_ps(b, u0, c0[r]);
                    c1[r] = _mm256_fmadd_ps(b, u1, c1[r]);
                }
            }
            for r in 0..R {
                let o = m.add(r * ldm);
                if acc {
                    c0[r] = _mm256_add_ps(c0[r], _mm256_loadu_ps(o));
                    c1[r] = _mm256_add_ps(c1[r], _mm256_loadu_ps(o.add(8)));
                }
                _mm256_storeu_ps(o, c0[r]);
                _mm256_storeu_ps(o.add(8), c1[r]);
            }
        }
    }
}

/// Tiles per transform task.
const TASK_TILES: usize = 4;

/// The convolution of `x` with the 3x3 kernel `w` (`flip_transpose`: see [`kernel_transform`]).
/// The transformed kernel, the packed input and one group's `V` and `M` share one scratch
/// buffer (reused across calls: fresh allocations of these sizes cost page faults on every
/// call, as much as a third of the layer).
///
/// The tiles go in groups whose `V` and `M` fit [`GROUP_BYTES`]; each group in three parallel
/// phases: the input transform (tasks of [`TASK_TILES`] tiles), the 36 products (one task per
/// `ξ`, or per `ξ` and range of tiles with many threads: each product has the group's tiles as
/// its long dimension, so its packing of `U[ξ]` is paid once per group, not per few tiles), and
/// the output transform.
#[allow(clippy::too_many_arguments)]
fn run(
    g: &Geom,
    x: &[f32],
    w: &[f32],
    flip_transpose: bool,
    bias: Option<&[f32]>,
    res: Option<&[f32]>,
    relu: bool,
    avx2: bool,
) -> Vec<f32> {
    let (th, tw) = tiles(g);
    let pl = Plan {
        g,
        th,
        tw,
        hp: 4 * th + 2,
        wp: 4 * tw + 2,
        cinp: g.cin.next_multiple_of(L),
        coutp: g.cout.next_multiple_of(NR),
    };
    let (cinp, coutp) = (pl.cinp, pl.coutp);
    // The transforms index these without further checks (unsafe stores and loads).
    assert_eq!(x.len(), g.b * g.cin * g.h * g.w);
    assert_eq!(w.len(), g.cout * g.cin * 9);
    assert!(res.is_none_or(|r| r.len() == g.b * g.cout * g.oh * g.ow));
    assert!(bias.is_none_or(|b| b.len() == g.cout));
    let nt = g.b * th * tw;
    let threads = crate::par::threads();
    // The products take the widest micro-kernel; the transforms are AVX2 code on both.
    let isa = if avx2 { crate::cpu::vector_isa() } else { None };
    let group = group_tiles(nt, cinp + coutp);
    let (u_len, xb_len) = (36 * cinp * coutp, g.b * cinp * pl.hp * pl.wp);
    // Every element is written by exactly one tile.
    let mut y = Vec::<f32>::with_capacity(g.b * g.cout * g.oh * g.ow);
    let yp = SendPtr(y.as_mut_ptr());
    let len = xb_len + 36 * group * (cinp + coutp);
    // The transformed kernel from the cache where these weights were transformed before (the
    // head's other pyramid levels, inference's earlier images).
    let tag = crate::reuse::Tag {
        kind: "winograd4 U",
        dims: [
            g.cout,
            g.cin,
            usize::from(flip_transpose),
            usize::from(avx2),
        ],
    };
    let transform = |u: &mut [f32]| kernel_transform(w, g.cout, g.cin, flip_transpose, avx2, u);
    let cache = crate::reuse::global();
    crate::reuse::Cache::with_derived(cache, tag, w, u_len, transform, |u| {
        crate::par::with_scratch(len, |buf: &mut [f32]| {
            let (xb, buf) = buf.split_at_mut(xb_len);
            pack_input(g, x, pl.hp, pl.wp, xb, avx2);
            let xb = &*xb;
            let (vbuf, mbuf) = buf.split_at_mut(36 * group * cinp);
            for t0 in (0..nt).step_by(group) {
                let tg = group.min(nt - t0);
                let (v, m) = (&mut vbuf[..36 * tg * cinp], &mut mbuf[..36 * tg * coutp]);
                let vp = SendPtr(v.as_mut_ptr());
                (0..tg.div_ceil(TASK_TILES)).into_par_iter().for_each(|c| {
                    let js = c * TASK_TILES..((c + 1) * TASK_TILES).min(tg);
                    input_tiles(avx2, &pl, xb, t0, tg, js, &vp);
                });
                // Rows of tiles per product task: all of them, or fewer so that 36 x parts tasks
                // give every thread several.
                let parts = (4 * threads).div_ceil(36).min(tg.div_ceil(32)).max(1);
                let rows = tg.div_ceil(parts);
                m.par_chunks_mut(tg * coutp)
                    .zip(v.par_chunks(tg * cinp))
                    .enumerate()
                    .flat_map(|(xi, (mx, vx))| {
                        mx.par_chunks_mut(rows * coutp)
                            .zip(vx.par_chunks(rows * cinp))
                            .map(move |(mr, vr)| (xi, mr, vr))
                    })
                    .for_each(|(xi, mr, vr)| {
                        let ux = &u[xi * cinp * coutp..(xi + 1) * cinp * coutp];
                        products(isa, mr.len() / coutp, cinp, coutp, vr, ux, mr);
                    });
                let m = &*m;
                (0..tg.div_ceil(TASK_TILES)).into_par_iter().for_each(|c| {
                    let js = c * TASK_TILES..((c + 1) * TASK_TILES).min(tg);
                    output_tiles(avx2, &pl, m, t0, tg, js, bias, res, relu, &yp, avx2);
                });
            }
        })
    });
    // SAFETY: the tiles cover the output (th * 4 >= oh, tw * 4 >= ow) and each wrote its part.
    unsafe { y.set_len(g.b * g.cout * g.oh * g.ow) };
    y
}

/// Whether the AVX2 build of the transforms runs (the CPU has it, and `RETINANET_ISA` allows it).
fn use_avx2() -> bool {
    crate::cpu::vector_isa().is_some()
}

/// Largest `V` + `M` of one group of tiles: well inside the last-level cache of current server
/// and laptop CPUs, so the products read what the transform just wrote from cache.
const GROUP_BYTES: usize = 12 << 20;

/// Tiles per group for `nt` tiles with `channels` (`cinp + coutp`) floats of `V` and `M` per
/// tile and `ξ`: equal groups within [`GROUP_BYTES`].
fn group_tiles(nt: usize, channels: usize) -> usize {
    let most = (GROUP_BYTES / (36 * channels * 4)).max(TASK_TILES);
    nt.div_ceil(nt.div_ceil(most))
}

/// Forward pass of a [`suitable`] convolution, with bias, residual `res` (`[B, Cout, OH, OW]`)
/// added before the ReLU.
pub(crate) fn forward(
    g: &Geom,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    res: Option<&[f32]>,
    relu: bool,
) -> Vec<f32> {
    run(g, x, w, false, bias, res, relu, use_avx2())
}

/// Input gradient of a [`suitable`] convolution: the stride-1 convolution of `dy` with the
/// rotated, transposed kernel and padding `2 - p`.
pub(crate) fn backward_input(g: &Geom, dy: &[f32], w: &[f32]) -> Vec<f32> {
    let gt = crate::conv::transposed(g).expect("a suitable convolution has a transposed form");
    run(&gt, dy, w, true, None, None, false, use_avx2())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ConvParams;
    use crate::conv::{backward_input_im2col, forward_im2col};

    fn det(n: usize, s: f32, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i + seed) * 7919 % 1000) as f32 / 500.0 - 1.0) * s)
            .collect()
    }

    /// Largest difference relative to the reference's largest magnitude.
    fn rel_err(a: &[f32], r: &[f32]) -> f32 {
        assert_eq!(a.len(), r.len());
        let scale = r.iter().fold(0f32, |m, v| m.max(v.abs()));
        a.iter().zip(r).fold(0f32, |m, (a, r)| m.max((a - r).abs())) / scale
    }

    /// Transformed kernels come from the cache only for the same weights: a repeated call
    /// gives the same bits, weights changed in place (one value the fingerprint does not
    /// sample, as an SGD step might leave the others) give the new result, and the forward
    /// pass and the input gradient (the flipped kernel) of the same weights do not mix.
    #[test]
    fn transformed_kernels_are_reused_only_for_the_same_weights() {
        let g = Geom::new(&[2, 128, 20, 20], &[128, 128, 3, 3], ConvParams::new(1, 1)).unwrap();
        assert!(suitable(&g));
        let x = det(2 * 128 * 400, 1.0, 11);
        let mut wt = det(128 * 128 * 9, 0.05, 12);
        let dy = det(2 * 128 * 400, 1.0, 13);
        let y1 = forward(&g, &x, &wt, None, None, false);
        let d1 = backward_input(&g, &dy, &wt);
        assert_eq!(forward(&g, &x, &wt, None, None, false), y1);
        assert_eq!(backward_input(&g, &dy, &wt), d1);
        assert!(rel_err(&d1, &backward_input_im2col(&g, &dy, &wt)) <= 2e-5);
        // Weight (co 0, ci 0, tap 1): the fingerprint samples every 2,304th value.
        wt[1] += 0.5;
        let y2 = forward(&g, &x, &wt, None, None, false);
        assert!(rel_err(&y2, &forward_im2col(&g, &x, &wt, None, false)) <= 2e-5);
        assert!(y2[..400] != y1[..400], "channel 0 must see the new weight");
        let d2 = backward_input(&g, &dy, &wt);
        assert!(rel_err(&d2, &backward_input_im2col(&g, &dy, &wt)) <= 2e-5);
    }

    /// F(4x4, 3x3) against im2col + gemm (to 2e-5 of the largest output: sums of up to 4,680
    /// terms of this structured data; [`accuracy_against_f64`] bounds the rounding itself):
    /// paddings 0-2, maps that are not whole tiles, channel
    /// counts that are not whole vectors or panels, one and several groups of tiles, with bias,
    /// residual and ReLU, forward and input gradient; on the AVX2 build and the plain one.
    #[test]
    fn matches_im2col_forward_and_input_gradient() {
        for (b, cin, cout, padding, h, w) in [
            (2, 128, 136, 1, 31, 30),
            (3, 131, 129, 0, 30, 27),
            (4, 256, 256, 2, 21, 19),
            (1, 136, 200, 1, 45, 41),
            (1, 64, 48, 1, 64, 63),
            (5, 256, 520, 1, 31, 33),
        ] {
            let g = Geom::new(
                &[b, cin, h, w],
                &[cout, cin, 3, 3],
                ConvParams::new(1, padding),
            )
            .unwrap();
            assert!(suitable(&g), "{g:?}");
            let x = det(b * cin * h * w, 1.0, 1);
            let wt = det(cout * cin * 9, 0.05, 2);
            let bias = det(cout, 1.0, 3);
            let res = det(b * cout * g.oh * g.ow, 1.0, 4);
            let dy = det(b * cout * g.oh * g.ow, 1.0, 5);
            let want_dx = backward_input_im2col(&g, &dy, &wt);
            for relu in [false, true] {
                let mut want = forward_im2col(&g, &x, &wt, Some(&bias), false);
                for (v, r) in want.iter_mut().zip(&res) {
                    *v += r;
                    if relu && *v < 0.0 {
                        *v = 0.0;
                    }
                }
                let got = forward(&g, &x, &wt, Some(&bias), Some(&res), relu);
                let e = rel_err(&got, &want);
                assert!(e <= 2e-5, "forward {g:?} relu {relu}: {e}");
            }
            let e = rel_err(&backward_input(&g, &dy, &wt), &want_dx);
            assert!(e <= 2e-5, "input gradient {g:?}: {e}");
            // The plain build (the gemm crate for the products, separate multiply and add,
            // scalar stores) agrees with the vector one (whose products sum in passes of the
            // L1-sized `kc`, another order).
            let fast = run(
                &g,
                &x,
                &wt,
                false,
                Some(&bias),
                Some(&res),
                true,
                use_avx2(),
            );
            let plain = run(&g, &x, &wt, false, Some(&bias), Some(&res), true, false);
            let e = rel_err(&plain, &fast);
            assert!(e <= 1e-5, "plain build {g:?}: {e}");
        }
        // Several groups of tiles: 1,764 tiles of 256 + 256 channels are four groups.
        let g = Geom::new(&[4, 256, 83, 83], &[256, 256, 3, 3], ConvParams::new(1, 1)).unwrap();
        assert!(group_tiles(4 * 21 * 21, 512) < 4 * 21 * 21 / 3);
        let x = det(4 * 256 * 83 * 83, 1.0, 6);
        let wt = det(256 * 256 * 9, 0.05, 7);
        let e = rel_err(
            &forward(&g, &x, &wt, None, None, false),
            &forward_im2col(&g, &x, &wt, None, false),
        );
        assert!(e <= 2e-5, "four groups: {e}");
    }

    /// The error against an f64 reference: within a factor ~8 of the direct sum's, and below
    /// what the common interpolation points (0, ±1, ±2) give (max 1.2e-5, rms 6.1e-7 here).
    #[test]
    fn accuracy_against_f64() {
        let g = Geom::new(&[2, 256, 33, 33], &[256, 256, 3, 3], ConvParams::new(1, 1)).unwrap();
        let mut s = 12345u64;
        let mut rnd = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 20001) as f32 / 10000.0 - 1.0
        };
        let x: Vec<f32> = (0..2 * 256 * 33 * 33).map(|_| rnd()).collect();
        let w: Vec<f32> = (0..256 * 256 * 9).map(|_| rnd() * 0.05).collect();
        let wide = |v: &[f32]| v.iter().map(|&a| f64::from(a)).collect::<Vec<_>>();
        let y64 = forward_im2col(&g, &wide(&x), &wide(&w), None, false);
        let scale = y64.iter().fold(0f64, |m, v| m.max(v.abs()));
        let errors = |a: &[f32]| {
            let d = a.iter().zip(&y64).map(|(a, r)| (f64::from(*a) - r).abs());
            let max = d.clone().fold(0f64, f64::max) / scale;
            let rms = (d.map(|e| e * e).sum::<f64>() / a.len() as f64).sqrt() / scale;
            (max, rms)
        };
        let (max_direct, rms_direct) = errors(&forward_im2col(&g, &x, &w, None, false));
        let (max, rms) = errors(&forward(&g, &x, &w, None, None, false));
        assert!(
            max_direct < 1e-6 && rms_direct < 1e-7,
            "{max_direct} {rms_direct}"
        );
        assert!(max < 8e-6 && rms < 5e-7, "max {max:e}, rms {rms:e}");
    }

    /// Every micro-kernel of the products (AVX-512's tiles of 1-6 rows x 1-4 panels, AVX2's,
    /// the gemm crate's) against an f64 sum, over row counts that leave every remainder, panel
    /// counts that are not whole groups of 4, and channel counts below, at and past a pass of `kc`.
    #[test]
    fn products_on_every_instruction_set() {
        let mut isas: Vec<Option<Isa>> = crate::cpu::vector_isas().into_iter().map(Some).collect();
        isas.push(None);
        for (rows, cinp, panels) in [
            (1, 8, 1),
            (7, 96, 3),
            (13, 200, 5),
            (6, 104, 4),
            (25, 264, 9),
        ] {
            let coutp = panels * NR;
            let v = det(rows * cinp, 1.0, 11);
            let u = det(cinp * coutp, 0.5, 12);
            let mut want = vec![0f64; rows * coutp];
            for r in 0..rows {
                for p in 0..panels {
                    for ci in 0..cinp {
                        for j in 0..NR {
                            want[r * coutp + p * NR + j] += f64::from(v[r * cinp + ci])
                                * f64::from(u[(p * cinp + ci) * NR + j]);
                        }
                    }
                }
            }
            let scale = want.iter().fold(0f64, |m, x| m.max(x.abs()));
            for &isa in &isas {
                let mut m = vec![f32::NAN; rows * coutp];
                products(isa, rows, cinp, coutp, &v, &u, &mut m);
                let e = m
                    .iter()
                    .zip(&want)
                    .fold(0f64, |e, (a, w)| e.max((f64::from(*a) - w).abs()));
                assert!(
                    e / scale < 1e-6,
                    "{isa:?} rows {rows} cinp {cinp} panels {panels}: {e}"
                );
            }
        }
    }

    #[test]
    fn the_layers_it_takes() {
        let g =
            |b, c, co, h| Geom::new(&[b, c, h, h], &[co, c, 3, 3], ConvParams::new(1, 1)).unwrap();
        assert!(suitable(&g(2, 256, 256, 33)));
        assert!(suitable(&g(1, 256, 180, 81)), "a class head's output layer");
        assert!(suitable(&g(1, 256, 256, 21)), "36 tiles");
        assert!(!suitable(&g(1, 256, 256, 13)), "16 tiles");
        assert!(!suitable(&g(2, 512, 512, 9)), "9x9: 3x3 tiles cover 12x12");
        assert!(suitable(&g(2, 256, 256, 17)), "17x17: 20x20 covered");
        assert!(!suitable(&g(8, 256, 256, 9)), "9x9: 12x12 covered");
        assert!(!suitable(&g(1, 256, 36, 81)), "36 outputs");
        assert!(suitable(&g(2, 64, 64, 65)), "64 channels, 9% overhang");
        assert!(!suitable(&g(16, 64, 64, 33)), "64 channels, 19% overhang");
        assert!(!suitable(&g(16, 32, 64, 65)), "32 channels");
        assert!(
            !suitable(&g(4, 512, 512, 21)),
            "a 38 MB kernel transform for 144 tiles"
        );
        assert!(suitable(&g(2, 512, 512, 33)), "162 tiles");
        let strided = Geom::new(&[2, 256, 33, 33], &[256, 256, 3, 3], ConvParams::new(2, 1));
        assert!(!suitable(&strided.unwrap()));
        let five = Geom::new(&[2, 256, 33, 33], &[256, 256, 5, 5], ConvParams::new(1, 2));
        assert!(!suitable(&five.unwrap()));
    }
}
