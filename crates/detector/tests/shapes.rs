//! Output sizes equal the anchors' count for any input size; initialisation as specified;
//! checkpoints round-trip.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use retinanet_anchors::AnchorConfig;
use retinanet_detector::{DetectorConfig, RetinaNet, RetinaNetConfig};
use retinanet_extractor::weights::{WeightsError, load_varmap, save_varmap};
use retinanet_extractor::{Depth, ResNetConfig};

fn small_cfg(classes: usize) -> RetinaNetConfig {
    let backbone = ResNetConfig {
        base_width: 8,
        ..ResNetConfig::new(Depth::R18, None)
    };
    let mut cfg = RetinaNetConfig::new(backbone, classes);
    cfg.detector.fpn_channels = 16;
    cfg.detector.head_channels = 8;
    cfg
}

#[test]
fn anchor_counts_match_gen_anchors() -> Result<()> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let model = RetinaNet::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &dev),
        &small_cfg(5),
    )?;
    let anchors = AnchorConfig::default();
    assert_eq!(anchors.num_anchors((257, 257)), 4452);
    for (h, w) in [
        (257, 257),
        (256, 256),
        (100, 37),
        (33, 47),
        (64, 96),
        (129, 65),
        (31, 31),
        (8, 9),
    ] {
        let x = Tensor::zeros((2, 3, h, w), DType::F32, &dev)?;
        let (cls, reg) = model.forward_t(&x, false)?;
        let n = anchors.num_anchors((h, w));
        assert_eq!(cls.dims(), &[2, n, 5], "{h}x{w}");
        assert_eq!(reg.dims(), &[2, n, 4], "{h}x{w}");
        if (h, w) == (257, 257) {
            assert_eq!(n, 3 * (33 * 33 + 17 * 17 + 9 * 9 + 5 * 5));
        }
    }
    Ok(())
}

#[test]
fn detector_initialisation_follows_the_tutorial() -> Result<()> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let cfg = RetinaNetConfig::new(ResNetConfig::resnet18(), 20);
    let _ = RetinaNet::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &cfg)?;
    let data = varmap.data().lock().unwrap();
    let mut n = 0;
    for (name, var) in data.iter().filter(|(k, _)| k.starts_with("detector.")) {
        let v = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        if name.ends_with(".bias") {
            let want = if name == "detector.conv_cls.6.bias" {
                -(99f32.ln())
            } else {
                0.0
            };
            assert!(v.iter().all(|&b| (b - want).abs() < 1e-6), "{name}");
        } else {
            let mean = v.iter().sum::<f32>() / v.len() as f32;
            let std =
                (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / v.len() as f32).sqrt();
            assert!(
                mean.abs() < 2e-3 && (std - 0.01).abs() < 1e-3,
                "{name}: mean {mean}, std {std}"
            );
        }
        n += 1;
    }
    assert_eq!(n, 2 * (6 + 8));
    assert_eq!(data["detector.conv_cls.6.weight"].dims(), &[60, 256, 3, 3]);
    assert_eq!(data["detector.prj_3.weight"].dims(), &[256, 128, 1, 1]);
    // Extractor: Kaiming normal fan-out (std sqrt(2 / (64 * 49)) for conv1), BN 1 / 0.
    let w = data["extractor.conv1.weight"]
        .as_tensor()
        .flatten_all()?
        .to_vec1::<f32>()?;
    let std = (w.iter().map(|x| x * x).sum::<f32>() / w.len() as f32).sqrt();
    let want = (2.0f32 / (64.0 * 49.0)).sqrt();
    assert!(
        (std - want).abs() < 0.1 * want,
        "conv1 std {std}, want {want}"
    );
    assert!(
        data["extractor.bn1.weight"]
            .as_tensor()
            .to_vec1::<f32>()?
            .iter()
            .all(|&v| v == 1.0)
    );
    assert!(
        data["extractor.bn1.running_var"]
            .as_tensor()
            .to_vec1::<f32>()?
            .iter()
            .all(|&v| v == 1.0)
    );
    Ok(())
}

