//! Differentiable operations that candle 0.11 lacks a backward pass for.
//!
//! * [`max_pool2d`]: max-pooling with padding and a kernel that differs from its stride (the
//!   ResNet stem's 3x3/2, padding 1). A CPU custom op whose backward routes each output gradient
//!   to the first maximal input of its window, as PyTorch does; [`max_pool2d_portable`] does the
//!   same from candle operations on other devices.
//! * [`upsample_bilinear_ac`]: bilinear resize with `align_corners=True` to any size, written as
//!   two matrix products with fixed interpolation matrices, so candle differentiates it on every
//!   backend.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor,
    WithDType, bail,
};

/// Geometry of a 2-D max-pool (square kernel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PoolGeom {
    k: usize,
    s: usize,
    p: usize,
}

impl PoolGeom {
    fn new(kernel: usize, stride: usize, padding: usize) -> Result<Self> {
        if kernel == 0 || stride == 0 || 2 * padding > kernel {
            bail!("max_pool2d: bad geometry kernel {kernel}, stride {stride}, padding {padding}")
        }
        Ok(Self {
            k: kernel,
            s: stride,
            p: padding,
        })
    }

    fn out_size(&self, n: usize) -> Result<usize> {
        if n + 2 * self.p < self.k {
            bail!(
                "max_pool2d: input side {n} with padding {} is smaller than the kernel {}",
                self.p,
                self.k
            )
        }
        Ok((n + 2 * self.p - self.k) / self.s + 1)
    }

    /// The window of output `(oy, ox)` clipped to an `h x w` plane: rows `ys..ye`, columns
    /// `xs..xe` (never empty: padding is at most half the kernel).
    #[inline]
    fn window(&self, h: usize, w: usize, oy: usize, ox: usize) -> (usize, usize, usize, usize) {
        let clip = |o: usize, n: usize| {
            let start = (o * self.s) as isize - self.p as isize;
            let lo = start.max(0) as usize;
            let hi = ((start + self.k as isize) as usize).min(n);
            (lo, hi)
        };
        let ((ys, ye), (xs, xe)) = (clip(oy, h), clip(ox, w));
        (ys, ye, xs, xe)
    }
}

/// `a` if it is larger or NaN, else `m`: a max that lets NaN through, as PyTorch's pooling does.
/// A select, not a branch: the comparison is a coin flip on real data.
#[inline]
fn nan_max<T: WithDType>(m: T, a: T) -> T {
    #[allow(clippy::eq_op)]
    let take = a > m || a != a;
    if take { a } else { m }
}

struct MaxPool2d(PoolGeom);

impl MaxPool2d {
    fn fwd<T: WithDType>(&self, data: &[T], layout: &Layout) -> Result<(Vec<T>, Shape)> {
        let (b, c, h, w) = layout.shape().dims4()?;
        let src = retinanet_kernels::dtype::slice(data, layout, "max_pool2d", "input")?;
        let (oh, ow) = (self.0.out_size(h)?, self.0.out_size(w)?);
        use rayon::prelude::*;
        let mut out = retinanet_kernels::zeroed::<T>(b * c * oh * ow);
        // Planes are independent: spread them over the threads. Separable: the maximum over
        // each output row's window rows, column by column (whole rows at a time, which
        // vectorises), then over each window's columns of that. Same values as the window by
        // window loop (a maximum is exact; NaN still wins), twice as fast on the stem's pool.
        out.par_chunks_mut(oh * ow)
            .zip(src.par_chunks_exact(h * w))
            .for_each(|(o, plane)| {
                let mut col = vec![T::zero(); w];
                for (oy, orow) in o.chunks_exact_mut(ow).enumerate() {
                    let (ys, ye, _, _) = self.0.window(h, w, oy, 0);
                    col.copy_from_slice(&plane[ys * w..][..w]);
                    for row in plane[(ys + 1) * w..ye * w].chunks_exact(w) {
                        for (c, &v) in col.iter_mut().zip(row) {
                            *c = nan_max(*c, v);
                        }
                    }
                    for (ox, out) in orow.iter_mut().enumerate() {
                        let (_, _, xs, xe) = self.0.window(h, w, oy, ox);
                        *out = col[xs + 1..xe].iter().fold(col[xs], |m, &v| nan_max(m, v));
                    }
                }
            });
        Ok((out, Shape::from((b, c, oh, ow))))
    }
}

