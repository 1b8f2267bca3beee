//! 2-D convolution (groups 1) as im2col + gemm, forward and backward, as candle custom ops.
//!
//! Layout conventions: activations `[B, C, H, W]`, weights `[Cout, Cin, kh, kw]`, both
//! contiguous. Per image, the forward pass is `Y = W · cols` with `W` seen as a
//! `[Cout, Cin*kh*kw]` matrix and `cols` the `[Cin*kh*kw, OH*OW]` patch matrix (im2col). A 1x1
//! convolution with stride 1 and no padding needs no patch matrix: `cols` is the image itself.
//! The backward pass reuses the same matrices: `dcols = Wᵀ · dY` scattered back (col2im) for the
//! input gradient and `dW = Σ_b dY · colsᵀ` for the weight gradient; the patch matrix is rebuilt
//! rather than kept from the forward pass, which keeps training memory at one output per layer.

use crate::dispatch;
use crate::par;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
    bail,
};
use rayon::prelude::*;
use std::ops::Range;

/// Stride, padding and dilation of a convolution (the same along both axes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConvParams {
    /// Step between windows.
    pub stride: usize,
    /// Implicit zeros on each side.
    pub padding: usize,
    /// Spacing of the kernel taps.
    pub dilation: usize,
}

impl Default for ConvParams {
    fn default() -> Self {
        Self {
            stride: 1,
            padding: 0,
            dilation: 1,
        }
    }
}

impl ConvParams {
    /// Stride `stride`, padding `padding`, dilation 1.
    pub fn new(stride: usize, padding: usize) -> Self {
        Self {
            stride,
            padding,
            dilation: 1,
        }
    }
}

/// Shapes of one convolution, checked once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geom {
    pub b: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub oh: usize,
    pub ow: usize,
    pub p: ConvParams,
    /// Products in bf16 ([`crate::bf16`]): the setting of the thread that made this geometry
    /// (so the op's worker threads follow it), where the geometry suits them ([`Geom::bf16_suits`]).
    pub bf16: bool,
    /// The weight gradient in bf16 products: the setting of that thread, where the geometry
    /// suits them ([`Geom::bf16_weight_grad_suits`]).
    pub bf16_weight_grad: bool,
    /// The weights are not being trained (autograd does not track them: inference): forms
    /// derived from them in one pass (the bf16 gemm's packing) may be kept in the transform
    /// cache for the next call. Trained weights change every step and are packed anew.
    pub keep_weights: bool,
}

impl Geom {
    pub(crate) fn new(x: &[usize], wt: &[usize], p: ConvParams) -> Result<Self> {
        let (&[b, cin, h, w], &[cout, wcin, kh, kw]) = (x, wt) else {
            bail!("conv2d: expected 4-D input and weight, got {x:?} and {wt:?}")
        };
        if wcin != cin {
            bail!("conv2d: input has {cin} channels, weight expects {wcin} (groups 1 only)")
        }
        if p.stride == 0 || p.dilation == 0 || kh == 0 || kw == 0 {
            bail!("conv2d: zero stride, dilation or kernel ({p:?}, kernel {kh}x{kw})")
        }
        let out = |n: usize, k: usize| -> Result<usize> {
            let span = p.dilation * (k - 1) + 1;
            match (n + 2 * p.padding).checked_sub(span) {
                Some(v) => Ok(v / p.stride + 1),
                None => bail!(
                    "conv2d: input side {n} with padding {} is smaller than the kernel span {span}",
                    p.padding
                ),
            }
        };
        let mut g = Self {
            b,
            cin,
            h,
            w,
            cout,
            kh,
            kw,
            oh: out(h, kh)?,
            ow: out(w, kw)?,
            p,
            bf16: false,
            bf16_weight_grad: false,
            keep_weights: false,
        };
        let on = crate::bf16::bf16_products();
        g.bf16 = on && Self::bf16_suits(&g);
        g.bf16_weight_grad = on && Self::bf16_weight_grad_suits(&g);
        Ok(g)
    }

    /// [`Geom::new`] for a convolution with a bias of dims `bias`, which must be `[Cout]`.
    pub(crate) fn with_bias(
        x: &[usize],
        w: &[usize],
        bias: &[usize],
        p: ConvParams,
    ) -> Result<Self> {
        let g = Self::new(x, w, p)?;
        if bias != [g.cout] {
            bail!(
                "conv2d: bias shape {bias:?} does not match {} output channels",
                g.cout
            )
        }
        Ok(g)
    }

    /// Whether a convolution takes bf16 products when they are on: those with 1x1 kernels (any
    /// stride), which are packed gemms without a patch matrix, and the larger kernels that the
    /// direct kernel's bf16 form takes ([`crate::direct::suitable_bf16`]: it reads bf16 channel
    /// pairs of the padded input, still no patch matrix), but for the layers where Winograd's
    /// f32 products stay ahead ([`Geom::winograd_beats_bf16`]). (Winograd itself stays in f32:
    /// in bf16 its transformed operands would carry 6x the error of rounding the inputs, 1.4-1.7%
    /// rms of the output against 0.24%, 256 -> 256 at 32x32; docs/performance.md.) Through
    /// im2col + the bf16 gemm, building the patch matrix costs about what the faster products
    /// save (measured on a Zen 5, 2 cores).
    fn bf16_suits(g: &Geom) -> bool {
        g.is_1x1() || (crate::direct::suitable_bf16(g) && !Self::winograd_beats_bf16(g))
    }

    /// Whether Winograd in f32 (F(4x4) or F(2x2), where it takes the layer) is faster than the
    /// direct kernel's bf16 products: F(4x4) does 4x fewer multiplies than a direct sum, but its
    /// transforms cost passes over the input and output that only wide layers amortise, and it
    /// rounds the maps up to whole 4x4 tiles. Measured in ResNet-50 RetinaNet (Zen 5, 2
    /// threads, medians of 4 alternated runs, forward / backward ms): 2x128x33x33 0.80 / 1.70
    /// in Winograd against 0.99 / 2.26, 256 -> 256 at 33x33 and 41x41 level or faster in
    /// Winograd; narrower or smaller maps faster in bf16: 2x64x65x65 0.84 / 1.81 against 1.15 /
    /// 2.00, 2x256x17x17 0.81 / 2.02 against 1.10 / 2.12.
    fn winograd_beats_bf16(g: &Geom) -> bool {
        (use_winograd4(g) || use_winograd(g))
            && g.cin >= 128
            && g.cout >= 128
            && g.oh.min(g.ow) >= 32
    }