#[test]
fn checkpoint_round_trip_and_strict_errors() -> Result<()> {
    let dev = Device::Cpu;
    let dir = std::env::temp_dir().join(format!("retinanet-detector-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("model.safetensors");
    let x = Tensor::randn(0f32, 1., (1, 3, 40, 33), &dev)?;

    let vm1 = VarMap::new();
    let m1 = RetinaNet::new(
        VarBuilder::from_varmap(&vm1, DType::F32, &dev),
        &small_cfg(3),
    )?;
    m1.forward_t(&x, true)?; // move the running statistics off their initial values
    save_varmap(&vm1, &path).unwrap();
    let (c1, r1) = m1.forward_t(&x, false)?;

    let vm2 = VarMap::new();
    let m2 = RetinaNet::new(
        VarBuilder::from_varmap(&vm2, DType::F32, &dev),
        &small_cfg(3),
    )?;
    let (c2, _) = m2.forward_t(&x, false)?;
    assert!(
        (&c1 - &c2)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?
            > 0.0
    );
    load_varmap(&vm2, &path).unwrap();
    let (c2, r2) = m2.forward_t(&x, false)?;
    assert_eq!(
        c1.flatten_all()?.to_vec1::<f32>()?,
        c2.flatten_all()?.to_vec1::<f32>()?
    );
    assert_eq!(
        r1.flatten_all()?.to_vec1::<f32>()?,
        r2.flatten_all()?.to_vec1::<f32>()?
    );

    // A model with more classes: the last cls conv has the wrong shape, and it is named.
    let vm3 = VarMap::new();
    RetinaNet::new(
        VarBuilder::from_varmap(&vm3, DType::F32, &dev),
        &small_cfg(4),
    )?;
    let e = load_varmap(&vm3, &path).unwrap_err();
    assert!(
        matches!(&e, WeightsError::Shape { name, .. } if name.starts_with("detector.conv_cls.6.")),
        "{e}"
    );

    // A model without the fc head given a file that has none: fine; one with a head: missing fc.
    let vm4 = VarMap::new();
    let mut cfg4 = small_cfg(3);
    cfg4.extractor.num_classes = Some(2);
    RetinaNet::new(VarBuilder::from_varmap(&vm4, DType::F32, &dev), &cfg4)?;
    let e = load_varmap(&vm4, &path).unwrap_err();
    assert!(
        matches!(&e, WeightsError::Missing { name, .. } if name.starts_with("extractor.fc.")),
        "{e}"
    );
    assert!(e.to_string().contains("extractor.fc."), "{e}");
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

#[test]
fn mismatched_channels_are_an_error() {
    let varmap = VarMap::new();
    let mut cfg = small_cfg(3);
    cfg.detector = DetectorConfig::new(3, [512, 1024, 2048]);
    let e = RetinaNet::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        &cfg,
    )
    .unwrap_err();
    assert!(e.to_string().contains("in_channels"), "{e}");
}

#[test]
fn infer_equals_eval_forward_without_tracking() -> Result<()> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let model = RetinaNet::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &dev),
        &small_cfg(3),
    )?;
    let x = Tensor::randn(0f32, 1., (1, 3, 50, 41), &dev)?;
    let (c1, r1) = model.forward_t(&x, false)?;
    let (c2, r2) = model.infer(&x)?;
    assert!(c1.track_op() && !c2.track_op() && !r2.track_op());
    // `infer` runs with BatchNorm folded into the convolutions: equal up to float rounding.
    for (a, b) in [(&c1, &c2), (&r1, &r2)] {
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let s = a.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(s > 0.0 && d <= 1e-5 * s, "infer differs by {d} (scale {s})");
    }
    // A copy for inference is folded once and gives the same as `infer`, bit for bit.
    let inf = model.for_inference()?;
    let (c4, _) = inf.infer(&x)?;
    assert_eq!(
        c4.flatten_all()?.to_vec1::<f32>()?,
        c2.flatten_all()?.to_vec1::<f32>()?
    );
    // The detached copy shares storage: an update to a variable shows in it.
    let frozen = model.detached();
    let var = varmap.data().lock().unwrap()["detector.conv_reg.6.bias"].clone();
    var.set(&(var.as_tensor() + 1.0)?)?;
    let (_, r3) = frozen.forward_t(&x, false)?;
    let shift = (r3 - &r2)?.mean_all()?.to_scalar::<f32>()?;
    assert!((shift - 1.0).abs() < 1e-5, "shift {shift}");
    Ok(())
}