impl CustomOp1 for MaxPool2d {
    fn name(&self) -> &'static str {
        "max-pool2d-padded"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        retinanet_kernels::dispatch!(raw "max_pool2d", (storage), |d| self.fwd(d, layout))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad_res.contiguous()?;
        Ok(Some(arg.apply_op3_no_bwd(
            &res.contiguous()?,
            &grad,
            &MaxPool2dGrad(self.0),
        )?))
    }
}

/// `(input, output, grad_output) -> grad_input` for [`MaxPool2d`]: each output's gradient goes
/// to the first element of its window (row-major) equal to the output, i.e. the first maximum
/// (the first NaN where the output is NaN). The position is found again rather than stored,
/// which keeps the forward pass allocation-free beyond its output.
struct MaxPool2dGrad(PoolGeom);

impl MaxPool2dGrad {
    fn run<T: WithDType>(
        &self,
        x: &[T],
        lx: &Layout,
        y: &[T],
        ly: &Layout,
        g: &[T],
        lg: &Layout,
    ) -> Result<(Vec<T>, Shape)> {
        let (b, c, h, w) = lx.shape().dims4()?;
        let (gb, gc, oh, ow) = lg.shape().dims4()?;
        if (gb, gc) != (b, c)
            || oh != self.0.out_size(h)?
            || ow != self.0.out_size(w)?
            || ly.shape() != lg.shape()
        {
            bail!(
                "max_pool2d backward: gradient shape {:?} does not match input {:?}",
                lg.shape(),
                lx.shape()
            )
        }
        let x = retinanet_kernels::dtype::slice(x, lx, "max_pool2d backward", "input")?;
        let y = retinanet_kernels::dtype::slice(y, ly, "max_pool2d backward", "output")?;
        let g = retinanet_kernels::dtype::slice(g, lg, "max_pool2d backward", "gradient")?;
        let mut out = retinanet_kernels::zeroed::<T>(b * c * h * w);
        use rayon::prelude::*;
        out.par_chunks_exact_mut(h * w)
            .zip(x.par_chunks_exact(h * w))
            .zip(y.par_chunks_exact(oh * ow).zip(g.par_chunks_exact(oh * ow)))
            .for_each(|((oplane, plane), (yplane, gplane))| {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let (ys, ye, xs, xe) = self.0.window(h, w, oy, ox);
                        let m = yplane[oy * ow + ox];
                        #[allow(clippy::eq_op)]
                        let nan = m != m;
                        // Scanned backwards with selects, so the last hit is the first match.
                        let mut first = ys * w + xs;
                        for y in (ys..ye).rev() {
                            for x in (xs..xe).rev() {
                                let v = plane[y * w + x];
                                #[allow(clippy::eq_op)]
                                let hit = v == m || (nan && v != v);
                                first = if hit { y * w + x } else { first };
                            }
                        }
                        oplane[first] += gplane[oy * ow + ox];
                    }
                }
            });
        Ok((out, lx.shape().clone()))
    }
}

impl CustomOp3 for MaxPool2dGrad {
    fn name(&self) -> &'static str {
        "max-pool2d-padded-grad"
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
        retinanet_kernels::dispatch!(raw "max_pool2d backward", (s1, s2, s3), |x, y, g| self
            .run(x, l1, y, l2, g, l3))
    }
}

