//! Batch normalisation over `[B, C, H, W]` in one or two passes, as candle custom ops.
//!
//! candle evaluates `(x - mean) / sqrt(var + eps) * w + b` as half a dozen broadcast operations,
//! each a full pass over the activation (and as many again backward). Here training mode is one
//! statistics pass and one normalising pass forward, two passes backward; evaluation mode is a
//! single per-channel `x * scale + shift`.

use crate::dispatch;
use crate::par;
use crate::reduce::{lane_sum, lane_sum2};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType, bail};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Per-channel mean and biased variance of `[B, C, HW]` data (two passes: exact for large means).
fn channel_stats<T: WithDType>(x: &[T], b: usize, c: usize, hw: usize) -> Vec<(f64, f64)> {
    let n = (b * hw) as f64;
    (0..c)
        .into_par_iter()
        .map(|ci| {
            let planes = || (0..b).map(move |bi| &x[(bi * c + ci) * hw..][..hw]);
            let mut s = 0f64;
            for p in planes() {
                // Sum each plane in f32/f64 lanes first (vectorises), then in f64.
                s += lane_sum(p, |v| v).to_f64();
            }
            let mean = s / n;
            let m = T::from_f64(mean);
            let mut q = 0f64;
            for p in planes() {
                q += lane_sum(p, |v| {
                    let d = v - m;
                    d * d
                })
                .to_f64();
            }
            (mean, q / n)
        })
        .collect()
}

/// Sums per-channel statistics over the processes of a data-parallel run (SyncBatchNorm). The
/// training library implements it over its communicator; every rank calls it in the same order.
pub trait SumReducer: Send + Sync + std::fmt::Debug {
    /// Element-wise sum over the ranks, in place.
    fn all_reduce_sum(&self, values: &mut [f64]) -> Result<()>;
}

/// [`channel_stats`] over every rank's batch: the global mean first (sums and counts reduced),
/// then the global biased variance around it (two passes, as on one process). Returns the
/// statistics and the global number of values per channel.
fn synced_stats<T: WithDType>(
    x: &[T],
    b: usize,
    c: usize,
    hw: usize,
    reducer: &dyn SumReducer,
) -> Result<(Vec<(f64, f64)>, usize)> {
    let planes = |ci: usize| (0..b).map(move |bi| &x[(bi * c + ci) * hw..][..hw]);
    let mut sums: Vec<f64> = (0..c)
        .into_par_iter()
        .map(|ci| planes(ci).map(|p| lane_sum(p, |v| v).to_f64()).sum())
        .collect();
    sums.push((b * hw) as f64);
    reducer.all_reduce_sum(&mut sums)?;
    let n = sums[c];
    if n < 2.0 {
        bail!("batch-norm: training needs more than one value per channel over all ranks, got {n}")
    }
    let means: Vec<f64> = sums[..c].iter().map(|s| s / n).collect();
    let mut sq: Vec<f64> = (0..c)
        .into_par_iter()
        .map(|ci| {
            let m = T::from_f64(means[ci]);
            planes(ci)
                .map(|p| {
                    lane_sum(p, |v| {
                        let d = v - m;
                        d * d
                    })
                    .to_f64()
                })
                .sum()
        })
        .collect();
    reducer.all_reduce_sum(&mut sq)?;
    let mv = means.into_iter().zip(sq).map(|(m, q)| (m, q / n)).collect();
    Ok((mv, n as usize))
}

/// `y = x * scale[c] + shift[c]` over `[B, C, HW]`, plus `res` (same shape) where given,
/// clipped at zero when `relu`, in one pass.
fn affine<T: WithDType>(
    x: &[T],
    c: usize,
    hw: usize,
    scale: &[T],
    shift: &[T],
    relu: bool,
    res: Option<&[T]>,
) -> Vec<T> {
    let clip = |v: T| if relu && v < T::zero() { T::zero() } else { v };
    par::fill_chunks(x.len(), hw, |i, yp| {
        let (a, s) = (scale[i % c], shift[i % c]);
        let xp = &x[i * hw..][..hw];
        match res {
            Some(r) => {
                for ((o, &v), &r) in yp.iter_mut().zip(xp).zip(&r[i * hw..][..hw]) {
                    o.write(clip(v * a + s + r));
                }
            }
            None => {
                for (o, &v) in yp.iter_mut().zip(xp) {
                    o.write(clip(v * a + s));
                }
            }
        }
    })
}

