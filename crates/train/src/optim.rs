//! SGD with momentum and weight decay, as PyTorch's `torch.optim.SGD` (dampening 0, no Nesterov):
//! `g = grad + wd * p`, `buf = momentum * buf + g` (`buf = g` on the first step), `p -= lr * buf`.
//! Also global-norm gradient clipping. candle-nn's SGD has neither momentum nor weight decay.

use std::collections::HashMap;

use anyhow::{Context, Result, bail};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

/// Prefix of momentum buffers in a checkpoint.
pub const MOMENTUM_PREFIX: &str = "optim.momentum.";

/// SGD over named variables.
pub struct Sgd {
    vars: Vec<(String, Var)>,
    momentum: f64,
    weight_decay: f64,
    buffers: HashMap<String, Tensor>,
}

impl Sgd {
    /// An optimizer over `vars` (name, variable); buffers (BN statistics) must not be among them.
    pub fn new(vars: Vec<(String, Var)>, momentum: f64, weight_decay: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&momentum) {
            bail!("momentum = {momentum} must lie in [0, 1)");
        }
        if !(weight_decay >= 0.0 && weight_decay.is_finite()) {
            bail!("weight_decay = {weight_decay} must be finite and >= 0");
        }
        Ok(Self {
            vars,
            momentum,
            weight_decay,
            buffers: HashMap::new(),
        })
    }

    /// The variables being trained.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Global L2 norm of the gradients.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        // Summed on the gradients' device, read back once: one device sync per step, not one
        // per variable (which would stall a GPU ~100 times a step).
        let mut sq: Option<Tensor> = None;
        for (_, v) in &self.vars {
            if let Some(g) = grads.get(v) {
                let s = g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?;
                sq = Some(match sq {
                    Some(acc) => (acc + s)?,
                    None => s,
                });
            }
        }
        Ok(match sq {
            Some(s) => s.to_scalar::<f64>()?.sqrt(),
            None => 0.0,
        })
    }

    /// One update at learning rate `lr`. With `clip = Some(c)`, gradients are scaled so their
    /// global norm is at most `c`. Returns the gradient norm before clipping (when computed).
    pub fn step(&mut self, grads: &GradStore, lr: f64, clip: Option<f64>) -> Result<Option<f64>> {
        let (scale, norm) = match clip {
            Some(c) => {
                let n = self.grad_norm(grads)?;
                (if n > c { c / (n + 1e-6) } else { 1.0 }, Some(n))
            }
            None => (1.0, None),
        };
        for (name, var) in &self.vars {
            // A variable outside this step's graph has no gradient: PyTorch skips it too.
            let Some(g) = grads.get(var) else { continue };
            let p = var.as_detached_tensor();
            if retinanet_kernels::sgd_supported(&p) {
                // In place, two parallel passes (retinanet-kernels); the buffer starts at zero,
                // which makes the first step `buf = d` as in PyTorch.
                let buf = if self.momentum != 0.0 {
                    let b = match self.buffers.get(name) {
                        Some(b) => b.clone(),
                        None => p.zeros_like()?,
                    };
                    self.buffers.insert(name.clone(), b.clone());
                    Some(b)
                } else {
                    None
                };
                let s = retinanet_kernels::SgdStep {
                    lr,
                    momentum: self.momentum,
                    weight_decay: self.weight_decay,
                    grad_scale: scale,
                };
                retinanet_kernels::sgd_step(&p, g, buf.as_ref(), s)
                    .with_context(|| format!("updating `{name}`"))?;
                continue;
            }
            // Other devices: the same update from tensor arithmetic. Detached: a momentum buffer
            // holding the gradient's graph would keep every past step's activations alive.
            let g = g.detach();
            let mut d = if scale != 1.0 { (g * scale)? } else { g };
            if self.weight_decay != 0.0 {
                d = (d + (&p * self.weight_decay)?)?;
            }
            if self.momentum != 0.0 {
                let buf = match self.buffers.get(name) {
                    Some(b) => ((b * self.momentum)? + d)?,
                    None => d,
                };
                d = buf.clone();
                self.buffers.insert(name.clone(), buf);
            }
            var.set(&(p - (d * lr)?)?)
                .with_context(|| format!("updating `{name}`"))?;
        }
        Ok(norm)
    }

    /// Momentum buffers, named `optim.momentum.<var>`, for a checkpoint.
    pub fn state(&self) -> HashMap<String, Tensor> {
        self.buffers
            .iter()
            .map(|(k, v)| (format!("{MOMENTUM_PREFIX}{k}"), v.clone()))
            .collect()
    }

    /// Restores momentum buffers from checkpoint tensors (other names are ignored); a buffer of
    /// an unknown variable or of the wrong shape is an error naming it.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let shapes: HashMap<&str, &Var> = self.vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
        self.buffers.clear();
        for (k, t) in tensors {
            let Some(name) = k.strip_prefix(MOMENTUM_PREFIX) else {
                continue;
            };
            let Some(v) = shapes.get(name) else {
                bail!(
                    "checkpoint has a momentum buffer for `{name}`, which the model does not train"
                );
            };
            if t.dims() != v.dims() {
                bail!(
                    "momentum buffer of `{name}` has shape {:?}, the variable {:?}",
                    t.dims(),
                    v.dims()
                );
            }
            // A private copy: buffers are updated in place.
            let t = t.to_device(v.device())?.to_dtype(v.dtype())?.copy()?;
            self.buffers.insert(name.to_string(), t);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Two steps of PyTorch's SGD (lr 0.1, momentum 0.9, wd 0.01) on loss = sum(w^2 * c),
    /// computed by hand: grad = 2 c w.
    #[test]
    fn matches_torch_sgd_by_hand() {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &dev).unwrap()).unwrap();
        let c = Tensor::new(&[3.0f32, 0.5], &dev).unwrap();
        let mut opt = Sgd::new(vec![("w".into(), w.clone())], 0.9, 0.01).unwrap();
        let (mut wv, mut buf) = ([1.0f64, -2.0], [0.0f64; 2]);
        let cv = [3.0f64, 0.5];
        for step in 0..3 {
            let loss = (w.as_tensor().sqr().unwrap() * &c)
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&grads, 0.1, None).unwrap();
            for i in 0..2 {
                let g = 2.0 * cv[i] * wv[i] + 0.01 * wv[i];
                buf[i] = if step == 0 { g } else { 0.9 * buf[i] + g };
                wv[i] -= 0.1 * buf[i];
            }
            let got: Vec<f32> = w.as_tensor().to_vec1().unwrap();
            for i in 0..2 {
                assert!(
                    (got[i] as f64 - wv[i]).abs() < 1e-5,
                    "step {step}: {got:?} vs {wv:?}"
                );
            }
        }
        // The state round-trips through a checkpoint map.
        let state = opt.state();
        assert!(state.contains_key("optim.momentum.w"));
        let mut opt2 = Sgd::new(vec![("w".into(), w.clone())], 0.9, 0.01).unwrap();
        opt2.load_state(&state).unwrap();
        assert_eq!(
            opt2.state()["optim.momentum.w"].to_vec1::<f32>().unwrap(),
            state["optim.momentum.w"].to_vec1::<f32>().unwrap()
        );
        let bad: HashMap<String, Tensor> = [(
            "optim.momentum.v".to_string(),
            Tensor::zeros(2, candle_core::DType::F32, &dev).unwrap(),
        )]
        .into();
        assert!(
            opt2.load_state(&bad)
                .unwrap_err()
                .to_string()
                .contains("`v`")
        );
    }

    #[test]
    fn clipping_bounds_the_update() {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::new(&[3.0f32, 4.0], &dev).unwrap()).unwrap();
        let mut opt = Sgd::new(vec![("w".into(), w.clone())], 0.0, 0.0).unwrap();
        // grad = w = (3, 4): norm 5, clipped to 1 -> update (0.6, 0.8) * lr.
        let loss = (w.as_tensor().sqr().unwrap() * 0.5)
            .unwrap()
            .sum_all()
            .unwrap();
        let n = opt
            .step(&loss.backward().unwrap(), 1.0, Some(1.0))
            .unwrap()
            .unwrap();
        assert!((n - 5.0).abs() < 1e-5);
        let got: Vec<f32> = w.as_tensor().to_vec1().unwrap();
        assert!(
            (got[0] - 2.4).abs() < 1e-5 && (got[1] - 3.2).abs() < 1e-5,
            "{got:?}"
        );
    }
}