/// 2-D max-pool of a `[B, C, H, W]` tensor with a `kernel x kernel` window, `stride` and
/// implicit `-inf` `padding` (PyTorch's `F.max_pool2d(x, kernel, stride, padding)`, floor mode).
///
/// Differentiable: the gradient of each output goes to the first maximum of its window. A CPU
/// kernel; on other devices [`max_pool2d_portable`].
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let g = PoolGeom::new(kernel, stride, padding)?;
    if x.device().is_cpu() {
        x.contiguous()?.apply_op1(MaxPool2d(g))
    } else {
        pool_portable(x, g)
    }
}

/// [`max_pool2d`] from candle's differentiable operations, for devices other than the CPU (a
/// round trip through the CPU op cost a copy of the activation each way, forward and backward).
///
/// The windows are `kernel²` strided views of the input padded with `-inf`; the output sums,
/// for each view, the values where that view holds the window's first maximum and zero
/// elsewhere, so its gradient reaches the first maximum of each window only, as on the CPU.
/// NaN inputs are not propagated the way the CPU op does (the maximum is the device's).
pub fn max_pool2d_portable(
    x: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    pool_portable(x, PoolGeom::new(kernel, stride, padding)?)
}

fn pool_portable(x: &Tensor, g: PoolGeom) -> Result<Tensor> {
    let PoolGeom {
        k: kernel,
        s: stride,
        p: padding,
    } = g;
    let (b, c, h, w) = x.dims4()?;
    let (oh, ow) = (g.out_size(h)?, g.out_size(w)?);
    let dev = x.device();
    // Padded so that each view can take `oh * stride` rows from its offset before subsampling.
    let (hp, wp) = (
        (kernel - 1 + oh * stride).max(h + 2 * padding),
        (kernel - 1 + ow * stride).max(w + 2 * padding),
    );
    let pad = |t: &Tensor| -> Result<Tensor> {
        t.pad_with_zeros(2, padding, hp - h - padding)?
            .pad_with_zeros(3, padding, wp - w - padding)
    };
    let inside = pad(&Tensor::ones((1, 1, h, w), DType::U8, dev)?)?.broadcast_as((b, c, hp, wp))?;
    let low = Tensor::full(f64::NEG_INFINITY, (b, c, hp, wp), dev)?.to_dtype(x.dtype())?;
    let xp = inside.where_cond(&pad(x)?, &low)?;
    let mut views = Vec::with_capacity(kernel * kernel);
    for dy in 0..kernel {
        for dx in 0..kernel {
            let v = xp
                .narrow(2, dy, oh * stride)?
                .narrow(3, dx, ow * stride)?
                .contiguous()?
                .reshape((b, c, oh, stride, ow, stride))?
                .narrow(3, 0, 1)?
                .narrow(5, 0, 1)?
                .reshape((b, c, oh, ow))?;
            views.push(v);
        }
    }
    let mut max = views[0].detach();
    for v in &views[1..] {
        max = max.maximum(&v.detach())?;
    }
    // Row-major scan: a view takes the window where it equals the maximum and no earlier one did.
    let zeros = max.zeros_like()?;
    let mut taken = zeros.clone();
    let mut out = zeros.clone();
    for v in &views {
        let hit = (v.detach().eq(&max)?.to_dtype(x.dtype())? * (1.0 - &taken)?)?;
        taken = (taken + &hit)?;
        out = (out + hit.to_dtype(DType::U8)?.where_cond(v, &zeros)?)?;
    }
    Ok(out)
}

/// The `[n_out, n_in]` matrix of 1-D linear interpolation with aligned corners: output `o`
/// samples input position `o * (n_in - 1) / (n_out - 1)`.
fn interp_matrix(n_in: usize, n_out: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    let scale = if n_out > 1 {
        (n_in - 1) as f64 / (n_out - 1) as f64
    } else {
        0.0
    };
    let mut m = vec![0f64; n_out * n_in];
    for o in 0..n_out {
        let src = o as f64 * scale;
        let i0 = (src.floor() as usize).min(n_in - 1);
        let i1 = (i0 + 1).min(n_in - 1);
        let l = src - i0 as f64;
        m[o * n_in + i0] += 1.0 - l;
        m[o * n_in + i1] += l;
    }
    Tensor::from_vec(m, (n_out, n_in), dev)?.to_dtype(dtype)
}