    /// Whether the input gradient takes bf16 products when they are on and the forward pass
    /// does: the transposed convolution (stride 1) where that suits them itself; without one
    /// (strides > 1), im2col + the bf16 gemm for 1x1 kernels and for the layers the f32 direct
    /// kernel takes. With larger weights the gemm's packing of the transposed weights costs
    /// more than its products save (512 -> 512 3x3 at stride 2, 2x512x17x17: 11.6 ms of CPU
    /// against 7.2 in f32, Zen 5), so they keep the f32 route, as do those with few positions
    /// (not measured faster in bf16).
    fn bf16_input_grad_suits(g: &Geom) -> bool {
        match transposed(g) {
            Some(gt) => Self::bf16_suits(&gt),
            None => g.is_1x1() || crate::direct::suitable(g),
        }
    }

    /// Whether the weight gradient takes bf16 products when they are on: 1x1 kernels (the packed
    /// gemm) and every larger kernel the direct kernel takes, the layers that Winograd computes
    /// forward included: the weight gradient is a direct sum over positions there too, and its
    /// bf16 form pairs neighbouring positions (no transform to carry the rounding).
    fn bf16_weight_grad_suits(g: &Geom) -> bool {
        g.is_1x1() || crate::direct::suitable_bf16_weight_grad(g)
    }

    /// Rows of the patch matrix (`Cin * kh * kw`).
    pub(crate) fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }

    pub(crate) fn ohw(&self) -> usize {
        self.oh * self.ow
    }

    /// Whether the kernel is 1x1 (any stride or padding).
    pub(crate) fn is_1x1(&self) -> bool {
        self.kh == 1 && self.kw == 1
    }

    /// Whether the patch matrix of an image is the image itself.
    pub(crate) fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.p.stride == 1 && self.p.padding == 0
    }

    /// Multiply-adds of the forward pass.
    pub fn macs(&self) -> usize {
        self.b * self.cout * self.ohw() * self.k()
    }

    /// For output column `o` of tap `t`, the input index `o * stride + t * dilation - padding`.
    #[inline]
    fn src(&self, o: usize, t: usize) -> isize {
        (o * self.p.stride + t * self.p.dilation) as isize - self.p.padding as isize
    }

    /// Range of outputs `o` whose source index `src(o, t)` lies in `0..n`.
    #[inline]
    fn valid(&self, t: usize, n: usize, n_out: usize) -> (usize, usize) {
        let s = self.p.stride as isize;
        let off = (t * self.p.dilation) as isize - self.p.padding as isize;
        // o * s + off >= 0  <=>  o >= ceil(-off / s)
        let lo = if off >= 0 { 0 } else { ((-off) + s - 1) / s };
        // o * s + off <= n - 1  <=>  o <= floor((n - 1 - off) / s)
        let hi_num = n as isize - 1 - off;
        let hi = if hi_num < 0 { 0 } else { hi_num / s + 1 };
        let lo = (lo as usize).min(n_out);
        let hi = (hi as usize).min(n_out).max(lo);
        (lo, hi)
    }
}

/// Fills `cols` (`[Cin*kh*kw, n]`, `n = rows.len() * OW`) with the patches of output rows
/// `rows` of one image (`[Cin, H, W]`).
pub(crate) fn im2col<T: WithDType>(g: &Geom, img: &[T], rows: Range<usize>, cols: &mut [T]) {
    let n = rows.len() * g.ow;
    im2col_at(g, img, rows, cols, (n, 0));
}

/// [`im2col`] into columns `off..off + n` of a patch matrix whose rows are `ld` long: how the
/// patches of several images sit side by side in one matrix.
pub(crate) fn im2col_at<T: WithDType>(
    g: &Geom,
    img: &[T],
    rows: Range<usize>,
    cols: &mut [T],
    (ld, off): (usize, usize),
) {
    let (kk, hw) = (g.kh * g.kw, g.h * g.w);
    let n = rows.len() * g.ow;
    let s = g.p.stride;
    let xr: Vec<_> = (0..g.kw).map(|kx| g.valid(kx, g.w, g.ow)).collect();
    // Stride 1 with output rows as wide as the input's ("same" width, e.g. 3x3 / padding 1): a
    // patch row is the plane shifted by (dy, dx), so a run of rows is one copy.
    let shifted = s == 1 && g.p.dilation == 1 && g.ow == g.w;
    par::for_each_chunk(&mut cols[..g.k() * ld], kk * ld, |c, chunk| {
        let plane = &img[c * hw..(c + 1) * hw];
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let row = &mut chunk[(ky * g.kw + kx) * ld + off..][..n];
                if shifted {
                    copy_shifted(g, plane, rows.clone(), (ky, kx), row);
                    continue;
                }
                let (xlo, xhi) = xr[kx];
                for (i, oy) in rows.clone().enumerate() {
                    let dst = &mut row[i * g.ow..(i + 1) * g.ow];
                    let iy = g.src(oy, ky);
                    if iy < 0 || iy >= g.h as isize {
                        dst.fill(T::zero());
                        continue;
                    }
                    let src_row = &plane[iy as usize * g.w..][..g.w];
                    zero(&mut dst[..xlo]);
                    zero(&mut dst[xhi..]);
                    if xhi > xlo {
                        let ix0 = g.src(xlo, kx) as usize;
                        if s == 1 {
                            dst[xlo..xhi].copy_from_slice(&src_row[ix0..ix0 + (xhi - xlo)]);
                        } else {
                            for (d, v) in dst[xlo..xhi]
                                .iter_mut()
                                .zip(src_row[ix0..].iter().step_by(s))
                            {
                                *d = *v;
                            }
                        }
                    }
                }
            }
        }
    });
}

/// One patch-matrix row of tap `(ky, kx)` for output rows `rows` of a stride-1 convolution
/// with `OW == W`: `row[(oy - r0) * W + ox] = plane[(oy + dy) * W + ox + dx]`, zero outside the
/// plane. The valid rows are copied as one block; the columns that wrapped into the next or
/// previous input row are zeroed afterwards.
fn copy_shifted<T: WithDType>(
    g: &Geom,
    plane: &[T],
    rows: Range<usize>,
    (ky, kx): (usize, usize),
    row: &mut [T],
) {
    let (w, h) = (g.w as isize, g.h as isize);
    let (dy, dx) = (
        ky as isize - g.p.padding as isize,
        kx as isize - g.p.padding as isize,
    );
    let (r0, r1) = (rows.start as isize, rows.end as isize);
    let a = r0.max(-dy).min(r1);
    let b = r1.min(h - dy).max(a);
    zero(&mut row[..((a - r0) * w) as usize]);
    zero(&mut row[((b - r0) * w) as usize..]);
    let seg = &mut row[((a - r0) * w) as usize..((b - r0) * w) as usize];
    if seg.is_empty() {
        return;
    }
    if dx.abs() >= w {
        seg.fill(T::zero());
        return;
    }
    // seg[t] = plane[start + t] where that index exists.
    let start = (a + dy) * w + dx;
    let len = seg.len() as isize;
    let t0 = (-start).clamp(0, len);
    let t1 = (plane.len() as isize - start).clamp(t0, len);
    zero(&mut seg[..t0 as usize]);
    zero(&mut seg[t1 as usize..]);
    seg[t0 as usize..t1 as usize]
        .copy_from_slice(&plane[(start + t0) as usize..(start + t1) as usize]);
    // The columns that wrapped into the neighbouring input row: |dx| <= padding a row.
    let k = dx.unsigned_abs();
    if k > 0 {
        let first = if dx < 0 { 0 } else { g.w - k };
        for r in seg.chunks_exact_mut(g.w) {
            zero(&mut r[first..first + k]);
        }
    }
}

