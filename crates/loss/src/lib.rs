//! The RetinaNet detection loss: sigmoid focal loss over classes plus smooth-L1 over the boxes
//! of positive anchors, normalised by the number of positives.
//!
//! With `p = sigmoid(logit)`, `pt = p` on the target class and `1 - p` elsewhere,
//! `w = alpha_t (1 - pt)^gamma` and `-ln(pt)` taken as binary cross-entropy with logits (stable
//! for any logit). Anchors whose target is `-1` are ignored; background (`0`) is all-negative.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use retinanet_loss::{FocalLossConfig, focal_loss_detection};
//!
//! let dev = Device::Cpu;
//! let cls = Tensor::new(&[[[2.0f32, -1.0], [-3.0, 0.5], [0.0, 0.0]]], &dev)?; // [B=1, A=3, C=2]
//! let reg = Tensor::zeros((1, 3, 4), candle_core::DType::F32, &dev)?;
//! let cls_t = Tensor::new(&[[1i64, 0, -1]], &dev)?; // class 1, background, ignored
//! let reg_t = Tensor::ones((1, 3, 4), candle_core::DType::F32, &dev)?;
//! let loss = focal_loss_detection(&cls, &reg, &cls_t, &reg_t, &FocalLossConfig::default())?;
//! assert_eq!(loss.num_positive, 1.0);
//! let total = loss.total.to_scalar::<f32>()?;
//! assert!((total - (loss.cls.to_scalar::<f32>()? + loss.reg.to_scalar::<f32>()?)).abs() < 1e-6);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{D, DType, Result, Tensor};

/// Weights of the loss. `Default` is the tutorial's: alpha 0.25, gamma 2, factors 1 and 1.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FocalLossConfig {
    /// Weight of the target class (`1 - alpha` for the others).
    pub alpha: f64,
    /// Focusing exponent.
    pub gamma: f64,
    /// Factor of the classification part.
    pub factor_cls: f64,
    /// Factor of the regression part.
    pub factor_reg: f64,
}

impl Default for FocalLossConfig {
    fn default() -> Self {
        Self {
            alpha: 0.25,
            gamma: 2.0,
            factor_cls: 1.0,
            factor_reg: 1.0,
        }
    }
}

/// The loss and its parts. All tensors are scalars in the graph of the inputs.
#[derive(Clone, Debug)]
pub struct FocalLoss {
    /// `(factor_cls * cls + factor_reg * reg) / max(1, positives)`: what to back-propagate.
    pub total: Tensor,
    /// The classification part, already divided by `max(1, positives)`, without its factor.
    pub cls: Tensor,
    /// The regression part, already divided by `max(1, positives)`, without its factor.
    pub reg: Tensor,
    /// Number of positive anchors in the batch.
    pub num_positive: f32,
}

fn check(name: &str, t: &Tensor, want: &[usize]) -> Result<()> {
    if t.dims() != want {
        candle_core::bail!(
            "focal_loss_detection: {name} has shape {:?}, expected {want:?}",
            t.dims()
        );
    }
    Ok(())
}

