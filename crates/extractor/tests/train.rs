//! Gradients flow where they should: frozen parts get none, the rest do, and SGD lowers a loss.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Optimizer, SGD, VarBuilder, VarMap};
use retinanet_extractor::{Depth, ResNet, ResNetConfig, is_buffer};

fn trainable(varmap: &VarMap) -> Vec<(String, candle_core::Var)> {
    let mut v: Vec<_> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .filter(|(k, _)| !is_buffer(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn frozen_stages_get_no_gradient() -> Result<()> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let cfg = ResNetConfig {
        base_width: 8,
        frozen_stages: 2,
        ..ResNetConfig::new(Depth::R50, None)
    };
    let net = ResNet::new(vb, &cfg)?;
    let x = Tensor::randn(0f32, 1., (2, 3, 64, 48), &dev)?;
    let (o3, o4, o5) = net.forward_t(&x, true)?;
    let loss = ((o3.sum_all()? + o4.sum_all()?)? + o5.sum_all()?)?;
    let grads = loss.backward()?;
    for (name, var) in trainable(&varmap) {
        let frozen =
            name.starts_with("conv1.") || name.starts_with("bn1.") || name.starts_with("layer1.");
        let g = grads.get(var.as_tensor());
        if frozen {
            assert!(g.is_none(), "{name} is frozen but has a gradient");
        } else {
            let g = g.unwrap_or_else(|| panic!("{name} has no gradient"));
            assert!(
                g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0,
                "{name}: zero gradient"
            );
        }
    }
    Ok(())
}

#[test]
fn sgd_on_the_classifier_lowers_the_loss() -> Result<()> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let cfg = ResNetConfig {
        base_width: 8,
        ..ResNetConfig::new(Depth::R18, Some(3))
    };
    let net = ResNet::new(vb, &cfg)?;
    let x = Tensor::randn(0f32, 1., (4, 3, 33, 33), &dev)?;
    let y = Tensor::new(&[0u32, 1, 2, 1], &dev)?;
    let vars: Vec<_> = trainable(&varmap).into_iter().map(|(_, v)| v).collect();
    let mut sgd = SGD::new(vars, 0.05)?;
    let mut losses = Vec::new();
    for _ in 0..8 {
        let logits = net.classify_t(&x, true)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        losses.push(loss.to_scalar::<f32>()?);
        sgd.backward_step(&loss)?;
    }
    assert!(losses[7] < 0.5 * losses[0], "losses {losses:?}");
    Ok(())
}