/// Zeroes a slice that is usually empty or a few elements long. `fill` (and any loop the
/// compiler recognises) calls memset even for no element; copy_shifted zeroes such pieces for
/// every channel, tap and row, and those calls were ~6% of the small default model's training
/// step.
#[inline(always)]
fn zero<T: WithDType>(s: &mut [T]) {
    let z = T::zero();
    match s {
        [] => {}
        [a] => *a = z,
        [a, b] => (*a, *b) = (z, z),
        [a, b, c] => (*a, *b, *c) = (z, z, z),
        _ => s.fill(z),
    }
}

/// Adds the patch-matrix gradient `cols` (`[Cin*kh*kw, n]` for output rows `rows`) back into
/// the image gradient `img` (`[Cin, H, W]`), summing where windows overlap.
pub(crate) fn col2im<T: WithDType>(g: &Geom, cols: &[T], rows: Range<usize>, img: &mut [T]) {
    let n = rows.len() * g.ow;
    col2im_at(g, cols, (n, 0), rows, img);
}

/// [`col2im`] from columns `off..` of a patch matrix whose rows are `ld` long.
pub(crate) fn col2im_at<T: WithDType>(
    g: &Geom,
    cols: &[T],
    (ld, off): (usize, usize),
    rows: Range<usize>,
    img: &mut [T],
) {
    let (kk, hw) = (g.kh * g.kw, g.h * g.w);
    let n = rows.len() * g.ow;
    let s = g.p.stride;
    let xr: Vec<_> = (0..g.kw).map(|kx| g.valid(kx, g.w, g.ow)).collect();
    par::for_each_chunk(img, hw, |c, plane| {
        let src = &cols[c * kk * ld..(c + 1) * kk * ld];
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let row = &src[(ky * g.kw + kx) * ld + off..][..n];
                let (xlo, xhi) = xr[kx];
                if xhi <= xlo {
                    continue;
                }
                let ix0 = g.src(xlo, kx) as usize;
                for (i, oy) in rows.clone().enumerate() {
                    let iy = g.src(oy, ky);
                    if iy < 0 || iy >= g.h as isize {
                        continue;
                    }
                    let dst = &mut plane[iy as usize * g.w..][..g.w];
                    let r = &row[i * g.ow + xlo..i * g.ow + xhi];
                    if s == 1 {
                        for (d, v) in dst[ix0..ix0 + r.len()].iter_mut().zip(r) {
                            *d += *v;
                        }
                    } else {
                        for (d, v) in dst[ix0..].iter_mut().step_by(s).zip(r) {
                            *d += *v;
                        }
                    }
                }
            }
        }
    });
}

/// Patch-matrix elements per block: 8 MiB of f32, so a block's columns stay in the L3 cache
/// between im2col and the gemm that reads them.
const BLOCK_ELEMS: usize = 2 << 20;

/// Output-row blocks of one image: the whole image for a pointwise convolution (no patch
/// matrix), else runs of rows whose patch matrix holds about [`BLOCK_ELEMS`] elements.
fn row_blocks(g: &Geom) -> Vec<Range<usize>> {
    if g.is_pointwise() {
        return std::iter::once(0..g.oh).collect();
    }
    let per = (BLOCK_ELEMS / (g.k() * g.ow).max(1)).clamp(1, g.oh.max(1));
    (0..g.oh)
        .step_by(per)
        .map(|r| r..(r + per).min(g.oh))
        .collect()
}

/// `dst (m x n, row-major, row stride ldd) (+)= a · b` where `a` and `b` are given by their
/// strides (`rs` between rows, `cs` between columns); f32 operands rounded to bf16 when `bf16`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm<T: WithDType>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    ldd: usize,
    accumulate: bool,
    a: &[T],
    (a_rs, a_cs): (usize, usize),
    b: &[T],
    (b_rs, b_cs): (usize, usize),
    threads: usize,
    bf16: bool,
) {
    if bf16 && T::DTYPE == DType::F32 {
        let (dst, a, b) = (as_f32_mut(dst), as_f32(a), as_f32(b));
        return crate::bf16::gemm(
            m,
            n,
            k,
            dst,
            ldd,
            accumulate,
            a,
            (a_rs, a_cs),
            b,
            (b_rs, b_cs),
            threads,
        );
    }
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * ldd..r * ldd + n].fill(T::zero());
            }
        }
        return;
    }
    // Bounds: the largest index each operand is read or written at.
    assert!(dst.len() >= (m - 1) * ldd + n);
    assert!(a.len() > (m - 1) * a_rs + (k - 1) * a_cs);
    assert!(b.len() > (k - 1) * b_rs + (n - 1) * b_cs);
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every access of gemm inside the three slices; `dst` is
    // borrowed mutably and does not alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ldd as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            par,
        )
    }
}

/// The weights as the left operand of a convolution's products (`m x k` at `strides`): with bf16
/// products, rounded and packed once per op instead of once per image and row block.
struct Weights<'a, T> {
    wt: &'a [T],
    strides: (usize, usize),
    packed: Option<crate::bf16::PackedA>,
}

impl<'a, T: WithDType> Weights<'a, T> {
    fn new(g: &Geom, wt: &'a [T], m: usize, k: usize, strides: (usize, usize)) -> Self {
        let packed = (g.bf16 && T::DTYPE == DType::F32).then(|| {
            let (wt, threads) = (as_f32(wt), par::threads());
            crate::bf16::PackedA::new(m, k, wt, strides, threads, g.keep_weights)
        });
        Self {
            wt,
            strides,
            packed,
        }
    }

    /// `dst (+)= W · b`, as [`gemm`].
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        m: usize,
        n: usize,
        k: usize,
        dst: &mut [T],
        ldd: usize,
        accumulate: bool,
        b: &[T],
        b_strides: (usize, usize),
        threads: usize,
    ) {
        match &self.packed {
            Some(pa) => crate::bf16::gemm_packed(
                pa,
                n,
                as_f32_mut(dst),
                ldd,
                accumulate,
                as_f32(b),
                b_strides,
                threads,
            ),
            None => gemm(
                m,
                n,
                k,
                dst,
                ldd,
                accumulate,
                self.wt,
                self.strides,
                b,
                b_strides,
                threads,
                false,
            ),
        }
    }
}