/// Focal loss of `cls_out [B, A, C]` logits and `reg_out [B, A, 4]` against the encoder's
/// `cls_t [B, A]` (any dtype; `-1` ignore, `0` background, `k` class `k`) and `reg_t [B, A, 4]`.
pub fn focal_loss_detection(
    cls_out: &Tensor,
    reg_out: &Tensor,
    cls_t: &Tensor,
    reg_t: &Tensor,
    cfg: &FocalLossConfig,
) -> Result<FocalLoss> {
    let (b, a, c) = cls_out.dims3().map_err(|_| {
        candle_core::Error::Msg(format!(
            "focal_loss_detection: class output has shape {:?}, expected [B, A, C]",
            cls_out.dims()
        ))
    })?;
    check("box output", reg_out, &[b, a, 4])?;
    check("class targets", cls_t, &[b, a])?;
    check("box targets", reg_t, &[b, a, 4])?;
    let dt = cls_out.dtype();
    let dev = cls_out.device();
    let t = cls_t.to_dtype(DType::F32)?;

    // Masks [B, A, 1]: kept (target > -1) and positive (target > 0).
    let keep = t.ge(0f64)?.to_dtype(dt)?.unsqueeze(D::Minus1)?;
    let pos = t.gt(0f64)?.to_dtype(dt)?.unsqueeze(D::Minus1)?;
    let num_positive = pos.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    let norm = num_positive.max(1.0) as f64;

    // One-hot over 1..=C; background and ignored rows are all zero.
    let classes = Tensor::arange(1f32, c as f32 + 1.0, dev)?.reshape((1, 1, c))?;
    let one_hot = t
        .unsqueeze(D::Minus1)?
        .broadcast_eq(&classes)?
        .to_dtype(dt)?;

    let x = cls_out;
    let p = sigmoid(x)?;
    let not_hot = one_hot.affine(-1.0, 1.0)?;
    let pt = ((&p * &one_hot)? + (p.affine(-1.0, 1.0)? * &not_hot)?)?;
    let alpha_t = one_hot.affine(2.0 * cfg.alpha - 1.0, 1.0 - cfg.alpha)?;
    let one_minus_pt = pt.affine(-1.0, 1.0)?;
    let focus = if cfg.gamma == 2.0 {
        one_minus_pt.sqr()?
    } else {
        // (1 - pt)^gamma, with 0^gamma = 0 kept finite in the gradient.
        one_minus_pt.clamp(1e-30, 1.0)?.powf(cfg.gamma)?
    };
    let w = (alpha_t * focus)?;
    // BCE with logits: max(x, 0) - x * y + ln(1 + exp(-|x|)).
    let ce = ((x.relu()? - (x * &one_hot)?)? + x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?)?;
    let loss_cls = (w * ce)?.broadcast_mul(&keep)?.sum_all()?;

    // Smooth-L1 (beta 1): 0.5 d^2 where |d| < 1, |d| - 0.5 elsewhere, chosen by a mask that
    // carries no gradient. The derivative is then d inside and sign(d) outside: 0 at d = 0
    // and +-1 on both sides of |d| = 1. (A clamp is `maximum` then `minimum`, whose ties split
    // the gradient: 0.5 where the output equals its target.)
    let d = (reg_out - reg_t)?;
    let ad = d.abs()?;
    let inside = ad.lt(1f64)?;
    let sl1 = inside.where_cond(&(d.sqr()? * 0.5)?, &(ad - 0.5)?)?;
    let loss_reg = sl1.broadcast_mul(&pos)?.sum_all()?;

    let cls_part = (loss_cls / norm)?;
    let reg_part = (loss_reg / norm)?;
    let total = ((&cls_part * cfg.factor_cls)? + (&reg_part * cfg.factor_reg)?)?;
    Ok(FocalLoss {
        total,
        cls: cls_part,
        reg: reg_part,
        num_positive,
    })
}

/// `1 / (1 + exp(-x))` from differentiable primitives, accurate and finite for any `x`:
/// `exp(-|x|)` never overflows.
fn sigmoid(x: &Tensor) -> Result<Tensor> {
    let e = x.abs()?.neg()?.exp()?; // exp(-|x|) in (0, 1]
    let inv = e.affine(1.0, 1.0)?.recip()?; // 1 / (1 + exp(-|x|)) = sigmoid(|x|)
    // sigmoid(x) = 1 / (1 + e) for x >= 0 and e / (1 + e) for x < 0: no cancellation either way.
    let nonneg = x.ge(0f64)?.to_dtype(x.dtype())?;
    let neg_branch = (&e * &inv)?;
    (&nonneg * &inv)? + (nonneg.affine(-1.0, 1.0)? * neg_branch)?
}
