//! `../shared/reference/anchors.json`: every case, exactly.

use retinanet_anchors::{AnchorCache, AnchorConfig, gen_anchors};
use serde_json::Value;
use std::path::PathBuf;

fn reference(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/reference")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn rows(v: &Value) -> Vec<[f32; 4]> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let r = r.as_array().unwrap();
            [0, 1, 2, 3].map(|i| r[i].as_f64().unwrap() as f32)
        })
        .collect()
}

#[test]
fn reference_cases() {
    let cases = reference("anchors.json");
    let cases = cases["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for case in cases {
        let cfg = AnchorConfig {
            a_hw: case["a_hw"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| [p[0].as_f64().unwrap(), p[1].as_f64().unwrap()])
                .collect(),
            scales: case["scales"].as_u64().unwrap() as usize,
            first_stride: case["first_stride"].as_u64().unwrap() as usize,
            level_scales: None,
            style: Default::default(),
        };
        let size = (
            case["img_size"][0].as_u64().unwrap() as usize,
            case["img_size"][1].as_u64().unwrap() as usize,
        );
        let a = gen_anchors(&cfg, size);
        let (yxyx, yxhw) = (rows(&case["yxyx"]), rows(&case["yxhw"]));
        assert_eq!(a.len(), yxyx.len(), "anchor count for {size:?}");
        assert_eq!(cfg.num_anchors(size), yxyx.len());
        // Integers and f32-rounded reals: exact equality is expected.
        assert_eq!(a.yxyx, yxyx, "yxyx for {size:?}");
        assert_eq!(a.yxhw, yxhw, "yxhw for {size:?}");
        assert_eq!(a.level_ranges.last().unwrap().1, a.len());
    }
}

#[test]
fn tutorial_sizes_and_cache() {
    let cfg = AnchorConfig::default();
    assert_eq!(cfg.num_anchors((641, 641)), 26_412);
    assert_eq!(cfg.num_anchors((257, 257)), 4_452);
    assert_eq!(
        cfg.grid_sizes((100, 161)),
        vec![(13, 21), (7, 11), (4, 6), (2, 3)]
    );
    let cache = AnchorCache::new(cfg.clone());
    let a = cache.get((129, 200));
    let b = cache.get((129, 200));
    assert!(std::sync::Arc::ptr_eq(&a, &b));
    assert_eq!(*a, gen_anchors(&cfg, (129, 200)));
    assert_eq!(cache.len(), 1);
    // 2^n + 1 sizes put the last anchor of every level on the far border.
    let a = cache.get((129, 129));
    for (s, &(lo, hi)) in a.level_ranges.iter().enumerate() {
        assert_eq!(a.yxhw[lo][0], 0.0);
        assert_eq!(a.yxhw[hi - 1][0], 128.0, "level {s}");
    }
}

#[test]
fn invalid_configs_are_named() {
    let mut cfg = AnchorConfig::default();
    cfg.a_hw[1] = [f64::NAN, 3.0];
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("a_hw[1]"), "{e}");
    let cfg = AnchorConfig {
        first_stride: 0,
        ..AnchorConfig::default()
    };
    assert!(
        cfg.validate()
            .unwrap_err()
            .to_string()
            .contains("first_stride")
    );
    let cfg = AnchorConfig {
        a_hw: vec![],
        ..AnchorConfig::default()
    };
    assert!(cfg.validate().is_err());
}

#[test]
fn sizes_and_ratios_describe_the_same_layout() {
    // Doubling sizes and shapes: the tutorial's own layout (its a_hw are size 28 at ratios 1,
    // 1/2 and 2, rounded to 0.1 px).
    let c = AnchorConfig::from_sizes(&[28.0, 56.0, 112.0, 224.0], &[1.0, 0.5, 2.0], 1, 8).unwrap();
    assert_eq!(c.level_scales, None, "doubling sizes need no level scales");
    assert_eq!(c.scales, 4);
    let t = AnchorConfig::default();
    for (a, b) in c.a_hw.iter().zip(&t.a_hw) {
        assert!(
            (a[0] - b[0]).abs() < 0.01 && (a[1] - b[1]).abs() < 0.01,
            "{a:?} vs {b:?}"
        );
    }
    // Three octave steps per shape: 2^0, 2^(1/3), 2^(2/3), shape-major.
    let c = AnchorConfig::from_sizes(&[32.0, 64.0], &[0.5, 2.0], 3, 8).unwrap();
    assert_eq!(c.anchors_per_cell(), 6);
    let side = |hw: [f64; 2]| (hw[0] * hw[1]).sqrt();
    for (i, f) in [1.0, 2f64.powf(1.0 / 3.0), 2f64.powf(2.0 / 3.0)]
        .iter()
        .enumerate()
    {
        assert!((side(c.a_hw[i]) - 32.0 * f).abs() < 1e-9);
        assert!((c.a_hw[i][0] / c.a_hw[i][1] - 0.5).abs() < 1e-12);
        assert!((c.a_hw[3 + i][0] / c.a_hw[3 + i][1] - 2.0).abs() < 1e-12);
    }
    // Sizes that do not double: each level has its own.
    let c = AnchorConfig::from_sizes(&[10.0, 25.0, 40.0], &[1.0], 1, 4).unwrap();
    assert_eq!(c.level_scales, Some(vec![1.0, 2.5, 4.0]));
    let a = gen_anchors(&c, (33, 33));
    let (lo, _) = a.level_ranges[1];
    assert_eq!(a.yxhw[lo], [0.0, 0.0, 25.0, 25.0]);
    assert_eq!(a.yxhw[a.level_ranges[2].0], [0.0, 0.0, 40.0, 40.0]);
    assert_eq!(c.grid_sizes((33, 33)), vec![(9, 9), (5, 5), (3, 3)]);
    // Bad values are named.
    let e = AnchorConfig::from_sizes(&[10.0, -1.0], &[1.0], 1, 8).unwrap_err();
    assert!(e.to_string().contains("sizes[1] = -1"), "{e}");
    let e = AnchorConfig::from_sizes(&[10.0], &[0.0], 1, 8).unwrap_err();
    assert!(e.to_string().contains("aspect_ratios[0]"), "{e}");
    let e = AnchorConfig::from_sizes(&[10.0], &[1.0], 0, 8).unwrap_err();
    assert!(e.to_string().contains("scales_per_octave"), "{e}");
    let bad = AnchorConfig {
        level_scales: Some(vec![1.0]),
        ..AnchorConfig::default()
    };
    assert!(
        bad.validate()
            .unwrap_err()
            .to_string()
            .contains("level_scales has 1")
    );
}

#[test]
fn the_cache_keeps_the_most_recently_used_sizes() {
    let cache = AnchorCache::with_capacity(AnchorConfig::default(), 2);
    let a = cache.get((65, 65));
    cache.get((129, 129));
    // Using 65 again makes 129 the oldest: a third size evicts it, not 65.
    assert!(std::sync::Arc::ptr_eq(&a, &cache.get((65, 65))));
    cache.get((33, 33));
    assert_eq!(cache.len(), 2);
    assert!(std::sync::Arc::ptr_eq(&a, &cache.get((65, 65))));
    let b = cache.get((129, 129));
    assert_eq!(*b, gen_anchors(&AnchorConfig::default(), (129, 129)));
    assert_eq!(cache.len(), 2);
}