/// Bilinear resize of a `[B, C, H, W]` tensor to `[B, C, out_h, out_w]` with aligned corners
/// (PyTorch's `F.interpolate(x, size, mode='bilinear', align_corners=True)`).
///
/// Bilinear interpolation is separable, so the result is `My · x · Mxᵀ` with two small
/// interpolation matrices; candle differentiates the matrix products on any backend.
pub fn upsample_bilinear_ac(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if h == 0 || w == 0 || out_h == 0 || out_w == 0 {
        bail!("upsample_bilinear_ac: empty size {h}x{w} -> {out_h}x{out_w}")
    }
    let (dtype, dev) = (x.dtype(), x.device());
    // Columns: [B*C*H, W] x [W, OW].
    let mx_t = interp_matrix(w, out_w, dtype, dev)?.t()?;
    let y = x
        .contiguous()?
        .reshape((b * c * h, w))?
        .matmul(&mx_t)?
        .reshape((b * c, h, out_w))?;
    // Rows: [OH, H] x [B*C, H, OW], the matrix broadcast over the planes.
    let my = interp_matrix(h, out_h, dtype, dev)?;
    my.broadcast_left(b * c)?
        .matmul(&y)?
        .reshape((b, c, out_h, out_w))
}

/// retinanet-kernels' parameters of a candle convolution (groups are checked by the callers).
pub(crate) fn kernel_params(cfg: &candle_nn::Conv2dConfig) -> retinanet_kernels::ConvParams {
    retinanet_kernels::ConvParams {
        stride: cfg.stride,
        padding: cfg.padding,
        dilation: cfg.dilation,
    }
}

/// Applies a candle-nn convolution (groups 1) with a faster backward pass on the CPU.
///
/// candle 0.11 computes a convolution's input gradient with direct `conv_transpose2d` loops,
/// slower than a matrix product (1.1-2x per layer here). On the CPU a tracked convolution here runs candle's forward
/// on detached operands and attaches its own backward: the input gradient is one matrix product
/// `Wᵀ · grad` followed by a scatter-add (col2im), the weight gradient candle's own formula. The
/// bias is added with ordinary (differentiable) ops.
///
/// On other devices candle's backward is used, with a workaround: it derives the transposed
/// convolution's output padding from the height only, so the input gradient has the wrong width
/// when `(H + 2p - k) mod s` differs from `(W + 2p - k) mod s`. Appending zero rows/columns that
/// no window reaches equalises the two without changing the output.
pub fn conv2d(x: &Tensor, conv: &candle_nn::Conv2d) -> Result<Tensor> {
    use candle_core::Module;
    let cfg = *conv.config();
    let w = conv.weight();
    // The CPU path: retinanet-kernels' im2col/Winograd + gemm convolution with its own backward
    // (2-4x candle's on this model), bias added in the same pass.
    if x.device().is_cpu() && cfg.groups == 1 && x.dtype() == DType::F32 {
        return retinanet_kernels::conv2d(x, w, conv.bias(), kernel_params(&cfg));
    }
    let tracked = x.track_op() || w.track_op();
    if !tracked {
        return conv.forward(x);
    }
    if x.device().is_cpu() && cfg.groups == 1 && matches!(x.dtype(), DType::F32 | DType::F64) {
        let y = x
            .detach()
            .conv2d(&w.detach(), cfg.padding, cfg.stride, cfg.dilation, 1)?;
        let op = ConvBackward {
            y: std::sync::Mutex::new(Some(y)),
            padding: cfg.padding,
            stride: cfg.stride,
            dilation: cfg.dilation,
        };
        let y = x.apply_op2(w, op)?;
        return match conv.bias() {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        };
    }
    let s = cfg.stride;
    if s > 1 {
        let (_, _, h, wd) = x.dims4()?;
        let k = w.dim(2)?;
        let span = cfg.dilation * (k - 1) + 1;
        let extra = |n: usize| (n + 2 * cfg.padding).checked_sub(span).map(|v| v % s);
        if let (Some(eh), Some(ew)) = (extra(h), extra(wd))
            && eh != ew
        {
            let x = if eh < ew {
                x.pad_with_zeros(2, 0, ew - eh)?
            } else {
                x.pad_with_zeros(3, 0, eh - ew)?
            };
            return conv.forward(&x);
        }
    }
    conv.forward(x)
}