/// Per channel `(Σ g, Σ g * (x - mean[c]))` over `[B, C, HW]`.
fn grad_sums<T: WithDType>(
    x: &[T],
    g: &[T],
    b: usize,
    c: usize,
    hw: usize,
    mean: &[f64],
) -> Vec<(f64, f64)> {
    (0..c)
        .into_par_iter()
        .map(|ci| {
            let m = T::from_f64(mean[ci]);
            let (mut sg, mut sgx) = (0f64, 0f64);
            for bi in 0..b {
                let o = (bi * c + ci) * hw;
                let (xp, gp) = (&x[o..o + hw], &g[o..o + hw]);
                let (a, bb) = lane_sum2(xp, gp, |_, gv| gv, |xv, gv| gv * (xv - m));
                sg += a.to_f64();
                sgx += bb.to_f64();
            }
            (sg, sgx)
        })
        .collect()
}

/// Shared between the forward op and its backward pass: the batch statistics.
#[derive(Debug, Default)]
struct Stats {
    /// Per channel `(mean, biased variance)`.
    mean_var: Vec<(f64, f64)>,
    /// Values per channel the statistics are over (all ranks' with a reducer).
    count: usize,
}

/// `(x, weight, bias) -> batch-normalised x` with batch statistics, then a ReLU if `relu`.
struct BatchNormTrain {
    eps: f64,
    relu: bool,
    /// Inputs `(x, [weight; bias], residual)` and `y = act(bn(x) + residual)`, instead of
    /// `(x, weight, bias)` and `y = act(bn(x))`: candle's custom ops take three inputs.
    residual: bool,
    stats: Arc<Mutex<Stats>>,
    reducer: Option<Arc<dyn SumReducer>>,
}

