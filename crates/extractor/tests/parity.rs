//! Parity with PyTorch: a half-width ResNet-18 made by `scripts/make_fixtures.py` (tutorial
//! architecture, random weights, saved as a DataParallel `.pth` with torchvision names).

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use retinanet_extractor::weights::{WeightsError, load_resnet, read_tensors};
use retinanet_extractor::{Depth, ResNet, ResNetConfig};
use std::collections::HashMap;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn rel_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    assert_eq!(a.dims(), b.dims());
    let num = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64;
    let den = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64;
    Ok(num / den.max(1e-12))
}

fn cfg() -> ResNetConfig {
    ResNetConfig {
        base_width: 32,
        ..ResNetConfig::new(Depth::R18, Some(10))
    }
}

fn build() -> (VarMap, ResNet, HashMap<String, Tensor>) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let net = ResNet::new(vb.pp("extractor"), &cfg()).unwrap();
    load_resnet(&varmap, &fixtures().join("r18h.pth"), "extractor.", false).unwrap();
    let io = read_tensors(&fixtures().join("r18h_io.safetensors")).unwrap();
    (varmap, net, io)
}

#[test]
fn eval_outputs_match_pytorch() -> Result<()> {
    let (_vm, net, io) = build();
    let x = &io["input"];
    let (o3, o4, o5) = net.forward_t(x, false)?;
    for (name, t) in [("out3", &o3), ("out4", &o4), ("out5", &o5)] {
        let d = rel_diff(t, &io[&format!("eval.{name}")])?;
        assert!(d < 1e-4, "{name}: relative difference {d}");
    }
    let d = rel_diff(&net.classify_t(x, false)?, &io["eval.logits"])?;
    assert!(d < 1e-4, "logits: relative difference {d}");
    Ok(())
}

#[test]
fn train_forward_and_running_stats_match_pytorch() -> Result<()> {
    let (varmap, net, io) = build();
    let (o3, o4, o5) = net.forward_t(&io["input"], true)?;
    for (name, t) in [("out3", &o3), ("out4", &o4), ("out5", &o5)] {
        let d = rel_diff(t, &io[&format!("train.{name}")])?;
        assert!(d < 1e-4, "{name}: relative difference {d}");
    }
    let data = varmap.data().lock().unwrap();
    let mut n = 0;
    for (k, want) in io.iter().filter(|(k, _)| k.starts_with("after.")) {
        let name = format!("extractor.{}", &k["after.".len()..]);
        let got = data
            .get(&name)
            .unwrap_or_else(|| panic!("no variable {name}"));
        let d = rel_diff(got.as_tensor(), want)?;
        assert!(d < 1e-4, "{name}: relative difference {d}");
        n += 1;
    }
    assert_eq!(n, 2 * (1 + 8 * 2 + 3)); // stem, 8 blocks x 2 BNs, 3 projections
    Ok(())
}

#[test]
fn freeze_bn_uses_running_statistics_in_training() -> Result<()> {
    let (varmap, mut net, io) = build();
    net.set_freeze_bn(true);
    let before = varmap.data().lock().unwrap()["extractor.bn1.running_mean"]
        .as_tensor()
        .copy()?;
    let (_, _, o5) = net.forward_t(&io["input"], true)?;
    assert!(rel_diff(&o5, &io["eval.out5"])? < 1e-4);
    let after = varmap.data().lock().unwrap()["extractor.bn1.running_mean"]
        .as_tensor()
        .copy()?;
    assert_eq!(before.to_vec1::<f32>()?, after.to_vec1::<f32>()?);
    Ok(())
}

#[test]
fn strict_loading_names_the_offending_tensor() {
    let dir = std::env::temp_dir().join(format!("retinanet-extractor-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut weights = read_tensors(&fixtures().join("r18h.pth")).unwrap();
    let load = |w: &HashMap<String, Tensor>, name: &str| {
        let p = dir.join(name);
        candle_core::safetensors::save(w, &p).unwrap();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        ResNet::new(vb.pp("extractor"), &cfg()).unwrap();
        load_resnet(&varmap, &p, "extractor.", false)
    };
    // The safetensors copy of the .pth loads as well.
    load(&weights, "ok.safetensors").unwrap();

    let t = weights.remove("module.layer3.1.bn2.running_var").unwrap();
    let e = load(&weights, "missing.safetensors").unwrap_err();
    assert!(
        matches!(&e, WeightsError::Missing { name, .. } if name == "extractor.layer3.1.bn2.running_var"),
        "{e}"
    );
    assert!(e.to_string().contains("layer3.1.bn2.running_var"));

    weights.insert("module.layer3.1.bn2.running_var".into(), t.clone());
    weights.insert("module.layer9.0.conv1.weight".into(), t.clone());
    let e = load(&weights, "unexpected.safetensors").unwrap_err();
    assert!(
        matches!(&e, WeightsError::Unexpected { original, .. } if original == "module.layer9.0.conv1.weight"),
        "{e}"
    );

    weights.remove("module.layer9.0.conv1.weight");
    weights.insert(
        "module.fc.bias".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = load(&weights, "shape.safetensors").unwrap_err();
    assert!(
        matches!(&e, WeightsError::Shape { name, found, .. } if name == "extractor.fc.bias" && found == &[3]),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn wrapped_pth_checkpoints_are_read() {
    let want = read_tensors(&fixtures().join("wrapped_expected.safetensors")).unwrap();
    for (file, prefix) in [
        ("wrapped_state_dict.pth", ""),
        ("wrapped_model.pth", "module."),
    ] {
        let got = read_tensors(&fixtures().join(file)).unwrap();
        assert_eq!(got.len(), want.len(), "{file}");
        for (k, v) in &want {
            let g = &got[&format!("{prefix}{k}")];
            let d = (g - v)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap();
            assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "{file}: {k}");
        }
    }
    let e = read_tensors(&fixtures().join("no_such_file.pth")).unwrap_err();
    assert!(e.to_string().contains("no_such_file.pth"), "{e}");
}