/// Whether to run one image per thread with single-threaded gemms (small images, where
/// splitting each small gemm across threads costs more than it gains).
fn per_image(g: &Geom, threads: usize) -> bool {
    // Few output channels make a thin gemm that splits badly, while building the patch matrix
    // costs the same whatever the width: give each thread whole images (and patch matrices).
    g.b >= threads && threads > 1 && (g.ohw() * g.cout * g.k() < (1 << 22) || g.cout < 128)
}

/// Images per group on the grouped path, 1 for the other paths. Small images go through one
/// gemm per group with the groups' patch matrices side by side: a gemm per image would pack the
/// whole weight matrix again for a few hundred output columns (measured 1.5-2x slower on 9x9
/// and 5x5 maps). Groups are sized so each thread gets the same number and a group's patch
/// matrix stays within [`BLOCK_ELEMS`].
fn group_size(g: &Geom, threads: usize) -> usize {
    if g.is_pointwise() || g.b < 2 || !(per_image(g, threads) || g.ohw() <= SMALL_MAP) {
        return 1;
    }
    let fit = (BLOCK_ELEMS / (g.k() * g.ohw()).max(1)).max(1);
    let rounds = g.b.div_ceil(threads).div_ceil(fit);
    g.b.div_ceil(threads * rounds)
}

/// Output maps up to this many pixels always take the grouped path (9x9 maps of ResNet's
/// stage 3 at 129 px, 17x17 at 257 px).
const SMALL_MAP: usize = 289;

/// Patch matrices of images `b0..b0 + n` of `x` side by side in `cols` (`[Cin*kh*kw, n * OHW]`).
fn group_cols<T: WithDType>(g: &Geom, x: &[T], b0: usize, n: usize, cols: &mut [T]) {
    let (ohw, chw) = (g.ohw(), g.cin * g.h * g.w);
    par::sequential(|| {
        for i in 0..n {
            let xb = &x[(b0 + i) * chw..(b0 + i + 1) * chw];
            im2col_at(g, xb, 0..g.oh, cols, (n * ohw, i * ohw));
        }
    });
}

/// Copies images `b0..b0 + n` of `src` (`[B, C, HW]`) into `dst` as one `[C, n * HW]` matrix.
fn gather_group<T: WithDType>(src: &[T], b0: usize, n: usize, c: usize, hw: usize, dst: &mut [T]) {
    let ld = n * hw;
    for i in 0..n {
        let img = &src[(b0 + i) * c * hw..(b0 + i + 1) * c * hw];
        for (ch, plane) in img.chunks_exact(hw).enumerate() {
            dst[ch * ld + i * hw..][..hw].copy_from_slice(plane);
        }
    }
}

/// Winograd for the geometries it suits, unless the grouped im2col path takes them (small maps,
/// where Winograd's 2x2 tiles waste a large share of the work on the border).
fn use_winograd(g: &Geom) -> bool {
    crate::winograd::suitable(g) && group_size(g, par::threads()) == 1
}

/// Forward pass: `y[b] = W · cols(x[b]) (+ bias)`, optionally followed by a ReLU.
pub(crate) fn forward<T: WithDType>(
    g: &Geom,
    x: &[T],
    wt: &[T],
    bias: Option<&[T]>,
    relu: bool,
) -> Vec<T> {
    forward_fused(g, x, wt, bias, None, relu)
}

/// [`forward`] with an optional residual `res` (`[B, Cout, OH, OW]`) added before the ReLU, in
/// the same pass over the output where the path allows (the direct kernel's store, the gemm's
/// initial value), else in one pass after it (Winograd).
pub(crate) fn forward_fused<T: WithDType>(
    g: &Geom,
    x: &[T],
    wt: &[T],
    bias: Option<&[T]>,
    res: Option<&[T]>,
    relu: bool,
) -> Vec<T> {
    if g.bf16 && T::DTYPE == DType::F32 {
        // 1x1: the packed bf16 gemm; larger kernels: the direct kernel's bf16 form.
        if g.is_1x1() {
            return forward_im2col_fused(g, x, wt, bias, res, relu);
        }
        return from_f32(crate::direct::forward_bf16(
            g,
            as_f32(x),
            as_f32(wt),
            bias.map(as_f32),
            res.map(as_f32),
            relu,
        ));
    }
    if T::DTYPE == DType::F32 && use_winograd4(g) {
        return from_f32(crate::winograd4::forward(
            g,
            as_f32(x),
            as_f32(wt),
            bias.map(as_f32),
            res.map(as_f32),
            relu,
        ));
    }
    if T::DTYPE == DType::F32 && !use_winograd(g) && crate::direct::suitable(g) {
        return from_f32(crate::direct::forward(
            g,
            as_f32(x),
            as_f32(wt),
            bias.map(as_f32),
            res.map(as_f32),
            relu,
        ));
    }
    if use_winograd(g) {
        let Some(res) = res else {
            return crate::winograd::forward(g, x, wt, bias, relu);
        };
        let mut y = crate::winograd::forward(g, x, wt, bias, false);
        y.par_chunks_mut(1 << 14)
            .zip(res.par_chunks(1 << 14))
            .for_each(|(y, r)| {
                for (v, &r) in y.iter_mut().zip(r) {
                    let s = *v + r;
                    *v = if relu && s < T::zero() { T::zero() } else { s };
                }
            });
        return y;
    }
    forward_im2col_fused(g, x, wt, bias, res, relu)
}

/// `y` as a `Vec<T>`; call only when `T::DTYPE` is F32.
fn from_f32<T: WithDType>(y: Vec<f32>) -> Vec<T> {
    assert_eq!(T::DTYPE, DType::F32);
    let mut y = std::mem::ManuallyDrop::new(y);
    // SAFETY: T is f32 (asserted): same layout, same allocation.
    unsafe { Vec::from_raw_parts(y.as_mut_ptr().cast::<T>(), y.len(), y.capacity()) }
}

/// F(4x4, 3x3) Winograd for the f32 geometries it suits (`RETINANET_NO_WINOGRAD4` turns it off,
/// to compare paths on one machine).
fn use_winograd4(g: &Geom) -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !*OFF.get_or_init(|| std::env::var_os("RETINANET_NO_WINOGRAD4").is_some())
        && crate::winograd4::suitable(g)
}

/// `s` as mutable f32; call only when `T::DTYPE` is F32.
fn as_f32_mut<T: WithDType>(s: &mut [T]) -> &mut [f32] {
    assert_eq!(T::DTYPE, DType::F32);
    // SAFETY: T is f32 (asserted).
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<f32>(), s.len()) }
}

/// `s` as f32; call only when `T::DTYPE` is F32.
fn as_f32<T: WithDType>(s: &[T]) -> &[f32] {
    assert_eq!(T::DTYPE, DType::F32);
    // SAFETY: T is f32 (asserted).
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<f32>(), s.len()) }
}

/// [`forward`] through im2col + gemm, whatever the geometry.
#[cfg(test)]
pub(crate) fn forward_im2col<T: WithDType>(
    g: &Geom,
    x: &[T],
    wt: &[T],
    bias: Option<&[T]>,
    relu: bool,
) -> Vec<T> {
    forward_im2col_fused(g, x, wt, bias, None, relu)
}

