//! A few SGD steps of extractor + detector on a tiny synthetic batch lower a detection-like loss.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Optimizer, SGD, VarBuilder, VarMap};
use retinanet_detector::{RetinaNet, RetinaNetConfig};
use retinanet_extractor::{Depth, ResNetConfig, is_buffer};

/// Like the focal loss' normalisation: summed sigmoid BCE over all logits plus squared error of
/// the positives' regression, divided by the number of positives.
fn objective(cls: &Tensor, reg: &Tensor, cls_t: &Tensor, reg_t: &Tensor) -> Result<Tensor> {
    // BCE with logits, stable form: max(x, 0) - x * t + ln(1 + exp(-|x|)).
    let bce = ((cls.relu()? - (cls * cls_t)?)? + (cls.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    let pos = cls_t.max_keepdim(2)?; // [B, A, 1]
    let npos = pos.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64;
    let sq = (reg - reg_t)?.sqr()?.broadcast_mul(&pos)?;
    (bce.sum_all()? + sq.sum_all()?)? / npos
}

fn run(h: usize, w: usize) -> Result<Vec<f32>> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let backbone = ResNetConfig {
        base_width: 8,
        ..ResNetConfig::new(Depth::R18, None)
    };
    let mut cfg = RetinaNetConfig::new(backbone, 2);
    cfg.detector.fpn_channels = 16;
    cfg.detector.head_channels = 16;
    let model = RetinaNet::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &cfg)?;
    let params: Vec<_> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .filter(|(k, _)| !is_buffer(k))
        .map(|(_, v)| v.clone())
        .collect();
    let n_params = params.len();
    let mut opt = SGD::new(params, 0.1)?;
    let x = Tensor::randn(0f32, 1., (2, 3, h, w), &dev)?;
    let (cls0, _) = model.forward_t(&x, false)?;
    let a = cls0.dim(1)?;
    let cls_t = Tensor::rand(0f32, 1., (2, a, 2), &dev)?
        .ge(0.97)?
        .to_dtype(DType::F32)?;
    let reg_t = Tensor::randn(0f32, 0.5, (2, a, 4), &dev)?;
    let mut losses = Vec::new();
    for step in 0..10 {
        let (cls, reg) = model.forward_t(&x, true)?;
        let loss = objective(&cls, &reg, &cls_t, &reg_t)?;
        losses.push(loss.to_scalar::<f32>()?);
        let grads = loss.backward()?;
        if step == 0 {
            // Every parameter, the stem included, gets a gradient.
            let with_grad = varmap
                .data()
                .lock()
                .unwrap()
                .iter()
                .filter(|(k, v)| !is_buffer(k) && grads.get(v.as_tensor()).is_some())
                .count();
            assert_eq!(with_grad, n_params);
        }
        opt.step(&grads)?;
    }
    Ok(losses)
}

/// Each step lowers the loss and ten steps lower it by more than 1% (observed 1.8-3.5%: random
/// targets at the tutorial's initialisation, whose tiny head weights make progress steady, not
/// fast).
fn assert_falls(losses: &[f32]) {
    assert!(losses.windows(2).all(|w| w[1] < w[0]), "losses {losses:?}");
    assert!(
        losses[losses.len() - 1] < 0.99 * losses[0],
        "losses {losses:?}"
    );
}

#[test]
fn loss_falls_square_input() -> Result<()> {
    let losses = run(65, 65)?;
    assert_falls(&losses);
    Ok(())
}

#[test]
fn loss_falls_non_square_even_input() -> Result<()> {
    // 64x42: even sides whose strided convs hit candle's conv2d backward limitation.
    let losses = run(64, 42)?;
    assert_falls(&losses);
    Ok(())
}
