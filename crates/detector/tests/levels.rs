//! Pyramids other than the tutorial's P3..P6 and other anchor counts per cell: the heads put out
//! exactly one row per anchor of the matching layout, level by level, for any input size; the
//! layers of unused levels are not built; impossible layouts are refused by name.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use retinanet_anchors::AnchorConfig;
use retinanet_detector::{DetectorConfig, RetinaNet, RetinaNetConfig};
use retinanet_extractor::{Depth, ResNetConfig};

fn cfg(first_level: usize, num_levels: usize, anchors: usize) -> RetinaNetConfig {
    let backbone = ResNetConfig {
        base_width: 8,
        ..ResNetConfig::new(Depth::R18, None)
    };
    let mut c = RetinaNetConfig::new(backbone, 3);
    c.detector.fpn_channels = 8;
    c.detector.head_channels = 8;
    c.detector.first_level = first_level;
    c.detector.num_levels = num_levels;
    c.detector.num_anchors = anchors;
    c
}

fn layout(first_level: usize, num_levels: usize, anchors: usize) -> AnchorConfig {
    AnchorConfig {
        a_hw: (0..anchors).map(|i| [10.0 + i as f64, 12.0]).collect(),
        scales: num_levels,
        first_stride: 1 << first_level,
        level_scales: None,
        style: Default::default(),
    }
}

#[test]
fn every_pyramid_lines_up_with_its_anchors() -> Result<()> {
    let dev = Device::Cpu;
    // Each first level with its shortest and longest pyramid, and anchor counts 1 to 9.
    let cases = [
        (2, 1, 1),
        (2, 6, 9),
        (2, 4, 3),
        (3, 4, 3),
        (3, 5, 6),
        (3, 1, 2),
        (4, 4, 9),
        (4, 2, 1),
        (5, 3, 4),
        (5, 1, 3),
    ];
    for (first, levels, na) in cases {
        let varmap = VarMap::new();
        let c = cfg(first, levels, na);
        let model = RetinaNet::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &c)?;
        let anchors = layout(first, levels, na);
        for (h, w) in [(65, 65), (50, 37), (97, 130)] {
            let x = Tensor::zeros((1, 3, h, w), DType::F32, &dev)?;
            let (cls, reg) = model.forward_t(&x, false)?;
            let n = anchors.num_anchors((h, w));
            let what = format!("P{first}+{levels} levels, {na} anchors, {h}x{w}");
            assert_eq!(cls.dims(), &[1, n, 3], "{what}");
            assert_eq!(reg.dims(), &[1, n, 4], "{what}");
            // Level by level: each map has its anchor grid's size.
            let f = model.extractor.features_t(&x, false)?;
            let maps = model
                .detector
                .pyramid_levels([&f[0], &f[1], &f[2], &f[3]])?;
            let sizes: Vec<(usize, usize)> =
                maps.iter().map(|m| (m.dims()[2], m.dims()[3])).collect();
            assert_eq!(sizes, anchors.grid_sizes((h, w)), "{what}");
        }
        // Layers exist for the levels in use only.
        let names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
        let has = |n: &str| {
            names
                .iter()
                .any(|k| k.starts_with(&format!("detector.{n}.")))
        };
        let last = first + levels - 1;
        assert_eq!(has("prj_2"), first == 2, "P{first}..P{last}");
        assert_eq!(has("conv_2"), first == 2);
        assert_eq!(has("prj_3"), first <= 3);
        assert_eq!(has("conv_3"), first <= 3 && last >= 3);
        assert_eq!(has("conv_out6"), last >= 6);
        assert_eq!(has("conv_out7"), last >= 7);
        let last_cls = varmap.data().lock().unwrap()["detector.conv_cls.6.weight"].dims()[0];
        assert_eq!(last_cls, na * 3);
    }
    Ok(())
}

#[test]
fn the_tutorial_pyramid_keeps_its_layers() {
    let varmap = VarMap::new();
    RetinaNet::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        &cfg(3, 4, 3),
    )
    .unwrap();
    let mut names: Vec<String> = varmap
        .data()
        .lock()
        .unwrap()
        .keys()
        .filter(|k| {
            k.starts_with("detector.") && !k.contains("conv_cls") && !k.contains("conv_reg")
        })
        .cloned()
        .collect();
    names.sort();
    let want: Vec<String> = ["conv_3", "conv_4", "conv_out6", "prj_3", "prj_4", "prj_5"]
        .iter()
        .flat_map(|n| [format!("detector.{n}.bias"), format!("detector.{n}.weight")])
        .collect();
    assert_eq!(names, want);
}

#[test]
fn impossible_pyramids_are_refused() {
    for (first, levels, want) in [(1, 3, "P1"), (6, 1, "P6"), (3, 6, "P8"), (3, 0, "P2")] {
        let varmap = VarMap::new();
        let e = RetinaNet::new(
            VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
            &cfg(first, levels, 3),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(want) && e.contains("P7"), "{e}");
    }
    assert_eq!(DetectorConfig::levels_for_stride(8, 4).unwrap(), (3, 4));
    assert_eq!(DetectorConfig::levels_for_stride(4, 6).unwrap(), (2, 6));
    let e = DetectorConfig::levels_for_stride(12, 4)
        .unwrap_err()
        .to_string();
    assert!(e.contains("12") && e.contains("4 (P2)"), "{e}");
    let e = DetectorConfig::levels_for_stride(8, 6)
        .unwrap_err()
        .to_string();
    assert!(e.contains("1 to 5 levels"), "{e}");
    // The P2-only reader refuses the three-map entry point.
    let varmap = VarMap::new();
    let m = RetinaNet::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        &cfg(2, 2, 1),
    )
    .unwrap();
    let x = Tensor::zeros((1, 8, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let e = m.detector.forward((&x, &x, &x)).unwrap_err().to_string();
    assert!(e.contains("out2"), "{e}");
}
