//! Weights files that cannot be used are told apart (empty, truncated, PyTorch's legacy format,
//! not a weights file at all), and a ResNet of another depth or width is named as such.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use retinanet_extractor::weights::{
    WeightsError, load_resnet, read_tensors, resnet_layout, save_varmap,
};
use retinanet_extractor::{Depth, ResNet, ResNetConfig};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/r18h.pth")
}

/// A fresh folder for one test (the crate has no temp-dir dependency).
struct TempDir(PathBuf);
impl TempDir {
    fn new(name: &str) -> Self {
        let p =
            std::env::temp_dir().join(format!("retinanet-weights-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

fn cut_points(len: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (1..20).map(|k| len * k / 20).collect();
    v.extend([1, 4, 21, len - 22, len - 21, len - 2, len - 1]);
    v.sort();
    v.dedup();
    v
}

#[test]
fn an_empty_file_is_named_empty() {
    let d = TempDir::new("empty");
    for name in ["w.pth", "w.safetensors", "w.bin"] {
        let p = d.file(name, b"");
        let e = read_tensors(&p).unwrap_err();
        assert!(
            matches!(&e, WeightsError::Empty { path } if path == &p),
            "{e}"
        );
        assert!(
            e.to_string().contains(name) && e.to_string().contains("empty"),
            "{e}"
        );
    }
}

#[test]
fn every_truncated_pth_is_named_truncated() {
    let d = TempDir::new("trunc-pth");
    let full = std::fs::read(fixture()).unwrap();
    assert_eq!(read_tensors(&d.file("full.pth", &full)).unwrap().len(), 122);
    let mut cases = 0;
    for cut in cut_points(full.len()) {
        let p = d.file("cut.pth", &full[..cut]);
        let e = read_tensors(&p).unwrap_err();
        // 1 byte cannot be told from other files; every longer cut keeps the zip signature.
        if cut >= 4 {
            assert!(
                matches!(&e, WeightsError::Truncated { .. }),
                "cut at {cut} of {}: {e}",
                full.len()
            );
            assert!(
                e.to_string().contains("cut.pth") && e.to_string().contains("truncated"),
                "{e}"
            );
            cases += 1;
        } else {
            assert!(e.to_string().contains("cut.pth"), "{e}");
        }
    }
    assert!(cases >= 20);
}

#[test]
fn every_truncated_safetensors_is_named_truncated_and_content_decides_the_format() {
    let d = TempDir::new("trunc-st");
    let mut w = HashMap::new();
    w.insert(
        "a".to_string(),
        Tensor::ones((40, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    w.insert(
        "b".to_string(),
        Tensor::zeros(17, DType::F32, &Device::Cpu).unwrap(),
    );
    let p = d.0.join("w.safetensors");
    candle_core::safetensors::save(&w, &p).unwrap();
    let full = std::fs::read(&p).unwrap();
    let header = u64::from_le_bytes(full[..8].try_into().unwrap()) as usize;
    for cut in cut_points(full.len()).into_iter().filter(|&c| c > 8) {
        let p = d.file("cut.safetensors", &full[..cut]);
        let e = read_tensors(&p).unwrap_err();
        assert!(
            matches!(&e, WeightsError::Truncated { .. }),
            "cut at {cut} (header {header}): {e}"
        );
        assert!(e.to_string().contains("cut.safetensors"), "{e}");
    }
    // A safetensors file named .pth, and a torch zip named .safetensors, both load.
    assert_eq!(read_tensors(&d.file("st.pth", &full)).unwrap().len(), 2);
    let zip = std::fs::read(fixture()).unwrap();
    assert_eq!(
        read_tensors(&d.file("zip.safetensors", &zip))
            .unwrap()
            .len(),
        122
    );
}

/// The start of a pre-1.6 `torch.save` file: the pickled magic number, protocol version and
/// system info (pickle protocol 2).
fn legacy_header() -> Vec<u8> {
    let mut v = vec![
        0x80, 0x02, 0x8A, 0x0A, 0x6C, 0xFC, 0x9C, 0x46, 0xF9, 0x20, 0x6A, 0xA8,
    ];
    v.extend([
        0x50, 0x19, b'.', 0x80, 0x02, b'M', 0xE9, 0x03, b'.', 0x80, 0x02, b'}', b'q',
    ]);
    v.extend(std::iter::repeat_n(0x42, 300));
    v
}

#[test]
fn pytorchs_legacy_format_asks_for_a_re_save() {
    let d = TempDir::new("legacy");
    let mut tar = vec![0u8; 1024];
    tar[..7].copy_from_slice(b"storage");
    tar[257..262].copy_from_slice(b"ustar");
    for (name, bytes) in [("legacy.pth", legacy_header()), ("ancient.pth", tar)] {
        let p = d.file(name, &bytes);
        let e = read_tensors(&p).unwrap_err();
        assert!(
            matches!(&e, WeightsError::LegacyFormat { .. }),
            "{name}: {e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains(name)
                && msg.contains("legacy")
                && msg.contains("re-save it with a current torch.save"),
            "{msg}"
        );
    }
}

#[test]
fn files_that_are_not_weights_say_what_they_look_like() {
    let d = TempDir::new("not");
    let cases: [(&str, Vec<u8>, &str); 6] = [
        (
            "page.pth",
            b"<!DOCTYPE html><html><body>Not Found</body></html>".to_vec(),
            "HTML",
        ),
        (
            "lfs.pth",
            b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n".to_vec(),
            "Git LFS pointer",
        ),
        (
            "pickle.pth",
            vec![0x80, 0x04, 0x95, 0x10, 0, 0, 0, 0, 0, 0, 0, b'}', b'.'],
            "pickle without PyTorch's magic",
        ),
        ("notes.pth", b"just some notes\n".to_vec(), "it is text"),
        (
            "noise.bin",
            (0..200u32).map(|i| (i * 97 % 251) as u8).collect(),
            "starts with the bytes 00 61",
        ),
        ("short.pth", vec![7, 7, 7], "starts with the bytes 07 07 07"),
    ];
    for (name, bytes, want) in cases {
        let p = d.file(name, &bytes);
        let e = read_tensors(&p).unwrap_err();
        assert!(matches!(&e, WeightsError::NotWeights { .. }), "{name}: {e}");
        let msg = e.to_string();
        assert!(msg.contains(name) && msg.contains(want), "{name}: {msg}");
    }
}

fn resnet(depth: Depth, width: usize) -> VarMap {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let cfg = ResNetConfig {
        base_width: width,
        ..ResNetConfig::new(depth, Some(10))
    };
    ResNet::new(vb.pp("extractor"), &cfg).unwrap();
    varmap
}

fn save(varmap: &VarMap, dir: &Path, name: &str) -> PathBuf {
    // As a torchvision state dict: without the `extractor.` prefix.
    let data = varmap.data().lock().unwrap();
    let plain: HashMap<String, Tensor> = data
        .iter()
        .map(|(k, v)| {
            (
                k.strip_prefix("extractor.").unwrap().to_string(),
                v.as_tensor().clone(),
            )
        })
        .collect();
    let p = dir.join(name);
    candle_core::safetensors::save(&plain, &p).unwrap();
    p
}

#[test]
fn a_resnet_of_another_depth_or_width_is_named_by_its_depths() {
    let d = TempDir::new("depth");
    let all = [
        (Depth::R18, 18),
        (Depth::R34, 34),
        (Depth::R50, 50),
        (Depth::R101, 101),
    ];
    let files: Vec<(usize, PathBuf)> = all
        .iter()
        .map(|&(depth, n)| {
            (
                n,
                save(&resnet(depth, 8), &d.0, &format!("r{n}.safetensors")),
            )
        })
        .collect();
    for &(depth, model_n) in &all {
        for (file_n, path) in &files {
            let model = resnet(depth, 8);
            let r = load_resnet(&model, path, "extractor.", false);
            if *file_n == model_n {
                r.unwrap();
                continue;
            }
            let e = r.unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, WeightsError::Architecture { .. }), "{msg}");
            assert!(
                msg.contains(&format!("holds a ResNet-{file_n} ("))
                    && msg.contains(&format!("the model is a ResNet-{model_n} ("))
                    && msg.contains(&format!("r{file_n}.safetensors")),
                "{msg}"
            );
        }
    }
    // Same depth, another width: the widths are named.
    let wide = save(&resnet(Depth::R18, 16), &d.0, "wide.safetensors");
    let e = load_resnet(&resnet(Depth::R18, 8), &wide, "extractor.", false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("base width 16") && e.contains("base width 8"),
        "{e}"
    );
    // The same layout with another head is not an architecture problem: the tensor is named.
    let varmap = resnet(Depth::R18, 8);
    let other_head = VarMap::new();
    ResNet::new(
        VarBuilder::from_varmap(&other_head, DType::F32, &Device::Cpu).pp("extractor"),
        &ResNetConfig {
            base_width: 8,
            ..ResNetConfig::new(Depth::R18, Some(3))
        },
    )
    .unwrap();
    let p = save(&other_head, &d.0, "head.safetensors");
    let e = load_resnet(&varmap, &p, "extractor.", false).unwrap_err();
    assert!(
        matches!(&e, WeightsError::Shape { name, .. } if name == "extractor.fc.bias"),
        "{e}"
    );

    // The torchvision layouts, from names and shapes alone.
    let r50 = resnet(Depth::R50, 64);
    let data = r50.data().lock().unwrap();
    let layout = resnet_layout(data.iter().map(|(k, v)| (k.as_str(), v.dims()))).unwrap();
    assert_eq!((layout.depth(), layout.base_width), (Some(50), Some(64)));
    assert_eq!(
        layout.describe(),
        "ResNet-50 (bottleneck blocks [3, 4, 6, 3], base width 64)"
    );
}

#[test]
fn a_project_checkpoint_of_another_depth_is_named_too() {
    let d = TempDir::new("ckpt");
    let p = d.0.join("ck.safetensors");
    save_varmap(&resnet(Depth::R34, 8), &p).unwrap();
    let e = retinanet_extractor::weights::load_varmap(&resnet(Depth::R18, 8), &p)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("holds a ResNet-34") && e.contains("the model is a ResNet-18"),
        "{e}"
    );
}
