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