/// `(x, w) -> conv(x, w)` whose value was computed beforehand (taken once from `y`), with a
/// backward pass built from matrix products.
struct ConvBackward {
    y: std::sync::Mutex<Option<Tensor>>,
    padding: usize,
    stride: usize,
    dilation: usize,
}

impl CustomOp2 for ConvBackward {
    fn name(&self) -> &'static str {
        "conv2d-gemm-backward"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = self
            .y
            .lock()
            .map_err(|_| candle_core::Error::Msg("conv2d: poisoned lock".into()))?
            .take();
        let Some(y) = y else {
            bail!("conv2d: the precomputed output was already used")
        };
        let (storage, layout) = y.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            bail!("conv2d: expected a CPU tensor")
        };
        let n = layout.shape().elem_count();
        match layout.contiguous_offsets() {
            Some((0, end)) if end == n => Ok((cpu.clone(), layout.shape().clone())),
            _ => bail!("conv2d: expected a contiguous convolution output"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Detached operands: the gradients then hold no reference to the forward graph.
        let (x, w) = (x.detach(), w.detach());
        let (b, cin, h, wd) = x.dims4()?;
        let (cout, _, kh, kw) = w.dims4()?;
        let (_, _, oh, ow) = grad.dims4()?;
        let grad = grad.detach().contiguous()?;
        // Input gradient: columns = Wᵀ [cin*kh*kw, cout] x grad [B, cout, oh*ow], then col2im.
        let cols = w
            .reshape((cout, cin * kh * kw))?
            .t()?
            .broadcast_left(b)?
            .matmul(&grad.reshape((b, cout, oh * ow))?)?;
        let gx = if kh == 1 && kw == 1 && self.stride == 1 && self.padding == 0 {
            cols.reshape((b, cin, h, wd))?
        } else {
            cols.apply_op1_no_bwd(&Col2Im {
                c: cin,
                h,
                w: wd,
                kh,
                kw,
                oh,
                ow,
                padding: self.padding,
                stride: self.stride,
                dilation: self.dilation,
            })?
        };
        // Weight gradient: correlate the input with the (dilated by the stride) output gradient,
        // batch as channels — candle's formula.
        let gw = x
            .transpose(0, 1)?
            .conv2d(
                &grad.transpose(0, 1)?,
                self.padding,
                self.dilation,
                self.stride,
                1,
            )?
            .transpose(0, 1)?;
        let (_, _, gh, gww) = gw.dims4()?;
        let gw = if gh != kh || gww != kw {
            gw.narrow(2, 0, kh)?.narrow(3, 0, kw)?
        } else {
            gw
        };
        Ok((Some(gx), Some(gw)))
    }
}

/// `[B, C*kh*kw, oh*ow]` columns -> `[B, C, H, W]`, summing overlapping contributions.
struct Col2Im {
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    padding: usize,
    stride: usize,
    dilation: usize,
}