impl BatchNormTrain {
    fn run<T: WithDType>(
        &self,
        x: &[T],
        l: &Layout,
        w: &[T],
        bias: &[T],
        res: Option<&[T]>,
    ) -> Result<(Vec<T>, Shape)> {
        let (b, c, h, wd) = l.shape().dims4()?;
        let hw = h * wd;
        let (mv, count) = match &self.reducer {
            Some(r) => synced_stats(x, b, c, hw, r.as_ref())?,
            None => (channel_stats(x, b, c, hw), b * hw),
        };
        let (mut scale, mut shift) = (Vec::with_capacity(c), Vec::with_capacity(c));
        for (ci, &(mean, var)) in mv.iter().enumerate() {
            let a = w[ci].to_f64() / (var + self.eps).sqrt();
            scale.push(T::from_f64(a));
            shift.push(T::from_f64(bias[ci].to_f64() - mean * a));
        }
        let y = affine(x, c, hw, &scale, &shift, self.relu, res);
        *self
            .stats
            .lock()
            .map_err(|_| candle_core::Error::Msg("batch-norm: poisoned lock".into()))? = Stats {
            mean_var: mv,
            count,
        };
        Ok((y, l.shape().clone()))
    }
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "kernels-batch-norm-train"
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
        let c = l1.dims().get(1).copied().unwrap_or(0);
        if self.residual {
            if l1.dims().len() != 4 || l2.dims() != [2, c] || l3.dims() != l1.dims() {
                bail!(
                    "batch-norm + residual: input {:?}, weight and bias {:?}, residual {:?} do \
                     not fit",
                    l1.dims(),
                    l2.dims(),
                    l3.dims()
                )
            }
            return dispatch!("batch-norm", (s1, l1, s2, l2, s3, l3), |x, wb, r| self
                .run(x, l1, &wb[..c], &wb[c..], Some(r))?);
        }
        if l1.dims().len() != 4 || l2.dims() != [c] || l3.dims() != [c] {
            bail!(
                "batch-norm: input {:?}, weight {:?}, bias {:?} do not fit",
                l1.dims(),
                l2.dims(),
                l3.dims()
            )
        }
        dispatch!("batch-norm", (s1, l1, s2, l2, s3, l3), |x, w, b| self
            .run(x, l1, w, b, None)?)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // With a residual, `w` is `[weight; bias]` and the third input the residual.
        let w = &if self.residual { w.get(0)? } else { w.clone() };
        // The fused ReLU's backward first: the gradient where the output was clipped is zero.
        let grad = if self.relu {
            grad.contiguous()?
                .apply_op2_no_bwd(res, &crate::conv::ReluMask)?
        } else {
            grad.clone()
        };
        let grad = &grad;
        let (mv, count) = {
            let st = self
                .stats
                .lock()
                .map_err(|_| candle_core::Error::Msg("batch-norm: poisoned lock".into()))?;
            (st.mean_var.clone(), st.count)
        };
        let grad = grad.contiguous()?;
        let wv: Vec<f64> = w.to_dtype(DType::F64)?.to_vec1()?;
        let sums = x.apply_op2_no_bwd(
            &grad,
            &GradSums {
                mean: mv.iter().map(|m| m.0).collect(),
            },
        )?;
        let sums: Vec<Vec<f64>> = sums.to_dtype(DType::F64)?.to_vec2()?;
        // The input gradient needs the sums over every rank's batch (the statistics were
        // global); the weight and bias gradients stay this rank's own, as the gradient
        // all-reduce sums them over the ranks afterwards.
        let global = match &self.reducer {
            Some(r) => {
                let mut v: Vec<f64> = sums[0].iter().chain(&sums[1]).copied().collect();
                r.all_reduce_sum(&mut v)?;
                let c = sums[0].len();
                vec![v[..c].to_vec(), v[c..].to_vec()]
            }
            None => sums.clone(),
        };
        let n = count as f64;
        // dx = a * g + k * (x - mean) + d per channel, with a = w / σ,
        // k = -w Σg(x-mean) / (n σ³), d = -a Σg / n.
        let (mut a, mut k, mut d, mut gw) = (vec![], vec![], vec![], vec![]);
        for (ci, &(mean, var)) in mv.iter().enumerate() {
            let inv = 1.0 / (var + self.eps).sqrt();
            let (sg, sgx) = (global[0][ci], global[1][ci]);
            let ai = wv[ci] * inv;
            let ki = -wv[ci] * sgx * inv * inv * inv / n;
            a.push(ai);
            k.push(ki);
            d.push(-ai * sg / n - ki * mean);
            gw.push(sums[1][ci] * inv);
        }
        let dev = x.device();
        let gx = x.apply_op3_no_bwd(
            &grad,
            &Tensor::new(vec![a, k, d], dev)?.to_dtype(x.dtype())?,
            &LinearCombo,
        )?;
        let gw = Tensor::new(gw, dev)?.to_dtype(w.dtype())?;
        let gb = Tensor::new(sums[0].clone(), dev)?.to_dtype(w.dtype())?;
        if self.residual {
            // The residual's gradient is the (masked) incoming one.
            return Ok((Some(gx), Some(Tensor::stack(&[gw, gb], 0)?), Some(grad)));
        }
        Ok((Some(gx), Some(gw), Some(gb)))
    }
}

/// `(x, g) -> [2, C]`: per channel `Σ g` and `Σ g (x - mean)`.
struct GradSums {
    mean: Vec<f64>,
}

