//! SGD with momentum and weight decay updating parameters and momentum buffers in place, in two
//! parallel passes — instead of the half-dozen whole-tensor candle operations (each allocating
//! a new tensor) of an update written with tensor arithmetic.

use candle_core::{
    CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor, WithDType, bail,
};
use rayon::prelude::*;

/// Hyper-parameters of one [`sgd_step`] (PyTorch's `torch.optim.SGD`, dampening 0, no Nesterov).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdStep {
    /// Learning rate.
    pub lr: f64,
    /// Momentum (0 for plain SGD).
    pub momentum: f64,
    /// L2 weight decay added to the gradient (`g + wd * p`).
    pub weight_decay: f64,
    /// Factor applied to the gradient first (gradient clipping); 1 for none.
    pub grad_scale: f64,
}

/// Elements per parallel task: large enough to amortise scheduling, small enough to balance.
const CHUNK: usize = 1 << 16;

/// `buf = momentum * buf + (scale * g + wd * p)`, in place on `buf`.
struct UpdateBuffer(SgdStep);

impl InplaceOp3 for UpdateBuffer {
    fn name(&self) -> &'static str {
        "kernels-sgd-buffer"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        fn run<T: WithDType>(b: &mut [T], g: &[T], p: &[T], s: SgdStep) {
            let (m, sc, wd) = (
                T::from_f64(s.momentum),
                T::from_f64(s.grad_scale),
                T::from_f64(s.weight_decay),
            );
            b.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK).zip(p.par_chunks(CHUNK)))
                .for_each(|(b, (g, p))| {
                    for ((b, &g), &p) in b.iter_mut().zip(g).zip(p) {
                        *b = m * *b + sc * g + wd * p;
                    }
                });
        }
        check(l1, &[l2, l3])?;
        crate::dispatch!(mut "sgd", (s1, l1, s2, l2, s3, l3), |buf, grad, param| run(
            buf, grad, param, self.0
        ))
    }
}

/// `p -= lr * d`, in place on `p`.
struct UpdateParam(f64);

impl InplaceOp2 for UpdateParam {
    fn name(&self) -> &'static str {
        "kernels-sgd-param"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        fn run<T: WithDType>(p: &mut [T], d: &[T], lr: f64) {
            let lr = T::from_f64(lr);
            p.par_chunks_mut(CHUNK)
                .zip(d.par_chunks(CHUNK))
                .for_each(|(p, d)| {
                    for (p, &d) in p.iter_mut().zip(d) {
                        *p -= lr * d;
                    }
                });
        }
        check(l1, &[l2])?;
        crate::dispatch!(mut "sgd", (s1, l1, s2, l2), |param, step| run(param, step, self.0))
    }
}

fn check(l: &Layout, others: &[&Layout]) -> Result<()> {
    for o in others {
        if o.dims() != l.dims() {
            bail!("sgd: shapes {:?} and {:?} differ", l.dims(), o.dims())
        }
    }
    Ok(())
}

/// Whether [`sgd_step`] can update `t` in place: a contiguous f32/f64 tensor on the CPU.
pub fn sgd_supported(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64) && t.is_contiguous()
}

/// One SGD update of `param` from `grad`, in place: `d = grad_scale * grad + weight_decay *
/// param`; with momentum, `buf = momentum * buf + d` and `d = buf`; then `param -= lr * d`.
///
/// `buf` (same shape; start it at zeros, which makes the first step `buf = d` as in PyTorch) is
/// required when `momentum != 0` and updated in place. `param` and `buf` must satisfy
/// [`sgd_supported`] (a `Var`'s tensor and a freshly made zeros tensor do); this is an error
/// otherwise, so callers keep a tensor-arithmetic path for other devices.
pub fn sgd_step(param: &Tensor, grad: &Tensor, buf: Option<&Tensor>, s: SgdStep) -> Result<()> {
    if !sgd_supported(param) {
        bail!("sgd_step: parameter must be a contiguous f32/f64 CPU tensor")
    }
    let grad = grad.contiguous()?;
    match buf {
        Some(b) if s.momentum != 0.0 => {
            if !sgd_supported(b) {
                bail!("sgd_step: momentum buffer must be a contiguous f32/f64 CPU tensor")
            }
            b.inplace_op3(&grad, param, &UpdateBuffer(s))?;
            param.inplace_op2(b, &UpdateParam(s.lr))
        }
        None if s.momentum != 0.0 => bail!("sgd_step: momentum {} needs a buffer", s.momentum),
        _ => {
            // No momentum: fold the gradient terms into the parameter update directly.
            if s.weight_decay == 0.0 {
                param.inplace_op2(&grad, &UpdateParam(s.lr * s.grad_scale))
            } else {
                let d = ((&grad * s.grad_scale)? + (param * s.weight_decay)?)?;
                param.inplace_op2(&d, &UpdateParam(s.lr))
            }
        }
    }
}