impl Col2Im {
    fn run<T: WithDType>(&self, cols: &[T], b: usize) -> Vec<T> {
        use rayon::prelude::*;
        let (h, w, kk) = (self.h, self.w, self.kh * self.kw);
        let col_plane = kk * self.oh * self.ow;
        let mut out = retinanet_kernels::zeroed::<T>(b * self.c * h * w);
        // One output plane (b, c) only receives its own kh*kw column rows.
        out.par_chunks_exact_mut(h * w)
            .enumerate()
            .for_each(|(i, plane)| {
                let src = &cols[i * col_plane..(i + 1) * col_plane];
                for ky in 0..self.kh {
                    for kx in 0..self.kw {
                        let row =
                            &src[(ky * self.kw + kx) * self.oh * self.ow..][..self.oh * self.ow];
                        for oy in 0..self.oh {
                            let iy = (oy * self.stride + ky * self.dilation) as isize
                                - self.padding as isize;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            let dst = &mut plane[iy as usize * w..][..w];
                            let r = &row[oy * self.ow..][..self.ow];
                            for (ox, &v) in r.iter().enumerate() {
                                let ix = (ox * self.stride + kx * self.dilation) as isize
                                    - self.padding as isize;
                                if ix >= 0 && ix < w as isize {
                                    dst[ix as usize] += v;
                                }
                            }
                        }
                    }
                }
            });
        out
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, rows, n) = layout.shape().dims3()?;
        if rows != self.c * self.kh * self.kw || n != self.oh * self.ow {
            bail!("col2im: unexpected column shape {:?}", layout.shape())
        }
        let shape = Shape::from((b, self.c, self.h, self.w));
        retinanet_kernels::dispatch!("col2im", (storage, layout), |columns| (
            self.run(columns, b),
            shape
        ))
    }
}

/// [`conv2d`] followed by a ReLU. On the CPU (f32) the ReLU is fused into the convolution's pass
/// and its backward into the convolution's backward (`retinanet_kernels::conv2d_relu`), which
/// saves candle's serial ReLU pass forward and three backward.
pub fn conv2d_relu(x: &Tensor, conv: &candle_nn::Conv2d) -> Result<Tensor> {
    let cfg = *conv.config();
    if x.device().is_cpu() && cfg.groups == 1 && x.dtype() == DType::F32 {
        return retinanet_kernels::conv2d_relu(x, conv.weight(), conv.bias(), kernel_params(&cfg));
    }
    conv2d(x, conv)?.relu()
}

/// `relu(conv(x) + residual)`: the end of a residual block at inference, the add and ReLU
/// fused into the convolution's output pass on the CPU (see
/// [`retinanet_kernels::conv2d_add_relu`]); elsewhere the three ops.
pub fn conv2d_add_relu(x: &Tensor, conv: &candle_nn::Conv2d, residual: &Tensor) -> Result<Tensor> {
    let cfg = *conv.config();
    if x.device().is_cpu() && cfg.groups == 1 && x.dtype() == DType::F32 {
        return retinanet_kernels::conv2d_add_relu(
            x,
            conv.weight(),
            conv.bias(),
            residual,
            kernel_params(&cfg),
        );
    }
    (conv2d(x, conv)? + residual)?.relu()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused path against `conv2d` + `relu`, values and input gradient.
    #[test]
    fn conv2d_relu_equals_conv_then_relu() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.3, (5, 3, 3, 3), &dev)?;
        let b = Tensor::randn(0f32, 0.3, 5, &dev)?;
        let conv = candle_nn::Conv2d::new(
            w,
            Some(b),
            candle_nn::Conv2dConfig {
                padding: 1,
                stride: 2,
                ..Default::default()
            },
        );
        let x = candle_core::Var::randn(0f32, 1., (2, 3, 9, 8), &dev)?;
        let fused = conv2d_relu(&x, &conv)?;
        let plain = conv2d(&x, &conv)?.relu()?;
        let diff = (&fused - &plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "values differ by {diff}");
        // Same mask for both (from the fused output), so the comparison cannot flip at zero.
        let r = (Tensor::randn(0f32, 1., fused.dims(), &dev)?
            * fused.gt(0.0)?.to_dtype(DType::F32)?)?;
        let g1 = (&fused * &r)?.sum_all()?.backward()?;
        let g2 = (conv2d(&x, &conv)? * &r)?.sum_all()?.backward()?;
        let diff = (g1.get(&x).unwrap() - g2.get(&x).unwrap())?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "input gradients differ by {diff}");
        Ok(())
    }
}