/// [`forward_fused`] through im2col + gemm.
fn forward_im2col_fused<T: WithDType>(
    g: &Geom,
    x: &[T],
    wt: &[T],
    bias: Option<&[T]>,
    res: Option<&[T]>,
    relu: bool,
) -> Vec<T> {
    let (k, ohw, chw) = (g.k(), g.ohw(), g.cin * g.h * g.w);
    let mut y = par::zeroed::<T>(g.b * g.cout * ohw);
    let threads = par::threads();
    let w = Weights::new(g, wt, g.cout, k, (k, 1));
    let nb = group_size(g, threads);
    if nb > 1 {
        y.par_chunks_mut(nb * g.cout * ohw)
            .enumerate()
            .for_each(|(gi, yg)| {
                let (b0, n) = (gi * nb, yg.len() / (g.cout * ohw));
                let ld = n * ohw;
                par::with_scratch((k + g.cout) * ld, |buf: &mut [T]| {
                    let (cols, out) = buf.split_at_mut(k * ld);
                    group_cols(g, x, b0, n, cols);
                    w.gemm(g.cout, ld, k, out, ld, false, cols, (ld, 1), 1);
                    // Back to [n, Cout, HW], adding the bias (and residual) and applying the
                    // ReLU on the way.
                    for (j, dst) in yg.chunks_exact_mut(ohw).enumerate() {
                        let (i, c) = (j / g.cout, j % g.cout);
                        let b = bias.map_or(T::zero(), |b| b[c]);
                        let src = &out[c * ld + i * ohw..][..ohw];
                        let r = res.map(|r| &r[(b0 * g.cout + j) * ohw..][..ohw]);
                        for (m, (d, &v)) in dst.iter_mut().zip(src).enumerate() {
                            let v = v + b + r.map_or(T::zero(), |r| r[m]);
                            *d = if relu && v < T::zero() { T::zero() } else { v };
                        }
                    }
                });
            });
        return y;
    }
    let blocks = row_blocks(g);
    let run = |bi: usize, yb: &mut [T], gemm_threads: usize| {
        // The gemm adds to the output's initial value: bias, residual + bias, or nothing. On
        // the one-image-at-a-time path (`gemm_threads > 1`) this and the ReLU below run over
        // the channels in parallel: serial, they left a core idle for 5% of a ResNet-50
        // inference.
        let init = |c: usize, row: &mut [T]| {
            let bv = bias.map_or(T::zero(), |b| b[c]);
            match res {
                Some(r) => {
                    let rr = &r[(bi * g.cout + c) * ohw..][..ohw];
                    for (d, &v) in row.iter_mut().zip(rr) {
                        *d = v + bv;
                    }
                }
                None => row.fill(bv),
            }
        };
        if res.is_some() || bias.is_some() {
            if gemm_threads > 1 {
                yb.par_chunks_exact_mut(ohw)
                    .enumerate()
                    .for_each(|(c, row)| init(c, row));
            } else {
                yb.chunks_exact_mut(ohw)
                    .enumerate()
                    .for_each(|(c, row)| init(c, row));
            }
        }
        let accumulate = res.is_some() || bias.is_some();
        let xb = &x[bi * chw..(bi + 1) * chw];
        for rows in &blocks {
            let (r0, n) = (rows.start * g.ow, rows.len() * g.ow);
            with_cols(g, xb, rows.clone(), gemm_threads, |src| {
                w.gemm(
                    g.cout,
                    n,
                    k,
                    &mut yb[r0..],
                    ohw,
                    accumulate,
                    src,
                    (n, 1),
                    gemm_threads,
                )
            });
        }
        if relu {
            let clip = |r: &mut [T]| {
                for v in r.iter_mut() {
                    if *v < T::zero() {
                        *v = T::zero();
                    }
                }
            };
            if gemm_threads > 1 {
                yb.par_chunks_mut(ohw).for_each(clip);
            } else {
                clip(yb);
            }
        }
    };
    if per_image(g, threads) {
        y.par_chunks_mut(g.cout * ohw)
            .enumerate()
            .for_each(|(bi, yb)| run(bi, yb, 1));
    } else {
        for (bi, yb) in y.chunks_mut(g.cout * ohw).enumerate() {
            run(bi, yb, threads);
        }
    }
    y
}

/// Calls `f` with the patch matrix of output rows `rows` of image `xb` (the image itself for a
/// pointwise convolution), built in this thread's scratch memory.
fn with_cols<T: WithDType, R>(
    g: &Geom,
    xb: &[T],
    rows: Range<usize>,
    threads: usize,
    f: impl FnOnce(&[T]) -> R,
) -> R {
    if g.is_pointwise() {
        return f(xb);
    }
    par::with_scratch(g.k() * rows.len() * g.ow, |cols: &mut [T]| {
        if threads > 1 {
            im2col(g, xb, rows, cols);
        } else {
            par::sequential(|| im2col(g, xb, rows, cols));
        }
        f(cols)
    })
}

/// Input gradient: `dx[b] = col2im(Wᵀ · dy[b])`.
pub(crate) fn backward_input<T: WithDType>(g: &Geom, dy: &[T], wt: &[T]) -> Vec<T> {
    if g.bf16 && T::DTYPE == DType::F32 {
        // The transposed convolution in bf16 where it suits them itself (else its f32 route).
        return match transposed(g) {
            Some(mut gt) => {
                gt.bf16 = Geom::bf16_suits(&gt);
                if gt.bf16 && !gt.is_1x1() {
                    // The direct kernel's bf16 form (as `forward` would pick), which packs the
                    // rotated weights itself.
                    return from_f32(crate::direct::forward_bf16_flipped(
                        &gt,
                        as_f32(dy),
                        as_f32(wt),
                    ));
                }
                forward(&gt, dy, &flip_transpose(g, wt), None, false)
            }
            None if Geom::bf16_input_grad_suits(g) => backward_input_im2col(g, dy, wt),
            None => backward_input(&Geom { bf16: false, ..*g }, dy, wt),
        };
    }
    if T::DTYPE == DType::F32
        && crate::winograd4::suitable(g)
        && transposed(g).is_some_and(|gt| use_winograd4(&gt))
    {
        return from_f32(crate::winograd4::backward_input(g, as_f32(dy), as_f32(wt)));
    }
    if use_winograd(g) {
        return crate::winograd::backward_input(g, dy, wt);
    }
    if let Some(gt) = transposed(g) {
        if T::DTYPE == DType::F32
            && !use_winograd4(&gt)
            && !use_winograd(&gt)
            && crate::direct::suitable(&gt)
        {
            // The direct kernel (as `forward` would pick), which packs the rotated weights
            // itself: the same packed values as from `flip_transpose`'s copy.
            return from_f32(crate::direct::forward_flipped(&gt, as_f32(dy), as_f32(wt)));
        }
        return forward(&gt, dy, &flip_transpose(g, wt), None, false);
    }
    backward_input_im2col(g, dy, wt)
}

