//! Every depth builds torchvision's layout: tensor counts, parameter counts and output shapes.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use retinanet_extractor::{Depth, ResNet, ResNetConfig, is_buffer};

#[test]
fn depths_match_torchvision_layouts() -> Result<()> {
    // torchvision's state dicts without `num_batches_tracked` (fc included), and the number of
    // trainable parameters without fc.
    let cases = [
        (Depth::R18, 102, 11_176_512),
        (Depth::R34, 182, 21_284_672),
        (Depth::R50, 267, 23_508_032),
        (Depth::R101, 522, 42_500_160),
    ];
    for (depth, tensors, params) in cases {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let cfg = ResNetConfig::new(depth, Some(1000));
        ResNet::new(vb, &cfg)?;
        let data = varmap.data().lock().unwrap();
        assert_eq!(data.len(), tensors, "{depth:?}");
        let n: usize = data
            .iter()
            .filter(|(k, _)| !is_buffer(k) && !k.starts_with("fc."))
            .map(|(_, v)| v.elem_count())
            .sum();
        assert_eq!(n, params, "{depth:?}");
    }
    Ok(())
}

#[test]
fn output_shapes_for_every_depth() -> Result<()> {
    let x = Tensor::randn(0f32, 1., (1, 3, 47, 33), &Device::Cpu)?;
    for depth in [Depth::R18, Depth::R34, Depth::R50, Depth::R101] {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let cfg = ResNetConfig {
            base_width: 4,
            ..ResNetConfig::new(depth, None)
        };
        let net = ResNet::new(vb, &cfg)?;
        let [c3, c4, c5] = net.out_channels();
        let e = if depth.bottleneck() { 4 } else { 1 };
        assert_eq!([c3, c4, c5], [8 * e, 16 * e, 32 * e]);
        let (o3, o4, o5) = net.forward_t(&x, false)?;
        // ceil(47 / t) x ceil(33 / t) for t = 8, 16, 32.
        assert_eq!(o3.dims(), &[1, c3, 6, 5]);
        assert_eq!(o4.dims(), &[1, c4, 3, 3]);
        assert_eq!(o5.dims(), &[1, c5, 2, 2]);
        assert!(net.classify_t(&x, false).is_err());
    }
    assert_eq!(ResNetConfig::resnet50().out_channels(), [512, 1024, 2048]);
    assert_eq!(ResNetConfig::resnet18().out_channels(), [128, 256, 512]);
    Ok(())
}