impl candle_core::CustomOp2 for GradSums {
    fn name(&self) -> &'static str {
        "kernels-batch-norm-grad-sums"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l1.shape().dims4()?;
        if l1.dims() != l2.dims() || self.mean.len() != c {
            bail!(
                "batch-norm backward: shapes {:?} and {:?} differ",
                l1.dims(),
                l2.dims()
            )
        }
        fn run<T: WithDType>(
            x: &[T],
            g: &[T],
            b: usize,
            c: usize,
            hw: usize,
            mean: &[f64],
        ) -> Vec<T> {
            let s = grad_sums(x, g, b, c, hw, mean);
            s.iter()
                .map(|p| T::from_f64(p.0))
                .chain(s.iter().map(|p| T::from_f64(p.1)))
                .collect()
        }
        dispatch!("batch-norm backward", (s1, l1, s2, l2), |x, g| (
            run(x, g, b, c, h * w, &self.mean),
            Shape::from((2, c))
        ))
    }
}

/// `(x, g, [3, C] coefficients a, k, d) -> a g + k x + d` per channel (d already holds `-k mean`).
struct LinearCombo;

impl CustomOp3 for LinearCombo {
    fn name(&self) -> &'static str {
        "kernels-batch-norm-input-grad"
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
        let (_, c, h, w) = l1.shape().dims4()?;
        if l1.dims() != l2.dims() || l3.dims() != [3, c] {
            bail!("batch-norm backward: unexpected shapes")
        }
        fn run<T: WithDType>(x: &[T], g: &[T], coef: &[T], c: usize, hw: usize) -> Vec<T> {
            par::fill_chunks(x.len(), hw, |i, o| {
                let ci = i % c;
                let (a, k, d) = (coef[ci], coef[c + ci], coef[2 * c + ci]);
                let (xp, gp) = (&x[i * hw..][..hw], &g[i * hw..][..hw]);
                for ((o, &xv), &gv) in o.iter_mut().zip(xp).zip(gp) {
                    o.write(a * gv + k * xv + d);
                }
            })
        }
        dispatch!(
            "batch-norm backward",
            (s1, l1, s2, l2, s3, l3),
            |x, g, coef| (run(x, g, coef, c, h * w), l1.shape().clone())
        )
    }
}

/// `(x, scale, shift) -> x * scale[c] + shift[c]`, differentiable in all three.
struct ChannelAffine;