/// For a stride-1 convolution with a square kernel and `padding < k`, the input gradient is a
/// forward convolution of `dy` with the kernel rotated by 180 degrees and its channel axes
/// swapped, at padding `k - 1 - padding`: this geometry. Its gemm has the long `Cout*k*k` inner
/// dimension of a forward pass (instead of `Cout`) and its patch matrix is gathered by im2col
/// rather than scattered by col2im. Pointwise convolutions keep their plain gemm.
pub(crate) fn transposed(g: &Geom) -> Option<Geom> {
    let ok = g.p.stride == 1
        && g.p.dilation == 1
        && g.kh == g.kw
        && g.p.padding < g.kh
        && !g.is_pointwise();
    ok.then(|| Geom {
        b: g.b,
        cin: g.cout,
        h: g.oh,
        w: g.ow,
        cout: g.cin,
        kh: g.kh,
        kw: g.kw,
        oh: g.h,
        ow: g.w,
        p: ConvParams {
            padding: g.kh - 1 - g.p.padding,
            ..g.p
        },
        bf16: g.bf16,
        bf16_weight_grad: false,
        keep_weights: g.keep_weights,
    })
}

/// `w'[ci][co][y][x] = w[co][ci][kh-1-y][kw-1-x]`: the weights of [`transposed`].
pub(crate) fn flip_transpose<T: WithDType>(g: &Geom, wt: &[T]) -> Vec<T> {
    let kk = g.kh * g.kw;
    let mut out = vec![T::zero(); wt.len()];
    // In parallel over the new outer dimension: serial, it ran on candle's thread with the
    // workers idle (0.6% of a small-model training step's samples).
    par::for_each_chunk(&mut out, g.cout * kk, |ci, dst| {
        for co in 0..g.cout {
            let src = &wt[(co * g.cin + ci) * kk..][..kk];
            for (d, s) in dst[co * kk..][..kk].iter_mut().zip(src.iter().rev()) {
                *d = *s;
            }
        }
    });
    out
}

/// [`backward_input`] through gemm + col2im, whatever the geometry.
pub(crate) fn backward_input_im2col<T: WithDType>(g: &Geom, dy: &[T], wt: &[T]) -> Vec<T> {
    let (k, ohw, chw) = (g.k(), g.ohw(), g.cin * g.h * g.w);
    let mut dx = par::zeroed::<T>(g.b * chw);
    let threads = par::threads();
    // Wᵀ: k x Cout.
    let w = Weights::new(g, wt, k, g.cout, (1, k));
    let nb = group_size(g, threads);
    if nb > 1 {
        dx.par_chunks_mut(nb * chw)
            .enumerate()
            .for_each(|(gi, dxg)| {
                let (b0, n) = (gi * nb, dxg.len() / chw);
                let ld = n * ohw;
                par::with_scratch((g.cout + k) * ld, |buf: &mut [T]| {
                    let (dyg, cols) = buf.split_at_mut(g.cout * ld);
                    gather_group(dy, b0, n, g.cout, ohw, dyg);
                    w.gemm(k, ld, g.cout, cols, ld, false, dyg, (ld, 1), 1);
                    par::sequential(|| {
                        for (i, dxb) in dxg.chunks_exact_mut(chw).enumerate() {
                            col2im_at(g, cols, (ld, i * ohw), 0..g.oh, dxb);
                        }
                    });
                });
            });
        return dx;
    }
    let blocks = row_blocks(g);
    let run = |bi: usize, dxb: &mut [T], gemm_threads: usize| {
        let dyb = &dy[bi * g.cout * ohw..(bi + 1) * g.cout * ohw];
        if g.is_pointwise() {
            w.gemm(k, ohw, g.cout, dxb, ohw, false, dyb, (ohw, 1), gemm_threads);
            return;
        }
        for rows in &blocks {
            let (r0, n) = (rows.start * g.ow, rows.len() * g.ow);
            par::with_scratch(k * n, |cols: &mut [T]| {
                let dyr = &dyb[r0..];
                w.gemm(k, n, g.cout, cols, n, false, dyr, (ohw, 1), gemm_threads);
                if gemm_threads > 1 {
                    col2im(g, cols, rows.clone(), dxb);
                } else {
                    par::sequential(|| col2im(g, cols, rows.clone(), dxb));
                }
            });
        }
    };
    if per_image(g, threads) {
        dx.par_chunks_mut(chw)
            .enumerate()
            .for_each(|(bi, dxb)| run(bi, dxb, 1));
    } else {
        for (bi, dxb) in dx.chunks_mut(chw).enumerate() {
            run(bi, dxb, threads);
        }
    }
    dx
}

/// Weight gradient: `dW = Σ_b dy[b] · cols(x[b])ᵀ`.
pub(crate) fn backward_weight<T: WithDType>(g: &Geom, x: &[T], dy: &[T]) -> Vec<T> {
    let bf16 = g.bf16_weight_grad && crate::direct::suitable_bf16_weight_grad(g);
    if T::DTYPE == DType::F32 && (bf16 || crate::direct::suitable(g)) {
        let dw = if bf16 {
            crate::direct::backward_weight_bf16(g, as_f32(x), as_f32(dy))
        } else {
            crate::direct::backward_weight(g, as_f32(x), as_f32(dy))
        };
        // SAFETY: T is f32 (checked above): same layout, same allocation.
        let mut dw = std::mem::ManuallyDrop::new(dw);
        return unsafe {
            Vec::from_raw_parts(dw.as_mut_ptr().cast::<T>(), dw.len(), dw.capacity())
        };
    }
    backward_weight_im2col(g, x, dy)
}

