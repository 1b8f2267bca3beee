//! 2-D batch normalisation with PyTorch's training semantics.

use std::sync::Arc;

use candle_core::{Result, Tensor, Var, bail};
use candle_nn::{Init, VarBuilder};
use retinanet_kernels::SumReducer;

/// `BatchNorm2d` as in PyTorch (`eps` 1e-5, `momentum` 0.1).
///
/// Training: normalises with the batch mean and the biased batch variance and updates the running
/// averages in place, the variance with Bessel's correction (`n / (n - 1)`), as PyTorch does.
/// Evaluation: uses the running statistics. The affine `weight`/`bias` are trainable; the running
/// statistics are variables of the [`candle_nn::VarMap`] (so checkpoints carry them) that are
/// never differentiated — see [`crate::is_buffer`].
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    momentum: f64,
    /// With a reducer, training statistics are over every rank's batch (SyncBatchNorm).
    sync: Option<Arc<dyn SumReducer>>,
}

impl BatchNorm2d {
    /// Builds the layer from `vb` (`weight` = 1, `bias` = 0, `running_mean` = 0,
    /// `running_var` = 1 when new).
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(channels, "bias", Init::Const(0.0))?;
        // A VarMap hands out the tensor of its own variable, so `from_tensor` shares its storage
        // and the in-place updates below land in the VarMap.
        let running_mean =
            Var::from_tensor(&vb.get_with_hints(channels, "running_mean", Init::Const(0.0))?)?;
        let running_var =
            Var::from_tensor(&vb.get_with_hints(channels, "running_var", Init::Const(1.0))?)?;
        Ok(Self {
            weight,
            bias,
            running_mean,
            running_var,
            eps: 1e-5,
            momentum: 0.1,
            sync: None,
        })
    }

    /// A copy whose affine parameters are detached (same storage, not tracked for backprop);
    /// the running statistics stay shared.
    pub fn detached(&self) -> Self {
        Self {
            weight: self.weight.detach(),
            bias: self.bias.detach(),
            ..self.clone()
        }
    }

    /// Takes training statistics over the batches of every rank of a data-parallel run
    /// (`Some`, PyTorch's SyncBatchNorm) or of this process only (`None`, the default).
    pub fn set_sync(&mut self, reducer: Option<Arc<dyn SumReducer>>) {
        self.sync = reducer;
    }

    /// Sets `eps` (PyTorch's default 1e-5; torchvision's COCO RetinaNet v1 weights expect 0).
    pub fn set_eps(&mut self, eps: f64) {
        self.eps = eps;
    }

    /// The running mean (a detached view).
    pub fn running_mean(&self) -> Tensor {
        self.running_mean.as_detached_tensor()
    }

    /// The running (unbiased) variance (a detached view).
    pub fn running_var(&self) -> Tensor {
        self.running_var.as_detached_tensor()
    }

    /// Applies the layer to `[B, C, H, W]`; `train` selects batch statistics (and updates the
    /// running averages) or running statistics.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_act(x, train, false)
    }

    /// [`BatchNorm2d::forward_t`], then a ReLU when `relu`; in training the ReLU runs inside
    /// the batch norm's passes (`retinanet_kernels::batch_norm_train_act`).
    pub fn forward_act(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        if train {
            return self.forward_train(x, relu, None);
        }
        self.check_input(x, false)?;
        let (scale, shift) = self.eval_affine()?;
        let y = retinanet_kernels::channel_affine(x, &scale, &shift)?;
        if relu {
            retinanet_kernels::relu(&y)
        } else {
            Ok(y)
        }
    }

    /// `relu(bn(x) + residual)`, the end of a residual block: in training mode one fused op
    /// (the addition and ReLU in the normalising pass; see
    /// [`retinanet_kernels::batch_norm_train_add_relu`]), in evaluation mode the per-channel
    /// affine map and a fused add + ReLU.
    pub fn forward_add_relu(&self, x: &Tensor, residual: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            return self.forward_train(x, true, Some(residual));
        }
        retinanet_kernels::add_relu(&self.forward_act(x, false, false)?, residual)
    }

    /// Training mode: batch statistics (retinanet-kernels: two passes forward and backward on
    /// the CPU, candle's broadcast ops elsewhere; they come back detached), the ReLU — and the
    /// residual's addition before it — inside the normalising pass, then the running averages.
    fn forward_train(&self, x: &Tensor, relu: bool, residual: Option<&Tensor>) -> Result<Tensor> {
        self.check_input(x, true)?;
        let (w, b, sync) = (&self.weight, &self.bias, self.sync.clone());
        let out = match residual {
            Some(r) => retinanet_kernels::batch_norm_train_add_relu(x, w, b, self.eps, sync, r)?,
            None => retinanet_kernels::batch_norm_train_act(x, w, b, self.eps, sync, relu)?,
        };
        self.update_running(&out)?;
        Ok(out.y)
    }

    /// `x` is `[B, C, H, W]` with this layer's channels and, for training on one process, more
    /// than one value per channel.
    fn check_input(&self, x: &Tensor, train: bool) -> Result<()> {
        let (b, c, h, w) = x.dims4()?;
        if c != self.weight.dim(0)? {
            bail!(
                "batch-norm: input has {c} channels, layer has {}",
                self.weight.dim(0)?
            )
        }
        if train && self.sync.is_none() && b * h * w < 2 {
            bail!("batch-norm: training needs more than one value per channel, got {b}x{h}x{w}")
        }
        Ok(())
    }

    /// The running statistics after a training-mode batch: Bessel's correction over the values
    /// the statistics are over (all ranks' when synchronised), as PyTorch's SyncBatchNorm.
    fn update_running(&self, out: &retinanet_kernels::BatchNormOutput) -> Result<()> {
        let n = out.count;
        let m = self.momentum;
        let new_mean = ((self.running_mean.as_detached_tensor() * (1.0 - m))?
            + (out.mean.flatten_all()? * m)?)?;
        let new_var = ((self.running_var.as_detached_tensor() * (1.0 - m))?
            + (out.var.flatten_all()? * (m * n as f64 / (n - 1) as f64))?)?;
        self.running_mean.set(&new_mean)?;
        self.running_var.set(&new_var)?;
        Ok(())
    }

    /// The evaluation-mode layer as per-channel `(scale, shift)`, `y = x * scale + shift`:
    /// `scale = w / sqrt(var + eps)`, `shift = b - mean * scale` (differentiable in `w`, `b`).
    pub fn eval_affine(&self) -> Result<(Tensor, Tensor)> {
        let inv_std = (self.running_var.as_detached_tensor() + self.eps)?
            .sqrt()?
            .recip()?;
        let scale = (&self.weight * inv_std)?;
        let shift = (&self.bias - (self.running_mean.as_detached_tensor() * &scale)?)?;
        Ok((scale, shift))
    }
}
