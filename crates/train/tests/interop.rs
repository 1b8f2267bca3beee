//! Weights in and out: the tutorial's two PyTorch state dicts (a committed fixture made with
//! PyTorch, `scripts/make_interop_fixtures.py`) run here as they do in PyTorch; they convert to
//! a checkpoint of this project; a checkpoint exports to the tutorial's and torchvision's names
//! as `.pth` files that read back to the same model.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use retinanet_extractor::weights::read_tensors;
use retinanet_train::interop::{
    Naming, export, load_state_dict_pair, save_as_checkpoint, write_pth,
};
use retinanet_train::load_detector;
use retinanet_train::model::varmap_tensors;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/interop")
}

fn names() -> Vec<String> {
    ["rectangle", "ellipse", "triangle", "cross"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// Largest absolute difference relative to the largest value of `b`.
fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
    a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

fn infer(det: &retinanet_train::LoadedDetector, x: &Tensor) -> (Tensor, Tensor) {
    det.model.infer(x).unwrap()
}

#[test]
fn the_tutorials_pkl_pair_runs_as_in_pytorch() {
    let f = fixtures();
    let det = load_state_dict_pair(
        &f.join("net_e.pkl"),
        &f.join("net_d.pkl"),
        Some(names()),
        &Device::Cpu,
    )
    .unwrap();
    let m = &det.config.model;
    assert_eq!(
        (m.depth, m.base_width, m.fpn_channels, m.head_channels),
        (18, 8, 16, 16),
        "read from the tensors' shapes"
    );
    let io = read_tensors(&f.join("io.safetensors")).unwrap();
    let (cls, reg) = infer(&det, &io["x"]);
    assert!(
        rel(&cls, &io["cls"]) < 1e-4,
        "cls {}",
        rel(&cls, &io["cls"])
    );
    assert!(
        rel(&reg, &io["reg"]) < 1e-4,
        "reg {}",
        rel(&reg, &io["reg"])
    );
}

#[test]
fn a_pair_that_does_not_fit_is_refused_by_name() {
    let f = fixtures();
    let (e, d) = (f.join("net_e.pkl"), f.join("net_d.pkl"));
    let err =
        |r: anyhow::Result<retinanet_train::LoadedDetector>| format!("{:#}", r.err().unwrap());
    // Four classes and no names: they are needed.
    let m = err(load_state_dict_pair(&e, &d, None, &Device::Cpu));
    assert!(m.contains("4 classes") && m.contains("--names"), "{m}");
    let m = err(load_state_dict_pair(
        &e,
        &d,
        Some(vec!["a".into()]),
        &Device::Cpu,
    ));
    assert!(m.contains("1 names") && m.contains("4 classes"), "{m}");
    // The files swapped.
    let m = err(load_state_dict_pair(&d, &e, Some(names()), &Device::Cpu));
    assert!(m.contains("net_e.pkl") || m.contains("net_d.pkl"), "{m}");
    // A detector with a tensor too many, and one with a wrong shape.
    let dir = tempfile::tempdir().unwrap();
    let mut t: BTreeMap<String, Tensor> = read_tensors(&d).unwrap().into_iter().collect();
    t.insert(
        "extra.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let extra = dir.path().join("extra.pth");
    write_pth(&extra, &t).unwrap();
    let m = err(load_state_dict_pair(
        &e,
        &extra,
        Some(names()),
        &Device::Cpu,
    ));
    assert!(m.contains("extra.weight") && m.contains("extra.pth"), "{m}");
    t.remove("extra.weight");
    t.insert(
        "conv_4.bias".into(),
        Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap(),
    );
    let bad = dir.path().join("bad.pth");
    write_pth(&bad, &t).unwrap();
    let m = err(load_state_dict_pair(&e, &bad, Some(names()), &Device::Cpu));
    assert!(m.contains("conv_4.bias") && m.contains("bad.pth"), "{m}");
}

#[test]
fn convert_writes_a_checkpoint_every_command_reads() {
    let f = fixtures();
    let det = load_state_dict_pair(
        &f.join("net_e.pkl"),
        &f.join("net_d.pkl"),
        Some(names()),
        &Device::Cpu,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("model.safetensors");
    save_as_checkpoint(&det, &ck).unwrap();
    let back = load_detector(&ck, &Device::Cpu).unwrap();
    assert_eq!(back.class_names, names());
    let io = read_tensors(&f.join("io.safetensors")).unwrap();
    let (a, b) = (infer(&det, &io["x"]), infer(&back, &io["x"]));
    assert_eq!(rel(&a.0, &b.0), 0.0);
    assert_eq!(rel(&a.1, &b.1), 0.0);
}

#[test]
fn exports_read_back_to_the_same_model_under_both_namings() {
    let f = fixtures();
    let det = load_state_dict_pair(
        &f.join("net_e.pkl"),
        &f.join("net_d.pkl"),
        Some(names()),
        &Device::Cpu,
    )
    .unwrap();
    let io = read_tensors(&f.join("io.safetensors")).unwrap();
    let want = infer(&det, &io["x"]);
    let tensors = varmap_tensors(&det.varmap);
    let dir = tempfile::tempdir().unwrap();

    // The tutorial's names: the same keys as the tutorial's files (no `module.`, no `fc`:
    // a detector checkpoint has no classification head).
    let (e, d) = export(&tensors, Naming::Tutorial).unwrap();
    let original_e: Vec<String> = read_tensors(&f.join("net_e.pkl"))
        .unwrap()
        .into_keys()
        .map(|k| k.trim_start_matches("module.").to_string())
        .filter(|k| !k.starts_with("fc.") && !k.ends_with("num_batches_tracked"))
        .collect();
    let mut original_e = original_e;
    original_e.sort();
    assert_eq!(e.keys().cloned().collect::<Vec<_>>(), original_e);
    let mut original_d: Vec<String> = read_tensors(&f.join("net_d.pkl"))
        .unwrap()
        .into_keys()
        .collect();
    original_d.sort();
    assert_eq!(d.keys().cloned().collect::<Vec<_>>(), original_d);
    let (pe, pd) = (dir.path().join("net_e.pkl"), dir.path().join("net_d.pkl"));
    write_pth(&pe, &e).unwrap();
    write_pth(&pd, &d).unwrap();
    // What the .pth holds is what was written, tensor for tensor.
    let re: HashMap<String, Tensor> = read_tensors(&pe).unwrap();
    for (k, v) in &e {
        assert_eq!(rel(&re[k], v), 0.0, "{k}");
    }
    let again = load_state_dict_pair(&pe, &pd, Some(names()), &Device::Cpu).unwrap();
    let got = infer(&again, &io["x"]);
    assert_eq!((rel(&got.0, &want.0), rel(&got.1, &want.1)), (0.0, 0.0));

    // torchvision's names: a batch counter per BatchNorm (i64 scalars), layerS.I names.
    let (e, _) = export(&tensors, Naming::Torchvision).unwrap();
    let counters: Vec<&String> = e
        .keys()
        .filter(|k| k.ends_with("num_batches_tracked"))
        .collect();
    let bns = e.keys().filter(|k| k.ends_with("running_var")).count();
    assert_eq!(counters.len(), bns);
    assert!(bns > 0 && e.contains_key("layer4.1.conv2.weight") && e.contains_key("conv1.weight"));
    assert!(
        !e.keys()
            .any(|k| k.starts_with("fc.") || k.contains("resblock"))
    );
    let pv = dir.path().join("resnet.pth");
    write_pth(&pv, &e).unwrap();
    let rv = read_tensors(&pv).unwrap();
    assert_eq!(rv.len(), e.len());
    assert_eq!(rv["layer1.0.bn1.num_batches_tracked"].dtype(), DType::I64);
    let again = load_state_dict_pair(&pv, &pd, Some(names()), &Device::Cpu).unwrap();
    let got = infer(&again, &io["x"]);
    assert_eq!((rel(&got.0, &want.0), rel(&got.1, &want.1)), (0.0, 0.0));
}

#[test]
fn pth_files_hold_any_shape_and_size() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("odd.pth");
    let dev = Device::Cpu;
    let big = Tensor::arange(0f32, 70_000.0, &dev)
        .unwrap()
        .reshape((7, 10_000))
        .unwrap();
    let t: BTreeMap<String, Tensor> = [
        ("scalar".to_string(), Tensor::new(3.5f32, &dev).unwrap()),
        ("big".to_string(), big.clone()),
        (
            "empty".to_string(),
            Tensor::zeros((0, 3), DType::F32, &dev).unwrap(),
        ),
        (
            "f64".to_string(),
            Tensor::new(&[1.0f64, -2.0], &dev).unwrap(),
        ),
        ("count".to_string(), Tensor::new(1i64 << 40, &dev).unwrap()),
    ]
    .into();
    write_pth(&p, &t).unwrap();
    let back = read_tensors(&p).unwrap();
    assert_eq!(back.len(), 5);
    assert_eq!(back["big"].dims(), [7, 10_000]);
    assert_eq!(rel(&back["big"], &big), 0.0);
    assert_eq!(back["scalar"].to_scalar::<f32>().unwrap(), 3.5);
    assert_eq!(back["count"].to_scalar::<i64>().unwrap(), 1i64 << 40);
    assert_eq!(back["f64"].to_vec1::<f64>().unwrap(), vec![1.0, -2.0]);
    assert_eq!(back["empty"].dims(), [0, 3]);
}