impl CustomOp3 for ChannelAffine {
    fn name(&self) -> &'static str {
        "kernels-channel-affine"
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
        let (_, c, h, w) = l1.shape().dims4()?;
        if l2.dims() != [c] || l3.dims() != [c] {
            bail!(
                "channel affine: scale {:?} / shift {:?} do not match {c} channels",
                l2.dims(),
                l3.dims()
            )
        }
        dispatch!("channel affine", (s1, l1, s2, l2, s3, l3), |x, a, s| (
            affine(x, c, h * w, a, s, false, None),
            l1.shape().clone()
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        _shift: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let c = scale.dim(0)?;
        let zeros = Tensor::zeros(c, x.dtype(), x.device())?;
        let gx = grad.apply_op3_no_bwd(scale, &zeros, &ChannelAffine)?;
        let sums = x.apply_op2_no_bwd(&grad, &GradSums { mean: vec![0.0; c] })?;
        Ok((Some(gx), Some(sums.get(1)?), Some(sums.get(0)?)))
    }
}

fn fast_path(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// Result of [`batch_norm_train`]: the normalised tensor and the batch statistics (detached,
/// `[C]`) for updating running averages.
#[derive(Debug, Clone)]
pub struct BatchNormOutput {
    /// `(x - mean) / sqrt(var + eps) * weight + bias`.
    pub y: Tensor,
    /// Per-channel batch mean.
    pub mean: Tensor,
    /// Per-channel biased batch variance.
    pub var: Tensor,
    /// Values per channel the statistics are over (`B * H * W`, summed over the ranks when
    /// synchronised): the running variance's Bessel correction needs it.
    pub count: usize,
}

/// Training-mode batch norm of `x` (`[B, C, H, W]`) with the batch mean and biased variance,
/// differentiable in `x`, `weight` and `bias` (`[C]` each).
///
/// On the CPU with f32/f64 this is two passes forward and two backward; elsewhere candle's
/// broadcast operations compute the same thing.
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<BatchNormOutput> {
    batch_norm_train_synced(x, weight, bias, eps, None)
}

/// [`batch_norm_train`] with the statistics taken over the batches of every rank of a
/// data-parallel run (SyncBatchNorm) when `reducer` is given: forward, the global mean and
/// variance; backward, the input gradient from the global gradient sums, the weight and bias
/// gradients from this rank's (the gradient all-reduce adds the ranks' up). With the whole batch
/// on one rank this is exactly [`batch_norm_train`].
pub fn batch_norm_train_synced(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    reducer: Option<Arc<dyn SumReducer>>,
) -> Result<BatchNormOutput> {
    batch_norm_train_act(x, weight, bias, eps, reducer, false)
}

/// [`batch_norm_train_synced`] followed by a ReLU when `relu` (`y` is then `relu(bn(x))`, the
/// statistics those of `x`): on the CPU the ReLU happens in the normalising pass and its
/// backward in the batch norm's, which saves a pass each way and, in candle's autograd, the
/// gradient accumulation of one more tensor (a zero-filled buffer and an addition, serial).
pub fn batch_norm_train_act(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    reducer: Option<Arc<dyn SumReducer>>,
    relu: bool,
) -> Result<BatchNormOutput> {
    batch_norm_train_fused(x, weight, bias, eps, reducer, relu, None)
}

/// `relu(bn(x) + residual)` with [`batch_norm_train_synced`]'s batch statistics (of `x`): the end
/// of a residual block in training mode, in the batch norm's normalising pass forward and its
/// two passes backward. Against `add_relu(bn(x), residual)` this saves the addition's pass each
/// way and, in candle's autograd, the serial gradient accumulation of the batch norm's output.
pub fn batch_norm_train_add_relu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    reducer: Option<Arc<dyn SumReducer>>,
    residual: &Tensor,
) -> Result<BatchNormOutput> {
    if residual.dims() != x.dims() {
        bail!(
            "batch-norm + residual: the residual is {:?}, the input {:?}",
            residual.dims(),
            x.dims()
        )
    }
    batch_norm_train_fused(x, weight, bias, eps, reducer, true, Some(residual))
}

fn batch_norm_train_fused(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    reducer: Option<Arc<dyn SumReducer>>,
    relu: bool,
    residual: Option<&Tensor>,
) -> Result<BatchNormOutput> {
    let (b, c, h, w) = x.dims4()?;
    if weight.dims() != [c] || bias.dims() != [c] {
        bail!(
            "batch-norm: input {:?}, weight {:?}, bias {:?} do not fit",
            x.dims(),
            weight.dims(),
            bias.dims()
        )
    }
    let fast = fast_path(x) && residual.is_none_or(|r| r.dtype() == x.dtype());
    if !fast {
        if reducer.is_some() {
            bail!(
                "SyncBatchNorm runs on the CPU in f32 or f64 only; this input is {:?} on {:?}",
                x.dtype(),
                x.device().location()
            )
        }
        let mean = x.mean_keepdim((0, 2, 3))?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim((0, 2, 3))?;
        let y = xc
            .broadcast_div(&(&var + eps)?.sqrt()?)?
            .broadcast_mul(&weight.reshape((1, c, 1, 1))?)?
            .broadcast_add(&bias.reshape((1, c, 1, 1))?)?;
        let y = match residual {
            Some(r) => (y + r)?,
            None => y,
        };
        let y = if relu { y.relu()? } else { y };
        return Ok(BatchNormOutput {
            y,
            mean: mean.flatten_all()?.detach(),
            var: var.flatten_all()?.detach(),
            count: b * h * w,
        });
    }
    let stats = Arc::new(Mutex::new(Stats::default()));
    let op = BatchNormTrain {
        eps,
        relu,
        residual: residual.is_some(),
        stats: stats.clone(),
        reducer,
    };
    let y = match residual {
        Some(r) => {
            let wb = Tensor::stack(&[weight, bias], 0)?;
            x.contiguous()?.apply_op3(&wb, &r.contiguous()?, op)?
        }
        None => x
            .contiguous()?
            .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?,
    };
    let (mv, count) = {
        let st = stats
            .lock()
            .map_err(|_| candle_core::Error::Msg("batch-norm: poisoned lock".into()))?;
        (st.mean_var.clone(), st.count)
    };
    let dev = x.device();
    let mean = Tensor::new(mv.iter().map(|m| m.0).collect::<Vec<_>>(), dev)?.to_dtype(x.dtype())?;
    let var = Tensor::new(mv.iter().map(|m| m.1).collect::<Vec<_>>(), dev)?.to_dtype(x.dtype())?;
    Ok(BatchNormOutput {
        y,
        mean,
        var,
        count,
    })
}

/// `x * scale[c] + shift[c]` over `[B, C, H, W]` in one pass (batch norm in evaluation mode with
/// `scale = w / sqrt(running_var + eps)`, `shift = b - running_mean * scale`); differentiable in
/// all three.
pub fn channel_affine(x: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
    if !fast_path(x) {
        let c = scale.dim(0)?;
        return x
            .broadcast_mul(&scale.reshape((1, c, 1, 1))?)?
            .broadcast_add(&shift.reshape((1, c, 1, 1))?);
    }
    x.contiguous()?
        .apply_op3(&scale.contiguous()?, &shift.contiguous()?, ChannelAffine)
}

/// `relu(a + b)` (`relu(a)` without `b`) over same-shape tensors in one parallel pass.
struct AddRelu;

fn add_relu_run<T: WithDType>(a: &[T], b: Option<&[T]>) -> Vec<T> {
    const CHUNK: usize = 1 << 15;
    par::fill_chunks(a.len(), CHUNK, |i, yc| {
        let ac = &a[i * CHUNK..][..yc.len()];
        match b {
            Some(b) => {
                let bc = &b[i * CHUNK..][..yc.len()];
                for ((y, &a), &b) in yc.iter_mut().zip(ac).zip(bc) {
                    let v = a + b;
                    y.write(if v > T::zero() { v } else { T::zero() });
                }
            }
            None => {
                for (y, &a) in yc.iter_mut().zip(ac) {
                    y.write(if a > T::zero() { a } else { T::zero() });
                }
            }
        }
    })
}

impl candle_core::CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "kernels-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        crate::dtype::same_dims("add_relu", l1, l2)?;
        dispatch!("add_relu", (s1, l1, s2, l2), |a, b| (
            add_relu_run(a, Some(b)),
            l1.shape().clone()
        ))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad
            .contiguous()?
            .apply_op2_no_bwd(res, &crate::conv::ReluMask)?;
        Ok((Some(g.clone()), Some(g)))
    }
}

struct Relu;

impl candle_core::CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "kernels-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!("relu", (s, l), |a| (
            add_relu_run(a, None),
            l.shape().clone()
        ))
    }

    fn bwd(&self, _a: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            grad.contiguous()?
                .apply_op2_no_bwd(res, &crate::conv::ReluMask)?,
        ))
    }
}

/// `max(x, 0)`, differentiable, in one parallel pass each way (candle's `relu` is a serial
/// pass forward and three backward on the CPU). Off the CPU, candle's `relu`.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    if !fast_path(x) {
        return x.relu();
    }
    x.contiguous()?.apply_op1(Relu)
}

/// `relu(a + b)` for same-shape tensors (the end of a residual block), differentiable, in one
/// parallel pass each way. Off the CPU, candle's `(a + b).relu()`.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !fast_path(a) || a.dtype() != b.dtype() {
        return (a + b)?.relu();
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
}