/// [`backward_weight`] through im2col + gemm, whatever the geometry.
pub(crate) fn backward_weight_im2col<T: WithDType>(g: &Geom, x: &[T], dy: &[T]) -> Vec<T> {
    let (k, ohw, chw) = (g.k(), g.ohw(), g.cin * g.h * g.w);
    let threads = par::threads();
    let nb = group_size(g, threads);
    if nb > 1 {
        let partial: Vec<Vec<T>> = (0..g.b.div_ceil(nb))
            .into_par_iter()
            .map(|gi| {
                let (b0, n) = (gi * nb, nb.min(g.b - gi * nb));
                let ld = n * ohw;
                let mut dw = vec![T::zero(); g.cout * k];
                par::with_scratch((g.cout + k) * ld, |buf: &mut [T]| {
                    let (dyg, cols) = buf.split_at_mut(g.cout * ld);
                    gather_group(dy, b0, n, g.cout, ohw, dyg);
                    group_cols(g, x, b0, n, cols);
                    gemm(
                        g.cout,
                        k,
                        ld,
                        &mut dw,
                        k,
                        false,
                        dyg,
                        (ld, 1),
                        cols,
                        (1, ld),
                        1,
                        g.bf16_weight_grad,
                    );
                });
                dw
            })
            .collect();
        return sum_partials(partial, g.cout * k);
    }
    let blocks = row_blocks(g);
    // Accumulates image `bi` into `dw`, overwriting it first when `first`.
    let run = |bi: usize, dw: &mut [T], first: bool, gemm_threads: usize| {
        let xb = &x[bi * chw..(bi + 1) * chw];
        let dyb = &dy[bi * g.cout * ohw..(bi + 1) * g.cout * ohw];
        for (j, rows) in blocks.iter().enumerate() {
            let (r0, n) = (rows.start * g.ow, rows.len() * g.ow);
            let acc = !(first && j == 0);
            with_cols(g, xb, rows.clone(), gemm_threads, |src| {
                let dyr = &dyb[r0..];
                gemm(
                    g.cout,
                    k,
                    n,
                    dw,
                    k,
                    acc,
                    dyr,
                    (ohw, 1),
                    src,
                    (1, n),
                    gemm_threads,
                    g.bf16_weight_grad,
                )
            });
        }
    };
    if per_image(g, threads) {
        // Each thread accumulates its share of the batch; the partial sums are added at the end.
        let chunk = g.b.div_ceil(threads);
        let partial: Vec<Vec<T>> = (0..g.b.div_ceil(chunk))
            .into_par_iter()
            .map(|t| {
                let mut dw = vec![T::zero(); g.cout * k];
                for (i, bi) in (t * chunk..((t + 1) * chunk).min(g.b)).enumerate() {
                    run(bi, &mut dw, i == 0, 1);
                }
                dw
            })
            .collect();
        sum_partials(partial, g.cout * k)
    } else {
        let mut dw = vec![T::zero(); g.cout * k];
        for bi in 0..g.b {
            run(bi, &mut dw, bi == 0, threads);
        }
        dw
    }
}

/// Element-wise sum of the per-thread partial weight gradients.
fn sum_partials<T: WithDType>(partial: Vec<Vec<T>>, len: usize) -> Vec<T> {
    let mut it = partial.into_iter();
    let mut dw = it.next().unwrap_or_else(|| vec![T::zero(); len]);
    for p in it {
        for (a, b) in dw.iter_mut().zip(p) {
            *a += b;
        }
    }
    dw
}

/// Per-channel sums of a `[B, C, H, W]` gradient: the bias gradient.
pub(crate) fn channel_sum<T: WithDType>(dy: &[T], b: usize, c: usize, hw: usize) -> Vec<T> {
    (0..c)
        .into_par_iter()
        .map(|ci| {
            let mut s = T::zero();
            for bi in 0..b {
                s += crate::reduce::lane_sum(&dy[(bi * c + ci) * hw..][..hw], |v| v);
            }
            s
        })
        .collect()
}

/// `(x, w) -> conv(x, w)`, differentiable in both.
struct Conv2d {
    p: ConvParams,
    relu: bool,
    /// [`Geom::keep_weights`].
    keep: bool,
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "kernels-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geom {
            keep_weights: self.keep,
            ..Geom::new(l1.dims(), l2.dims(), self.p)?
        };
        dispatch!("conv2d", (s1, l1, s2, l2), |x, w| (
            forward(&g, x, w, None, self.relu),
            Shape::from((g.b, g.cout, g.oh, g.ow))
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = mask_relu(grad, res, self.relu)?;
        conv_grads(self.p, x, w, &grad)
    }
}

/// `(x, w, bias) -> conv(x, w) + bias`, differentiable in all three.
struct Conv2dBias {
    p: ConvParams,
    relu: bool,
    /// [`Geom::keep_weights`].
    keep: bool,
}

impl CustomOp3 for Conv2dBias {
    fn name(&self) -> &'static str {
        "kernels-conv2d-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geom {
            keep_weights: self.keep,
            ..Geom::with_bias(l1.dims(), l2.dims(), l3.dims(), self.p)?
        };
        dispatch!("conv2d", (s1, l1, s2, l2, s3, l3), |x, w, b| (
            forward(&g, x, w, Some(b), self.relu),
            Shape::from((g.b, g.cout, g.oh, g.ow))
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = mask_relu(grad, res, self.relu)?;
        let (gx, gw) = conv_grads(self.p, x, w, &grad)?;
        let gb = grad.apply_op1_no_bwd(&ChannelSum)?;
        Ok((gx, gw, Some(gb)))
    }
}

/// Input and weight gradients of a convolution, each only where autograd can use it: the input
/// gradient of the first layer (the images) is skipped, a full convolution's worth of work.
fn conv_grads(
    p: ConvParams,
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let gx = if x.track_op() {
        let op = InputGrad { p, x: x.dims4()? };
        Some(grad.apply_op2_no_bwd(w, &op)?)
    } else {
        None
    };
    let gw = if w.track_op() {
        let op = WeightGrad { p, w: w.dims4()? };
        Some(x.apply_op2_no_bwd(grad, &op)?)
    } else {
        None
    };
    Ok((gx, gw))
}

/// The incoming gradient, zeroed where a fused ReLU clipped the output.
fn mask_relu(grad: &Tensor, res: &Tensor, relu: bool) -> Result<Tensor> {
    let grad = grad.contiguous()?;
    if relu {
        grad.apply_op2_no_bwd(res, &ReluMask)
    } else {
        Ok(grad)
    }
}

pub(crate) struct ReluMask;

impl CustomOp2 for ReluMask {
    fn name(&self) -> &'static str {
        "kernels-relu-mask"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        crate::dtype::same_dims("relu mask", l1, l2)?;
        fn run<T: WithDType>(g: &[T], y: &[T]) -> Vec<T> {
            const CHUNK: usize = 1 << 15;
            crate::par::fill_chunks(g.len(), CHUNK, |i, o| {
                let (g, y) = (&g[i * CHUNK..][..o.len()], &y[i * CHUNK..][..o.len()]);
                for ((o, &g), &y) in o.iter_mut().zip(g).zip(y) {
                    o.write(if y > T::zero() { g } else { T::zero() });
                }
            })
        }
        dispatch!("relu mask", (s1, l1, s2, l2), |g, y| (
            run(g, y),
            l1.shape().clone()
        ))
    }
}

/// `(dy, w) -> dx`.
struct InputGrad {
    p: ConvParams,
    x: (usize, usize, usize, usize),
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "kernels-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = self.x;
        let g = Geom::new(&[b, c, h, w], l2.dims(), self.p)?;
        if l1.dims() != [g.b, g.cout, g.oh, g.ow] {
            bail!(
                "conv2d backward: gradient shape {:?} does not match",
                l1.dims()
            )
        }
        dispatch!("conv2d backward", (s1, l1, s2, l2), |dy, wt| (
            backward_input(&g, dy, wt),
            Shape::from(self.x)
        ))
    }
}

/// `(x, dy) -> dw`.
struct WeightGrad {
    p: ConvParams,
    w: (usize, usize, usize, usize),
}

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "kernels-conv2d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (co, ci, kh, kw) = self.w;
        let g = Geom::new(l1.dims(), &[co, ci, kh, kw], self.p)?;
        if l2.dims() != [g.b, g.cout, g.oh, g.ow] {
            bail!(
                "conv2d backward: gradient shape {:?} does not match",
                l2.dims()
            )
        }
        dispatch!("conv2d backward", (s1, l1, s2, l2), |x, dy| (
            backward_weight(&g, x, dy),
            Shape::from(self.w)
        ))
    }
}

/// `[B, C, H, W] -> [C]` sums.
struct ChannelSum;

impl CustomOp1 for ChannelSum {
    fn name(&self) -> &'static str {
        "kernels-channel-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l.shape().dims4()?;
        dispatch!("channel sum", (s, l), |d| (
            channel_sum(d, b, c, h * w),
            Shape::from(c)
        ))
    }
}

/// Whether the fast CPU path applies to these operands.
fn fast_path(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu()
        && w.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && x.dtype() == w.dtype()
}

/// 2-D convolution of `x` (`[B, Cin, H, W]`) with `w` (`[Cout, Cin, kh, kw]`) and an optional
/// `bias` (`[Cout]`), PyTorch's `F.conv2d` (groups 1); differentiable in all operands.
///
/// On the CPU with f32/f64 this runs the im2col + gemm kernels of this crate, forward and
/// backward. Elsewhere it falls back to candle's `conv2d` (plus a broadcast bias).
pub fn conv2d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, p: ConvParams) -> Result<Tensor> {
    conv2d_act(x, w, bias, p, false)
}

/// [`conv2d`] followed by a ReLU, fused into the same pass on the CPU.
pub fn conv2d_relu(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, p: ConvParams) -> Result<Tensor> {
    conv2d_act(x, w, bias, p, true)
}

fn conv2d_act(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    p: ConvParams,
    relu: bool,
) -> Result<Tensor> {
    if !fast_path(x, w) {
        let mut y = x.conv2d(w, p.padding, p.stride, p.dilation, 1)?;
        if let Some(b) = bias {
            y = y.broadcast_add(&b.reshape((1, (), 1, 1))?)?;
        }
        return if relu { y.relu() } else { Ok(y) };
    }
    let keep = !w.track_op();
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match bias {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, Conv2dBias { p, relu, keep }),
        None => x.apply_op2(&w, Conv2d { p, relu, keep }),
    }
}

/// `relu(conv(x, w) + bias + residual)` for inference: the residual add and the ReLU happen
/// while the convolution writes its output (the direct kernel's stores, the gemm's initial
/// value), so a residual block ends in one pass over its output instead of three.
///
/// Not differentiable: where any operand is tracked by autograd, or off the CPU, it is
/// [`conv2d`] followed by [`crate::add_relu`] (same values, up to the order of the additions).
pub fn conv2d_add_relu(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: &Tensor,
    p: ConvParams,
) -> Result<Tensor> {
    let tracked =
        x.track_op() || w.track_op() || bias.is_some_and(Tensor::track_op) || residual.track_op();
    if tracked || !fast_path(x, w) || residual.dtype() != x.dtype() || !residual.device().is_cpu() {
        return crate::add_relu(&conv2d(x, w, bias, p)?, residual);
    }
    let out = conv2d_out_dims(x.dims(), w.dims(), p)?;
    if residual.dims() != out {
        bail!(
            "conv2d_add_relu: residual {:?} differs from the convolution's output {out:?}",
            residual.dims()
        )
    }
    let bias = match bias {
        Some(b) => b.contiguous()?,
        None => Tensor::zeros(out[1], x.dtype(), x.device())?,
    };
    let op = Conv2dResidual {
        p,
        res: residual.contiguous()?,
    };
    x.contiguous()?
        .apply_op3_no_bwd(&w.contiguous()?, &bias, &op)
}

/// `(x, w, bias) -> relu(conv(x, w) + bias + res)`, forward only.
struct Conv2dResidual {
    p: ConvParams,
    res: Tensor,
}

impl CustomOp3 for Conv2dResidual {
    fn name(&self) -> &'static str {
        "kernels-conv2d-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        // Forward only: never trained weights.
        let g = Geom {
            keep_weights: true,
            ..Geom::with_bias(l1.dims(), l2.dims(), l3.dims(), self.p)?
        };
        let (rs, rl) = self.res.storage_and_layout();
        let candle_core::Storage::Cpu(rs) = &*rs else {
            bail!("conv2d_add_relu: the residual must be on the CPU")
        };
        dispatch!("conv2d", (s1, l1, s2, l2, s3, l3, rs, rl), |x, w, b, r| (
            forward_fused(&g, x, w, Some(b), Some(r), true),
            Shape::from((g.b, g.cout, g.oh, g.ow))
        ))
    }
}

/// Which products of a convolution multiply in bf16 when bf16 products are on ([`crate::bf16`]);
/// the others run in f32, bit for bit as with bf16 products off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bf16Products {
    pub forward: bool,
    pub input_grad: bool,
    pub weight_grad: bool,
}

/// [`Bf16Products`] of a convolution of these shapes: 1x1 kernels in all three products; the
/// larger kernels the direct kernel's bf16 form takes in their forward pass, and in their
/// input gradient where its transposed convolution is such a layer too (stride 1) or goes
/// through im2col for a layer that the f32 direct kernel takes (strided); the
/// weight gradient of every layer the direct kernel's bf16 form takes (the layers Winograd
/// computes forward included); the other products in f32.
pub fn conv2d_bf16_products(
    x_dims: &[usize],
    w_dims: &[usize],
    p: ConvParams,
) -> Result<Bf16Products> {
    let g = Geom::new(x_dims, w_dims, p)?;
    let on = Geom::bf16_suits(&g);
    Ok(Bf16Products {
        forward: on,
        input_grad: on && Geom::bf16_input_grad_suits(&g),
        weight_grad: Geom::bf16_weight_grad_suits(&g),
    })
}

/// Output dims `[B, Cout, OH, OW]` of a convolution of `x_dims` by `w_dims` (errors as
/// [`conv2d`] would).
pub fn conv2d_out_dims(x_dims: &[usize], w_dims: &[usize], p: ConvParams) -> Result<[usize; 4]> {
    let g = Geom::new(x_dims, w_dims, p)?;
    Ok([g.b, g.cout, g.oh, g.ow])
}

/// Multiply-adds of the forward pass of a convolution of `x_dims` with `w_dims` (backward costs
/// twice as much), or an error when the shapes do not fit.
pub fn conv2d_macs(x_dims: &[usize], w_dims: &[usize], p: ConvParams) -> Result<usize> {
    Ok(Geom::new(x_dims, w_dims, p)?.macs())
}
